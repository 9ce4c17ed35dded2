"""``mtsae unlearn generate`` (module ``unlearn``): generate text with an unlearning recipe applied to the model.

::

    mtsae unlearn generate --recipe eval/unlearning/recipe.json --prompt "The virus binds" [--compare]
    mtsae unlearn generate --recipe R --prompts-file prompts.txt --out generations.jsonl

The recipe (written by ``mtsae eval unlearning`` beside its results) names the SAE (checked against its
SHA-256), the layer, the features and the multiplier; the model defaults to the one the recipe was chosen
on. Generation is greedy unless ``--sample``; the clamp runs inside ``generate`` with the KV cache
(:class:`mtsae.evals.unlearning.intervention.GenerationClamp`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_parser", "read_prompts", "generate_texts", "main"]

log = logging.getLogger("mtsae.unlearn")


class UnlearnError(RuntimeError):
    """A user error: printed as one message, exit status 2."""


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the prompts of ``--prompts-file`` (one per line; ``.jsonl``: a ``prompt``
    or ``text`` field per line)."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise UnlearnError(f"prompts file {prompts_file!r} does not exist")
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                key = next((k for k in ("prompt", "text") if k in row), None)
                if key is None:
                    raise UnlearnError(f"{prompts_file} line {i + 1}: no 'prompt' or 'text' field")
                out.append(str(row[key]))
            else:
                out.append(line)
    if not out:
        raise UnlearnError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = False,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Continuations of ``prompts`` (left-padded batches; greedy unless ``sample``)."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts = prompts
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        bos = getattr(tokenizer, "bos_token", None)
        add_special = not (chat and bos and chunk[0].startswith(bos))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
        if sample:
            torch.manual_seed(seed + start)
        seq = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        new = seq[:, batch["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def run_generate(args: argparse.Namespace) -> list[dict[str, str]]:
    from mtsae.evals.unlearning.intervention import clamped
    from mtsae.evals.unlearning.recipe import RecipeError, UnlearningRecipe
    from mtsae.lm.hooks import n_layers
    from mtsae.lm.loading import load_causal_lm, load_lm_config, load_tokenizer, model_dtype

    recipe = UnlearningRecipe.load(args.recipe)  # its fields are checked here
    if args.multiplier is not None:
        recipe.multiplier = args.multiplier
        recipe.check_multiplier()
    prompts = read_prompts(args.prompt, args.prompts_file)
    name = args.model_name or recipe.model.get("name")
    if not name:
        raise UnlearnError("the recipe names no model: pass --model-name")
    revision = args.revision if args.model_name else (args.revision or recipe.model.get("revision"))
    dtype = args.model_dtype or recipe.model.get("dtype") or "float32"
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model_dtype(dtype, "--model-dtype")
    except ValueError as e:
        raise UnlearnError(str(e)) from None
    sae = recipe.load_sae(device)  # its hash and the features' range, before the model is loaded
    depth = n_layers(
        load_lm_config(name, revision, setting="--model-name")
    )  # the config only: no weights yet
    if recipe.layer >= depth:
        raise RecipeError(
            f"the recipe clamps layer {recipe.layer}, but {name} has {depth} decoder layers (0 .. {depth - 1})"
        )
    tokenizer = load_tokenizer(name, revision)
    model = load_causal_lm(name, revision, dtype, device)
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat=args.chat,
        sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )
    with clamped(model, sae, recipe):
        outs = generate_texts(model, tokenizer, prompts, **kw)
    originals = generate_texts(model, tokenizer, prompts, **kw) if args.compare else None
    rows = []
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        row = {"prompt": p, "clamped": o}
        print(f"### prompt {i + 1}: {p}\n[clamped]  {o}")
        if originals is not None:
            row["original"] = originals[i]
            print(f"[original] {originals[i]}")
        rows.append(row)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae unlearn`` argument parser."""
    p = argparse.ArgumentParser(prog="mtsae unlearn", description="Use an unlearning recipe.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate}")
    gen = sub.add_parser("generate", help="generate text with the recipe's clamp applied")
    gen.add_argument("--recipe", required=True, help="recipe.json written by mtsae eval unlearning")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", default=None, help="one prompt per line (.jsonl: 'prompt' field)")
    gen.add_argument("--multiplier", type=float, default=None, help="override the recipe's multiplier")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--compare", action="store_true", help="also generate without the clamp")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model-name", default=None, help="the LM (default: the recipe's)")
    gen.add_argument("--revision", default=None)
    gen.add_argument("--model-dtype", default=None, help="LM dtype (default: the recipe's)")
    gen.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    gen.add_argument("--out", default=None, help="also write the generations as JSONL")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae unlearn``; returns the exit status (2 for a user error, with its message on stderr)."""
    from mtsae.evals.unlearning.recipe import RecipeError
    from mtsae.lm.loading import LMUnavailableError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        print("mtsae unlearn: error: --max-new-tokens and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run_generate(args)
    except (UnlearnError, RecipeError, LMUnavailableError) as e:
        print(f"mtsae unlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
