"""Cases per hour of a cohort (by hand, not in CI): the local batch (one worker process) against Ray with N actors
of one core each, on the same cases, in one run; and Ray's overhead per case (a case's time from hand-out to
result, less the time the case itself took in its actor).

    python Testing/benchmarks/bench_cohort.py                 # 8 cases, the bundled model, 2 actors
    python Testing/benchmarks/bench_cohort.py --cases 16 --actors 2

The cases are copies of the real head MRI in ../shared/data/mr_brain_seg3d, segmented with the bundled
deepseg-brain model. On a GPU machine, ``--gpu`` gives Ray one actor per GPU instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSegModule"))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the benchmark's Ray on loopback only
HEAD_MRI = Path(__file__).resolve().parents[3] / "shared" / "data" / "mr_brain_seg3d" / "MR.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="cuda: one Ray actor per GPU")
    arguments = parser.parse_args()
    if not HEAD_MRI.exists():
        raise SystemExit(f"{HEAD_MRI} is missing (../shared/data)")
    import ray

    from DeepSegModuleLib.batch import read_cases, run_cases
    from DeepSegModuleLib.cohort import INPUT_COLUMNS, SegmentCases
    from DeepSegModuleLib.jobs import ProcessWorker
    from DeepSegModuleLib.models.store import ModelStore, resolve_model
    from DeepSegModuleLib.ray_cohort import run_on_ray
    from DeepSegModuleLib.segmentation.options import SegmentationOptions

    device = "cuda" if arguments.gpu else "cpu"
    model = resolve_model(None, ModelStore())
    with tempfile.TemporaryDirectory() as work:
        cases_folder = Path(work) / "cases"
        cases_folder.mkdir()
        for index in range(arguments.cases):
            shutil.copy(HEAD_MRI, cases_folder / f"head-{index:02d}.nii.gz")
        cases = read_cases(cases_folder, INPUT_COLUMNS[:1], optional=INPUT_COLUMNS[1:])
        options = SegmentationOptions(device=device)

        local_job = SegmentCases(model, options, Path(work) / "local", "nii.gz")
        worker = ProcessWorker()
        started = time.perf_counter()
        try:
            local = run_cases(cases, local_job.output_dir, local_job.outputs_of,
                              lambda case, outputs: local_job(case, outputs, worker))  # fmt: skip
        finally:
            worker.shutdown()
        local_s = time.perf_counter() - started

        ray_job = SegmentCases(model, options, Path(work) / "ray", "nii.gz")
        ray.init(address="local", num_cpus=arguments.actors, num_gpus=None if arguments.gpu else 0,
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR")  # fmt: skip
        round_trips: dict[str, float] = {}
        started = time.perf_counter()
        try:
            on_ray = run_on_ray(cases, ray_job, cpus_per_actor=1, round_trips=round_trips)
        finally:
            ray.shutdown()
        ray_s = time.perf_counter() - started

        failed = [r.name for r in [*local, *on_ray] if r.status != "done"]
        if failed:
            raise SystemExit(f"cases failed: {failed}")
        identical = all((ray_job.output_dir / f"{c.name}.nii.gz").read_bytes()
                        == (local_job.output_dir / f"{c.name}.nii.gz").read_bytes() for c in cases)  # fmt: skip
        overheads = [round_trips[r.name] - r.seconds for r in on_ray if r.name in round_trips]
        print(f"{arguments.cases} cases, deepseg-brain on {HEAD_MRI.name}, device {device}")
        print(f"local batch (1 worker):        {local_s:7.1f} s  {3600 * arguments.cases / local_s:7.0f} cases/hour")
        print(f"Ray ({arguments.actors} actors x 1 core):      {ray_s:7.1f} s  {3600 * arguments.cases / ray_s:7.0f} "
              f"cases/hour  (x{local_s / ray_s:.2f}; includes starting Ray and its actors)")  # fmt: skip
        print(f"Ray overhead per case: median {statistics.median(overheads):.3f} s, max {max(overheads):.3f} s")
        print(f"label maps identical between the two: {identical}")


if __name__ == "__main__":
    main()
