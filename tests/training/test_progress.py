"""Progress bars in non-terminal logs (SLURM .out files): plain lines, no cursor codes, one bar per job."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from data.cache_format import CacheSpec
from data.cache_writer import build_cache
from data.lm_source import LMSource
from mtsae.progress import progress_bar, track
from tests.helpers.lm import offline_hub, tiny_lm_dir

CURSOR = re.compile(r"\r|\x1b\[")


def test_bar_writes_plain_lines_when_not_a_terminal() -> None:
    buf = io.StringIO()
    bar = progress_bar(total=5, desc="caching activations", unit="seq", file=buf, log_interval=0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    text = buf.getvalue()
    assert text and not CURSOR.search(text)
    lines = text.splitlines()
    assert all(line.startswith("caching activations") for line in lines)
    assert "5/5" in lines[-1]


def test_bars_do_not_nest() -> None:
    buf = io.StringIO()
    outer = progress_bar(total=2, desc="outer", file=buf, log_interval=0)
    inner = progress_bar(total=3, desc="inner", file=buf, log_interval=0)
    assert inner.disable and not outer.disable
    inner.update(3)
    inner.close()
    outer.update(2)
    outer.close()
    assert "inner" not in buf.getvalue() and "outer" in buf.getvalue()
    again = progress_bar(total=1, desc="again", file=buf, log_interval=0)
    assert not again.disable
    again.close()


def test_lm_cache_build_shows_one_bar_without_cursor_codes(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    offline_hub(monkeypatch)
    lm = tiny_lm_dir(tmp_path_factory, "gemma2")
    src = LMSource(
        model_name=str(lm),
        layer=1,
        dataset=str(lm / "corpus.jsonl"),
        ctx_len=16,
        model_dtype="float32",
        device="cpu",
    )
    assert src.progress  # the source would show its own tokens/s bar when used alone
    capsys.readouterr()  # (writing the tiny LM has a bar of its own)
    build_cache(src, tmp_path, CacheSpec(8, 4, 4, "float32"), source_batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert not CURSOR.search(err)
    bar_lines = [line for line in err.splitlines() if "/" in line and ("seq" in line or "tok" in line)]
    assert bar_lines and all(line.startswith("caching activations") for line in bar_lines)


def test_training_bar_in_a_log_file_is_plain_lines_without_a_validation_bar(tmp_path: Path, capsys) -> None:
    from callbacks.progress import LogProgressBar
    from tests.helpers.train import tiny_args
    from train import cli_main

    args = tiny_args(tmp_path, "--trainer.max_steps", "40", "--trainer.enable_progress_bar", "true")
    cli = cli_main(["fit", *args])  # stdout is captured: not a terminal
    assert any(isinstance(cb, LogProgressBar) for cb in cli.trainer.callbacks)
    out = capsys.readouterr().out
    assert not CURSOR.search(out)
    epochs = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert epochs and epochs[-1].startswith("Epoch 1:")  # 32 batches per epoch, 40 steps
    assert len(epochs) <= 8  # a line per interval and one at each epoch's end, not one per batch (40)
    assert "Validation" not in out and "Sanity" not in out


def test_track_writes_plain_lines_and_closes_when_left_early() -> None:
    """Evaluation loops use ``track``: plain lines in a log, and a loop left early frees the bar."""
    stream = io.StringIO()
    for i in track(range(10), desc="eval batches", file=stream, log_interval=0.0):
        if i == 3:
            break
    out = stream.getvalue()
    assert "eval batches" in out and "\r" not in out and "\x1b[" not in out
    after = io.StringIO()
    with progress_bar(total=2, desc="next job", file=after, log_interval=0.0) as bar:
        bar.update(2)
    assert "next job" in after.getvalue()  # not silenced by a bar left open by the loop above
