"""SAEBench's custom-SAE interface for this project's SAEs (MTSAEs and per-token SAEs).

SAEBench (github.com/adamkarvonen/SAEBench, ``sae_bench/custom_saes/base_sae.py`` and its README) runs
its evaluations (core, sparse probing, absorption, SCR/TPP, unlearning, ...) on any ``nn.Module`` that
has ``encode``, ``decode`` and ``forward``, the weights ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``
(unit-norm rows), ``b_enc``, ``b_dec``, ``device`` and ``dtype`` attributes and a ``cfg`` with at least
``model_name``, ``d_in``, ``d_sae``, ``hook_layer``, ``hook_name``, ``context_size``, ``hook_head_index``,
``architecture``, ``dtype`` and ``to_dict()``. :class:`SAEBenchSAE` is that module::

    from mtsae.saebench import SAEBenchSAE
    sae = SAEBenchSAE.from_folder("runs/gemma_l19/version_0/sae")    # model, layer, hook from the export
    sae_bench.evals.core.main.multiple_evals(selected_saes=[("mtsae", sae)], ...)

How the MTSAE meets it:

- ``encode(x)`` on ``[B, L, D]`` encodes every position with its causal context, as in training. SAEBench
  prepends the BOS token; position 0 is marked invalid, as the BOS was in training (no features there,
  and its activation, huge in Gemma, does not leak into later tokens) — ``mask_first_position``.
- A 2-D ``[N, D]`` input is ambiguous for an MTSAE (SAEBench passes one flattened prompt in
  ``BaseSAE.test_sae``, and unrelated single positions in the absorption eval): ``flat_input`` says what
  it is — ``"error"`` (default), ``"sequence"`` (one sequence in order) or ``"tokens"`` (``N`` tokens, each
  encoded without context). Per-token SAEs take ``[N, D]`` as tokens whatever it says.
- ``W_enc`` is the encoder's weight on the current token, ``[d_in, d_sae]`` (:func:`current_token_encoder`;
  for a per-token SAE, ``W_enc`` itself). SAEBench uses it only for weight statistics (encoder norms and
  cosines, absorption metadata).
- An SAE generating token by token with a KV cache sees ``L = 1`` (one token, no context); SAEBench's
  evaluations above run full sequences.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtsae.export import SAEMetadata, hook_name, load_sae, read_metadata
from mtsae.model import MTSAE

__all__ = ["SAEBenchConfig", "SAEBenchSAE", "FLAT_INPUTS", "current_token_encoder"]

FLAT_INPUTS = ("error", "sequence", "tokens")


@dataclass
class SAEBenchConfig:
    """The fields SAEBench reads from a custom SAE's ``cfg`` (its ``CustomSAEConfig``), same names."""

    model_name: str
    """language model, as SAEBench loads it (TransformerLens name, e.g. ``gemma-2-2b``)"""
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    """``blocks.{hook_layer}.hook_resid_post``"""
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    """``mtsae`` for an MTSAE; ``standard``, ``topk`` or ``jumprelu`` for per-token SAEs"""
    apply_b_dec_to_input: bool | None = None
    finetuning_scaling_factor: bool | None = None
    activation_fn_str: str = ""
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = ""
    """the weights' dtype as a string (``float32``, ``bfloat16``), kept up to date by ``.to()``"""
    device: str = ""
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None
    dilations: list[int] = field(default_factory=list)
    """this project's: the MTSAE's dilations (``[]`` for a per-token SAE)"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def current_token_encoder(sae: MTSAE) -> Tensor:
    """The encoder's weight on the current token, ``[d_in, d_sae]``: the ``W`` with which the SAE computes
    ``pre_t = u_t @ W + b_enc`` (``u = x - b_dec``) when the context is zero.

    For side-by-side branches that is ``Σ_s diag(c_s) W_enc[s·d_in:(s+1)·d_in]`` with ``c_s`` the offset-0
    tap of branch ``s`` (a cascade multiplies the taps of the branches below). It is read off the encoder
    itself, by encoding each basis vector as a sequence of one token, so it holds for every encoder
    layout; a per-token SAE returns its ``W_enc``.
    """
    if not sae.dilations:
        return sae.W_enc.detach().clone()
    training = sae.training
    sae.eval()  # a training-mode BatchTopK would update its threshold
    try:
        u = torch.eye(sae.d_in, device=sae.W_enc.device, dtype=torch.float32)
        x = (u + sae.b_dec.detach().float())[:, None, :]  # [d_in, 1, d_in]: one-token sequences, u = e_c
        pre = sae._encode(x, None)[1][:, 0]  # [d_in, d_sae]: e_c @ W + b_enc
    finally:
        sae.train(training)
    return (pre - sae.b_enc.detach().float()).to(sae.W_enc.dtype)


def _architecture(sae: MTSAE) -> tuple[str, str]:
    if sae.dilations:
        return "mtsae", sae.activation_name
    return {"relu": ("standard", "relu"), "topk": ("topk", "topk")}.get(
        sae.activation_name, ("jumprelu", "relu")
    )


class SAEBenchSAE(nn.Module):
    """An SAE of this project (acting on raw activations) presented as a SAEBench custom SAE.

    Args:
        sae: the SAE (``mtsae.load_sae``, ``SAEModule.export_sae()``); it is used as is, not copied.
        model_name: the language model as SAEBench names it.
        hook_layer: the layer whose residual stream (``hook_resid_post``) the SAE reads.
        context_size: tokens per sequence in training (SAEBench's ``cfg.context_size``).
        flat_input: what a 2-D ``[N, D]`` input to an MTSAE is: ``"error"`` (refuse), ``"sequence"`` or
            ``"tokens"`` (see the module docstring).
        mask_first_position: mark position 0 (the BOS SAEBench prepends) invalid in 3-D inputs; ``None``
            does so for an MTSAE (as in training) and not for a per-token SAE (as SAEBench does).
        device: where to put the SAE (default: where it is).
        dtype: the weights' dtype (default: as they are).
    """

    def __init__(
        self,
        sae: MTSAE,
        model_name: str,
        hook_layer: int,
        context_size: int | None = None,
        flat_input: str = "error",
        mask_first_position: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if flat_input not in FLAT_INPUTS:
            raise ValueError(f"flat_input must be one of {FLAT_INPUTS}, got {flat_input!r}")
        if not model_name:
            raise ValueError("model_name is needed: SAEBench loads the language model by that name")
        if isinstance(hook_layer, bool) or not isinstance(hook_layer, int) or hook_layer < 0:
            raise ValueError(f"hook_layer must be a non-negative integer, got {hook_layer!r}")
        self.sae = sae.eval()
        self.flat_input = flat_input
        self.mask_first_position = bool(sae.dilations) if mask_first_position is None else mask_first_position
        arch, act_fn = _architecture(sae)
        self.cfg = SAEBenchConfig(
            model_name=model_name,
            d_in=sae.d_in,
            d_sae=sae.d_sae,
            hook_layer=hook_layer,
            hook_name=hook_name(hook_layer),
            context_size=context_size,
            architecture=arch,
            apply_b_dec_to_input=True,
            finetuning_scaling_factor=False,
            activation_fn_str=act_fn,
            activation_fn_kwargs=dict(sae.activation_kwargs),
            prepend_bos=True,
            dilations=list(sae.dilations),
        )
        self.device: torch.device = sae.W_dec.device
        self.dtype: torch.dtype = sae.W_dec.dtype
        self.to(device=device or self.device, dtype=dtype or self.dtype)

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        model_name: str | None = None,
        hook_layer: int | None = None,
        **kwargs: Any,
    ) -> SAEBenchSAE:
        """Wrap an SAE folder (:func:`mtsae.load_sae`); model name, layer and context size come from its
        metadata unless given (SAEBench names models as TransformerLens does: pass ``model_name`` when the
        export holds a hub path such as ``google/gemma-2-2b``)."""
        meta: SAEMetadata = read_metadata(path)
        model_name = model_name or meta.model_name
        hook_layer = meta.layer if hook_layer is None else hook_layer
        if model_name is None or hook_layer is None:
            raise ValueError(
                f"{path} does not record its language model and layer (model_name={meta.model_name!r}, "
                f"layer={meta.layer!r}): pass model_name= and hook_layer="
            )
        kwargs.setdefault("context_size", meta.context_size)
        return cls(load_sae(path), model_name, hook_layer, **kwargs)

    # ------------------------------------------------------------------ weights SAEBench reads
    @property
    def W_dec(self) -> nn.Parameter:  # [d_sae, d_in], unit-norm rows
        return self.sae.W_dec

    @property
    def b_dec(self) -> nn.Parameter:  # [d_in]
        return self.sae.b_dec

    @property
    def b_enc(self) -> nn.Parameter:  # [d_sae]
        return self.sae.b_enc

    @property
    def W_enc(self) -> Tensor:  # [d_in, d_sae]: the weight on the current token
        return current_token_encoder(self.sae)

    # ------------------------------------------------------------------ encode / decode
    def _encode_3d(self, x: Tensor, mask_first: bool) -> Tensor:
        valid = None
        if mask_first:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            valid[:, 0] = False
        return self.sae.encode(x.to(self.dtype), valid)

    def encode(self, x: Tensor) -> Tensor:
        """Feature codes: ``[B, L, D] -> [B, L, d_sae]`` (with context), or ``[N, D] -> [N, d_sae]``."""
        if x.dim() == 3:
            return self._encode_3d(x, self.mask_first_position)
        if x.dim() != 2:
            raise ValueError(
                f"expected [B, L, {self.cfg.d_in}] or [N, {self.cfg.d_in}], got {tuple(x.shape)}"
            )
        if not self.sae.dilations or self.flat_input == "tokens":
            return self._encode_3d(x.unsqueeze(1), False).squeeze(1)  # every token alone
        if self.flat_input == "sequence":
            return self._encode_3d(x.unsqueeze(0), self.mask_first_position).squeeze(0)
        raise ValueError(
            f"SAEBenchSAE got a 2-D input {tuple(x.shape)}: for an MTSAE that is one sequence or unrelated "
            "tokens. Pass [B, L, D], or build the adapter with flat_input='sequence' (one flattened prompt, as "
            "in SAEBench's test_sae) or flat_input='tokens' (single positions, as in the absorption eval; "
            "encoded without context)"
        )

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``f @ W_dec + b_dec`` (per token)."""
        return self.sae.decode(feature_acts.to(self.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ device and dtype
    def to(self, *args: Any, **kwargs: Any) -> SAEBenchSAE:
        """As ``nn.Module.to``, and keep ``device``, ``dtype`` and ``cfg.dtype`` / ``cfg.device`` in step."""
        super().to(*args, **kwargs)
        self.device = self.sae.W_dec.device
        self.dtype = self.sae.W_dec.dtype
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        self.cfg.device = str(self.device)
        return self
