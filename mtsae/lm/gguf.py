"""A GGUF file as a model name: de-quantised once into a local Hugging Face folder, keyed by its SHA-256.

``model_name: artifacts/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` works wherever a model name is accepted
(``data.source.init_args.model_name``, every ``--model-name``). The first use loads the file with
transformers' GGUF reader (packages ``gguf`` and ``accelerate``), de-quantises the weights to float32
and saves them with the tokenizer as safetensors in ``<folder>/<stem>-<sha256[:16]>/`` (``<folder>`` is
``$MTSAE_GGUF_DIR``, else the folder holding the ``.gguf`` path as given, a symbolic link not resolved).
Later uses hash the file (about 0.3 s per 100 MB) and load the folder in seconds. ``gguf.json`` in the
folder records the file and its hash; the folder is written under a temporary name and renamed, so an
interrupted de-quantisation is redone, never half-read.

transformers refuses ``save_pretrained`` on a GGUF-loaded model; a fresh model built from the loaded
config with the loaded state dict saves normally (tied embeddings stay tied).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from mtsae.hashing import file_sha256

__all__ = [
    "GGUF_DIR_ENV",
    "GGUFDependencyError",
    "gguf_folder",
    "gguf_info",
    "is_gguf",
    "materialise_gguf",
    "resolve_model_name",
]

log = logging.getLogger(__name__)

#: environment variable naming the folder that holds de-quantised GGUF models
GGUF_DIR_ENV = "MTSAE_GGUF_DIR"
_INFO = "gguf.json"
_REQUIRED = ("gguf", "accelerate")


class GGUFDependencyError(ImportError):
    """A package the GGUF reader needs is missing."""


def is_gguf(name: str | os.PathLike) -> bool:
    """True when ``name`` names a GGUF file (by its suffix)."""
    return str(name).lower().endswith(".gguf")


def gguf_folder(path: str | os.PathLike, sha256: str) -> Path:
    """Where the de-quantised copy of ``path`` (with hash ``sha256``) lives."""
    path = Path(path).expanduser()
    root = Path(os.environ[GGUF_DIR_ENV]).expanduser() if os.environ.get(GGUF_DIR_ENV) else path.parent
    return root / f"{path.stem}-{sha256[:16]}"


def _check_dependencies() -> None:
    missing = [m for m in _REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise GGUFDependencyError(
            f"reading a .gguf model needs the packages {' and '.join(missing)}: "
            f"pip install {' '.join(missing)} (or `make smollm2`)"
        )


def gguf_info(name: str | os.PathLike) -> dict[str, str]:
    """``{"model_file": absolute path, "model_sha256": hex}`` of a GGUF file (hashes it)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path.resolve())!r} does not exist")
    return {"model_file": str(path.resolve()), "model_sha256": file_sha256(path)}


def materialise_gguf(name: str | os.PathLike) -> Path:
    """The local Hugging Face folder holding the de-quantised model of the GGUF file ``name``.

    Creates it on first use (float32 safetensors, tokenizer, ``gguf.json``); a second call only hashes
    the file. ``FileNotFoundError`` for a missing file, :class:`GGUFDependencyError` (one line naming what
    to install) when ``gguf`` or ``accelerate`` is missing.
    """
    info = gguf_info(name)
    folder = gguf_folder(name, info["model_sha256"])
    if (folder / _INFO).is_file():
        return folder
    _check_dependencies()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtsae.lm.hooks import hf_dtype_kwargs
    from mtsae.progress import no_library_bars

    src = Path(info["model_file"])
    log.info("de-quantising %s into %s (once)", src, folder)
    with no_library_bars():
        loaded = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, **hf_dtype_kwargs(torch.float32)
        )
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # a GGUF-loaded model refuses save_pretrained: a fresh one with its weights saves normally
    config = loaded.config
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve_model_name(name: str) -> str:
    """``name`` itself, or for a ``.gguf`` file the folder of its de-quantised copy (created if needed)."""
    return str(materialise_gguf(name)) if is_gguf(name) else name
