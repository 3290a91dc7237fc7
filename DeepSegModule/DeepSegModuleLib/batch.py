"""Running a cohort: many cases, one persistent worker (the model loads once), resumable, failures isolated.

A case list comes from a folder (every image file is a case, named after the file) or a CSV with a header:
``case,input[,input2,...]`` for segmentation and ``case,fixed,moving[,moving_segmentation]`` for registration
(relative paths are relative to the CSV). Each finished case writes its outputs and then a small
``<case>.done.json`` record; a re-run skips cases whose record and outputs exist, so an interrupted batch
continues where it stopped. A failed case is recorded and the batch goes on.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import VOLUME_SUFFIXES

DONE_SUFFIX = ".done.json"


@dataclass
class Case:
    """One case: a name and its named input files."""

    name: str
    files: dict[str, Path]


@dataclass
class CaseResult:
    """What happened to a case: "done", "skipped" (done earlier) or "failed"."""

    name: str
    status: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_cases(source: str | Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Case]:
    """Cases from a folder of images (first column only) or a CSV with a ``case`` column and ``columns``.

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
        if not images:
            raise ValueError(f"no images (.nii.gz, .nrrd, .mha, ...) in {source}")
        cases = [Case(_case_name(path), {columns[0]: path}) for path in images]
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
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"case names must be unique; repeated: {duplicates}")
    return cases


def run_cases(
    cases: list[Case],
    output_dir: Path,
    outputs_of: Callable[[Case], dict[str, Path]],
    process: Callable[[Case, dict[str, Path]], dict[str, Any]],
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Processes every case not done yet; returns one result per case in order.

    Args:
        outputs_of: the output files of a case (all must exist for the case to count as done).
        process: does one case, writing exactly those outputs; returns a summary (JSON-able).
        on_result: called after each case (progress display).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        outputs = outputs_of(case)
        record = output_dir / f"{case.name}{DONE_SUFFIX}"
        if record.is_file() and all(path.exists() for path in outputs.values()):
            previous = json.loads(record.read_text(encoding="utf-8"))
            result = CaseResult(case.name, "skipped", previous.get("seconds", 0.0),
                                {k: str(v) for k, v in outputs.items()}, previous.get("summary", {}))
        else:
            started = time.perf_counter()
            try:
                summary = process(case, outputs)
            except Exception as error:  # noqa: BLE001 - one case's failure must not stop the cohort
                for path in outputs.values():
                    if path.is_file():
                        path.unlink()
                result = CaseResult(case.name, "failed", time.perf_counter() - started, error=" ".join(str(error).split()))
            else:
                seconds = time.perf_counter() - started
                result = CaseResult(case.name, "done", seconds, {k: str(v) for k, v in outputs.items()}, summary)
                record.write_text(json.dumps({"seconds": seconds, "summary": summary}, indent=2, default=str), encoding="utf-8")
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def iter_rows(results: list[CaseResult]) -> Iterator[tuple[str, str, str, str]]:
    """(case, status, seconds, details) rows for the summary table."""
    for result in results:
        if result.status == "failed":
            details = result.error
        else:
            details = ", ".join(f"{key} {value}" for key, value in result.summary.items())
        yield result.name, result.status, f"{result.seconds:.1f}", details
