"""A job that wraps a real cohort job and kills its worker process on chosen cases, as a crash in a native
library would (no Python exception reaches Ray, the process is simply gone)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CrashingJob:
    """Runs ``inner`` on every case, except that the worker process dies on each case named in ``always`` and on
    the first try of each case named in ``once`` (a file in ``marks`` remembers the try across processes)."""

    inner: Any
    marks: Path
    always: tuple[str, ...] = ()
    once: tuple[str, ...] = ()
    kind: str = field(default="segment")

    @property
    def output_dir(self) -> Path:
        return self.inner.output_dir

    def outputs_of(self, case):
        return self.inner.outputs_of(case)

    def paths(self, cases):
        return self.inner.paths(cases)

    def __call__(self, case, outputs, worker):
        if case.name in self.always:
            os._exit(3)
        if case.name in self.once:
            mark = self.marks / f"{case.name}.tried"
            if not mark.exists():
                mark.write_text("tried once")
                os._exit(3)
        return self.inner(case, outputs, worker)
