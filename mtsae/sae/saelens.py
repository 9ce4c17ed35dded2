"""SAELens's on-disk format: export per-token SAEs to it, import SAEs from it as per-token SAEs.

A SAELens folder is ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and, for JumpReLU, ``threshold [d_sae]``; it loads with
``sae_lens.SAE.load_from_disk(path)``. Activations map one to one:

====================  ==========================================================================
this project          SAELens architecture
====================  ==========================================================================
``relu``              ``standard``: ``relu((x - b_dec) @ W_enc + b_enc)``
``topk``              ``topk`` (``k``): ReLU of the ``k`` largest pre-activations
``jumprelu``          ``jumprelu``: ``relu(pre) · 1[pre > threshold]``, ``threshold = exp(log_threshold)``
``batchtopk``         ``jumprelu`` with the inference threshold ``θ`` for every feature (what
                      SAELens itself saves for BatchTopK); equal to this project's eval mode
====================  ==========================================================================

An MTSAE's encoder convolves over earlier tokens; SAELens's encoders see one token, so no SAELens
architecture can hold it: :func:`save_saelens` refuses it (use :func:`mtsae.save_sae` and, for SAEBench,
:class:`mtsae.sae.saebench.SAEBenchSAE`).

:func:`load_saelens` reads the folders of public releases in both SAELens layouts (6.x, and the
earlier one with ``hook_point`` / ``activation_fn_str``): ``standard`` (ReLU), ``topk`` and
``jumprelu`` (a JumpReLU with the ``batchtopk`` training metadata of SAELens comes back as
``batchtopk``). ``apply_b_dec_to_input: false`` is folded into ``b_enc`` and a fine-tuning
``scaling_factor`` into ``W_dec``, so the result is the same function of the input. Decoder rows are
normalised to unit norm and the norms folded into the encoder (as SAEBench does on loading) where that
leaves the outputs unchanged up to the rescaled codes: ReLU, JumpReLU and TopK with
``rescale_acts_by_decoder_norm``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtsae.sae.activations import BatchTopK, JumpReLU, ReLU, TopK
from mtsae.sae.export import ExportFormatError, SAEMetadata
from mtsae.sae.model import MTSAE
from mtsae.sae.positions import check_max_norm_multiple

__all__ = [
    "SAELENS_CFG_FILE",
    "SAELENS_WEIGHTS_FILE",
    "ImportedSAE",
    "save_saelens",
    "load_saelens",
    "read_saelens_metadata",
]

log = logging.getLogger(__name__)

SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
#: the SAELens layout written here (``metadata.sae_lens_version``; below 6 SAELens reads the old layout)
LAYOUT_VERSION = "6.0.0"
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
_SUPPORTED = ("standard", "topk", "jumprelu")


class ImportedSAE(NamedTuple):
    sae: MTSAE
    """the per-token SAE (``dilations=[]``), eval mode, float32, acting on raw activations"""
    metadata: SAEMetadata
    """model name, hook name, layer, context size, ... as far as the folder tells"""
    architecture: str
    """the SAELens architecture it was read as"""
    decoder_folded: bool
    """whether the decoder norms were folded into the encoder (then ``W_dec`` rows are unit norm)"""


# ---------------------------------------------------------------------------------------------- export
def save_saelens(
    sae: MTSAE, out_dir: str | os.PathLike, metadata: SAEMetadata | dict[str, Any] | None = None
) -> Path:
    """Write a per-token SAE (``dilations=[]``, raw activations) as a SAELens folder.

    ``metadata`` fills SAELens's ``model_name``, ``hook_name``, ``context_size``, ``prepend_bos`` and
    ``dataset_path``; the whole of it is kept under ``metadata.mtsae``.
    """
    if sae.dilations:
        raise ValueError(
            f"an MTSAE (dilations={sae.dilations}) cannot be saved as a SAELens SAE: its encoder reads "
            f"the {sae.receptive_field} latest tokens through causal convolutions, and SAELens's encoders "
            "read one token, so the file would load as a different SAE. Save it with mtsae.save_sae, and "
            "evaluate it in SAEBench through mtsae.sae.saebench.SAEBenchSAE; only per-token SAEs "
            "(dilations=[]) export to SAELens"
        )
    if isinstance(metadata, dict):
        metadata = SAEMetadata.from_dict(metadata)
    metadata = metadata or SAEMetadata()
    act = sae.act
    tensors = {
        "W_enc": sae.W_enc.detach().float().cpu().contiguous(),  # [d_in, d_sae]
        "W_dec": sae.W_dec.detach().float().cpu().contiguous(),  # [d_sae, d_in]
        "b_enc": sae.b_enc.detach().float().cpu().contiguous(),
        "b_dec": sae.b_dec.detach().float().cpu().contiguous(),
    }
    arch: dict[str, Any]
    extra_meta: dict[str, Any] = {}
    if isinstance(act, ReLU):
        arch = {"architecture": "standard"}
    elif isinstance(act, TopK):
        arch = {"architecture": "topk", "k": act.k, "rescale_acts_by_decoder_norm": False}
    elif isinstance(act, JumpReLU):
        arch = {"architecture": "jumprelu"}
        tensors["threshold"] = act.threshold.detach().float().cpu().contiguous()
    elif isinstance(act, BatchTopK):
        arch = {"architecture": "jumprelu"}
        tensors["threshold"] = act.threshold.detach().float().cpu().expand(sae.d_sae).contiguous()
        extra_meta = {"training_architecture": "batchtopk", "training_architecture_details": {"k": act.k}}
    else:  # pragma: no cover - every activation of mtsae.sae.activations is listed above
        raise ValueError(f"no SAELens architecture for the activation {type(act).__name__}")
    meta = {
        "sae_lens_version": LAYOUT_VERSION,
        "sae_lens_training_version": None,
        "model_name": metadata.model_name,
        "hook_name": metadata.hook_name,
        "hook_head_index": None,
        "context_size": metadata.context_size,
        "prepend_bos": True if metadata.prepend_bos is None else metadata.prepend_bos,
        "dataset_path": (metadata.data or {}).get("dataset"),
        "model_from_pretrained_kwargs": {},
        **extra_meta,
        "max_norm_multiple": sae.max_norm_multiple,  # this project's activation-sink rule (mtsae.sae.positions)
        "mtsae": metadata.to_dict(),
    }
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **arch,
        "metadata": meta,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / SAELENS_WEIGHTS_FILE))
    (out / SAELENS_CFG_FILE).write_text(json.dumps(cfg, indent=1))
    return out


# ---------------------------------------------------------------------------------------------- import
def _version_tuple(v: Any) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(v or ""))[:3]
    return tuple(int(n) for n in nums) if nums else (0,)


def _normalise_cfg(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """A flat view of either SAELens layout: 6.x (``metadata`` section) or the earlier flat one."""
    meta = dict(raw.get("metadata") or {})
    version = meta.get("sae_lens_version") or raw.get("sae_lens_version")
    cfg = {**meta, **{k: v for k, v in raw.items() if k != "metadata"}}
    if _version_tuple(version) < (6,):
        renames = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
        cfg = {renames.get(k, k): v for k, v in cfg.items()}
        act_fn = cfg.get("activation_fn") or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if "architecture" not in cfg or cfg["architecture"] == "standard":
            if act_fn == "topk":
                cfg["architecture"], cfg["k"] = "topk", kwargs.get("k")
            elif act_fn != "relu":
                raise ExportFormatError(
                    f"{path / SAELENS_CFG_FILE}: activation_fn {act_fn!r} has no counterpart here "
                    "(relu, topk and jumprelu SAEs import)"
                )
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = (
                "expected_average_only_in" if cfg["normalize_activations"] else "none"
            )
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg["normalize_activations"] = cfg.get("normalize_activations") or "none"
    return cfg


def _check_cfg(cfg: dict[str, Any], path: Path) -> None:
    where = path / SAELENS_CFG_FILE
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ExportFormatError(f"{where}: {key} must be a positive integer, got {cfg.get(key)!r}")
    arch = cfg["architecture"]
    if arch not in _SUPPORTED:
        raise ExportFormatError(
            f"{where}: SAELens architecture {arch!r} cannot be imported as a per-token SAE of this project; "
            f"supported: {', '.join(_SUPPORTED)} (ReLU, TopK, JumpReLU and BatchTopK saved as JumpReLU)"
        )
    if cfg["normalize_activations"] != "none":
        raise ExportFormatError(
            f"{where}: normalize_activations={cfg['normalize_activations']!r}; only 'none' imports. "
            "'expected_average_only_in' needs the dataset's scaling factor folded into the weights first "
            "(sae_lens: sae.fold_activation_norm_scaling_factor(factor), then save_model); "
            "per-token rescalings (constant_norm_rescale, layer_norm) are not linear and cannot be folded"
        )
    if cfg.get("reshape_activations", "none") != "none" or "hook_z" in str(cfg.get("hook_name") or ""):
        raise ExportFormatError(
            f"{where}: attention-output (hook_z) SAEs do not import; residual-stream SAEs do"
        )
    if cfg.get("hook_head_index") is not None:
        raise ExportFormatError(f"{where}: per-head SAEs (hook_head_index) do not import")
    if arch == "topk" and not isinstance(cfg.get("k"), int):
        raise ExportFormatError(f"{where}: a topk SAE needs an integer k, got {cfg.get('k')!r}")


def _metadata(cfg: dict[str, Any]) -> SAEMetadata:
    if isinstance(cfg.get("mtsae"), dict):  # written by save_saelens: the full metadata is kept
        return SAEMetadata.from_dict(cfg["mtsae"])
    hook = cfg.get("hook_name")
    match = _HOOK_RE.match(str(hook or ""))
    layer = cfg.get("hook_layer")
    if match:  # the input of block n (resid_pre) is the output of block n - 1; of block 0, the embeddings
        n = int(match.group(1))
        layer = n if match.group(2) == "post" else (n - 1 if n > 0 else None)
    dataset = cfg.get("dataset_path")
    tokens = cfg.get("training_tokens")
    extra = {
        k: cfg[k] for k in ("neuronpedia_id", "model_from_pretrained_kwargs", "architecture") if k in cfg
    }
    return SAEMetadata(
        model_name=cfg.get("model_name"),
        layer=layer if isinstance(layer, int) else None,
        hook_name=hook,
        context_size=cfg.get("context_size"),
        prepend_bos=cfg.get("prepend_bos"),
        training_tokens=tokens if isinstance(tokens, int) and tokens >= 0 else None,
        data={"dataset": dataset} if dataset else None,
        extra={"format": "saelens", **extra},
    )


def read_saelens_metadata(path: str | os.PathLike) -> SAEMetadata:
    """The :class:`mtsae.sae.export.SAEMetadata` of a SAELens folder (from its ``cfg.json``)."""
    path = Path(path).expanduser()
    return _metadata(_normalise_cfg(json.loads((path / SAELENS_CFG_FILE).read_text()), path))


def _expect(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if name not in state:
        raise ExportFormatError(f"{path / SAELENS_WEIGHTS_FILE} has no {name!r}; it has {sorted(state)}")
    t = state[name].float()
    if tuple(t.shape) != shape:
        raise ExportFormatError(
            f"{path / SAELENS_WEIGHTS_FILE}: {name} is {tuple(t.shape)}, expected {shape}"
        )
    return t


def _per_token_sae(cfg: dict[str, Any], threshold: torch.Tensor | None, path: Path) -> MTSAE:
    """The (empty) per-token SAE with the activation of a SAELens config: ReLU, TopK, BatchTopK (a
    JumpReLU trained as BatchTopK, with one shared threshold) or JumpReLU."""
    d_in, d_sae, arch = cfg["d_in"], cfg["d_sae"], cfg["architecture"]
    batchtopk_k = (cfg.get("training_architecture_details") or {}).get("k")
    if isinstance(batchtopk_k, float) and batchtopk_k.is_integer():
        batchtopk_k = int(batchtopk_k)  # SAELens keeps k as a float
    if arch == "standard":
        return MTSAE(d_in, d_sae, dilations=[], activation="relu")
    if arch == "topk":
        return MTSAE(d_in, d_sae, dilations=[], activation="topk", activation_kwargs={"k": cfg["k"]})
    if (
        cfg.get("training_architecture") == "batchtopk"
        and isinstance(batchtopk_k, int)
        and torch.all(threshold == threshold[0])
    ):
        return MTSAE(d_in, d_sae, dilations=[], activation="batchtopk", activation_kwargs={"k": batchtopk_k})
    # jumprelu: threshold = exp(log_threshold) must be positive
    if not bool(torch.all((threshold > 0) & torch.isfinite(threshold))):
        raise ExportFormatError(
            f"{path}: a JumpReLU threshold is not positive and finite (min {float(threshold.min()):.3g}); this "
            "project's JumpReLU keeps log(threshold)"
        )
    return MTSAE(d_in, d_sae, dilations=[], activation="jumprelu")


def load_saelens(path: str | os.PathLike, fold_decoder_norm: bool = True) -> ImportedSAE:
    """Import a SAELens folder as a per-token SAE of this project (see the module docstring).

    Args:
        path: folder with ``cfg.json`` and ``sae_weights.safetensors``.
        fold_decoder_norm: normalise ``W_dec`` rows and fold their norms into the encoder where that is
            exact (ReLU, JumpReLU; TopK only with ``rescale_acts_by_decoder_norm``), as SAEBench does
            before evaluating a SAELens SAE. The reconstruction is unchanged; codes are multiplied by
            the norms. A TopK decoder that is not unit norm is kept as it is, with a warning.
    """
    path = Path(path).expanduser()
    for name in (SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ExportFormatError(f"{path} has no {name}: not a SAELens SAE folder")
    try:
        raw = json.loads((path / SAELENS_CFG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path / SAELENS_CFG_FILE} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ExportFormatError(f"{path / SAELENS_CFG_FILE} is not a JSON object of SAELens settings")
    cfg = _normalise_cfg(raw, path)
    _check_cfg(cfg, path)
    d_in, d_sae, arch = cfg["d_in"], cfg["d_sae"], cfg["architecture"]
    try:
        with safe_open(str(path / SAELENS_WEIGHTS_FILE), framework="pt", device="cpu") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise ExportFormatError(
            f"{path / SAELENS_WEIGHTS_FILE} is not a readable safetensors file ({e})"
        ) from None
    W_enc = _expect(state, "W_enc", (d_in, d_sae), path)
    W_dec = _expect(state, "W_dec", (d_sae, d_in), path)
    b_enc = _expect(state, "b_enc", (d_sae,), path)
    b_dec = _expect(state, "b_dec", (d_in,), path)
    if "scaling_factor" in state:  # earlier layout: decode((f * scaling_factor)) -> fold into W_dec
        W_dec = W_dec * _expect(state, "scaling_factor", (d_sae,), path)[:, None]
    if not cfg["apply_b_dec_to_input"]:
        b_enc = b_enc + b_dec @ W_enc  # x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
    meta = _metadata(cfg)

    threshold = None
    if arch == "jumprelu":
        threshold = _expect(state, "threshold", (d_sae,), path)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens: topk(pre · |W_dec|) then decode with W_dec / |W_dec|: exactly the folded SAE
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    norms = W_dec.norm(dim=1)
    folded = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5))
    if fold_decoder_norm and not folded:
        if arch == "topk":
            log.warning(
                "%s: a TopK SAE whose decoder rows are not unit norm (max |norm - 1| = %.3g) keeps its "
                "decoder: folding the norms would change which k features win",
                path,
                float((norms - 1).abs().max()),
            )
        else:
            n = norms.clamp_min(1e-8)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
            threshold = None if threshold is None else threshold * n
            folded = True
    sae = _per_token_sae(cfg, threshold, path)
    try:
        sae.max_norm_multiple = check_max_norm_multiple(cfg.get("max_norm_multiple"))  # absent: None
    except ValueError as e:
        raise ExportFormatError(f"{path / SAELENS_CFG_FILE}: {e}") from None
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
        if isinstance(sae.act, JumpReLU):
            sae.act.log_threshold.copy_(threshold.log())
        elif isinstance(sae.act, BatchTopK):
            sae.act.threshold.fill_(float(threshold[0]))
    return ImportedSAE(sae=sae.eval(), metadata=meta, architecture=arch, decoder_folded=folded)
