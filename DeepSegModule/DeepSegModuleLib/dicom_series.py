"""DICOM series in: a folder of images becomes one volume with the geometry its images give.

A folder (a series, or a study with several) is scanned header by header. Only an allow-list of image storage
classes is read: classic single-frame CT, MR and PET images (DICOM PS3.4 B.5). Files that are not DICOM, or
whose headers cannot be parsed, are skipped and counted; ``DEEPSEG_MAX_DICOM_FILES`` bounds how many files a
scan opens. When several series qualify, :func:`choose` refuses to guess and lists them (:class:`AmbiguousSeries`),
to be chosen by Series Instance UID, modality or description.

Geometry comes from each image's Image Position and Image Orientation (Patient), never from Slice Location or
the instance number:

- the slice axis is the normal of the image plane (row x column direction), and images are ordered along it;
- an oblique series is read as it lies (its directions go into the IJK-to-RAS matrix);
- a gantry-tilted series (images shifted in their own plane from one to the next) and a series with uneven
  spacing (a missing image) are resampled onto a regular grid along the normal, linearly, and the read says so
  in :attr:`DicomSeries.notes`; :meth:`DicomSeries.on_source_images` takes a result back onto the images;
- refused with the reason: images that share a position (phases, echoes or time points in one series), mixed
  orientations or grids, a single image, multi-frame images, colour images, gaps over three times the usual.

Arrays are in Slicer's (k, j, i) order with a 4x4 IJK-to-RAS matrix, as everywhere in DeepSeg (DICOM is LPS).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import limits

#: The image storage classes DeepSeg reads (SOP Class UID -> modality). Source: DICOM PS3.4 Table B.5-1.
IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
}
#: Enhanced (multi-frame) classes, recognised to be refused with the reason rather than skipped as unknown.
MULTI_FRAME_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET",
}
DICOM_FILES = limits.Limit("DEEPSEG_MAX_DICOM_FILES", 20_000, "files")

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames",
    "SamplesPerPixel", "Rows", "Columns",
]  # fmt: skip
_ORIENTATION_TOLERANCE = 1e-4
_POSITION_TOLERANCE_MM = 1e-3  # images closer than this along the normal share a position
_LARGEST_GAP = 3.0  # times the median spacing: past it, images are missing, not unevenly spaced


class DicomError(ValueError):
    """A DICOM folder DeepSeg will not read; the message says why and what to do."""


class AmbiguousSeries(DicomError):
    """Several series qualify; :attr:`choices` describes each (uid, modality, images, description)."""

    def __init__(self, headline: str, listing: str, choices: list[dict[str, Any]]) -> None:
        super().__init__(f"{headline}: {listing}")
        self.headline = headline  # the message without the listing, for a caller that lists the choices itself
        self.choices = choices


@dataclass(frozen=True)
class SeriesChoice:
    """How to choose one series where a folder holds several (all optional; each narrows the choice)."""

    uids: tuple[str, ...] = ()
    modality: str | None = None
    description: str | None = None

    def describe(self) -> str:
        parts = [f"--series {uid}" for uid in self.uids]
        parts += [f"--modality {self.modality}"] if self.modality else []
        parts += [f"--series-description {self.description!r}"] if self.description else []
        return " ".join(parts)


@dataclass
class SeriesInfo:
    """One series found in a folder: what identifies it and its files (unread)."""

    uid: str
    modality: str
    description: str
    number: int | None
    files: list[Path] = field(default_factory=list)
    refusal: str = ""  # why it cannot be read (multi-frame, colour), or ""

    def as_choice(self) -> dict[str, Any]:
        return {"series_uid": self.uid, "modality": self.modality, "images": len(self.files),
                "description": self.description, "series_number": self.number}  # fmt: skip

    def line(self) -> str:
        uid = self.uid or "(no UID)"
        return f"{uid}  {self.modality}  {len(self.files)} images  {self.description or '(no description)'}"


@dataclass
class FolderScan:
    """What a scan found: the series in reading order, and how many files it skipped."""

    folder: Path
    series: list[SeriesInfo]
    skipped: int = 0


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (DeepSeg reads a folder only as a DICOM series or study)."""
    return Path(path).is_dir()


def _text(dataset: Any, keyword: str) -> str:
    value = dataset.get(keyword, "")
    return "" if value is None else str(value).strip()


def _class_uid(dataset: Any) -> str:
    """The SOP Class UID, from the file meta where the dataset's own is empty (anonymised series)."""
    uid = _text(dataset, "SOPClassUID")
    meta = getattr(dataset, "file_meta", None)
    return uid or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else "")


def instance_uid(dataset: Any) -> str:
    """The SOP Instance UID, from the file meta where the dataset's own is empty (anonymised series)."""
    uid = _text(dataset, "SOPInstanceUID")
    meta = getattr(dataset, "file_meta", None)
    return uid or (_text(meta, "MediaStorageSOPInstanceUID") if meta is not None else "")


def _walk_files(folder: Path):
    """The files under ``folder`` that may be images, in a stable order: no hidden files or folders, no DICOMDIR,
    no links (a link may point anywhere on the machine)."""
    for root, folders, names in os.walk(folder, followlinks=False):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            path = Path(root) / name
            if not path.is_symlink() and path.is_file():
                yield path


def _files_under(folder: Path) -> list[Path]:
    limit = DICOM_FILES.value()
    found: list[Path] = []
    for path in _walk_files(folder):
        found.append(path)
        if len(found) > limit:
            DICOM_FILES.check(len(found), f"the folder {folder} (counting its first files)")
    return found


def holds_dicom(folder: str | os.PathLike, look_at: int = 64) -> bool:
    """Whether one of the first ``look_at`` files under ``folder`` is a DICOM file (its "DICM" preamble marker):
    a cheap test of which subfolders of a cohort are series, before any header is parsed."""
    for seen, path in enumerate(_walk_files(Path(folder))):
        if seen >= look_at:
            return False
        try:
            with path.open("rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            pass
    return False


def scan(folder: str | os.PathLike) -> FolderScan:
    """Reads the headers of every file under ``folder`` and groups the images into series.

    Raises:
        DicomError: the folder holds no readable image series (the message says what was found).
        LimitExceeded: more files than ``DEEPSEG_MAX_DICOM_FILES``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder} is not a folder")
    groups: dict[tuple, SeriesInfo] = {}
    skipped = 0
    other_classes: set[str] = set()
    for path in _files_under(folder):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError, EOFError):
            skipped += 1
            continue
        class_uid = _class_uid(header)
        if class_uid not in IMAGE_STORAGE and class_uid not in MULTI_FRAME_STORAGE:
            skipped += 1
            if class_uid:
                other_classes.add(class_uid)
            continue
        uid = _text(header, "SeriesInstanceUID")
        number = header.get("SeriesNumber")
        key = (uid,) if uid else ("", _text(header, "StudyInstanceUID"), str(number), _text(header, "Modality"),
                                  _text(header, "SeriesDescription"), _text(header, "FrameOfReferenceUID"))
        info = groups.get(key)
        if info is None:
            info = groups[key] = SeriesInfo(uid, _text(header, "Modality") or IMAGE_STORAGE.get(class_uid, "?"),
                                            _text(header, "SeriesDescription"), _int_or_none(number))
        info.files.append(path)
        if class_uid in MULTI_FRAME_STORAGE or (_int_or_none(header.get("NumberOfFrames")) or 1) > 1:
            info.refusal = (f"its images are multi-frame ({MULTI_FRAME_STORAGE.get(class_uid, 'several frames each')}); "
                            "DeepSeg reads classic single-frame series: convert it, e.g. with dcm2niix, and pass the NIfTI")  # fmt: skip
        elif (_int_or_none(header.get("SamplesPerPixel")) or 1) != 1:
            info.refusal = "its images are in colour; DeepSeg reads greyscale CT, MR and PET series"
    if not groups:
        found = f"{skipped} file(s), none a CT, MR or PET image"
        if other_classes:
            found += f" (storage classes: {', '.join(sorted(other_classes)[:3])})"
        raise DicomError(f"{folder} holds no DICOM image series: {found}; pass a series folder or an image file")
    series = sorted(groups.values(), key=lambda s: (s.number if s.number is not None else 1 << 30, s.uid, s.description))
    return FolderScan(folder, series, skipped)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def choose(found: FolderScan, choice: SeriesChoice = SeriesChoice()) -> SeriesInfo:
    """The one series of ``found`` that ``choice`` allows.

    Raises:
        AmbiguousSeries: several series qualify (the message lists them; :attr:`AmbiguousSeries.choices` too).
        DicomError: none qualifies, or the chosen one cannot be read (multi-frame, colour).
    """
    candidates = found.series
    if choice.uids:
        candidates = [s for s in candidates if s.uid in choice.uids]
    if choice.modality:
        candidates = [s for s in candidates if s.modality.upper() == choice.modality.strip().upper()]
    if choice.description:
        wanted = choice.description.strip().lower()
        exact = [s for s in candidates if s.description.lower() == wanted]
        candidates = exact or [s for s in candidates if wanted in s.description.lower()]
    readable = [s for s in candidates if not s.refusal]
    if not candidates:
        listing = "; ".join(s.line() for s in found.series)
        raise DicomError(f"no series in {found.folder} matches {choice.describe()}: it holds {listing}")
    if not readable:
        raise DicomError(f"series {candidates[0].line()} in {found.folder} cannot be read: {candidates[0].refusal}")
    if len(readable) > 1:
        listing = "; ".join(s.line() for s in readable)
        raise AmbiguousSeries(
            f"{found.folder} holds {len(readable)} series; choose one with --series UID, --modality or "
            "--series-description", listing, [s.as_choice() for s in readable],
        )  # fmt: skip
    return readable[0]


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class SourceImage:
    """One image of the series as read: its header (no pixel data) and where it lies relative to the first."""

    header: Any
    normal_mm: float  # position along the slice normal, from the first image
    in_plane_ij: tuple[float, float]  # its in-plane offset from the first image, in voxels (i, j)


@dataclass
class DicomSeries:
    """A series as one volume.

    Attributes:
        array: voxels in (k, j, i) order, rescaled to modality units (HU for CT); int16 where they fit, else float32.
        ijk_to_ras: the grid of ``array``.
        images: the source images in the order along the normal (ascending).
        notes: what was done to the geometry (tilt, uneven spacing), for the user.
        info: the series found by the scan.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    images: list[SourceImage]
    notes: list[str]
    info: SeriesInfo

    @property
    def resampled(self) -> bool:
        return bool(self.notes)

    @property
    def name(self) -> str:
        return self.info.description or self.info.modality or "DICOM series"

    def on_source_images(self, volume: np.ndarray, order: int = 0) -> np.ndarray:
        """``volume`` on this series' grid (k, j, i), taken back onto each source image: (images, rows, columns)
        in :attr:`images` order; ``order`` 0 (nearest, for labels) or 1 (linear, for probabilities)."""
        volume = np.asarray(volume)
        if not self.resampled:
            return volume
        from scipy.ndimage import map_coordinates

        spacing = float(np.linalg.norm(self.ijk_to_ras[:3, 2]))
        rows, columns = volume.shape[1:]
        j, i = np.mgrid[0:rows, 0:columns].astype(np.float32)
        frames = np.empty((len(self.images), rows, columns), dtype=volume.dtype)
        for index, image in enumerate(self.images):
            k = image.normal_mm / spacing
            offset_i, offset_j = image.in_plane_ij
            if order == 0:
                k = round(k)
            coordinates = np.stack([np.full_like(i, k), j + offset_j, i + offset_i])
            frames[index] = map_coordinates(volume, coordinates, order=order, mode="nearest")
        return frames


def read(info: SeriesInfo) -> DicomSeries:
    """Reads a series' images into one volume (see the module docstring for the geometry rules).

    Raises:
        DicomError: the geometry is ambiguous or the pixels cannot be decoded (with the reason).
        LimitExceeded: the volume is over ``DEEPSEG_MAX_VOXELS``.
    """
    import pydicom

    if info.refusal:
        raise DicomError(f"series {info.line()} cannot be read: {info.refusal}")
    if len(info.files) < 2:
        raise DicomError(f"series {info.line()} has one image; DeepSeg needs a 3D series (two images or more)")
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in info.files]
    geometry = _geometry(headers, info)
    rows, columns = geometry["shape"]
    limits.VOXELS.check(rows * columns * geometry["output_slices"], f"series {info.line()}")
    order = geometry["order"]
    stack = _stack([info.files[index] for index in order], (rows, columns), info)
    images = [SourceImage(headers[index], float(geometry["normal"][n]), geometry["in_plane"][n])
              for n, index in enumerate(order)]  # fmt: skip
    notes = geometry["notes"]
    if notes:
        stack = _regularise(stack, images, geometry["spacing_k"], geometry["output_slices"])
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0] = geometry["row"] * geometry["pixel_spacing"][1]
    ijk_to_lps[:3, 1] = geometry["column"] * geometry["pixel_spacing"][0]
    ijk_to_lps[:3, 2] = geometry["normal_direction"] * geometry["spacing_k"]
    ijk_to_lps[:3, 3] = geometry["origin"]
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    return DicomSeries(stack, ijk_to_ras, images, notes, info)


def _floats(header: Any, keyword: str, count: int, info: SeriesInfo) -> np.ndarray:
    value = header.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        numbers = np.array([])
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise DicomError(f"series {info.line()}: an image has no valid {keyword}; its geometry is unknown")
    return numbers


def _geometry(headers: list[Any], info: SeriesInfo) -> dict[str, Any]:
    orientations = np.array([_floats(h, "ImageOrientationPatient", 6, info) for h in headers])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        raise DicomError(f"series {info.line()} mixes image orientations (a localiser or several stacks); choose "
                         "one stack, e.g. by --series-description, or split the folder")  # fmt: skip
    grids = {(int(h.get("Rows") or 0), int(h.get("Columns") or 0),
              tuple(np.round(_floats(h, "PixelSpacing", 2, info), 6))) for h in headers}  # fmt: skip
    if len(grids) > 1:
        raise DicomError(f"series {info.line()} mixes image sizes or pixel spacings; split it into one grid per folder")
    rows, columns, pixel_spacing = grids.pop()
    if rows < 1 or columns < 1 or min(pixel_spacing) <= 0:
        raise DicomError(f"series {info.line()}: images without rows, columns or pixel spacing")
    row = orientations[0][:3] / np.linalg.norm(orientations[0][:3])
    column = orientations[0][3:] / np.linalg.norm(orientations[0][3:])
    if abs(float(row @ column)) > 1e-3:
        raise DicomError(f"series {info.line()}: its row and column directions are not perpendicular")
    normal = np.cross(row, column)
    positions = np.array([_floats(h, "ImagePositionPatient", 3, info) for h in headers])
    along = positions @ normal
    order = [int(n) for n in np.argsort(along, kind="stable")]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    if gaps.min() < _POSITION_TOLERANCE_MM:
        shared = int((gaps < _POSITION_TOLERANCE_MM).sum()) + 1
        raise DicomError(
            f"series {info.line()}: {shared} images share a position (phases, echoes or time points in one series); "
            "DeepSeg reads one volume: split the series (e.g. by acquisition or echo) and pass one"
        )  # fmt: skip
    spacing = float(np.median(gaps))
    notes = []
    if gaps.max() > _LARGEST_GAP * spacing:
        raise DicomError(f"series {info.line()}: a gap of {gaps.max():.1f} mm between images where the rest are "
                         f"{spacing:.2f} mm apart; images are missing, so DeepSeg will not fill them in")  # fmt: skip
    output_slices = len(order)
    tolerance = max(0.01, 0.01 * spacing)
    if np.abs(gaps - spacing).max() > tolerance:
        output_slices = int(round((along[-1] - along[0]) / spacing)) + 1
        spacing = float((along[-1] - along[0]) / (output_slices - 1))
        notes.append(f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm): resampled onto a regular "
                     f"{spacing:.2f} mm grid")  # fmt: skip
    offsets = positions - positions[0]
    in_plane_mm = np.c_[offsets @ row, offsets @ column]
    in_plane = [(float(u / pixel_spacing[1]), float(v / pixel_spacing[0])) for u, v in in_plane_mm]
    if np.abs(in_plane_mm).max() > 0.01:
        drift = np.linalg.norm(in_plane_mm[-1]) / max(along[-1] - along[0], 1e-9)
        notes.append(f"tilted ({np.degrees(np.arctan(drift)):.1f} degrees: gantry tilt): resampled onto a grid "
                     "perpendicular to the images")  # fmt: skip
    return {
        "order": order, "shape": (rows, columns), "pixel_spacing": pixel_spacing, "row": row, "column": column,
        "normal_direction": normal, "normal": along - along[0], "in_plane": in_plane, "spacing_k": spacing,
        "output_slices": output_slices, "origin": positions[0], "notes": notes,
    }  # fmt: skip


def _pixels(path: Path, info: SeriesInfo) -> tuple[np.ndarray, float, float]:
    """One image's stored pixels and its Rescale Slope and Intercept."""
    import pydicom

    dataset = pydicom.dcmread(path)
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - a decoder's failure becomes one line with what to install
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"cannot decode the pixels of {path.name} ({name}): {' '.join(str(error).split())[:200]}; "
                         "for compressed series install a decoder: pip install pylibjpeg pylibjpeg-openjpeg "
                         "pylibjpeg-libjpeg") from None  # fmt: skip
    if pixels.ndim != 2:
        raise DicomError(f"series {info.line()}: {path.name} is not one greyscale image")
    return pixels, float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)


def _stack(files: list[Path], shape: tuple[int, int], info: SeriesInfo) -> np.ndarray:
    """The images in modality units (HU for CT), one slice each, written straight into one array: int16 while the
    values fit (CT's usual -1024 intercept), int32 past that, float32 once a slope or intercept is fractional."""
    volume = np.empty((len(files), *shape), dtype=np.int16)
    for index, path in enumerate(files):
        pixels, slope, intercept = _pixels(path, info)
        if pixels.shape != shape:
            raise DicomError(f"series {info.line()}: {path.name} has {pixels.shape[0]}x{pixels.shape[1]} pixels, "
                             f"the others {shape[0]}x{shape[1]}")  # fmt: skip
        if slope == 1.0 and intercept == int(intercept) and volume.dtype.kind == "i":
            low, high = int(pixels.min()) + int(intercept), int(pixels.max()) + int(intercept)
            limits_of = np.iinfo(volume.dtype)
            if low < limits_of.min or high > limits_of.max:
                volume = volume.astype(np.int32)
            # Stored values past the signed range wrap on the cast and wrap back on adding the intercept: the
            # result is exact, because it was just checked to fit (two's complement arithmetic).
            volume[index] = pixels.astype(volume.dtype)
            volume[index] += int(intercept)
        else:
            if volume.dtype != np.float32:
                volume = volume.astype(np.float32)
            volume[index] = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return volume


def _regularise(stack: np.ndarray, images: list[SourceImage], spacing: float, output_slices: int) -> np.ndarray:
    """The images resampled onto the regular grid: each output slice lies on the first image's plane moved along
    the normal; it is blended linearly from the two images either side, each shifted back by its in-plane offset."""
    from scipy.ndimage import shift

    fill = float(stack.min())
    along = np.array([image.normal_mm for image in images])

    def aligned(index: int) -> np.ndarray:
        offset_i, offset_j = images[index].in_plane_ij
        plane = stack[index].astype(np.float32)
        if abs(offset_i) < 1e-6 and abs(offset_j) < 1e-6:
            return plane
        return shift(plane, (offset_j, offset_i), order=1, mode="constant", cval=fill)

    output = np.empty((output_slices, *stack.shape[1:]), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for k in range(output_slices):
        position = min(k * spacing, along[-1])
        upper = int(min(np.searchsorted(along, position, side="left"), len(images) - 1))
        if abs(along[upper] - position) < 1e-6 or upper == 0:
            output[k] = cache.setdefault(upper, aligned(upper))
            continue
        lower = upper - 1
        weight = (position - along[lower]) / (along[upper] - along[lower])
        output[k] = (1 - weight) * cache.setdefault(lower, aligned(lower)) + weight * cache.setdefault(upper, aligned(upper))
        for stale in [key for key in cache if key < lower]:
            del cache[stale]
    if stack.dtype.kind == "i":
        return np.round(output).astype(stack.dtype)
    return output


def derived_uid(*parts: str) -> str:
    """A stable UID of the '2.25.' form (a UUID as a decimal number, DICOM PS3.5 B.2) derived from ``parts``: the
    same inputs give the same UID on every run."""
    digest = hashlib.sha256("\\".join(parts).encode("utf-8")).digest()[:16]
    value = int.from_bytes(digest, "big")
    value = (value & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    return f"2.25.{value}"


# ------------------------------------------------------------------------------------------------ Slicer


_SCANS: dict[tuple[str, float], FolderScan] = {}


def find_series(folder: str | os.PathLike, choice: SeriesChoice = SeriesChoice()) -> SeriesInfo:
    """:func:`scan` then :func:`choose`; a folder scanned before in this process (unchanged since) is not scanned
    again, so a command that checks its inputs first reads the headers once."""
    folder = Path(folder)
    key = (os.path.realpath(folder), folder.stat().st_mtime)
    found = _SCANS.get(key)
    if found is None:
        found = _SCANS[key] = scan(folder)
    return choose(found, choice)


def load_series(context: Any, folder: str | os.PathLike, choice: SeriesChoice = SeriesChoice()) -> tuple[Any, DicomSeries]:
    """Reads the chosen series of ``folder`` into a new scalar volume node; returns the node and the series."""
    from . import nodes

    series = read(find_series(folder, choice))
    node = nodes.array_to_volume(context, series.array, series.ijk_to_ras, name=series.name)
    return node, series
