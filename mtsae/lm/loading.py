"""Loading a Hugging Face causal LM, its config and its tokenizer: hub name or local folder, dtype,
device, ``trust_remote_code`` off unless asked, and one set of error messages.

Every loader checks first that a local path exists and that the hub can be used (:func:`check_hub`),
so a missing model fails in seconds with the fix, not after transformers' retries. The error is
:class:`LMUnavailableError`; its message names the setting to change when the caller passes one
(``data.source.init_args.model_name``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtsae.lm.gguf import GGUFDependencyError, is_gguf, materialise_gguf
from mtsae.lm.hooks import hf_dtype_kwargs
from mtsae.lm.hub import HubUnavailableError, check_hub, download_command, is_local
from mtsae.progress import no_library_bars

__all__ = [
    "LMUnavailableError",
    "MODEL_DTYPES",
    "load_causal_lm",
    "load_lm_config",
    "load_tokenizer",
    "model_dtype",
    "resolve_device",
    "resolve_lm_name",
    "special_ids",
]

log = logging.getLogger(__name__)

#: the dtypes a language model may run in (``model_dtype`` in configs and on the command line)
MODEL_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class LMUnavailableError(RuntimeError):
    """A language model, tokenizer or dataset cannot be loaded (missing path, no network, gated)."""


def model_dtype(dtype: str | torch.dtype, setting: str = "model dtype") -> torch.dtype:
    """``dtype`` as a torch dtype; ``ValueError`` naming ``setting`` if it is not in :data:`MODEL_DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{setting} must be one of {sorted(MODEL_DTYPES)}, got {dtype!r}")
    return MODEL_DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is ``cuda`` when available, else ``cpu``; anything else must be a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto' or a torch device string, got {device!r}") from e


def _short(name: str) -> str:
    return Path(name.rstrip("/")).name or "model"


def model_error(
    what: str, name: str, revision: str | None, err: Exception, setting: str = ""
) -> LMUnavailableError:
    """The error for a model part (``config``, ``tokenizer``, ``weights``) that cannot be loaded."""
    rev = f" (revision {revision!r})" if revision else ""
    if isinstance(err, FileNotFoundError) and is_local(name):
        hint = (
            "Point it at an existing model folder (with config.json, the tokenizer and the weights) or at "
            "a Hugging Face hub name"
        )
    else:
        hint = (
            f"Without network access, or for a gated model (Gemma: accept its license on the hub and set "
            f"HF_TOKEN), download it once elsewhere (`{download_command(name)}`) and pass the local folder"
        )
    where = f":\n    {setting}: /path/to/local/{_short(name)}" if setting else "."
    return LMUnavailableError(
        f"cannot load the {what} of {name!r}{rev}: {type(err).__name__}: {err}\n{hint}{where}"
    )


def check_model_reachable(
    name: str, revision: str | None = None, what: str = "model", setting: str = ""
) -> None:
    """Raise :class:`LMUnavailableError` at once for a local path that does not exist or an unusable hub."""
    if not name:
        raise ValueError(
            f"{setting or 'the model name'} must be a hub name or a local path, got an empty string"
        )
    if is_local(name) and not Path(name).expanduser().exists():
        err = FileNotFoundError(f"local path {str(Path(name).expanduser().resolve())!r} does not exist")
        raise model_error(what, name, revision, err, setting) from err
    if is_gguf(name):
        return  # a local file (checked above); resolve_lm_name de-quantises it
    try:  # offline or unreachable hub: fail now, before transformers retries with back-off
        check_hub(name, f"the {what} of" if what != "model" else "the model", revision, "model", setting)
    except HubUnavailableError as err:
        raise LMUnavailableError(str(err)) from err


def resolve_lm_name(name: str, setting: str = "") -> str:
    """``name``, or for a ``.gguf`` file the local folder of its de-quantised copy (made once; see
    :mod:`mtsae.lm.gguf`). A missing file or a missing ``gguf``/``accelerate`` is :class:`LMUnavailableError`."""
    if not is_gguf(name):
        return name
    check_model_reachable(name, None, "model", setting)
    try:
        return str(materialise_gguf(name))
    except GGUFDependencyError as err:
        raise LMUnavailableError(str(err)) from err


def load_lm_config(
    name: str, revision: str | None = None, trust_remote_code: bool = False, setting: str = ""
) -> Any:
    """``AutoConfig.from_pretrained`` (no weights) with :class:`LMUnavailableError` when unreachable."""
    from transformers import AutoConfig

    name = resolve_lm_name(name, setting)
    check_model_reachable(name, revision, "model", setting)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (
        Exception
    ) as err:  # OSError, hub errors, ValueError for unknown model types: re-raised, never swallowed
        raise model_error("config", name, revision, err, setting) from err


def load_tokenizer(
    name: str, revision: str | None = None, trust_remote_code: bool = False, setting: str = ""
) -> Any:
    """``AutoTokenizer.from_pretrained`` with :class:`LMUnavailableError` when unreachable."""
    from transformers import AutoTokenizer

    name = resolve_lm_name(name, setting)
    check_model_reachable(name, revision, "tokenizer", setting)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise model_error("tokenizer", name, revision, err, setting) from err
    tok.model_max_length = int(1e30)  # long texts are cut into rows by the caller: silence the warning
    return tok


def special_ids(tokenizer: Any) -> tuple[int, int, int | None]:
    """``(bos_id, eos_id, pad_id)`` for packed rows; a missing BOS or EOS is replaced by the other (GPT-2
    and Qwen2 start rows with EOS, the token they see at document boundaries). ``ValueError`` if neither."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token: rows need one to start with")
    return (bos if bos is not None else eos), (eos if eos is not None else bos), tokenizer.pad_token_id


def load_causal_lm(
    name: str,
    revision: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    setting: str = "",
) -> nn.Module:
    """A Hugging Face causal LM, frozen, in eval mode on ``device``; :class:`LMUnavailableError` if unreachable."""
    from transformers import AutoModelForCausalLM

    dtype = model_dtype(dtype)
    device = resolve_device(device)
    name = resolve_lm_name(name, setting)
    check_model_reachable(name, revision, "weights", setting)
    log.info("loading %s (%s) on %s", name, dtype, device)
    try:
        with no_library_bars():
            model = AutoModelForCausalLM.from_pretrained(
                name, revision=revision, trust_remote_code=trust_remote_code, **hf_dtype_kwargs(dtype)
            )
    except Exception as err:
        raise model_error("weights", name, revision, err, setting) from err
    model.requires_grad_(False)
    return model.to(device).eval()
