"""SynthSeg-style image generator: every sample is a new random brain scan drawn from the template's labels.

For each sample (all draws from one seeded generator, so a seed gives the same sequence):

1. **Geometry**: a random affine (rotation up to ``rotation_deg`` about each axis, per-axis scale, shear,
   translation) composed with a smooth random deformation (Gaussian displacements on a coarse control grid,
   upsampled trilinearly), a random left-right flip, evaluated directly on the output crop, so the random
   field of view (cropping) comes with it. It is one ``grid_sample`` (nearest for labels, linear for the
   distance map): on a CPU this is far cheaper than resampling a full-size volume with separate
   elastic and affine transforms.
2. **Head**: shells of random, spatially varying thickness around the brain (outer CSF and meninges, skull,
   scalp) and, beyond them, random blobs of other tissue (see :mod:`.data`).
3. **Contrast**: per generation class a mean and a standard deviation, either fully random (half of the
   samples, as SynthSeg) or a jittered T1, T2, FLAIR, PD or CT-like preset; Gaussian texture, blurred
   (MONAI ``RandGaussianSmooth``).
4. **Artefacts**: bias field (MONAI ``RandBiasField``), random resolution (blur with MONAI
   ``GaussianSmooth`` then down- and up-sampling: thick slices along one axis or isotropic low resolution),
   noise (MONAI ``RandGaussianNoise``), gamma (MONAI ``RandAdjustContrast``).
5. **Skull stripping** for ``skull_stripped_probability`` of the samples: everything outside the brain set
   to 0, as brain-extracted scans are.
6. Intensities clipped at 0 and mapped min..max onto 0..1, the ``unit`` normalisation the model card
   declares, so training sees what inference feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth

from DeepSegModuleLib.training.data import (
    CSF,
    GENERATION_CLASSES,
    OTHER_TISSUE,
    OUTER_CSF,
    SCALP,
    SKULL,
    TemplateLabels,
)

# Means of air, CSF, grey matter, white matter, outer CSF, skull, scalp, muscle-like and fat-like other
# tissue, on a 0..1 scale.
CONTRAST_PRESETS = {
    "T1": (0.02, 0.20, 0.50, 0.75, 0.18, 0.08, 0.85, 0.45, 0.90),
    "T2": (0.02, 0.95, 0.55, 0.40, 0.85, 0.08, 0.55, 0.30, 0.70),
    "FLAIR": (0.02, 0.10, 0.60, 0.45, 0.15, 0.06, 0.65, 0.40, 0.80),
    "PD": (0.02, 0.70, 0.70, 0.55, 0.65, 0.08, 0.75, 0.50, 0.80),
    "CT": (0.00, 0.26, 0.30, 0.28, 0.27, 0.85, 0.25, 0.30, 0.15),
}


@dataclass
class SynthSettings:
    """Ranges of the random draws (lengths in mm, angles in degrees)."""

    crop: tuple[int, int, int] = (64, 80, 64)
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.05
    translation_mm: float = 10.0
    deformation_mm: float = 3.0
    control_points: int = 5
    flip_probability: float = 0.5
    random_contrast_probability: float = 0.5
    skull_stripped_probability: float = 0.25
    no_head_probability: float = 0.05
    other_tissue_probability: float = 0.7
    other_tissue_mm: tuple[float, float] = (10.0, 70.0)
    bias_probability: float = 0.8
    low_resolution_probability: float = 0.5
    max_slice_mm: float = 7.0
    noise_probability: float = 0.8
    noise_std: float = 0.05
    gamma_probability: float = 0.5
    #: Share of heads painted in layers as real ones are: a thicker outer CSF / meninges layer, a skull whose
    #: middle is marrow (diploe) between inner and outer tables, a scalp of muscle under fat. 0 paints the plain
    #: three shells (the first stage of the default recipe).
    layered_head_probability: float = 0.0
    layered_outer_csf_mm: tuple[float, float] = (0.5, 6.0)
    #: Thickness range of the outer CSF / meninges shell of plain (not layered) heads.
    outer_csf_mm: tuple[float, float] = (0.5, 3.0)
    #: Share of samples whose outer CSF (between the brain and the skull) takes the CSF's intensity, as it does
    #: in a real scan (it is the same fluid), so that only the brain's surface tells brain from outer CSF. 0
    #: draws them independently with no extra random draw (the first stages of the default recipe).
    outer_csf_like_csf_probability: float = 0.0


class BrainSynth:
    """Draws (image, target) pairs from :class:`~DeepSegModuleLib.training.data.TemplateLabels`.

    Args:
        template: generation labels, distance-from-brain map and grid.
        settings: ranges of the random draws.
        seed: seeds numpy and the MONAI transforms; the same seed gives the same samples.
    """

    def __init__(self, template: TemplateLabels, settings: SynthSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or SynthSettings()
        self.spacing = template.spacing
        self.rng = np.random.default_rng(seed)
        source = np.stack([template.labels.astype(np.float32), template.outside_mm.astype(np.float32)])
        self.source = torch.from_numpy(source)[None]  # (1, 2, I, J, K)
        self.shape = np.array(template.labels.shape)
        brain = np.argwhere(template.labels > 0)
        self.brain_center = brain.mean(axis=0) if len(brain) else (self.shape - 1) / 2
        # Crops smaller than the brain are centred anywhere over most of it, so that its edges (what the
        # brain mask depends on) are in view as often as its middle.
        half_extent = (brain.max(axis=0) - brain.min(axis=0)) / 2 if len(brain) else np.zeros(3)
        self.center_range = np.maximum(half_extent - np.array(self.settings.crop) / 4, 0.0)
        crop = self.settings.crop
        offsets = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in crop), indexing="ij")
        self.offsets = torch.stack(offsets, dim=-1)  # (*crop, 3), voxels from the crop centre
        seeds = self.rng.integers(0, 2**31 - 1, size=4)
        self.texture_blur = RandGaussianSmooth((0.3, 1.0), (0.3, 1.0), (0.3, 1.0), prob=1.0)
        self.bias = RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=self.settings.bias_probability)
        self.noise = RandGaussianNoise(prob=self.settings.noise_probability, std=self.settings.noise_std)
        self.gamma = RandAdjustContrast(prob=self.settings.gamma_probability, gamma=(0.6, 1.6))
        for transform, transform_seed in zip((self.texture_blur, self.bias, self.noise, self.gamma), seeds):
            transform.set_random_state(seed=int(transform_seed))

    # -------------------------------------------------------------------------------------------- geometry

    def _affine(self) -> np.ndarray:
        s = self.settings
        angles = np.radians(self.rng.uniform(-s.rotation_deg, s.rotation_deg, size=3))
        rotation = np.eye(3)
        for axis, angle in enumerate(angles):
            c, n = np.cos(angle), np.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            step = np.eye(3)
            step[i, i], step[i, j], step[j, i], step[j, j] = c, -n, n, c
            rotation = rotation @ step
        shear = np.eye(3) + np.triu(self.rng.uniform(-s.shear, s.shear, size=(3, 3)), k=1)
        scale = np.diag(1.0 / self.rng.uniform(*s.scale, size=3))  # output -> source, so a zoom shrinks steps
        return rotation @ shear @ scale

    def _smooth_field(self, channels: int, std: float, points: int, size: tuple[int, int, int]) -> torch.Tensor:
        coarse = torch.from_numpy(self.rng.normal(0.0, std, size=(1, channels, points, points, points)))
        return F.interpolate(coarse.float(), size=size, mode="trilinear", align_corners=True)[0]

    def _sample_geometry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation labels and distance-from-brain (mm) on the randomly placed, deformed output crop."""
        s = self.settings
        center = self.brain_center + self.rng.uniform(-1, 1, size=3) * (
            self.center_range + s.translation_mm / self.spacing
        )
        affine = torch.from_numpy(self._affine()).float()
        points = self.offsets @ affine.T + torch.from_numpy(center).float()
        displacement = self._smooth_field(3, s.deformation_mm / self.spacing, s.control_points, tuple(s.crop))
        points = points + displacement.permute(1, 2, 3, 0)
        if self.rng.random() < s.flip_probability:
            points = torch.flip(points, dims=(0,))
        # grid_sample wants (x, y, z) = (last, middle, first) axis of the source, normalised to -1..1.
        normalised = 2.0 * points / torch.from_numpy(self.shape - 1).float() - 1.0
        grid = normalised.flip(-1)[None]
        labels = F.grid_sample(self.source[:, :1], grid, mode="nearest", padding_mode="zeros", align_corners=True)
        distance = F.grid_sample(self.source[:, 1:], grid, mode="bilinear", padding_mode="border", align_corners=True)
        return labels[0, 0].round().long(), distance[0, 0]

    def _paint_head(self, labels: torch.Tensor, distance_mm: torch.Tensor) -> torch.Tensor:
        if self.rng.random() < self.settings.no_head_probability:
            return labels
        size = tuple(labels.shape)
        variation = 1.0 + self._smooth_field(1, 0.25, 4, size)[0].clamp(-0.6, 0.6)
        # No draw at all when layering is off, so the plain recipe's random sequence stays as it was.
        layered = self.settings.layered_head_probability > 0 and self.rng.random() < self.settings.layered_head_probability
        outer = self.rng.uniform(*(self.settings.layered_outer_csf_mm if layered else self.settings.outer_csf_mm)) * variation
        skull = outer + self.rng.uniform(3.0, 9.0) * variation
        scalp = skull + self.rng.uniform(3.0, 12.0) * variation
        shell = torch.where(distance_mm <= skull, torch.where(distance_mm <= outer, OUTER_CSF, SKULL), SCALP)
        if layered:
            # Each layer takes one of the two "other tissue" classes, so its intensity is drawn independently.
            inner_table = outer + self.rng.uniform(0.2, 0.4) * (skull - outer)
            outer_table = skull - self.rng.uniform(0.2, 0.4) * (skull - outer)
            marrow = (distance_mm > inner_table) & (distance_mm < outer_table)
            shell = torch.where(marrow, OTHER_TISSUE[int(self.rng.integers(2))], shell)
            muscle = (distance_mm > skull) & (distance_mm <= skull + self.rng.uniform(0.3, 0.7) * (scalp - skull))
            shell = torch.where(muscle, OTHER_TISSUE[int(self.rng.integers(2))], shell)
        head = torch.where((labels == 0) & (distance_mm <= scalp), shell, labels)
        if self.rng.random() < self.settings.other_tissue_probability:
            reach = scalp + self.rng.uniform(*self.settings.other_tissue_mm) * variation
            texture = self._smooth_field(1, 1.0, int(self.rng.integers(4, 9)), size)[0]
            tissue = torch.where(texture > 0.0, OTHER_TISSUE[0], OTHER_TISSUE[1])
            tissue = torch.where(texture.abs() < 0.2, SCALP, tissue)
            head = torch.where((head == 0) & (distance_mm <= reach), tissue, head)
        return head

    # -------------------------------------------------------------------------------------------- contrast

    def _class_intensities(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rng.random() < self.settings.random_contrast_probability:
            means = self.rng.uniform(0.0, 1.0, size=GENERATION_CLASSES)
        else:
            preset = list(CONTRAST_PRESETS.values())[self.rng.integers(len(CONTRAST_PRESETS))]
            means = np.clip(np.array(preset) + self.rng.normal(0.0, 0.06, size=GENERATION_CLASSES), 0.0, 1.0)
        stds = self.rng.uniform(0.0, 0.06, size=GENERATION_CLASSES)
        tie = self.settings.outer_csf_like_csf_probability
        if tie > 0 and self.rng.random() < tie:
            means[OUTER_CSF] = np.clip(means[CSF] + self.rng.normal(0.0, 0.02), 0.0, 1.0)
            stds[OUTER_CSF] = stds[CSF]
        return means, stds

    def _low_resolution(self, image: torch.Tensor) -> torch.Tensor:
        """Simulates a coarser acquisition: blur to the new voxel size, sample on it, go back."""
        if self.rng.random() >= self.settings.low_resolution_probability:
            return image
        if self.rng.random() < 0.5:
            factors = np.ones(3)
            factors[self.rng.integers(3)] = self.rng.uniform(2.5, self.settings.max_slice_mm) / self.spacing
        else:
            factors = np.full(3, self.rng.uniform(2.0, 4.0) / self.spacing)
        factors = np.maximum(factors, 1.0)
        sigma = [float(0.42 * f) if f > 1.0 else 0.0 for f in factors]
        blurred = GaussianSmooth(sigma=sigma)(image)
        size = tuple(int(max(4, round(n / f))) for n, f in zip(image.shape[1:], factors))
        coarse = F.interpolate(blurred[None], size=size, mode="trilinear", align_corners=True)
        return F.interpolate(coarse, size=tuple(image.shape[1:]), mode="trilinear", align_corners=True)[0]

    # -------------------------------------------------------------------------------------------- sample

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One (image ``(1, *crop)`` float32 in 0..1, target ``(1, *crop)`` int64 in 0..3) pair."""
        labels, distance_mm = self._sample_geometry()
        labels = self._paint_head(labels, distance_mm)
        means, stds = self._class_intensities()
        means_t = torch.from_numpy(means).float()[labels]
        stds_t = torch.from_numpy(stds).float()[labels]
        image = (means_t + stds_t * torch.from_numpy(self.rng.standard_normal(labels.shape)).float())[None]
        image = torch.as_tensor(self.texture_blur(image)).clamp_min(0.0)
        image = torch.as_tensor(self.bias(image))
        image = self._low_resolution(image)
        image = torch.as_tensor(self.noise(image)).clamp_min(0.0)
        image = (image - image.min()) / torch.clamp(image.max() - image.min(), min=1e-6)
        image = torch.as_tensor(self.gamma(image))
        brain = (labels >= 1) & (labels <= 3)
        if self.rng.random() < self.settings.skull_stripped_probability:
            image = torch.where(brain[None], image, torch.zeros_like(image))
        image = (image - image.min()) / torch.clamp(image.max() - image.min(), min=1e-6)
        target = torch.where(brain, labels, torch.zeros_like(labels))
        return image.float().contiguous(), target[None].long()
