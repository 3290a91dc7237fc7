"""DICOM SEG out (highdicom): a segmentation of a DICOM series, referencing that series image by image.

One frame per source image, on that image's own grid (a series DeepSeg resampled, tilted or unevenly spaced, is
taken back onto each image first). Segments carry their label's name, SNOMED CT category and type (Slicer's
"Tissue" where the model gives none), anatomic region and colour (CIE Lab), and the algorithm that made them:
DeepSeg, the model's name and version.

Encodings (DICOM PS3.3 C.8.20.2):

- ``labelmap`` (the default): one frame per image, each voxel the number of its segment, RLE-compressed; the
  smallest file for many segments;
- ``binary``: one bit-packed frame per segment and image, empty frames left out; what readers older than the
  2024 LABELMAP class need;
- ``fractional``: probabilities, 8 bits per voxel and segment.

Anonymised series with empty UIDs (TotalSegmentator's own test series has them) are referenced by the SOP
Instance UIDs in their files' meta information, and the study, series and frame of reference get UIDs derived
from those, the same on every run.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

from .dicom_series import DicomSeries, derived_uid, instance_uid
from .labels import DEFAULT_TERMINOLOGY, CodedEntry, LabelInfo, Terminology

ENCODINGS = ("labelmap", "binary")
_LO = 64  # DICOM's Long String


def _coded(entry: CodedEntry) -> Any:
    from highdicom.sr.coding import CodedConcept

    return CodedConcept(value=entry.value, scheme_designator=entry.scheme, meaning=entry.meaning[:_LO])


def _terminology(info: LabelInfo) -> Terminology:
    term = info.terminology
    if isinstance(term, str):
        try:
            term = Terminology.from_slicer_string(term)
        except ValueError:
            term = None
    return term if isinstance(term, Terminology) else DEFAULT_TERMINOLOGY


def _description(number: int, info: LabelInfo, algorithm: Any) -> Any:
    import highdicom as hd

    term = _terminology(info)
    red, green, blue = (float(c) * 255.0 for c in info.rgb())
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.name[:_LO],
        segmented_property_category=_coded(term.category),
        segmented_property_type=_coded(term.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_coded(term.anatomic_region)] if term.anatomic_region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(red, green, blue),
    )


def source_datasets(series: DicomSeries) -> list[Any]:
    """The source images' headers as highdicom needs them: missing UIDs filled in (see the module docstring)."""
    instances = [instance_uid(image.header) for image in series.images]
    if not all(instances):
        raise ValueError(f"series {series.info.line()}: an image has no SOP Instance UID, so a DICOM SEG cannot "
                         "reference it; write a .seg.nrrd or a label map instead")  # fmt: skip
    study = derived_uid("study", *instances)
    series_uid = derived_uid("series", *instances)
    frame_of_reference = derived_uid("frame of reference", *instances)
    datasets = []
    for image, uid in zip(series.images, instances, strict=True):
        dataset = copy.copy(image.header)
        meta = getattr(image.header, "file_meta", None)
        class_uid = str(dataset.get("SOPClassUID", "") or "") or (str(meta.MediaStorageSOPClassUID) if meta else "")
        dataset.SOPClassUID = class_uid
        dataset.SOPInstanceUID = uid
        for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series_uid),
                               ("FrameOfReferenceUID", frame_of_reference)):  # fmt: skip
            if not str(dataset.get(keyword, "") or "").strip():
                setattr(dataset, keyword, value)
        datasets.append(dataset)
    return datasets


def write_dicom_seg(
    path: str | os.PathLike,
    series: DicomSeries,
    labels: np.ndarray,
    label_table: list[LabelInfo],
    *,
    model_name: str,
    model_version: str = "",
    encoding: str = "labelmap",
    probabilities: dict[int, np.ndarray] | None = None,
) -> Path:
    """Writes a DICOM SEG of ``labels`` (on ``series``' grid, (k, j, i)) to ``path``.

    Args:
        encoding: ``labelmap`` or ``binary`` (see the module docstring); ignored with ``probabilities``.
        probabilities: label value -> probability map on the series' grid: a FRACTIONAL SEG of these instead.

    Raises:
        ValueError: an unknown encoding, no segments, or a series a SEG cannot reference.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from . import __version__

    if encoding not in ENCODINGS:
        raise ValueError(f"unknown SEG encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    table = sorted(label_table, key=lambda info: info.value)
    if not table:
        raise ValueError("no segments to write: the model kept no labels")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=(model_name or "DeepSeg model")[:_LO], family=codes.cid7162.ArtificialIntelligence,
        version=(model_version or "unversioned")[:_LO], source="DeepSeg",
    )  # fmt: skip
    descriptions = [_description(number, info, algorithm) for number, info in enumerate(table, start=1)]
    sources = source_datasets(series)
    if probabilities:
        maps = [series.on_source_images(np.asarray(probabilities[info.value], dtype=np.float32), order=1)
                for info in table]  # fmt: skip
        pixels = np.clip(np.stack(maps, axis=-1), 0.0, 1.0)
        kind, syntax, omit_empty = hd.seg.SegmentationTypeValues.FRACTIONAL, ExplicitVRLittleEndian, True
    else:
        lookup = np.zeros(int(max(int(labels.max()), table[-1].value)) + 1, dtype=np.uint16)
        for number, info in enumerate(table, start=1):
            lookup[info.value] = number
        dtype = np.uint8 if len(table) < 256 else np.uint16
        # segment numbers per voxel; highdicom takes this label-map form for BINARY too
        pixels = lookup[np.asarray(series.on_source_images(labels, order=0), dtype=np.int64)].astype(dtype)
        if encoding == "labelmap":
            kind, syntax, omit_empty = hd.seg.SegmentationTypeValues.LABELMAP, RLELossless, False
        else:
            kind, syntax, omit_empty = hd.seg.SegmentationTypeValues.BINARY, ExplicitVRLittleEndian, True
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="DeepSeg",
        manufacturer_model_name=(model_name or "DeepSeg model")[:_LO],
        software_versions=f"DeepSeg {__version__}",
        device_serial_number="none",
        content_label="DEEPSEG",
        content_description=f"{model_name or 'DeepSeg'} segmentation"[:_LO],
        series_description=f"DeepSeg: {model_name}"[:_LO] if model_name else "DeepSeg segmentation",
        transfer_syntax_uid=syntax,
        omit_empty_frames=omit_empty,
    )
    path = Path(path)
    seg.save_as(str(path))
    return path
