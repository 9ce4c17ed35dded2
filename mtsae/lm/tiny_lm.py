"""A tiny, randomly initialised causal LM with its own tokenizer and corpus, built offline.

:func:`build_tiny_lm` writes to one folder everything that :class:`data.LMSource` needs, without any
download: a random-init causal LM (``save_pretrained``), a byte-level BPE tokenizer trained on a
generated corpus (saved as a ``transformers`` fast tokenizer with ``<bos>``/``<eos>``/``<pad>``/``<unk>``)
and the corpus itself as ``corpus.jsonl`` (one ``{"text": ...}`` document per line). The folder loads
with ``AutoTokenizer.from_pretrained(out_dir)`` and ``AutoModelForCausalLM.from_pretrained(out_dir)``.

The model is not trained: it exists to test the plumbing (hooks, packing, caching) end to end.
Everything is deterministic: the same arguments give the same files.

Command line (``make tiny-lm``)::

    mtsae example tiny-lm --out artifacts/tiny_lm [--arch gemma2|llama|gpt2|gpt_neox] [--seed 0]
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from mtsae.lm.hooks import hf_dtype_kwargs

__all__ = ["ARCHS", "SPECIAL_TOKENS", "build_tiny_lm", "make_corpus"]

log = logging.getLogger(__name__)

#: architectures :func:`build_tiny_lm` can build (they cover the three decoder-layer layouts of mtsae.lm.hooks)
ARCHS = ("gemma2", "llama", "gpt2", "gpt_neox")

#: special tokens of the tiny tokenizer, in id order (``<pad>`` = 0, ``<bos>`` = 1, ...)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}

_SUBJECTS = [
    "the cell",
    "a virus",
    "the protein",
    "my cat",
    "the river",
    "a student",
    "the enzyme",
    "the old king",
    "a small robot",
    "the market",
    "the gene",
    "our team",
    "the storm",
]
_VERBS = [
    "binds",
    "follows",
    "replicates near",
    "looks at",
    "crosses",
    "studies",
    "breaks",
    "builds",
    "remembers",
    "measures",
    "ignores",
    "protects",
    "changes",
]
_OBJECTS = [
    "the membrane",
    "a long road",
    "the receptor",
    "the blue house",
    "an ancient map",
    "the sample",
    "a quiet village",
    "the signal",
    "the strand of DNA",
    "the last train",
    "a heavy stone",
    "the dataset",
]
_TAILS = [
    "",
    " today",
    " again",
    " in the morning",
    " after the rain",
    " very slowly",
    " at night",
    " for three days",
    " without a sound",
]


def make_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """``n_docs`` short English-like documents of 1-12 sentences (some longer than a 64-token row)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        n_sent = rng.randint(1, 12)
        sents = []
        for _ in range(n_sent):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
            if rng.random() < 0.2:
                s += f", {rng.randint(0, 999)} times"
            sents.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"]))
        docs.append(f"Doc {i}: " + " ".join(sents))
    return docs


def _train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (no unknown characters possible) wrapped as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # like Gemma / Llama: `tokenizer(text)` prepends BOS; `add_special_tokens=False` does not
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **SPECIAL_TOKENS)


def _make_config(
    arch: str,
    vocab_size: int,
    special_ids: dict[str, int],
    n_layers: int,
    hidden_size: int,
    n_heads: int,
    max_positions: int,
):
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    ids = {
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
    }
    head_dim = hidden_size // n_heads
    llama_like = {  # the keyword names Gemma-2 and Llama share
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": max(1, n_heads // 2),
        "max_position_embeddings": max_positions,
        **ids,
    }
    if arch == "gemma2":
        return Gemma2Config(
            **llama_like, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=max_positions // 4
        )
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=max_positions,
            **ids,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=max_positions,
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r}; build_tiny_lm supports {', '.join(ARCHS)}")


def build_tiny_lm(
    out_dir: str | Path,
    arch: str = "gemma2",
    seed: int = 0,
    n_layers: int = 4,
    hidden_size: int = 64,
    n_heads: int = 4,
    vocab_size: int = 512,
    n_docs: int = 300,
    max_positions: int = 512,
) -> Path:
    """Write a random-init tiny causal LM, its tokenizer and ``corpus.jsonl`` to ``out_dir``.

    Args:
        out_dir: folder to write (created if needed; existing files are overwritten).
        arch: ``gemma2`` (default), ``llama``, ``gpt2`` or ``gpt_neox``.
        seed: seeds the corpus and the weights; the same seed gives the same files.
        n_layers: number of decoder layers.
        hidden_size: width of the residual stream (``d_in`` of an SAE trained on it).
        n_heads: attention heads (``hidden_size`` must be divisible by it).
        vocab_size: target BPE vocabulary size (256 bytes + 4 special tokens + merges).
        n_docs: number of documents in ``corpus.jsonl``.
        max_positions: maximum sequence length of the model.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; build_tiny_lm supports {', '.join(ARCHS)}")
    if hidden_size % n_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by n_heads={n_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    docs = make_corpus(n_docs, seed)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")

    tokenizer = _train_tokenizer(docs, vocab_size)
    tokenizer.save_pretrained(out)
    special_ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }

    config = _make_config(arch, len(tokenizer), special_ids, n_layers, hidden_size, n_heads, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **hf_dtype_kwargs(torch.float32))
    model.save_pretrained(out)
    log.info(
        "wrote tiny %s LM (%d layers, d_model=%d, vocab=%d) + tokenizer + corpus.jsonl (%d docs) to %s",
        arch,
        n_layers,
        hidden_size,
        len(tokenizer),
        len(docs),
        out,
    )
    return out
