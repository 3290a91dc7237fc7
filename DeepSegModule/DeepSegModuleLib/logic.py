"""DeepSeg's GUI-free logic: nodes in, engine in the worker, nodes out, applied on the caller's thread.

``DeepSegLogic.segment(...)`` and ``DeepSegLogic.register(...)`` return when done (scripts, Jupyter, tests).
``start_segment(...)`` / ``start_register(...)`` return a :class:`Run` at once; the caller polls it from the main
thread (Slicer's module widget does so from a ``QTimer``) and the result is written into the scene by the poll
that sees the job finish, as one change. A failed or cancelled run leaves the scene as it was.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import nodes, segments, tasks
from .context import SceneContext
from .image_checks import check_finite
from .jobs import InProcessWorker, Job, JobEvent, JobState, ProcessWorker
from .labels import LabelInfo
from .models.store import ModelStore  # no torch: the store only copies files and checks sha256s
from .registration.presets import RegistrationOptions
from .registration.results import QualityReport, RegistrationOutputs
from .segmentation.options import SegmentationOptions
from .segmentation.results import SegmentationResult

logger = logging.getLogger(__name__)


@dataclass
class SegmentationOutcome:
    """What a finished segmentation put into the scene, and the engine's result it came from.

    Attributes:
        segmentation: the segmentation node (one segment per kept label).
        probabilities: label name -> probability volume node, when asked for.
        result: the engine's :class:`~DeepSegModuleLib.segmentation.results.SegmentationResult` (the label map with
            the model's own label values, its grid and label table, timings, memory, messages) for file writers.
    """

    segmentation: Any
    probabilities: dict[str, Any]
    result: SegmentationResult

    @property
    def report(self) -> dict[str, Any]:
        """Timings, peak memory, device and messages as plain values."""
        return self.result.report()


@dataclass
class RegistrationOutcome:
    """What a finished registration put into the scene, and the engine's outputs it came from.

    Attributes:
        transform: the resampling transform (fixed point -> moving point): linear, or a grid transform.
        volume: the moving volume resampled onto the fixed grid.
        inverse_transform: the moving -> fixed transform, when asked for.
        segmentation: the moving segmentation carried onto the fixed volume, when one was given.
        outputs: the engine's :class:`~DeepSegModuleLib.registration.results.RegistrationOutputs`.
        fixed_ijk_to_ras: the fixed grid (where ``outputs.propagated_labels`` lie).
        label_table: the moving segmentation's labels (values as in ``outputs.propagated_labels``).
    """

    transform: Any
    volume: Any
    outputs: RegistrationOutputs
    fixed_ijk_to_ras: np.ndarray
    inverse_transform: Any = None
    segmentation: Any = None
    label_table: list[LabelInfo] | None = None

    @property
    def quality(self) -> QualityReport:
        return self.outputs.quality


Outcome = SegmentationOutcome | RegistrationOutcome


class Run:
    """A run in progress: :meth:`poll` from the main thread until it returns True, or :meth:`wait`."""

    def __init__(self, job: Job, apply: Callable[[Any], Outcome], context: SceneContext,
                 on_event: Callable[[JobEvent], None] | None = None):
        self.job = job
        self._apply = apply
        self._context = context
        self._on_event = on_event
        self.outcome: Outcome | None = None
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None or self.error is not None

    @property
    def cancelled(self) -> bool:
        """True once the job ended because the user cancelled it."""
        return self.job.state == JobState.CANCELLED

    def cancel(self) -> None:
        self.job.cancel()

    def _forward_events(self) -> None:
        for event in self.job.poll():
            if self._on_event is not None:
                self._on_event(event)

    def poll(self) -> bool:
        """Forwards progress events; once the job has ended, applies its result. Returns True when finished."""
        self._forward_events()
        if self.finished or not self.job.finished:
            return self.finished
        self._forward_events()  # the last events arrive together with the job's end, after the drain above
        try:
            outputs = self.job.wait(0)
        except Exception as error:  # JobCancelled / JobFailed: nothing to apply
            self.error = str(error)
            return True
        self.outcome = _applied_as_one_change(self._context, lambda: self._apply(outputs))
        return True

    def wait(self, timeout: float | None = None) -> Outcome:
        """Blocks until the job ends, applies its result, and returns the :class:`Outcome`.

        Raises:
            JobCancelled, JobFailed: the run did not finish; the scene is unchanged.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.job.finished:  # forward progress while waiting, so scripts can show a live bar
            self._forward_events()
            if deadline is not None and time.monotonic() > deadline:
                break
            self.job.wait_until_finished(0.1)
        outputs = self.job.wait(0 if deadline is not None else None)
        self._forward_events()
        if self.outcome is None:
            self.outcome = _applied_as_one_change(self._context, lambda: self._apply(outputs))
        return self.outcome


def _applied_as_one_change(context: SceneContext, apply: Callable[[], Outcome]) -> Outcome:
    """Runs ``apply`` in one scene batch; on error removes the nodes it added, then re-raises."""
    scene = context.scene
    before = set(context.node_ids())
    scene.StartState(scene.BatchProcessState)
    try:
        return apply()
    except BaseException:
        for node_id in context.node_ids():
            if node_id not in before:
                node = scene.GetNodeByID(node_id)
                if node is not None:
                    scene.RemoveNode(node)
        raise
    finally:
        scene.EndState(scene.BatchProcessState)


class DeepSegLogic:
    """Segmentation and registration on a scene context.

    Args:
        context: the scene and module logics (:meth:`SceneContext.headless` or ``from_application``).
        worker: where engines run; a persistent :class:`ProcessWorker` by default (started on first use).
    """

    def __init__(
        self,
        context: SceneContext,
        worker: ProcessWorker | InProcessWorker | None = None,
        model_store_root: str | os.PathLike | None = None,
    ):
        self.context = context
        self._worker = worker
        #: Where :meth:`resolve_model` looks up model names; the store's default folder when None.
        self.model_store_root = model_store_root
        self._verified_models: dict[str, tuple] = {}

    @property
    def worker(self) -> ProcessWorker | InProcessWorker:
        if self._worker is None:
            self._worker = ProcessWorker()
        return self._worker

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ------------------------------------------------------------------------------------ models

    def stored_model_ids(self) -> list[str]:
        """Names of the models in the local model store (see :func:`stored_model_ids`)."""
        return stored_model_ids(self.model_store_root)

    def resolve_model(self, model: str | os.PathLike) -> str:
        """A model argument as a path for the worker (see :func:`~DeepSegModuleLib.models.store.resolve_model`); a
        stored model is re-hashed only when one of its files changed since this logic last checked it.

        Raises:
            ChecksumError: a stored model's file was damaged or changed since it was imported.
            ModelFileError: no such model, or an ambiguous name.
        """
        from .models.store import resolve_model

        return str(resolve_model(model, ModelStore(self.model_store_root), self._verified_models))

    def trusted_in_store(self, model: str | os.PathLike) -> bool:
        """Whether ``model`` names a stored model whose own code the user has trusted (a recorded decision)."""
        from .models.store import recorded_trust

        return recorded_trust(str(model), ModelStore(self.model_store_root))

    def import_model(self, source: str | os.PathLike, model_id: str | None = None, replace: bool = False) -> str:
        """Copies a model folder, ``.zip`` or TorchScript file (with its card) into the store; returns its name."""
        return ModelStore(self.model_store_root).import_model(source, model_id=model_id, replace=replace).model_id

    # ------------------------------------------------------------------------------------ segmentation

    def start_segment(
        self,
        input_volumes: Any | Sequence[Any],
        model: str | None = None,
        options: SegmentationOptions | None = None,
        *,
        output_segmentation: Any = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> Run:
        """Starts segmenting ``input_volumes`` (one volume node per model input) with ``model`` (a path, or the name
        of a model in the local model store; None: the default model that ships with DeepSeg) and ``options``
        (passed to the engine unchanged; a stored model the user trusted runs with ``trust_code``).

        Raises:
            ValueError: an unusable input or option; ChecksumError: a stored model was changed. Nothing is started.
        """
        if model is None:
            from .models.store import DEFAULT_MODEL_ID

            model = DEFAULT_MODEL_ID
        options = (options or SegmentationOptions()).checked()
        volumes = list(input_volumes) if isinstance(input_volumes, (list, tuple)) else [input_volumes]
        if not volumes or any(volume is None for volume in volumes):
            raise ValueError("choose an input volume")
        if not options.trust_code and self.trusted_in_store(model):
            options = options.replace(trust_code=True)
        model = self.resolve_model(model)
        arrays, grids = [], []
        for volume in volumes:
            array, grid = nodes.volume_to_array(volume)
            check_finite(array, f"input volume '{volume.GetName()}'")
            arrays.append(array)
            grids.append(grid)
        if output_segmentation is not None and not output_segmentation.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("the output must be a segmentation node (or None to create one)")
        job = self.worker.submit(
            tasks.SEGMENT,
            {f"image{index}": array for index, array in enumerate(arrays)},
            {"model": str(model), "ijk_to_ras": grids, "options": options},
        )
        reference = volumes[0]

        def apply(result: SegmentationResult) -> SegmentationOutcome:
            segmentation = segments.labels_to_segmentation(
                self.context,
                result.labels,
                result.label_table,
                reference_volume=reference,
                segmentation_node=output_segmentation,
                name=f"{reference.GetName()} segmentation",
                include_empty=True,
            )
            _place_under_same_transform(segmentation, reference)
            by_value = {info.value: info.name for info in result.label_table}
            probabilities = {}
            for value, probability in result.probabilities.items():
                name = by_value.get(value, str(value))
                probabilities[name] = nodes.probability_to_volume(
                    self.context, probability, result.ijk_to_ras, name=f"{reference.GetName()} p({name})"
                )
            return SegmentationOutcome(segmentation, probabilities, result)

        return Run(job, apply, self.context, on_event)

    def segment(
        self,
        input_volumes: Any | Sequence[Any],
        model: str | None = None,
        options: SegmentationOptions | None = None,
        timeout: float | None = None,
        **where: Any,
    ) -> SegmentationOutcome:
        """Segments and returns when the segmentation is in the scene (see :meth:`start_segment`)."""
        return self.start_segment(input_volumes, model, options, **where).wait(timeout)

    # ------------------------------------------------------------------------------------ registration

    def start_register(
        self,
        fixed_volume: Any,
        moving_volume: Any,
        options: RegistrationOptions | None = None,
        *,
        fixed_mask: Any = None,
        moving_mask: Any = None,
        moving_segmentation: Any = None,
        output_transform: Any = None,
        output_volume: Any = None,
        output_segmentation: Any = None,
        on_event: Callable[[JobEvent], None] | None = None,
        fixed_segmentation: Any = None,
    ) -> Run:
        """Starts registering ``moving_volume`` to ``fixed_volume`` with ``options`` (preset, device, inverse).

        The result is a transform node holding the resampling transform (fixed point -> moving point): linear for
        "rigid"/"affine", a grid transform (linear and deformable parts combined) otherwise. Put the moving volume
        under it to see it aligned with the fixed one. Optionally: the moving segmentation propagated onto the fixed
        volume, and the inverse transform. With ``fixed_segmentation`` too (the same structures drawn on the fixed
        volume), the quality report gives the Dice of every structure the two share by name; structures the
        reference lacks are not scored.
        """
        options = (options or RegistrationOptions()).checked()
        fixed, fixed_grid = nodes.volume_to_array(fixed_volume, world=True)
        moving, moving_grid = nodes.volume_to_array(moving_volume, world=True)
        check_finite(fixed, f"fixed volume '{fixed_volume.GetName()}'")
        check_finite(moving, f"moving volume '{moving_volume.GetName()}'")
        inputs: dict[str, Any] = {"fixed": fixed, "moving": moving}
        if fixed_mask is not None:
            inputs["fixed_mask"] = _mask_on(self.context, fixed_mask, fixed_volume)
        if moving_mask is not None:
            inputs["moving_mask"] = _mask_on(self.context, moving_mask, moving_volume)
        label_table = None
        if moving_segmentation is not None:
            inputs["moving_labels"], label_table = _labels_on(self.context, moving_segmentation, moving_volume)
        if fixed_segmentation is not None:
            if label_table is None:
                raise ValueError("a reference segmentation on the fixed volume is compared with the moving "
                                 "segmentation carried onto it: give the moving segmentation too")  # fmt: skip
            inputs["fixed_labels"] = _labels_by_name(self.context, fixed_segmentation, fixed_volume, label_table)
        params = {"fixed_ijk_to_ras": fixed_grid, "moving_ijk_to_ras": moving_grid, "options": options}
        job = self.worker.submit(tasks.REGISTER, inputs, params)
        moving_name, fixed_name = moving_volume.GetName(), fixed_volume.GetName()

        def apply(outputs: RegistrationOutputs) -> RegistrationOutcome:
            outcome = RegistrationOutcome(
                transform=self._transform_node(
                    outputs.total_displacement_ras, outputs.fixed_to_moving_ras, fixed_grid,
                    f"{moving_name} to {fixed_name}", output_transform,
                ),
                volume=nodes.array_to_volume(
                    self.context, outputs.resampled_moving, fixed_grid, name=f"{moving_name} registered",
                    node=output_volume,
                ),
                outputs=outputs,
                fixed_ijk_to_ras=fixed_grid,
                label_table=label_table,
            )  # fmt: skip
            if options.inverse:
                outcome.inverse_transform = self._transform_node(
                    outputs.inverse_total_displacement_ras, np.linalg.inv(outputs.fixed_to_moving_ras), moving_grid,
                    f"{fixed_name} to {moving_name}", None,
                )  # fmt: skip
            if label_table is not None:
                outputs.quality.label_names = {info.value: info.name for info in label_table}
            if "fixed_labels" in inputs and outputs.quality.dice:
                # only the structures the reference has (a label missing from it would score 0)
                present = {int(v) for v in np.unique(inputs["fixed_labels"]) if v}
                outputs.quality.dice = {k: v for k, v in outputs.quality.dice.items() if k in present}
                values = list(outputs.quality.dice.values())
                outputs.quality.mean_dice = float(np.mean(values)) if values else None
            if outputs.propagated_labels is not None and label_table is not None:
                outcome.segmentation = segments.labels_to_segmentation(
                    self.context, outputs.propagated_labels, label_table, ijk_to_ras=fixed_grid,
                    segmentation_node=output_segmentation, name=f"{moving_name} segmentation registered",
                    include_empty=True,
                )  # fmt: skip
            return outcome

        return Run(job, apply, self.context, on_event)

    def _transform_node(self, displacement: np.ndarray | None, matrix: np.ndarray, grid: np.ndarray, name: str, node):
        """A grid transform from a displacement field on ``grid``, or else a linear transform from ``matrix``."""
        if displacement is not None:
            return nodes.displacement_to_grid_transform(self.context, displacement, grid, name=name, node=node)
        return nodes.matrix_to_transform(self.context, matrix, name=name, node=node)

    def register(
        self,
        fixed_volume: Any,
        moving_volume: Any,
        options: RegistrationOptions | None = None,
        timeout: float | None = None,
        **where: Any,
    ) -> RegistrationOutcome:
        """Registers and returns when the transform (and optional outputs) are in the scene."""
        return self.start_register(fixed_volume, moving_volume, options, **where).wait(timeout)


def stored_model_ids(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the models in the local model store at ``root`` (its default folder when None).

    Slicer's panel lists the models when it opens, before PyTorch may even be installed: the models package imports
    its names lazily, and the store itself needs neither torch nor MONAI, so this imports neither.
    """
    return ModelStore(root).list_ids()


def _labels_by_name(context: SceneContext, segmentation: Any, volume: Any, table: list[LabelInfo]) -> np.ndarray:
    """A reference segmentation's labels on ``volume``'s grid, renumbered to ``table``'s values by segment name
    (names it does not share with ``table`` become 0)."""
    labels, reference_table = _labels_on(context, segmentation, volume)
    values = {info.name.strip().lower(): info.value for info in table}
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    for info in reference_table:
        lookup[info.value] = values.get(info.name.strip().lower(), 0)
    if not lookup.any():
        raise ValueError("the reference segmentation shares no segment name with the moving segmentation, so no "
                         "structure can be compared; name the segments alike")  # fmt: skip
    return lookup[labels].astype(np.int32)


def _labels_on(context: SceneContext, segmentation: Any, volume: Any) -> tuple[np.ndarray, list[LabelInfo]]:
    """Labels of a segmentation node (values 1..N) or a label map volume (its own values) on ``volume``'s grid."""
    if segmentation.IsA("vtkMRMLSegmentationNode"):
        labels, _, table = segments.segmentation_to_labels(context, segmentation, volume)
        return labels, table
    labels, grid = nodes.volume_to_array(segmentation)
    volume_array, volume_grid = nodes.volume_to_array(volume)
    if labels.shape != volume_array.shape or not np.allclose(grid, volume_grid, atol=1e-4):
        raise ValueError(
            f"label map '{segmentation.GetName()}' is not on the grid of '{volume.GetName()}': "
            "resample it onto the moving volume first, or pass a segmentation"
        )
    values = [int(value) for value in np.unique(labels) if value != 0]
    return labels, [LabelInfo(value, f"Label {value}") for value in values]


def _mask_on(context: SceneContext, mask: Any, volume: Any) -> np.ndarray:
    """A mask node (label map volume or segmentation) as a boolean array on ``volume``'s grid."""
    if mask.IsA("vtkMRMLSegmentationNode"):
        labels, _, _ = segments.segmentation_to_labels(context, mask, volume)
        return labels > 0
    array, _ = nodes.volume_to_array(mask)
    if array.shape != nodes.volume_to_array(volume)[0].shape:
        raise ValueError(f"mask '{mask.GetName()}' is not on the grid of '{volume.GetName()}': use a segmentation")
    return array > 0


def _place_under_same_transform(node: Any, reference: Any) -> None:
    """Results computed on a volume's own grid follow the volume wherever its parent transform puts it."""
    parent = reference.GetParentTransformNode()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
