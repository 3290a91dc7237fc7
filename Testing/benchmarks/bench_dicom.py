"""DICOM in and out at CT size (by hand, not in CI): reading a 512 x 512 x 300 CT series (DeepSeg's reader against
SimpleITK's ImageSeriesReader, files in the page cache), and writing a 100-label segmentation of it as a DICOM
SEG, LABELMAP (DeepSeg's default) against BINARY: seconds and file size.

    python Testing/benchmarks/bench_dicom.py            # --slices 300 --labels 100

Targets (issue 18): read <= 3 s, LABELMAP write <= 10 s, LABELMAP file <= 1/10 of the BINARY one.
The series is written here with pydicom (uncompressed, one file per image), so it needs no data set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSegModule"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Python"))

from dicom_helpers import write_series  # noqa: E402

from DeepSegModuleLib import dicom_seg, dicom_series  # noqa: E402
from DeepSegModuleLib.labels import LabelInfo  # noqa: E402


def body_field(points: np.ndarray) -> np.ndarray:
    """A CT-like body: soft tissue in an ellipse, air outside, a bright rod (bone); values in HU."""
    inside = (points[:, 0] / 170.0) ** 2 + (points[:, 1] / 120.0) ** 2 <= 1.0
    rod = (points[:, 0] - 20.0) ** 2 + (points[:, 1] + 40.0) ** 2 <= 15.0**2
    return np.where(rod, 700.0, np.where(inside, 40.0 + 0.05 * points[:, 2], -1000.0))


def hundred_labels(shape: tuple[int, int, int], count: int) -> np.ndarray:
    """``count`` labelled blocks tiling the body's middle (organ-sized regions, as TotalSegmentator's 117 are)."""
    labels = np.zeros(shape, np.uint8)
    slabs = int(np.ceil(count / 25))
    k_edges = np.linspace(0, shape[0], slabs + 1).astype(int)
    j_edges = np.linspace(shape[1] * 0.25, shape[1] * 0.75, 6).astype(int)
    i_edges = np.linspace(shape[2] * 0.2, shape[2] * 0.8, 6).astype(int)
    value = 1
    for k in range(slabs):
        for j in range(5):
            for i in range(5):
                if value > count:
                    return labels
                labels[k_edges[k]:k_edges[k + 1], j_edges[j]:j_edges[j + 1], i_edges[i]:i_edges[i + 1]] = value
                value += 1
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--labels", type=int, default=100)
    arguments = parser.parse_args()
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "series"
        started = time.perf_counter()
        write_series(folder, body_field, rows=512, columns=512, pixel_spacing=(0.8, 0.8), slices=arguments.slices,
                     slice_step=(0.0, 0.0, 1.0), origin=(-204.8, -204.8, -150.0))  # fmt: skip
        print(f"wrote a {512}x{512}x{arguments.slices} CT series with pydicom in {time.perf_counter() - started:.1f} s")
        for path in folder.iterdir():  # into the page cache
            path.read_bytes()

        started = time.perf_counter()
        series = dicom_series.read(dicom_series.find_series(folder))
        ours = time.perf_counter() - started
        reader = sitk.ImageSeriesReader()
        started = time.perf_counter()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        image = reader.Execute()
        theirs = time.perf_counter() - started
        same = np.array_equal(sitk.GetArrayViewFromImage(image), series.array)
        print(f"read: DeepSeg {ours:.2f} s, SimpleITK {theirs:.2f} s (x{theirs / ours:.1f}); voxels identical: {same}")

        labels = hundred_labels(series.array.shape, arguments.labels)
        table = [LabelInfo(value, f"structure {value}") for value in range(1, arguments.labels + 1)]
        sizes = {}
        for encoding in ("labelmap", "binary"):
            path = Path(work) / f"{encoding}.dcm"
            started = time.perf_counter()
            dicom_seg.write_dicom_seg(path, series, labels, table, model_name="benchmark", encoding=encoding)
            seconds = time.perf_counter() - started
            sizes[encoding] = path.stat().st_size
            print(f"SEG write, {arguments.labels} labels, {encoding:<8s}: {seconds:6.2f} s, "
                  f"{sizes[encoding] / 2**20:8.1f} MiB")  # fmt: skip
        print(f"LABELMAP file is 1/{sizes['binary'] / sizes['labelmap']:.0f} of the BINARY one")


if __name__ == "__main__":
    main()
