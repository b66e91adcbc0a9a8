"""Progress bars for long work (loading, quantizing, building checkpoints).

A rich bar on an interactive terminal; elsewhere (CI logs, pipes) nothing is
drawn and the work is logged at INFO when it ends.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("kt_core")


@contextmanager
def progress(description: str, total: int) -> Iterator:
    """``with progress("loading", n) as advance: ... advance()``"""
    start = time.perf_counter()
    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
    else:
        yield lambda n=1: None
    log.info("%s: %d steps in %.1fs", description, total, time.perf_counter() - start)
