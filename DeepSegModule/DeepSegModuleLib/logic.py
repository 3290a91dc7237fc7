"""DeepSeg's GUI-free logic: nodes in, engine in the worker, nodes out, applied on the caller's thread.

``DeepSegLogic.segment(...)`` and ``DeepSegLogic.register(...)`` return when done (scripts, Jupyter, tests).
``start_segment(...)`` / ``start_register(...)`` return a :class:`Run` at once; the caller polls it from the main
thread (Slicer's module widget does so from a ``QTimer``) and the result is written into the scene by the poll
that sees the job finish, as one change. A failed or cancelled run leaves the scene as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import nodes, tasks
from .context import SceneContext
from .jobs import InProcessWorker, Job, JobEvent, ProcessWorker

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a finished run put into the scene, and its report (timings, memory, quality, messages)."""

    nodes: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class Run:
    """A run in progress: :meth:`poll` from the main thread until it returns True, or :meth:`wait`."""

    def __init__(self, job: Job, apply: Callable[[dict[str, Any]], Outcome], context: SceneContext,
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

    def cancel(self) -> None:
        self.job.cancel()

    def poll(self) -> bool:
        """Forwards progress events; once the job has ended, applies its result. Returns True when finished."""
        for event in self.job.poll():
            if self._on_event is not None:
                self._on_event(event)
        if self.finished or not self.job.finished:
            return self.finished
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
        outputs = self.job.wait(timeout)
        for event in self.job.poll():
            if self._on_event is not None:
                self._on_event(event)
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

    def __init__(self, context: SceneContext, worker: ProcessWorker | InProcessWorker | None = None):
        self.context = context
        self._worker = worker

    @property
    def worker(self) -> ProcessWorker | InProcessWorker:
        if self._worker is None:
            self._worker = ProcessWorker()
        return self._worker

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ------------------------------------------------------------------------------------ segmentation

    def start_segment(
        self,
        input_volumes: Any | Sequence[Any],
        model: str,
        *,
        output_segmentation: Any = None,
        labels: Sequence[str] | None = None,
        probabilities: bool = False,
        device: str = "auto",
        overlap: float | None = None,
        mirroring: bool = False,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> Run:
        """Starts segmenting ``input_volumes`` (one volume node per model input) with ``model`` (a path)."""
        volumes = list(input_volumes) if isinstance(input_volumes, (list, tuple)) else [input_volumes]
        if not volumes:
            raise ValueError("choose an input volume")
        arrays, grids = [], []
        for volume in volumes:
            array, grid = nodes.volume_to_array(volume)
            arrays.append(array)
            grids.append(grid)
        if output_segmentation is not None and not output_segmentation.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("the output must be a segmentation node (or None to create one)")
        options = {"device": device, "overlap": overlap, "mirroring": mirroring, "return_probabilities": probabilities}
        if labels:
            options["labels"] = list(labels)
        job = self.worker.submit(
            tasks.SEGMENT,
            {f"image{index}": array for index, array in enumerate(arrays)},
            {"model": str(model), "ijk_to_ras": grids, "options": options},
        )
        reference = volumes[0]

        def apply(outputs: dict[str, Any]) -> Outcome:
            segmentation = nodes.labels_to_segmentation(
                self.context,
                outputs["labels"],
                outputs["label_table"],
                reference_volume=reference,
                segmentation_node=output_segmentation,
                name=f"{reference.GetName()} segmentation",
                include_empty=True,
            )
            _place_under_same_transform(segmentation, reference)
            created = {"segmentation": segmentation}
            by_value = {info.value: info for info in outputs["label_table"]}
            for value, probability in outputs["probabilities"].items():
                name = by_value[value].name if value in by_value else str(value)
                created[f"probability {name}"] = nodes.probability_to_volume(
                    self.context, probability, outputs["ijk_to_ras"], name=f"{reference.GetName()} p({name})"
                )
            return Outcome(created, outputs["report"])

        return Run(job, apply, self.context, on_event)

    def segment(self, input_volumes: Any | Sequence[Any], model: str, timeout: float | None = None, **options: Any) -> Outcome:
        """Segments and returns when the segmentation is in the scene (see :meth:`start_segment`)."""
        return self.start_segment(input_volumes, model, **options).wait(timeout)

    # ------------------------------------------------------------------------------------ registration

    def start_register(
        self,
        fixed_volume: Any,
        moving_volume: Any,
        *,
        preset: str = "deformable fast",
        fixed_mask: Any = None,
        moving_mask: Any = None,
        moving_segmentation: Any = None,
        output_transform: Any = None,
        output_volume: Any = None,
        output_segmentation: Any = None,
        inverse: bool = False,
        device: str = "auto",
        on_event: Callable[[JobEvent], None] | None = None,
        **overrides: Any,
    ) -> Run:
        """Starts registering ``moving_volume`` to ``fixed_volume``.

        The result is a transform node holding the resampling transform (fixed point -> moving point): linear for
        "rigid"/"affine", a grid transform (linear and deformable parts combined) otherwise. Put the moving volume
        under it to see it aligned with the fixed one. Optionally: the resampled moving volume, the moving
        segmentation propagated onto the fixed volume, and the inverse transform.
        """
        fixed, fixed_grid = nodes.volume_to_array(fixed_volume, world=True)
        moving, moving_grid = nodes.volume_to_array(moving_volume, world=True)
        inputs: dict[str, Any] = {"fixed": fixed, "moving": moving}
        if fixed_mask is not None:
            inputs["fixed_mask"] = _mask_on(self.context, fixed_mask, fixed_volume)
        if moving_mask is not None:
            inputs["moving_mask"] = _mask_on(self.context, moving_mask, moving_volume)
        label_table = None
        if moving_segmentation is not None:
            inputs["moving_labels"], _, label_table = nodes.segmentation_to_labels(
                self.context, moving_segmentation, moving_volume
            )
        params = {
            "fixed_ijk_to_ras": fixed_grid,
            "moving_ijk_to_ras": moving_grid,
            "preset": preset,
            "device": device,
            "inverse": inverse,
            "overrides": overrides,
        }
        job = self.worker.submit(tasks.REGISTER, inputs, params)
        moving_name = moving_volume.GetName()

        def apply(outputs: dict[str, Any]) -> Outcome:
            created: dict[str, Any] = {}
            if "total_displacement_ras" in outputs:
                created["transform"] = nodes.displacement_to_grid_transform(
                    self.context, outputs["total_displacement_ras"], fixed_grid,
                    name=f"{moving_name} to {fixed_volume.GetName()}", node=output_transform,
                )
            else:
                created["transform"] = nodes.matrix_to_transform(
                    self.context, outputs["fixed_to_moving_ras"],
                    name=f"{moving_name} to {fixed_volume.GetName()}", node=output_transform,
                )
            if "inverse_total_displacement_ras" in outputs:
                created["inverse transform"] = nodes.displacement_to_grid_transform(
                    self.context, outputs["inverse_total_displacement_ras"], moving_grid,
                    name=f"{fixed_volume.GetName()} to {moving_name}",
                )
            elif inverse:
                created["inverse transform"] = nodes.matrix_to_transform(
                    self.context, np.linalg.inv(outputs["fixed_to_moving_ras"]),
                    name=f"{fixed_volume.GetName()} to {moving_name}",
                )
            created["volume"] = nodes.array_to_volume(
                self.context, outputs["resampled_moving"], fixed_grid,
                name=f"{moving_name} registered", node=output_volume,
            )
            if "propagated_labels" in outputs and label_table is not None:
                created["segmentation"] = nodes.labels_to_segmentation(
                    self.context, outputs["propagated_labels"], label_table, ijk_to_ras=fixed_grid,
                    segmentation_node=output_segmentation, name=f"{moving_name} segmentation registered",
                    include_empty=True,
                )
            return Outcome(created, {"quality": outputs["quality"], "device": outputs["device"]})

        return Run(job, apply, self.context, on_event)

    def register(self, fixed_volume: Any, moving_volume: Any, timeout: float | None = None, **options: Any) -> Outcome:
        """Registers and returns when the transform (and optional outputs) are in the scene."""
        return self.start_register(fixed_volume, moving_volume, **options).wait(timeout)


def _mask_on(context: SceneContext, mask: Any, volume: Any) -> np.ndarray:
    """A mask node (label map volume or segmentation) as a boolean array on ``volume``'s grid."""
    if mask.IsA("vtkMRMLSegmentationNode"):
        labels, _, _ = nodes.segmentation_to_labels(context, mask, volume)
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
