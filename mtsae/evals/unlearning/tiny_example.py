"""Offline files for trying the unlearning evaluation on the tiny LM (:mod:`mtsae.lm.tiny_lm`), no download.

:func:`write_unlearning_files` splits the tiny LM's ``corpus.jsonl`` into a forget corpus (documents that
mention at least two of cell / virus / protein / gene / enzyme: the stand-in for WMDP's biology) and a
retain corpus (the rest), and writes WMDP-style and MMLU-style multiple-choice files (``question``,
``choices``, ``answer``) made of the corpus's words. The questions are nonsense and the LM is random:
this exercises the commands end to end, it does not measure anything.

CLI (``make unlearning-example`` runs it, then trains, evaluates and generates; see the README)::

    mtsae example unlearning --lm artifacts/tiny_lm --out artifacts/tiny_unlearning
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from mtsae.evals.unlearning.mcq import MMLU_SUBSETS
from mtsae.lm.tiny_lm import build_tiny_lm

__all__ = ["BIO_WORDS", "PROMPTS", "write_unlearning_files", "build_unlearning_example"]

log = logging.getLogger(__name__)

#: words that make a tiny-corpus document part of the forget corpus (two of them at least)
BIO_WORDS = ("cell", "virus", "protein", "gene", "enzyme")

#: prompts written beside the files for ``mtsae unlearn generate --prompts-file``
PROMPTS = ("The virus binds the receptor", "The enzyme breaks", "A small robot crosses the river")


def _questions(n: int, seed: int, words: list[str]) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        choices = rng.sample(words, 4)
        out.append(
            {"question": f"What is {' '.join(rng.sample(words, 3))}?", "choices": choices, "answer": i % 4}
        )
    return out


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_unlearning_files(
    lm_dir: str | Path, out: str | Path, n_wmdp: int = 32, n_mmlu: int = 12
) -> dict[str, object]:
    """Forget / retain corpora and WMDP-style / MMLU-style question files from a tiny LM's corpus.

    Returns the matching :class:`mtsae.evals.unlearning.config.UnlearningConfig` keyword arguments
    (``forget_corpus``, ``retain_corpus``, ``wmdp_source``, ``mmlu_source``: subset -> file).
    """
    lm_dir, out = Path(lm_dir), Path(out)
    corpus = lm_dir / "corpus.jsonl"
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus} does not exist: build the tiny LM first (make tiny-lm)")
    out.mkdir(parents=True, exist_ok=True)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    forget = [d for d in docs if sum(w in d for w in BIO_WORDS) >= 2]
    retain = [d for d in docs if d not in forget]
    words = sorted({w.strip(".,!?:") for d in docs[:40] for w in d.split()} - {""})
    return {
        "forget_corpus": _jsonl(out / "bio-forget-corpus.jsonl", [{"text": d} for d in forget]),
        "retain_corpus": _jsonl(out / "retain.jsonl", [{"text": d} for d in retain]),
        "wmdp_source": _jsonl(out / "wmdp.jsonl", _questions(n_wmdp, 0, words)),
        "mmlu_source": {
            s: _jsonl(out / f"{s}.jsonl", _questions(n_mmlu, i + 1, words))
            for i, s in enumerate(MMLU_SUBSETS)
        },
    }


def build_unlearning_example(lm_dir: str | Path, out: str | Path) -> dict[str, object]:
    """The tiny LM in ``lm_dir`` (built if missing), the files of :func:`write_unlearning_files` and
    ``prompts.txt`` in ``out``; ``out/files.json`` lists the paths."""
    lm_dir, out = Path(lm_dir), Path(out)
    if not (lm_dir / "corpus.jsonl").is_file():
        build_tiny_lm(lm_dir)
    files = write_unlearning_files(lm_dir, out)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (out / "files.json").write_text(json.dumps(files, indent=1))
    log.info("wrote the unlearning example files to %s", out)
    return files
