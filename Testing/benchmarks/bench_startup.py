"""How long the command line takes to say something (by hand, not in CI): ``--help``, a wrong argument, CUDA
without a GPU, and the first progress line of ``deepseg segment`` with the bundled model, for one or more
checkouts side by side (each run a fresh process; the median of the repeats).

    git worktree add /tmp/deepseg-before 0c6b51b
    python Testing/benchmarks/bench_startup.py --checkout /tmp/deepseg-before --checkout . --repeats 5
    sudo python Testing/benchmarks/bench_startup.py --checkout . --repeats 3 --cold   # a cold machine

``--cold`` empties the page cache (Linux, ``/proc/sys/vm/drop_caches``, root) before every run, so each run reads
torch, VTK and MONAI from disk as the first command after a boot does; without it, runs after the first find the
libraries in memory.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_MRI = Path(__file__).resolve().parents[3] / "shared" / "data" / "mr_brain_seg3d" / "MR.nii.gz"


def drop_page_cache() -> None:
    """Writes dirty pages out and empties the page cache (Linux, root), or says why it cannot."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"--cold needs root on Linux to empty the page cache ({error})") from None


def first_line_seconds(checkout: Path, argv: list[str], wait_for: str | None, cold: bool = False) -> float:
    """Seconds until the process prints a stderr line containing ``wait_for`` (or until it ends)."""
    if cold:
        drop_page_cache()
    code = (f"import sys; sys.path.insert(0, {str(checkout / 'DeepSegModule')!r}); "
            "from DeepSegModuleLib.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    seconds = None
    for line in process.stderr:
        if wait_for is not None and wait_for in line and seconds is None:
            seconds = time.perf_counter() - started
    process.wait()
    return seconds if seconds is not None else time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, action="append", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="empty the page cache before every run (root)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cases = {
            "--help": (["--help"], None),
            "register --preset magic (error)": (["register", "--fixed", str(HEAD_MRI), "--moving", str(HEAD_MRI),
                                                 "--output-transform", f"{work}/t.h5", "--preset", "magic"], None),
            "segment --device cuda, no GPU (error)": (["segment", "-i", str(HEAD_MRI), "-o", f"{work}/a.seg.nrrd",
                                                       "--device", "cuda"], None),
            "segment: first progress line": (["segment", "-i", str(HEAD_MRI), "--device", "cpu"], "..."),
            "segment: model loading starts": (["segment", "-i", str(HEAD_MRI), "--device", "cpu"], "load ..."),
            "segment: whole run": (["segment", "-i", str(HEAD_MRI), "--device", "cpu"], None),
        }  # fmt: skip
        times: dict[tuple[str, int], list[float]] = {}
        serial = 0
        for _ in range(arguments.repeats):
            for case, (argv, wait_for) in cases.items():
                for index, checkout in enumerate(arguments.checkout):
                    serial += 1
                    run_argv = [*argv, "-o", f"{work}/out{serial}.seg.nrrd"] if argv[0] == "segment" and "-o" not in argv else argv
                    times.setdefault((case, index), []).append(first_line_seconds(checkout.resolve(), run_argv, wait_for,
                                                                                       arguments.cold))
    print(f"{'case':40s} " + " ".join(f"{str(c)[-24:]:>26s}" for c in arguments.checkout))
    for case in cases:
        medians = [statistics.median(times[(case, i)]) for i in range(len(arguments.checkout))]
        print(f"{case:40s} " + " ".join(f"{m:24.2f} s" for m in medians))


if __name__ == "__main__":
    main()
