"""Image files checked before a reader allocates anything, and voxels checked before an engine sees them.

An image file is foreign input: its header decides how much memory a reader asks for, where a detached NRRD
reads its data, and whether the voxels that arrive are the ones the file promised. :func:`check_image_file`
reads only headers (SimpleITK's image information, NRRD and NIfTI headers) and refuses, in one line:

- a file that is not an image, or a 2D image (a PNG, a single slice);
- a grid over ``DEEPSEG_MAX_VOXELS``, a ``.seg.nrrd`` with over ``DEEPSEG_MAX_SEGMENTS`` segments;
- a detached NRRD whose ``data file`` lies outside the header's folder;
- a truncated file (NIfTI and NRRD, compressed or not: the data is shorter than the header promises);
- NaN or infinite voxels in a floating-point NIfTI or NRRD (Slicer's reader would make them 0 without a word).

:func:`check_finite` refuses NaN and infinite voxels, which a network turns into garbage without complaint.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np

from DeepSegModuleLib import limits
from DeepSegModuleLib.storage import StorageError


class ImageFileError(StorageError, ValueError):
    """An image file that DeepSeg will not read; the message says why and what to do."""


_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_TWO_D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_NRRD_TYPE_BYTES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2, "ushort": 2,
    "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2, "int": 4, "signed int": 4,
    "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4, "longlong": 8,
    "long long": 8, "long long int": 8, "signed long long": 8, "signed long long int": 8, "int64": 8,
    "int64_t": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8, "uint64": 8,
    "uint64_t": 8, "float": 4, "double": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 4 << 20


def check_image_file(path: str | os.PathLike, what: str = "image") -> None:
    """Refuses an image file DeepSeg should not read (see the module docstring); reads headers only.

    Raises:
        ImageFileError: naming the file, the reason and what to do.
        LimitExceeded: the grid or the segment count is over a limit (naming the variable that raises it).
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(_TWO_D_SUFFIXES):
        raise ImageFileError(f"{path} is a 2D picture ({path.suffix}); DeepSeg reads 3D volumes (NIfTI, NRRD, "
                             "MetaImage, a DICOM series)")  # fmt: skip
    if path.stat().st_size == 0:
        raise ImageFileError(f"{path} is empty")
    nrrd_header = _nrrd_header(path) if name.endswith(_NRRD_SUFFIXES) else None
    if nrrd_header is not None:
        _check_nrrd(path, nrrd_header)
    size, dimension = _image_information(path, what)
    if dimension < 3:
        shape = " x ".join(str(s) for s in size)
        raise ImageFileError(f"{path} is a 2D image ({shape}); DeepSeg segments and registers 3D volumes")
    limits.VOXELS.check(float(np.prod(size[:3], dtype=np.float64)), f"the grid of {path.name}")
    if name.endswith(_NIFTI_SUFFIXES):
        _check_nifti_complete(path)
    elif nrrd_header is not None:
        _check_nrrd_complete(path, nrrd_header)


def _image_information(path: Path, what: str) -> tuple[list[int], int]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ImageFileError(
            f"{path} is not an {what} DeepSeg can read (not NIfTI, NRRD, MetaImage or another format ITK knows, "
            "or its header is damaged)"
        ) from None
    return list(reader.GetSize()), reader.GetDimension()


def _nrrd_header(path: Path) -> dict[str, str | list[str]]:
    """The NRRD header's fields (lower-case keys), ``_bytes`` (its length) and ``_list`` (a LIST's file names)."""
    with open(path, "rb") as stream:
        head = stream.read(_MAX_HEADER_BYTES)
    if not head.startswith(b"NRRD"):
        raise ImageFileError(f"{path} does not start with 'NRRD'; it is not a NRRD file")
    fields: dict[str, str | list[str]] = {}
    lines = head.split(b"\n")
    offset = 0
    for index, raw in enumerate(lines):
        offset += len(raw) + 1
        line = raw.rstrip(b"\r").decode("latin-1")
        if index == 0 or line.startswith("#"):
            continue
        if line == "":
            fields["_bytes"] = str(offset)
            return fields
        if ":=" in line:
            key, value = line.split(":=", 1)
            fields[key.strip().lower()] = value
            continue
        if ": " not in line:
            raise ImageFileError(f"{path}: header line {index + 1} is not 'field: value'")
        key, value = line.split(": ", 1)
        key = key.strip().lower()
        fields[key] = value.strip()
        if key in ("data file", "datafile") and value.strip().upper().startswith("LIST"):
            fields["_list"] = [entry.decode("latin-1").strip() for entry in lines[index + 1 :] if entry.strip()]
            fields["_bytes"] = str(len(head))
            return fields
    if len(head) >= _MAX_HEADER_BYTES:
        raise ImageFileError(f"{path}: the NRRD header is over {_MAX_HEADER_BYTES >> 20} MB")
    fields["_bytes"] = str(len(head))  # a detached header (.nhdr) may end without a blank line
    return fields


def _detached_files(path: Path, header: dict) -> list[Path]:
    value = header.get("data file") or header.get("datafile")
    if not value:
        return []
    value = str(value)
    folder = path.parent
    if value.upper().startswith("LIST"):
        names = list(header.get("_list", []))
    else:
        parts = value.split()
        if len(parts) >= 4 and "%" in parts[0]:  # printf-style: format min max step [subdim]
            try:
                first, last, step = int(parts[1]), int(parts[2]), int(parts[3])
            except ValueError:
                raise ImageFileError(f"{path}: 'data file: {value}' is malformed") from None
            if step == 0 or abs(last - first) // abs(step) > 100_000:
                raise ImageFileError(f"{path}: 'data file: {value}' names too many files")
            try:
                names = [parts[0] % number for number in range(first, last + (1 if step > 0 else -1), step)]
            except (TypeError, ValueError):
                raise ImageFileError(f"{path}: 'data file: {value}' is malformed") from None
        else:
            names = [value]
    for name in names:
        if not name or not name.isprintable():
            raise ImageFileError(f"{path}: 'data file' names {name!r}, which is not a printable file name")
    return [folder / name for name in names]


def _check_nrrd(path: Path, header: dict) -> None:
    folder = Path(os.path.realpath(path.parent))
    for data_file in _detached_files(path, header):
        resolved = Path(os.path.realpath(data_file))
        if folder not in resolved.parents:
            raise ImageFileError(
                f"{path} reads its voxels from {data_file}, outside the header's folder {path.parent}; DeepSeg "
                "reads detached NRRD data only from the header's own folder: move the data file beside it"
            )
        if not resolved.is_file():
            raise ImageFileError(f"{path} names the data file {data_file.name}, which does not exist")
    sizes = str(header.get("sizes", "")).split()
    try:
        extent = float(np.prod([float(s) for s in sizes], dtype=np.float64)) if sizes else 0.0
    except ValueError:
        raise ImageFileError(f"{path}: 'sizes: {' '.join(sizes)}' is not a list of numbers") from None
    limits.VOXELS.check(extent, f"the grid of {path.name} (all its components)")
    segments = {m.group(1) for key in header if (m := re.match(r"segment(\d+)_", key))}
    limits.SEGMENTS.check(len(segments), f"the segment count of {path.name}")


def _expected_nrrd_bytes(header: dict) -> int | None:
    kind = str(header.get("type", "")).strip().lower()
    if kind not in _NRRD_TYPE_BYTES:
        return None
    sizes = [int(s) for s in str(header.get("sizes", "")).split() if s.isdigit()]
    return int(np.prod(sizes, dtype=np.int64)) * _NRRD_TYPE_BYTES[kind] if sizes else None


def _nrrd_dtype(header: dict) -> np.dtype | None:
    kind = str(header.get("type", "")).strip().lower()
    if kind not in _NRRD_TYPE_BYTES:
        return None
    size = _NRRD_TYPE_BYTES[kind]
    if kind in ("float", "double"):
        code = f"f{size}"
    elif kind.startswith(("u", "unsigned")):
        code = f"u{size}"
    else:
        code = f"i{size}"
    order = ">" if str(header.get("endian", "little")).strip().lower() == "big" else "<"
    return np.dtype(order + code)


def _check_nrrd_complete(path: Path, header: dict) -> None:
    if header.get("data file") or header.get("datafile") or header.get("line skip") or header.get("byte skip"):
        return  # detached or skipping data: the reader checks sizes against its files
    expected = _expected_nrrd_bytes(header)
    dtype = _nrrd_dtype(header)
    encoding = str(header.get("encoding", "raw")).lower()
    if expected is None or dtype is None or encoding not in ("raw", "gzip", "gz"):
        return
    _scan_voxel_data(path, int(header["_bytes"]), expected, dtype, compressed=encoding != "raw", skip=0)


def _check_nifti_complete(path: Path) -> None:
    import nibabel

    try:
        image = nibabel.load(str(path))
        header = image.header
        dtype = header.get_data_dtype()
        expected = int(np.prod(header.get_data_shape(), dtype=np.int64)) * dtype.itemsize
        # a single-file NIfTI's voxels start at 352 at the earliest, whatever vox_offset says (as nibabel reads it)
        offset = max(int(header.get("vox_offset", 352)), 352)
    except Exception:  # noqa: BLE001 - nibabel raises many kinds for a damaged header
        raise ImageFileError(f"{path}: its NIfTI header cannot be read; the file is damaged") from None
    compressed = path.name.lower().endswith(".gz")
    _scan_voxel_data(path, 0 if compressed else offset, expected, dtype, compressed, skip=offset if compressed else 0)


def _scan_voxel_data(path: Path, offset: int, expected: int, dtype: np.dtype, compressed: bool, skip: int) -> None:
    """Reads the voxel data once, in chunks: it must be as long as the header promises (a cut file is an error,
    not half a volume of zeros), and floating-point voxels must be finite (readers turn NaN into 0 silently).

    ``offset`` is where the (compressed) stream starts in the file; ``skip`` how many decompressed bytes
    precede the voxels. Never reads past the promised length (a gzip bomb behind a small header stays packed).
    """
    floating = dtype.kind == "f"
    total = 0
    nonfinite = 0
    remainder = b""
    with open(path, "rb") as raw:
        raw.seek(offset)
        stream = gzip.GzipFile(fileobj=raw) if compressed else raw
        try:
            while total < skip + expected:
                chunk = stream.read(min(1 << 22, skip + expected - total))
                if not chunk:
                    break
                start = max(0, skip - total)
                total += len(chunk)
                if floating and start < len(chunk):
                    data = remainder + chunk[start:]
                    usable = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data[:usable], dtype=dtype)
                    nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                    remainder = data[usable:]
        except (EOFError, OSError, zlib.error):
            raise ImageFileError(f"{path} is truncated or damaged: its compressed data ends early ({total} bytes "
                                 "decompressed); copy the file again") from None  # fmt: skip
    actual = total - skip
    if actual < expected:
        raise ImageFileError(f"{path} is truncated: {max(actual, 0)} of {expected} bytes of voxel data; copy the "
                             "file again")  # fmt: skip
    if nonfinite:
        raise ImageFileError(
            f"{path} has {nonfinite} NaN or infinite voxels; DeepSeg does not guess values for them (a reader would "
            "silently make them 0): replace them first (in Python, numpy.nan_to_num)"
        )


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuses NaN or infinite voxels, which a network would turn into a wrong result without a word.

    Raises:
        ImageFileError: naming how many voxels and what to do.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ImageFileError(
            f"{what} has {bad} NaN or infinite voxels ({bad / array.size:.2%}); DeepSeg does not guess values for "
            "them: replace them first (in Slicer, Volumes > Threshold or Simple Filters; in Python, numpy.nan_to_num)"
        )
