"""Activations of a Hugging Face causal LM on a text dataset (``data.source.class_path: data.LMSource``).

Rows are ``[BOS] + (ctx_len - 1)`` tokens packed from the document stream (:func:`pack_documents`):
documents are tokenized without special tokens and each is followed by EOS; a document longer than
the room left in a row continues in the next row, after that row's BOS. Nothing is dropped or
duplicated, except the incomplete tail at the very end of the dataset. Row ``i`` is always the
same bytes (same model, revision, dataset, tokenizer, dtype and device type), which is what lets a
cache build resume at shard granularity: :meth:`LMSource.generate` packs the rows before ``start``
(cheap) but skips their forward pass.

Activations are the residual stream after decoder layer ``layer`` ("resid_post", SAEBench's
``blocks.L.hook_resid_post``), read by :func:`mtsae.lm.hooks.capture_resid_post`, which stops the forward
pass right after that layer. ``valid`` is False on the special tokens (BOS, EOS, PAD).

Models without a BOS token (Qwen2, ...) use their EOS token at the start of a row, as GPT-2 does (its
BOS and EOS are the same ``<|endoftext|>``): a row then starts with the token the model has seen at
document boundaries. A tokenizer with neither is rejected.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from data.sources import ActivationSource, SourceChunk
from mtsae.hashing import file_sha256
from mtsae.lm.gguf import gguf_info, is_gguf
from mtsae.lm.hooks import capture_resid_post, decoder_layers, lm_hidden_size, n_layers
from mtsae.lm.loading import (
    MODEL_DTYPES,
    LMUnavailableError,
    check_model_reachable,
    load_causal_lm,
    load_lm_config,
    load_tokenizer,
    resolve_device,
    special_ids,
)
from mtsae.lm.text import open_dataset, pack_documents, tokenize_documents
from mtsae.progress import progress_bar

__all__ = ["LMSource", "SourceUnavailableError"]

log = logging.getLogger(__name__)

#: a model, tokenizer or dataset named in the config cannot be loaded (missing path, no network, gated);
#: the message says which setting to change
SourceUnavailableError = LMUnavailableError

_MODEL_SETTING = "data.source.init_args.model_name"
_DATASET_SETTING = "data.source.init_args.dataset"


def _short(name: str) -> str:
    return Path(name.rstrip("/")).name or "model"


class LMSource(ActivationSource):
    """Residual-stream activations (resid_post of ``layer``) of a causal LM on packed text rows.

    Args:
        model_name: Hugging Face hub name (``google/gemma-2-2b``) or path to a local model folder.
        layer: decoder layer whose output (resid_post) is read, 0-based (Gemma-2-2B has 0 .. 25).
        dataset: hub dataset name (``monology/pile-uncopyrighted``), a local folder, or a local file
            (``.jsonl``, ``.json``, ``.txt`` (one document per line), ``.parquet``, ``.csv``).
        ctx_len: tokens per row, BOS included.
        dataset_config: hub dataset configuration name (``wikitext-103-raw-v1``), if it has several.
        split: dataset split to read (``train``).
        text_column: column that holds the document text.
        streaming: stream the dataset instead of downloading it all first.
        revision: model revision (branch, tag or commit) on the hub; ``None`` is the default branch.
        model_dtype: dtype the model runs in and activations are produced in:
            ``bfloat16``, ``float16`` or ``float32``.
        device: ``auto`` (``cuda`` if available, else ``cpu``), or a torch device string (``cuda:1``).
        llm_batch_size: rows per forward pass of the language model.
        trust_remote_code: allow model code from the hub (off unless you trust the repository).
        shuffle_buffer: if > 0, shuffle documents with a buffer of this many (seeded by ``seed``);
            0 reads documents in dataset order.
        seed: seed of the document shuffle (used only when ``shuffle_buffer > 0``).
        progress: show a progress bar (tokens/s, ETA) while generating.

    Gated models (Gemma) need their license accepted on the hub and a token (``HF_TOKEN`` or
    ``hf auth login``); offline, point ``model_name`` and ``dataset`` at local copies.
    """

    kind = "lm"

    def __init__(
        self,
        model_name: str,
        layer: int,
        dataset: str,
        ctx_len: int = 128,
        dataset_config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = True,
        revision: str | None = None,
        model_dtype: str = "bfloat16",
        device: str = "auto",
        llm_batch_size: int = 8,
        trust_remote_code: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not model_name:
            raise ValueError("model_name must be a hub name or a local path, got an empty string")
        if not dataset:
            raise ValueError("dataset must be a hub name or a local path, got an empty string")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {layer!r}")
        if ctx_len < 2:
            raise ValueError(f"ctx_len must be at least 2 (BOS + one token), got {ctx_len}")
        if model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {sorted(MODEL_DTYPES)}, got {model_dtype!r}")
        if llm_batch_size < 1:
            raise ValueError(f"llm_batch_size must be >= 1, got {llm_batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        resolve_device(device)  # ValueError for a string torch does not know
        self.model_name = model_name
        self.layer = layer
        self.dataset = dataset
        self._ctx_len = ctx_len
        self.dataset_config = dataset_config
        self.split = split
        self.text_column = text_column
        self.streaming = streaming
        self.revision = revision
        self.model_dtype = model_dtype
        self.device = device
        self.llm_batch_size = llm_batch_size
        self.trust_remote_code = trust_remote_code
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.progress = progress

        self._config: Any = None
        self._model_sha256: str | None = None  # of a .gguf model file, hashed once
        self._dataset_sha256: str | None = None  # of a local dataset file, hashed once
        self._tokenizer: Any = None
        self._model: torch.nn.Module | None = None
        # packed-row iterator kept between generate() calls, so that consecutive ranges don't re-tokenize
        self._rows: Iterator[list[int]] | None = None
        self._rows_pos = 0  # rows already taken from self._rows

    # ------------------------------------------------------------------ description
    @property
    def ctx_len(self) -> int:
        return self._ctx_len

    @property
    def d_in(self) -> int:
        """Width of the residual stream, from the model config (no weights are loaded)."""
        return lm_hidden_size(self._load_config())

    def fingerprint(self) -> dict:
        if is_gguf(self.model_name) and self._model_sha256 is None:
            check_model_reachable(self.model_name, setting=_MODEL_SETTING)  # a clear error if missing
            self._model_sha256 = gguf_info(self.model_name)["model_sha256"]
        if self._dataset_sha256 is None and Path(self.dataset).is_file():
            self._dataset_sha256 = file_sha256(self.dataset)
        return {
            "source": self.kind,
            "model_name": self.model_name,
            # a .gguf file is identified by its bytes, not its path
            **({"model_sha256": self._model_sha256} if self._model_sha256 else {}),
            "revision": self.revision,
            "layer": self.layer,
            "hook": "resid_post",
            "ctx_len": self.ctx_len,
            "dataset": self.dataset,
            # a local file is identified by its bytes too: an edited file at the same path is another cache
            **({"dataset_sha256": self._dataset_sha256} if self._dataset_sha256 else {}),
            "dataset_config": self.dataset_config,
            "split": self.split,
            "text_column": self.text_column,
            "model_dtype": self.model_dtype,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            # streaming and map-style datasets shuffle differently; without shuffling they read the same order
            **({"streaming": self.streaming} if self.shuffle_buffer else {}),
        }

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    # ------------------------------------------------------------------ loading (mtsae.lm: clear errors)
    def _load_config(self) -> Any:
        if self._config is None:
            self._config = load_lm_config(
                self.model_name, self.revision, self.trust_remote_code, setting=_MODEL_SETTING
            )
        return self._config

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            tok = load_tokenizer(
                self.model_name, self.revision, self.trust_remote_code, setting=_MODEL_SETTING
            )
            try:
                special_ids(tok)
            except ValueError as e:
                raise ValueError(
                    f"{self.model_name!r}: {e}; LMSource needs one to start rows and separate documents"
                ) from e
            self._tokenizer = tok
        return self._tokenizer

    @property
    def special_ids(self) -> tuple[int, int, int | None]:
        """``(bos_id, eos_id, pad_id)`` used in rows (a missing BOS/EOS is replaced by the other)."""
        return special_ids(self._load_tokenizer())

    def _load_model(self) -> torch.nn.Module:
        if self._model is None:
            log.info("loading %s to capture layer %d", self.model_name, self.layer)
            self._model = load_causal_lm(
                self.model_name,
                self.revision,
                self.model_dtype,
                self.torch_device,
                self.trust_remote_code,
                setting=_MODEL_SETTING,
            )
        return self._model

    def _open_dataset(self, streaming: bool) -> Iterable[dict]:
        ds = open_dataset(
            self.dataset,
            self.dataset_config,
            self.split,
            streaming=streaming,
            columns=f"a {self.text_column!r} column",
            setting=_DATASET_SETTING,
        )
        if self.shuffle_buffer > 0:
            if streaming:
                ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            else:
                ds = ds.shuffle(seed=self.seed)
        return ds

    def _texts(self, streaming: bool) -> Iterator[str]:
        for i, record in enumerate(self._open_dataset(streaming)):
            if self.text_column not in record:
                raise ValueError(
                    f"dataset {self.dataset!r} has no column {self.text_column!r} "
                    f"(columns: {sorted(record)}); set data.source.init_args.text_column"
                )
            text = record[self.text_column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"dataset {self.dataset!r} column {self.text_column!r} holds "
                    f"{type(text).__name__}, not text (record {i})"
                )
            yield text

    def _new_rows(self) -> Iterator[list[int]]:
        bos, eos, _ = self.special_ids
        tokens = tokenize_documents(self._load_tokenizer(), self._texts(self.streaming))
        return pack_documents(tokens, self.ctx_len, bos, eos)

    # ------------------------------------------------------------------ ActivationSource
    def check(self) -> None:
        """Fail fast: config reachable, layer in range, architecture supported, tokenizer and dataset readable.

        Loads no weights (the architecture check builds the model on the ``meta`` device).
        """
        from transformers import AutoModelForCausalLM

        config = self._load_config()
        n = n_layers(config)
        if not 0 <= self.layer < n:
            raise ValueError(
                f"layer={self.layer} is out of range: {self.model_name!r} has {n} decoder layers "
                f"(valid: 0 .. {n - 1}); set data.source.init_args.layer"
            )
        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        except Exception as e:
            raise ValueError(
                f"{self.model_name!r} ({type(config).__name__}) is not a causal language model "
                f"that transformers can build: {e}"
            ) from e
        decoder_layers(skeleton)  # ValueError naming the class if the layout is unknown
        del skeleton
        self._load_tokenizer()
        # one record, streamed: reachability and the text column without downloading the dataset
        next(iter(self._texts(streaming=True)), None)

    def generate(self, start: int, stop: int, batch_size: int) -> Iterator[SourceChunk]:
        """Yield rows ``start .. stop`` in chunks of at most ``batch_size`` rows.

        Chunks hold ``acts [n, ctx_len, d_in]`` (CPU, ``model_dtype``), ``tokens [n, ctx_len] int32`` and
        ``valid [n, ctx_len] bool`` (False on BOS / EOS / PAD). Raises ``ValueError`` if the dataset ends
        before row ``stop``.
        """
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start == stop:
            return
        model = self._load_model()
        device = next(model.parameters()).device
        special = torch.tensor([t for t in self.special_ids if t is not None], dtype=torch.int32)

        if self._rows is None or start < self._rows_pos:
            self._rows, self._rows_pos = self._new_rows(), 0
        skipped = sum(1 for _ in itertools.islice(self._rows, start - self._rows_pos))  # packed, not run
        self._rows_pos += skipped
        if self._rows_pos < start:
            raise self._exhausted(stop)

        T = self.ctx_len
        bar = progress_bar(
            total=(stop - start) * T,
            unit="tok",
            unit_scale=True,
            leave=False,
            disable=not self.progress,
            desc=f"{_short(self.model_name)} L{self.layer}",
        )
        try:
            row = start
            while row < stop:
                n = min(batch_size, stop - row)
                rows = list(itertools.islice(self._rows, n))
                self._rows_pos += len(rows)
                if len(rows) < n:
                    raise self._exhausted(stop)
                tokens = torch.tensor(rows, dtype=torch.int32)  # [n, T]
                acts = []
                for i in range(0, len(rows), self.llm_batch_size):
                    ids = tokens[i : i + self.llm_batch_size].to(device=device, dtype=torch.long)  # [b, T]
                    acts.append(capture_resid_post(model, self.layer, ids).to("cpu"))  # [b, T, d]
                    bar.update(ids.numel())
                # concatenated outside inference mode: a plain tensor the consumer may view, convert or modify
                acts_NTD = torch.cat(acts)  # [n, T, d]
                valid = ~torch.isin(tokens, special)  # [n, T]
                yield SourceChunk(acts=acts_NTD, tokens=tokens, valid=valid)
                row += n
        finally:
            bar.close()

    def _exhausted(self, stop: int) -> ValueError:
        return ValueError(
            f"dataset {self.dataset!r} (split {self.split!r}) ends after {self._rows_pos} rows of ctx_len "
            f"{self.ctx_len}, but rows up to {stop} were requested: use a larger dataset/split or fewer sequences"
        )

    def close(self) -> None:
        """Free the model (and GPU memory); the config and tokenizer stay (they are small)."""
        if self._model is not None:
            on_cuda = next(self._model.parameters()).is_cuda
            self._model = None
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
        self._rows, self._rows_pos = None, 0

    def __getstate__(self) -> dict:
        # picklable (DDP spawn, deepcopy): drop the loaded model and the live row iterator
        state = self.__dict__.copy()
        state.update(_model=None, _rows=None, _rows_pos=0)
        return state

    def __repr__(self) -> str:
        return (
            f"LMSource(model_name={self.model_name!r}, layer={self.layer}, dataset={self.dataset!r}, "
            f"ctx_len={self.ctx_len})"
        )
