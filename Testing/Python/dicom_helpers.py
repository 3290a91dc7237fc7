"""DICOM series written here with pydicom, as scanners lay them out: one file per image, positions and orientation
in patient coordinates (LPS), CT values through Rescale Slope and Intercept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_SERIES = SHARED / "ct_dicom_series" / "dicom"


def write_series(
    folder: Path,
    field: Callable[[np.ndarray], np.ndarray],
    *,
    rows: int = 40,
    columns: int = 48,
    pixel_spacing: tuple[float, float] = (1.5, 1.25),
    row_direction=(1.0, 0.0, 0.0),
    column_direction=(0.0, 1.0, 0.0),
    positions: list | np.ndarray | None = None,
    slices: int = 24,
    slice_step=(0.0, 0.0, 2.0),
    origin=(-30.0, -25.0, -20.0),
    series_uid: str | None = None,
    description: str = "test series",
    modality: str = "CT",
    study_uid: str | None = None,
    intercept: float = -1024.0,
    shuffle: bool = True,
    sop_class: str = CT_IMAGE_STORAGE,
    extra: Callable[[Dataset, int], None] | None = None,
) -> list[Path]:
    """Writes a series whose voxel values are ``field(points_lps)`` (an (n, 3) array of positions in mm, rounded to
    HU); image ``k`` lies at ``positions[k]`` (or ``origin + k * slice_step``). Files are written in a shuffled order
    under names that do not sort by position, as real exports often are. Returns the files in position order."""
    folder.mkdir(parents=True, exist_ok=True)
    row = np.asarray(row_direction, float)
    column = np.asarray(column_direction, float)
    if positions is None:
        positions = [np.asarray(origin, float) + k * np.asarray(slice_step, float) for k in range(slices)]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference = generate_uid()
    j, i = np.mgrid[0:rows, 0:columns]
    files = []
    order = np.random.default_rng(7).permutation(len(positions)) if shuffle else np.arange(len(positions))
    for k, position in enumerate(positions):
        position = np.asarray(position, float)
        points = position + i[..., None] * pixel_spacing[1] * row + j[..., None] * pixel_spacing[0] * column
        values = np.round(field(points.reshape(-1, 3)).reshape(rows, columns))
        stored = np.clip(values - intercept, 0, 65535).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID = sop_class
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.FrameOfReferenceUID = frame_of_reference
        dataset.PatientName = "Test^Phantom"
        dataset.PatientID = "PHANTOM1"
        dataset.PatientBirthDate = ""
        dataset.PatientSex = "O"
        dataset.StudyDate = "20260101"
        dataset.StudyTime = "120000"
        dataset.StudyID = "1"
        dataset.AccessionNumber = ""
        dataset.ReferringPhysicianName = ""
        dataset.Modality = modality
        dataset.Manufacturer = "pydicom"
        dataset.SeriesNumber = 3
        dataset.SeriesDescription = description
        dataset.InstanceNumber = int(order[k]) + 1
        dataset.ImagePositionPatient = [float(f"{v:.6f}") for v in position]
        dataset.ImageOrientationPatient = [float(f"{v:.8f}") for v in (*row, *column)]
        dataset.PixelSpacing = list(pixel_spacing)
        dataset.SliceThickness = 2.0
        dataset.Rows, dataset.Columns = rows, columns
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
        dataset.RescaleIntercept = intercept
        dataset.RescaleSlope = 1
        dataset.PixelData = stored.tobytes()
        if extra is not None:
            extra(dataset, k)
        path = folder / f"IM{int(order[k]):04d}"
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def linear_field(gradient=(3.0, -2.0, 5.0), offset: float = 40.0) -> Callable[[np.ndarray], np.ndarray]:
    """A CT value that changes linearly with position (HU per mm along L, P, S): any resampling error shows."""
    gradient = np.asarray(gradient, float)
    return lambda points: points @ gradient + offset


def ball_field(centre_lps, radius: float, inside: float = 400.0, outside: float = -100.0):
    centre = np.asarray(centre_lps, float)
    return lambda points: np.where(np.linalg.norm(points - centre, axis=1) <= radius, inside, outside)


def rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    c, s = np.cos(angle), np.sin(angle)
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def voxel_points_lps(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
    """The LPS position of every voxel of a (k, j, i) array, as (k, j, i, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    ras = ijk @ np.asarray(ijk_to_ras).T
    return ras[..., :3] * np.array([-1.0, -1.0, 1.0])


def read_pixels(path: Path) -> np.ndarray:
    dataset = pydicom.dcmread(path)
    return dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
