"""Running a cohort: many cases, one persistent worker (the model loads once), resumable, failures isolated.

A case list comes from a folder (every image file is a case, named after the file, and so is every subfolder that
holds a DICOM series, named after the folder) or a CSV with a header:
``case,input[,input2,...]`` for segmentation and ``case,fixed,moving[,moving_segmentation]`` for registration
(relative paths are relative to the CSV). Each finished case writes its outputs and then a small
``<case>.done.json`` record; a re-run skips cases whose record and outputs exist, so an interrupted batch
continues where it stopped. A failed case is recorded and the batch goes on. After the batch,
``deepseg-summary.csv`` and ``deepseg-summary.json`` hold one row per case: status, seconds, error and the numbers
of its summary (numbers as numbers in the JSON).

The same cases run on a Ray cluster through :mod:`~DeepSegModuleLib.ray_cohort`, with :func:`finished` and
:func:`run_case` as here, so both write the same files and records.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dicom_series import holds_dicom
from .models.errors import ModelError
from .outputs import OutputError, replace_text
from .storage import VOLUME_SUFFIXES, StorageError

DONE_SUFFIX = ".done.json"
#: Failures that another try would give again: the input, the model or an output was refused.
REFUSALS = (ValueError, StorageError, OutputError, ModelError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)  # fmt: skip


@dataclass
class Case:
    """One case: a name and its named input files."""

    name: str
    files: dict[str, Path]


@dataclass
class CaseResult:
    """What happened to a case: "done", "skipped" (done earlier) or "failed".

    ``attempts`` counts the tries (a cohort on Ray retries a case once); ``retryable`` says whether a failure may
    pass on another try (an unexpected error, a worker that died), as a refusal of bad input would not.
    """

    name: str
    status: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    attempts: int = 1
    retryable: bool = False


#: A case name becomes a file name in the output folder: the model-id rule (letters, digits, '.', '_', '-';
#: no leading dot, no separator, at most 128 characters), matched whole.
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.stem
    return _safe_case_name(name)


def _safe_case_name(name: str) -> str:
    """A file's or a folder's own name made a safe case name (spaces and other characters become '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")[:128]
    return cleaned or "case"


def read_cases(source: str | Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Case]:
    """Cases from a folder (each image file, and each subfolder holding a DICOM series, is a case; first column
    only) or a CSV with a ``case`` column and ``columns`` (an entry may be a DICOM series folder).

    Raises:
        ValueError: a CSV without the required columns, duplicate case names, or an empty folder.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"{source} does not exist: pass a folder of images or a CSV of cases")
    if source.is_dir():
        if len(columns) > 1:
            raise ValueError(f"a folder gives one image per case; for {', '.join(columns)} use a CSV")
        images = sorted(p for p in source.iterdir() if p.is_file() and any(p.name.lower().endswith(s) for s in VOLUME_SUFFIXES))
        series = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".") and holds_dicom(p))
        if not images and not series:
            raise ValueError(f"no images (.nii.gz, .nrrd, .mha, ...) and no DICOM series folders in {source}")
        cases = [Case(_case_name(path), {columns[0]: path}) for path in images]
        cases += [Case(_safe_case_name(path.name), {columns[0]: path}) for path in series]
    else:
        with source.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        header = set(rows[0]) if rows else set()
        missing = [name for name in ("case", *columns) if name not in header]
        if missing:
            raise ValueError(f"{source} needs the column(s) {missing}; it has {sorted(header)}")
        cases = []
        for row in rows:
            files = {}
            for name in (*columns, *optional):
                value = (row.get(name) or "").strip()
                if value:
                    path = Path(value)
                    files[name] = path if path.is_absolute() else source.parent / path
            cases.append(Case(row["case"].strip(), files))
    names = [case.name for case in cases]
    unsafe = [name for name in names if not CASE_NAME.fullmatch(name)]
    if unsafe:
        raise ValueError(
            f"case names become output file names and may hold only letters, digits, '.', '_' and '-' (not starting "
            f"with '.'): fix {unsafe[:5]} in {source}"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"case names must be unique; repeated: {duplicates}")
    return cases


def finished(case: Case, outputs: dict[str, Path], output_dir: Path) -> CaseResult | None:
    """The "skipped" result of a case done earlier (its record and every output exist), else None."""
    record = output_dir / f"{case.name}{DONE_SUFFIX}"
    previous = _read_record(record) if all(path.exists() for path in outputs.values()) else None
    if previous is None:
        return None
    return CaseResult(case.name, "skipped", previous.get("seconds", 0.0), {k: str(v) for k, v in outputs.items()},
                      previous.get("summary", {}))  # fmt: skip


def run_case(
    case: Case, outputs: dict[str, Path], output_dir: Path, process: Callable[[Case, dict[str, Path]], dict[str, Any]]
) -> CaseResult:
    """Runs one case and writes its done-record; a failure becomes a "failed" result (never an exception), marked
    ``retryable`` unless it is a refusal of bad input that another try would refuse again."""
    record = output_dir / f"{case.name}{DONE_SUFFIX}"
    started = time.perf_counter()
    try:
        # process() writes all of a case's outputs or none (outputs.OutputSet), so nothing is removed here
        summary = process(case, outputs)
        seconds = time.perf_counter() - started
        _write_record(record, {"seconds": seconds, "summary": summary})
    except Exception as error:  # noqa: BLE001 - one case's failure must not stop the cohort
        return CaseResult(case.name, "failed", time.perf_counter() - started, error=" ".join(str(error).split()),
                          retryable=not isinstance(error, REFUSALS))  # fmt: skip
    return CaseResult(case.name, "done", seconds, {k: str(v) for k, v in outputs.items()}, summary)


def run_cases(
    cases: list[Case],
    output_dir: Path,
    outputs_of: Callable[[Case], dict[str, Path]],
    process: Callable[[Case, dict[str, Path]], dict[str, Any]],
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Processes every case not done yet, one after the other; returns one result per case in order.

    Args:
        outputs_of: the output files of a case (all must exist for the case to count as done).
        process: does one case, writing exactly those outputs; returns a summary (JSON-able).
        on_result: called after each case (progress display).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        outputs = outputs_of(case)
        result = finished(case, outputs, output_dir) or run_case(case, outputs, output_dir, process)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _read_record(record: Path) -> dict[str, Any] | None:
    """A case's done-record, or None when there is none or it is damaged (the case then runs again)."""
    try:
        content = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _write_record(record: Path, content: dict[str, Any]) -> None:
    """Writes a case's done-record atomically (a crash never leaves half a record that would skip the case)."""
    replace_text(record, json.dumps(content, indent=2, default=str))


SUMMARY_CSV = "deepseg-summary.csv"
_SUMMARY_COLUMNS = ("case", "status", "seconds", "error")


def write_summary_csv(results: list[CaseResult], output_dir: Path) -> Path:
    """One row per case (status, seconds, error, and each number of its summary as a column) in
    ``<output_dir>/deepseg-summary.csv``, rewritten after every batch; a file of that name that DeepSeg did not
    write (another header) is left alone and the summary goes to ``deepseg-summary-<n>.csv``."""
    numbers = sorted({key for result in results for key in result.summary})
    columns = [*_SUMMARY_COLUMNS, *numbers]
    target = output_dir / SUMMARY_CSV
    serial = 1
    while target.exists() and not _written_by_deepseg(target):
        serial += 1
        target = output_dir / f"deepseg-summary-{serial}.csv"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for result in results:
        values = [result.name, result.status, round(result.seconds, 3), result.error]
        writer.writerow(values + [result.summary.get(key, "") for key in numbers])
    return replace_text(target, text.getvalue())


SUMMARY_JSON = "deepseg-summary.json"


def write_summary_json(results: list[CaseResult], output_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """The batch as JSON in ``<output_dir>/deepseg-summary.json`` (beside the CSV, with the same rule for a file of
    that name that DeepSeg did not write): every case with its status, seconds, attempts, error and summary."""
    target = output_dir / SUMMARY_JSON
    serial = 1
    while target.exists() and not _json_by_deepseg(target):
        serial += 1
        target = output_dir / f"deepseg-summary-{serial}.json"
    cases = [{"case": r.name, "status": r.status, "seconds": round(r.seconds, 3), "attempts": r.attempts,
              "error": r.error, "outputs": r.outputs, "summary": r.summary} for r in results]  # fmt: skip
    content = {"deepseg_batch_summary": 1, **(extra or {}), "cases": cases,
               "failed": [r.name for r in results if r.status == "failed"]}  # fmt: skip
    return replace_text(target, json.dumps(content, indent=2, default=str))


def _json_by_deepseg(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("deepseg_batch_summary") == 1
    except (OSError, ValueError, AttributeError):
        return False


def _written_by_deepseg(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().strip().split(",")[: len(_SUMMARY_COLUMNS)] == list(_SUMMARY_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


def iter_rows(results: list[CaseResult]) -> Iterator[tuple[str, str, str, str]]:
    """(case, status, seconds, details) rows for the summary table."""
    for result in results:
        if result.status == "failed":
            details = result.error
        else:
            details = ", ".join(f"{key} {value}" for key, value in result.summary.items())
        yield result.name, result.status, f"{result.seconds:.1f}", details
