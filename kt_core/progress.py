"""Progress for long work (loading, quantizing, building checkpoints), always on stderr.

On an interactive terminal a rich bar is drawn while the work runs; elsewhere (CI logs,
pipes, IDE consoles) one line says what started and one what finished, so minutes of
work are never silent:

    loading qwen3_moe (4 layers) ...
    loading qwen3_moe (4 layers): 4/4 done in 3.2 s

``KT_PROGRESS=0`` turns both off (the timing is still logged at INFO).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger("kt_core")


def enabled() -> bool:
    return os.environ.get("KT_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def _tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """``with progress("loading", n) as advance: ... advance()``"""
    start = time.perf_counter()
    done = [0]
    stream = sys.stderr
    show = enabled()
    if show and _tty(stream):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), transient=True, console=Console(file=stream)) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                done[0] += n
                bar.advance(task, n)

            yield advance
    else:
        if show:
            _line(stream, f"{description} ...")

        def advance(n: int = 1) -> None:
            done[0] += n

        yield advance
    elapsed = time.perf_counter() - start
    if show:
        _line(stream, f"{description}: {done[0]}/{total} done in {elapsed:.1f} s")
    log.info("%s: %d steps in %.1fs", description, total, elapsed)


def _line(stream, text: str) -> None:
    """One progress line on stderr (never stdout: a command's output stays its own)."""
    stream.write(text + "\n")
    stream.flush()
