"""Progress bars that stay readable in log files (SLURM ``.out`` files, ``nohup``, CI logs).

On a terminal, :func:`progress_bar` is an ordinary ``tqdm`` bar. When the stream is not a terminal it
writes one plain line per update, at most every ``log_interval`` seconds, with no carriage returns or
cursor-movement codes. Bars do not nest: while one is open in a process, further bars are silent (a
cache build shows one bar, not one per shard or per LM batch).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

from tqdm.std import tqdm

__all__ = ["progress_bar", "track", "LineStream", "no_library_bars"]

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
_open_bars = 0
T = TypeVar("T")


class LineStream:
    """A file-like wrapper that turns tqdm's in-place refreshes into plain, newline-terminated lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = _CONTROL.sub("\n", s)
        for line in text.split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class _Bar(tqdm):
    """A ``tqdm`` that counts the open bars of this process (see :func:`progress_bar`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _open_bars
        super().__init__(*args, **kwargs)
        self._counted = not self.disable
        if self._counted:
            _open_bars += 1

    def close(self) -> None:
        global _open_bars
        if getattr(self, "_counted", False):
            self._counted = False
            _open_bars -= 1
        super().close()


def progress_bar(
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
    log_interval: float = 30.0,
    **kwargs: Any,
) -> tqdm:
    """A progress bar for one job; silent when ``disable`` or when another bar is already open.

    Args:
        total: expected number of units.
        desc: label in front of the bar.
        unit: name of one unit.
        disable: show nothing.
        file: stream (default ``sys.stderr``).
        log_interval: seconds between lines when the stream is not a terminal.
        kwargs: passed to ``tqdm``.
    """
    stream = sys.stderr if file is None else file
    silent = disable or _open_bars > 0
    common = dict(total=total, desc=desc, unit=unit, disable=silent, **kwargs)
    if silent or getattr(stream, "isatty", lambda: False)():
        return _Bar(file=stream, dynamic_ncols=True, **common)
    return _Bar(
        file=LineStream(stream),
        ascii=True,
        ncols=100,
        mininterval=log_interval,
        maxinterval=log_interval,
        **common,
    )


def track(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    disable: bool = False,
    **kwargs: Any,
) -> Iterator[T]:
    """Iterate over ``iterable`` with a :func:`progress_bar`, closed when the loop ends or is left early."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = progress_bar(total=total, desc=desc, disable=disable, **kwargs)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


@contextmanager
def no_library_bars() -> Iterator[None]:
    """Silence ``transformers``' own bars (loading weights) when stderr is not a terminal or a bar is open."""
    from transformers.utils import logging as hf_logging

    quiet = _open_bars > 0 or not getattr(sys.stderr, "isatty", lambda: False)()
    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()
