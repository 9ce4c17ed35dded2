"""``mtsae example``: offline example inputs, no download.

    mtsae example tiny-lm --out artifacts/tiny_lm [--arch gemma2|llama|gpt2|gpt_neox] [--seed 0]
    mtsae example unlearning --lm artifacts/tiny_lm --out artifacts/tiny_unlearning

``tiny-lm`` writes a tiny random causal LM, its tokenizer and corpus (:func:`mtsae.lm.tiny_lm.build_tiny_lm`);
``unlearning`` writes forget / retain corpora, question files and prompts made from that corpus
(:func:`mtsae.evals.unlearning.tiny_example.build_unlearning_example`; the LM is built first if missing).
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae example`` argument parser."""
    from mtsae.lm.tiny_lm import ARCHS

    p = argparse.ArgumentParser(prog="mtsae example", description="Write offline example inputs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{tiny-lm,unlearning}")
    lm = sub.add_parser("tiny-lm", help="a tiny random causal LM with its tokenizer and corpus")
    lm.add_argument("--out", default="artifacts/tiny_lm", help="output folder (default: artifacts/tiny_lm)")
    lm.add_argument("--arch", default="gemma2", choices=ARCHS)
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--n-layers", type=int, default=4)
    lm.add_argument("--hidden-size", type=int, default=64)
    un = sub.add_parser("unlearning", help="corpora, questions and prompts for the unlearning commands")
    un.add_argument("--lm", default="artifacts/tiny_lm", help="tiny LM folder (built there if missing)")
    un.add_argument("--out", default="artifacts/tiny_unlearning", help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae example``; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "tiny-lm":
        from mtsae.lm.tiny_lm import build_tiny_lm

        out = build_tiny_lm(
            args.out, arch=args.arch, seed=args.seed, n_layers=args.n_layers, hidden_size=args.hidden_size
        )
    else:
        from mtsae.evals.unlearning.tiny_example import build_unlearning_example

        build_unlearning_example(args.lm, args.out)
        out = args.out
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
