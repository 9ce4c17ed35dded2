"""``LogProgressBar``: Lightning's training progress bar, readable in log files.

On a terminal it is Lightning's ``TQDMProgressBar``. When its stream is not a terminal (SLURM ``.out``
files, ``nohup``), it shows the training bar only (no nested validation bar), as one plain line at most
every ``log_interval`` seconds, with no carriage returns or cursor-movement codes. ``train.py`` adds it
when the configuration has no progress bar of its own and ``trainer.enable_progress_bar`` is on.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

from mtsae.progress import LineStream

__all__ = ["LogProgressBar"]


class _ThrottledTqdm(Tqdm):
    """A bar whose explicit ``refresh()`` calls (Lightning makes one per batch) print at most every ``interval`` s."""

    def __init__(self, *args: Any, interval: float = 30.0, **kwargs: Any) -> None:
        self._interval, self._last_print, self._done_printed = interval, float("-inf"), None
        super().__init__(*args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if now - self._last_print >= self._interval or (done and self._done_printed != (self.desc, self.n)):
            self._last_print = now
            if done:
                self._done_printed = (self.desc, self.n)  # the end of an epoch: one line, not one per refresh
            super().refresh(*args, **kwargs)


class LogProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` on a terminal; plain lines for the training bar only in a log file.

    Args:
        refresh_rate: batches between updates (as ``TQDMProgressBar``).
        log_interval: seconds between lines when the stream is not a terminal.
        stream: where the bar is written (default: ``sys.stdout``, as Lightning's bar).
    """

    def __init__(
        self, refresh_rate: int = 1, log_interval: float = 30.0, stream: IO[str] | None = None
    ) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.log_interval = log_interval
        self._stream = stream

    @property
    def stream(self) -> IO[str]:
        return sys.stdout if self._stream is None else self._stream

    @property
    def is_terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    @override
    def init_train_tqdm(self) -> Tqdm:
        if self.is_terminal:
            return super().init_train_tqdm()
        return _ThrottledTqdm(
            desc=self.train_description,
            disable=self.is_disabled,
            leave=True,
            file=LineStream(self.stream),
            ascii=True,
            ncols=120,
            smoothing=0,
            mininterval=self.log_interval,
            bar_format=self.BAR_FORMAT,
            interval=self.log_interval,
        )

    def _silent(self) -> Tqdm:
        return Tqdm(disable=True)

    @override
    def init_sanity_tqdm(self) -> Tqdm:
        return super().init_sanity_tqdm() if self.is_terminal else self._silent()

    @override
    def init_validation_tqdm(self) -> Tqdm:
        return super().init_validation_tqdm() if self.is_terminal else self._silent()

    @override
    def init_predict_tqdm(self) -> Tqdm:
        return super().init_predict_tqdm() if self.is_terminal else self._silent()

    @override
    def init_test_tqdm(self) -> Tqdm:
        return super().init_test_tqdm() if self.is_terminal else self._silent()
