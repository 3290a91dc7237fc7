"""Registration parameters and the named presets a user picks from.

Every preset is a :class:`RegistrationConfig`; every field stays overridable
(``get_preset("deformable fast", regularization_weight=2.0)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("rigid", "affine", "deformable")
INITIAL_ALIGNMENTS = ("center_of_mass", "geometric_center", "none")
LINEAR_SIMILARITIES = ("ncc", "mi")
DEFORMABLE_SIMILARITIES = ("lncc", "mi", "mind")
REGULARIZATIONS = ("diffusion", "bending")


@dataclass(frozen=True)
class RegistrationConfig:
    """Everything that steers one registration run.

    Spacings are physical (mm) so that a preset means the same thing for a 1 mm brain and a 3 mm
    abdomen: a level never goes finer than the fixed image's own voxels along an axis.

    Attributes:
        stages: Stages to run, in order, any subset of ``("rigid", "affine", "deformable")``.
        initial_alignment: ``"center_of_mass"`` (intensity moments inside the masks),
            ``"geometric_center"`` (image centres) or ``"none"`` (trust the scanner coordinates
            or ``initial_fixed_to_moving_ras``).
        linear_similarity: ``"ncc"`` (global normalised cross-correlation, same modality) or
            ``"mi"`` (global mutual information, different modalities).
        linear_spacings_mm: Pyramid of the rigid and affine stages, coarse to fine.
        linear_iterations: Most iterations per linear level. The linear stages use resilient
            propagation (Rprop), and a level ends earlier once every parameter's step is below
            a small fraction of the level's voxel.
        linear_learning_rate: First step of each parameter on the first level (halved per level):
            radians for rotation, matrix entries for affine, and fractions of the fixed image's
            half extent for translation.
        linear_max_points: Fixed voxels sampled by the global measures, drawn once per level and
            shared by the rigid and affine stages; elastix's default is a few thousand, 20k fill a
            32 x 32 joint histogram well.
        deformable_similarity: ``"lncc"`` (local NCC, compared on the box around the fixed
            foreground), ``"mind"`` (squared difference of MIND-SSC descriptors on that box, for
            different modalities) or ``"mi"`` (global MI, MONAI).
        deformable_spacings_mm: Pyramid of the deformable stage, coarse to fine.
        deformable_iterations: Most Adam iterations per deformable level; a level settles and ends
            earlier once its loss stops improving.
        deformable_learning_rate_mm: Adam step of the velocity field, in mm.
        lncc_kernel_size: Window of the local NCC, in voxels of the level grid.
        mi_bins: Histogram bins of the mutual information.
        regularization: ``"diffusion"`` (first derivatives) or ``"bending"`` (second derivatives)
            of the velocity field.
        regularization_weight: Weight of the regulariser against the similarity.
        velocity_smoothing_vox: Gaussian sigma (level voxels) applied to the velocity before
            integration; a fluid-like smoother that keeps the field diffeomorphic at few iterations.
        velocity_grid_factor: The velocity field's control grid is this many times coarser than
            the level's image grid (1 = same grid; 2 = eight times fewer unknowns, same accuracy
            for smooth anatomy-scale deformations).
        integration_steps: Scaling-and-squaring steps of the stationary velocity field (for the
            result; while optimising, only as many as keep each scaled velocity under an eighth
            of a control-grid voxel).
        initializer: Optional TorchScript network (path or loaded module) mapping
            ``(fixed, moving)``, each ``(1, 1, D, H, W)`` in [0, 1] on the first deformable level grid,
            to a displacement ``(1, 3, D, H, W)`` in voxels, channels in (k, j, i) order (MONAI's
            ``Warp`` convention). It seeds the velocity field, which is then refined.
        initializer_input_shape: ``(D, H, W)`` the network needs; both images are resized to it.
        automatic_masks: When one image is empty outside an organ (a brain-extracted template: one
            constant value, usually zero, outside the brain) and the other shows clearly more (a head with
            skull and scalp), compare only inside the extracted image's signal, as a user would by
            giving it as a mask. Otherwise every similarity measure prefers stretching the
            extracted brain over the whole head. Only for an image the user gave no mask (a
            user's mask of the head's brain and the template's automatic mask work together); the
            quality report's ``notes`` say when it happened.
        folding_warning_percent: Folding above this (percent of voxels with det(J) <= 0 inside the
            quality mask) is flagged in the quality report and warned about.
        initial_pose_search: After the initial alignment, and when neither image has a mask (given or
            automatic) and the linear stages use cross-correlation, try a coarse grid of shifts (+-40 mm) and
            nods (+-20 degrees) on the coarsest level and start from the best if it correlates clearly better
            (two heads with different fields of view or poses; see ``initialization.search_initial_pose``).
        linear_foreground: Without a fixed mask, the linear stages compare the fixed image's foreground
            (intensities above 5 % of its range), not the air around it.
        seed: Seed of the point sampling, for reproducible runs.
    """

    stages: tuple[str, ...] = ("rigid", "affine", "deformable")
    initial_alignment: str = "center_of_mass"
    initial_pose_search: bool = True
    linear_foreground: bool = True
    linear_similarity: str = "ncc"
    linear_spacings_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    linear_iterations: tuple[int, ...] = (100, 50, 25)
    linear_learning_rate: float = 0.01
    linear_max_points: int = 20000
    deformable_similarity: str = "lncc"
    deformable_spacings_mm: tuple[float, ...] = (8.0, 4.0)
    deformable_iterations: tuple[int, ...] = (100, 60)
    deformable_learning_rate_mm: float = 0.5
    lncc_kernel_size: int = 5
    mi_bins: int = 32
    regularization: str = "diffusion"
    regularization_weight: float = 1.0
    velocity_smoothing_vox: float = 1.0
    velocity_grid_factor: float = 2.0
    integration_steps: int = 7
    initializer: str | Path | Any | None = field(default=None, compare=False)
    initializer_input_shape: tuple[int, int, int] | None = None
    automatic_masks: bool = True
    folding_warning_percent: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check that the fields make sense together.

        Raises:
            ValueError: With the offending field and the accepted values.
        """
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES} in that order, got {self.stages}")
        if list(self.stages) != sorted(self.stages, key=STAGES.index):
            raise ValueError(f"stages must run in the order {STAGES}, got {self.stages}")
        for name, value, allowed in (
            ("initial_alignment", self.initial_alignment, INITIAL_ALIGNMENTS),
            ("linear_similarity", self.linear_similarity, LINEAR_SIMILARITIES),
            ("deformable_similarity", self.deformable_similarity, DEFORMABLE_SIMILARITIES),
            ("regularization", self.regularization, REGULARIZATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for spacings, iterations, stage in (
            (self.linear_spacings_mm, self.linear_iterations, "linear"),
            (self.deformable_spacings_mm, self.deformable_iterations, "deformable"),
        ):
            if len(spacings) != len(iterations) or not spacings:
                raise ValueError(
                    f"{stage}_spacings_mm and {stage}_iterations need one entry per pyramid level, "
                    f"got {spacings} and {iterations}"
                )
            if any(s <= 0 for s in spacings) or any(n < 0 for n in iterations):
                raise ValueError(f"{stage} spacings must be > 0 mm and iterations >= 0")
        if self.velocity_grid_factor < 1:
            raise ValueError("velocity_grid_factor must be >= 1")
        if self.integration_steps < 1:
            raise ValueError("integration_steps must be >= 1")
        if self.lncc_kernel_size < 3 or self.lncc_kernel_size % 2 == 0:
            raise ValueError("lncc_kernel_size must be an odd number >= 3")


PRESETS: dict[str, RegistrationConfig] = {
    "rigid": RegistrationConfig(stages=("rigid",)),
    "affine": RegistrationConfig(stages=("rigid", "affine")),
    # The image similarity is evaluated at 4 mm and then 2 mm, the velocity on a control grid three
    # times coarser (12 and 6 mm): between two people's brains a 2 mm level lines up the structures
    # (tuning pairs: mean Dice 0.664 -> 0.703) and the coarser grid keeps it at about twice the time
    # of the 4 mm level alone (a 2 mm level on a 4 mm grid: 0.724 at five times). The linear stages stop
    # at 4 mm: the deformable stage corrects what a 2 mm linear level would refine. No 8 mm deformable
    # level: it shrank a brain-extracted template onto a head's brain. docs/registration.md ("Why the
    # presets are what they are") has the measurements.
    "deformable fast": RegistrationConfig(
        stages=("rigid", "affine", "deformable"),
        linear_spacings_mm=(8.0, 4.0),
        linear_iterations=(100, 50),
        deformable_spacings_mm=(4.0, 2.0),
        deformable_iterations=(100, 40),
        velocity_grid_factor=3.0,
    ),
    "deformable accurate": RegistrationConfig(
        stages=("rigid", "affine", "deformable"),
        linear_spacings_mm=(8.0, 4.0, 2.0, 1.0),
        linear_iterations=(150, 100, 50, 30),
        deformable_spacings_mm=(6.0, 3.0, 1.5),
        deformable_iterations=(150, 100, 60),
        deformable_learning_rate_mm=0.4,
    ),
    # Different modalities: global mutual information for the linear stages, MIND-SSC descriptors
    # (local structure, whatever the contrast) for the deformable one: against global MI for the
    # deformable stage, the same accuracy in half the time and less distortion of same-subject pairs
    # whose true motion is rigid (docs/registration.md has the measurements).
    "multimodal": RegistrationConfig(
        stages=("rigid", "affine", "deformable"),
        linear_similarity="mi",
        deformable_similarity="mind",
        deformable_spacings_mm=(6.0, 3.0),
        deformable_iterations=(100, 60),
        regularization_weight=0.5,
        velocity_smoothing_vox=1.5,
    ),
}


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> RegistrationConfig:
    """A named preset with some fields replaced.

    Args:
        name: One of :func:`preset_names` (case and ``_``/``-`` versus space do not matter).
        **overrides: Fields of :class:`RegistrationConfig` to replace.

    Returns:
        The configuration.

    Raises:
        ValueError: Unknown preset name or field.
    """
    key = name.strip().lower().replace("_", " ").replace("-", " ")
    if key not in PRESETS:
        raise ValueError(f"unknown registration preset {name!r}; choose one of {preset_names()}")
    return with_overrides(PRESETS[key], **overrides)


def with_overrides(config: RegistrationConfig, **overrides: Any) -> RegistrationConfig:
    """A copy of ``config`` with some fields replaced (validated).

    Raises:
        ValueError: Unknown field or invalid value.
    """
    valid = {f.name for f in dataclasses.fields(RegistrationConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown registration parameter(s) {unknown}; valid ones are {sorted(valid)}")
    return dataclasses.replace(config, **overrides)


def linear_preset_names() -> list[str]:
    """Presets whose result is a linear transform (no deformable stage); the others give a grid transform."""
    return [name for name, config in PRESETS.items() if "deformable" not in config.stages]


@dataclass
class RegistrationOptions:
    """What the user chooses for one registration run, as one object from the panel or the command line to the
    engine (it pickles; no torch).

    Attributes:
        preset: one of :func:`preset_names`, or a :class:`RegistrationConfig` of one's own.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        inverse: also compute the inverse transform (moving to fixed).
    """

    preset: str | RegistrationConfig = "deformable fast"
    device: str = "auto"
    inverse: bool = False

    def config(self) -> RegistrationConfig:
        """The preset's configuration.

        Raises:
            ValueError: an unknown preset name.
        """
        return self.preset if isinstance(self.preset, RegistrationConfig) else get_preset(self.preset)

    def replace(self, **changes: Any) -> RegistrationOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def linear(self) -> bool:
        """True when the result is a linear transform."""
        return "deformable" not in self.config().stages

    def checked(self) -> RegistrationOptions:
        """Returns self once the preset and the device are valid.

        Raises:
            ValueError: the first that is not, with the values it takes.
        """
        from DeepSegModuleLib.devices import check_device_name

        self.config()
        check_device_name(self.device)
        return self
