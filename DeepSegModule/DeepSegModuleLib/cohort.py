"""What one case of a cohort is, from files to files: the same for ``deepseg batch`` on this machine and for each
actor of a cohort on Ray (:mod:`~DeepSegModuleLib.ray_cohort`), so both write the same files.

A job is a small picklable object: its settings (model, options, output folder, formats) and two calls,
``outputs_of(case)`` (the files a case writes, all of which exist once it is done) and
``job(case, outputs, worker)`` (runs the case on ``worker``, whose process keeps the model loaded, writes exactly
those outputs or none, and returns the case's numbers for the summary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batch import Case
from .dicom_series import SeriesChoice

INPUT_COLUMNS = ("input", *[f"input{n}" for n in range(2, 9)])
SEGMENT_FORMATS = {"seg.nrrd": "seg.nrrd", "nii.gz": "nii.gz", "dicom-seg": "dcm"}


def _logic_factory(worker):
    from .logic import DeepSegLogic

    return lambda context: DeepSegLogic(context, worker)


def _check_input(path: Path, what: str, dicom: SeriesChoice | None = None) -> Path:
    from .cli_common import check_input

    return check_input(path, what, dicom)


@dataclass
class SegmentCases:
    """Segments each case's inputs with one model into ``<output_dir>/<case>.<format>``."""

    model_path: Path
    options: Any  # SegmentationOptions
    output_dir: Path
    output_format: str = "seg.nrrd"
    overwrite: bool = False
    dicom: SeriesChoice = field(default_factory=SeriesChoice)
    seg_encoding: str = "labelmap"

    kind = "segment"

    def outputs_of(self, case: Case) -> dict[str, Path]:
        return {"segmentation": self.output_dir / f"{case.name}.{SEGMENT_FORMATS[self.output_format]}"}

    def inputs_of(self, case: Case) -> list[Path]:
        return [case.files[key] for key in INPUT_COLUMNS if key in case.files]

    def __call__(self, case: Case, outputs: dict[str, Path], worker) -> dict[str, Any]:
        from .file_runs import segment_files
        from .outputs import OutputSet

        inputs = self.inputs_of(case)
        for path in inputs:
            _check_input(path, f"input of case {case.name}", self.dicom)
        if self.output_format == "dicom-seg" and not inputs[0].is_dir():
            raise ValueError(f"case {case.name}: a DICOM SEG needs a DICOM series as input, not {inputs[0].name}")
        checked = OutputSet(inputs=[*inputs, self.model_path], overwrite=self.overwrite, root=self.output_dir)
        checked.claim(outputs["segmentation"], f"output of case {case.name}")
        summary = segment_files(
            _logic_factory(worker), inputs, outputs["segmentation"], self.model_path, self.options, outputs=checked,
            dicom=self.dicom, output_format="dicom-seg" if self.output_format == "dicom-seg" else None,
            seg_encoding=self.seg_encoding,
        )  # fmt: skip
        return {f"{name} ml": volume for name, volume in summary["segments_ml"].items()}

    def paths(self, cases: list[Case]) -> list[Path]:
        """Every path the cohort reads (for the check that each node of a cluster sees them)."""
        return [self.model_path, *[path for case in cases for path in self.inputs_of(case)]]


@dataclass
class RegisterCases:
    """Registers each case's moving image to its fixed one: ``<case>.h5`` and ``<case>.nrrd`` (and ``<case>.seg.nrrd``
    when the case gives a moving segmentation)."""

    options: Any  # RegistrationOptions
    output_dir: Path
    overwrite: bool = False
    dicom: SeriesChoice = field(default_factory=SeriesChoice)

    kind = "register"

    def outputs_of(self, case: Case) -> dict[str, Path]:
        outputs = {"transform": self.output_dir / f"{case.name}.h5", "volume": self.output_dir / f"{case.name}.nrrd"}
        if "moving_segmentation" in case.files:
            outputs["segmentation"] = self.output_dir / f"{case.name}.seg.nrrd"
        return outputs

    def __call__(self, case: Case, outputs: dict[str, Path], worker) -> dict[str, Any]:
        from .file_runs import register_files
        from .outputs import OutputSet

        for key in case.files:
            _check_input(case.files[key], f"{key} of case {case.name}", self.dicom if key != "moving_segmentation" else None)
        checked = OutputSet(inputs=[Path(p) for p in case.files.values()], overwrite=self.overwrite, root=self.output_dir)
        for kind, path in outputs.items():
            checked.claim(path, f"{kind} of case {case.name}")
        _, quality = register_files(
            _logic_factory(worker), case.files["fixed"], case.files["moving"], outputs["transform"], self.options,
            output_volume=outputs["volume"], moving_segmentation=case.files.get("moving_segmentation"),
            output_segmentation=outputs.get("segmentation"), outputs=checked, dicom=self.dicom,
        )  # fmt: skip
        result = {key: getattr(quality, key) for key in ("folding_percent", "log_jacobian_std")
                  if getattr(quality, key) is not None}  # fmt: skip
        if "total" in quality.runtime_s:
            result["engine_s"] = round(quality.runtime_s["total"], 2)
        return result

    def paths(self, cases: list[Case]) -> list[Path]:
        return [Path(path) for case in cases for path in case.files.values()]
