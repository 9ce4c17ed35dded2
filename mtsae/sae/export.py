"""Saving and loading trained SAEs that act on raw activations (no Lightning needed to use them).

An exported SAE is a folder (``docs/formats.md`` describes it field by field):

- ``config.json``: ``format_version``, the constructor arguments of :class:`mtsae.MTSAE` under ``sae``,
  the weights' ``dtype``, and :class:`SAEMetadata` under ``metadata`` (language model and revision, layer,
  hook name, context size, the activation scale folded into the weights, training tokens, git commit, ...);
- ``sae.safetensors``: the state dict (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``conv_weight`` and the
  activation's threshold, if any), with the config repeated in the file's header.

:func:`load_sae` also reads the first format (``config.json`` + ``sae.pt``) and a SAELens folder
(``cfg.json`` + ``sae_weights.safetensors``, see :mod:`mtsae.sae.saelens`), as a per-token SAE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mtsae.sae.model import MTSAE
from mtsae.sae.safetensors_io import save_file_deterministic

__all__ = [
    "SAEMetadata",
    "ExportFormatError",
    "save_sae",
    "load_sae",
    "read_metadata",
    "git_commit",
    "hook_name",
]

FORMAT_VERSION = 2
CONFIG_FILE, WEIGHTS_FILE = "config.json", "sae.safetensors"
LEGACY_WEIGHTS_FILE = "sae.pt"  # format 1: the state dict as a torch.save pickle


class ExportFormatError(ValueError):
    """A folder that is not an SAE this project can read, with what it found and what it needs."""


def hook_name(layer: int) -> str:
    """The SAELens / TransformerLens / SAEBench name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass(frozen=True)
class SAEMetadata:
    """What a user needs to use an exported SAE months later (every field is optional).

    The weights always act on raw activations of the hook point: the input scale used in training is
    folded in (``act_scale`` records its value, for information only).
    """

    model_name: str | None = None
    """language model (hub name or local path) whose activations the SAE reads; None for synthetic data"""
    model_sha256: str | None = None
    """SHA-256 of the model file when ``model_name`` is a ``.gguf`` file; None otherwise"""
    model_revision: str | None = None
    """its revision (branch, tag or commit); None for the default branch"""
    model_dtype: str | None = None
    """dtype the language model ran in when the training activations were computed"""
    layer: int | None = None
    """decoder block whose output (the residual stream after it) the SAE reads"""
    hook_name: str | None = None
    """the hook point in SAELens / SAEBench names, ``blocks.{layer}.hook_resid_post``"""
    context_size: int | None = None
    """tokens per training sequence, the BOS included"""
    prepend_bos: bool | None = None
    """whether every training sequence starts with the BOS token"""
    activation_dtype: str | None = None
    """storage dtype of the cached training activations"""
    act_scale: float = 1.0
    """input scale of training (``E||c·x||² = d_in``), already folded into the saved weights"""
    training_tokens: int | None = None
    """token positions trained on (all devices, BOS and padding included)"""
    training_valid_tokens: int | None = None
    """of which valid (not BOS, EOS or padding)"""
    global_step: int | None = None
    """optimizer steps of the run"""
    data: dict[str, Any] | None = None
    """the activation source's settings (dataset, split, text column, seed, ...)"""
    git_commit: str | None = None
    """commit of the code that trained the SAE (``+dirty`` when it had uncommitted changes)"""
    extra: dict[str, Any] = field(default_factory=dict)
    """anything else (free-form)"""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEMetadata:
        """Known fields by name; unknown keys go to ``extra`` (written by another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        extra = {**dict(known.pop("extra", None) or {}), **unknown}
        return cls(**known, extra=extra)


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit checked out where ``path`` lies (default: this package), ``+dirty`` if it has changes.

    None when that is not inside a git work tree or git is not installed.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode == 0 and bool(status.stdout.strip())
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mtsae_version = version("mtsae")
    except PackageNotFoundError:
        mtsae_version = "unknown"
    return {"mtsae": mtsae_version, "torch": torch.__version__}


def _config(sae: MTSAE, metadata: SAEMetadata) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "sae": sae.config(),
        "receptive_field": sae.receptive_field,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "metadata": metadata.to_dict(),
        "versions": _versions(),
    }


def save_sae(
    sae: MTSAE, out_dir: str | os.PathLike, metadata: SAEMetadata | dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` and ``sae.safetensors`` to ``out_dir`` (see the module docstring).

    ``sae`` must act on raw activations (``SAEModule.export_sae()``); ``metadata`` describes where its
    activations come from (a dict is read with :meth:`SAEMetadata.from_dict`).
    """
    if isinstance(metadata, dict):
        metadata = SAEMetadata.from_dict(metadata)
    metadata = metadata or SAEMetadata()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(sae, metadata)
    text = json.dumps(cfg, indent=1)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    # sorted metadata keys: the same SAE gives the same bytes in every process (recipes pin its hash)
    save_file_deterministic(tensors, out / WEIGHTS_FILE, {"format": "mtsae", "config": json.dumps(cfg)})
    (out / CONFIG_FILE).write_text(text)
    return out


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from e


def _kind(path: Path) -> str:
    """``mtsae`` (this format), ``legacy`` (format 1) or ``saelens``; a clear error otherwise."""
    from mtsae.sae.saelens import SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE

    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass the folder of an exported SAE")
    if (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists():
        return "mtsae"
    if (path / CONFIG_FILE).exists() and (path / LEGACY_WEIGHTS_FILE).exists():
        return "legacy"
    if (path / SAELENS_CFG_FILE).exists() and (path / SAELENS_WEIGHTS_FILE).exists():
        return "saelens"
    found = sorted(p.name for p in path.iterdir())[:10]
    raise ExportFormatError(
        f"{path} is not an SAE folder this project reads: it needs {CONFIG_FILE} + {WEIGHTS_FILE} "
        f"(mtsae), {CONFIG_FILE} + {LEGACY_WEIGHTS_FILE} (mtsae, first format) or {SAELENS_CFG_FILE} + "
        f"{SAELENS_WEIGHTS_FILE} (SAELens); found {found}"
    )


def _check_version(path: Path, cfg: dict[str, Any]) -> None:
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportFormatError(
            f"{path / CONFIG_FILE} has format_version={version!r}; this mtsae reads versions 1 to "
            f"{FORMAT_VERSION}: upgrade mtsae to load it"
        )


def read_metadata(path: str | os.PathLike) -> SAEMetadata:
    """The :class:`SAEMetadata` of an SAE folder of any format :func:`load_sae` reads."""
    path = Path(path).expanduser()
    kind = _kind(path)
    if kind == "saelens":
        from mtsae.sae.saelens import read_saelens_metadata

        return read_saelens_metadata(path)
    cfg = _read_config(path)
    if kind == "mtsae":
        _check_version(path, cfg)
    meta = dict(cfg.get("metadata") or {})
    if kind == "legacy" and "act_scale" not in meta:
        meta["act_scale"] = 1.0
    return SAEMetadata.from_dict(meta)


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> MTSAE:
    """Load an SAE folder (eval mode, float32, acting on raw activations, ``requires_grad=False``).

    Reads this project's format (``config.json`` + ``sae.safetensors``), its first format
    (``config.json`` + ``sae.pt``) and SAELens folders (``cfg.json`` + ``sae_weights.safetensors``, as a
    per-token SAE: :func:`mtsae.sae.saelens.load_saelens`). Its metadata: :func:`read_metadata`.
    """
    path = Path(path).expanduser()
    kind = _kind(path)
    if kind == "saelens":
        from mtsae.sae.saelens import load_saelens

        return load_saelens(path).sae.to(device).requires_grad_(False)
    cfg = _read_config(path)
    if kind == "mtsae":
        _check_version(path, cfg)
        if not isinstance(cfg.get("sae"), dict):
            raise ExportFormatError(f"{path / CONFIG_FILE} has no 'sae' section (the model's arguments)")
        weights = path / WEIGHTS_FILE
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as fh:
                # the header's shapes first: sizes in an untrusted config are checked before allocation
                _check_shapes(path, cfg["sae"], {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})  # noqa: SIM118
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as e:
            raise ExportFormatError(f"{weights} is not a readable safetensors file ({e})") from None
        sae = MTSAE(**cfg["sae"])
    else:  # format 1: the constructor arguments at the top level, the weights pickled
        args = {k: v for k, v in cfg.items() if k != "metadata"}
        state = torch.load(path / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        _check_shapes(path, args, {k: tuple(v.shape) for k, v in state.items()})
        sae = MTSAE(**args)
    try:
        missing, unexpected = sae.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit the config
        raise ExportFormatError(f"the weights in {path} do not fit its config: {e}") from e
    if missing or unexpected:
        raise ExportFormatError(
            f"the weights in {path} do not fit its config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return sae.to(device).eval().requires_grad_(False)


def _check_shapes(path: Path, args: dict[str, Any], found: dict[str, tuple[int, ...]]) -> None:
    """Refuse arguments that are not a valid :class:`MTSAE`, or weights of other names or shapes, before
    the model is allocated (it is built on the ``meta`` device: no memory)."""
    try:
        with torch.device("meta"):
            probe = MTSAE(**args)
    except (TypeError, ValueError) as e:
        raise ExportFormatError(f"{path / CONFIG_FILE}: the SAE's arguments are not valid ({e})") from None
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if found != want:
        differ = sorted(k for k in set(want) | set(found) if want.get(k) != found.get(k))
        detail = "; ".join(f"{k}: config {want.get(k)}, weights {found.get(k)}" for k in differ[:5])
        raise ExportFormatError(f"the weights in {path} do not fit its config ({detail})")
