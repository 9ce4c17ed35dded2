"""Language-model hooking, generic over Hugging Face causal-LM architectures.

The activation of interest is the residual stream after decoder layer ``L`` ("resid_post", SAEBench /
TransformerLens ``blocks.L.hook_resid_post``): the output of ``decoder_layers(model)[L]``. For
``L < n_layers - 1`` it equals ``model(..., output_hidden_states=True).hidden_states[L + 1]``; for the
last layer ``hidden_states[-1]`` has the model's final norm applied, while resid_post does not.

- :func:`capture_resid_post` reads it with a forward hook that then stops the forward pass, so the
  layers after ``L`` (and the unembedding) never run.
- :func:`splice_resid_post` replaces it by ``fn(h)`` for the duration of a ``with`` block (SAE
  reconstructions for CE-loss scores, feature clamping for unlearning).
- :func:`lm_hidden_size` and :func:`n_layers` read the shape of a model from its config, without
  loading weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "decoder_layers",
    "capture_resid_post",
    "splice_resid_post",
    "lm_hidden_size",
    "n_layers",
    "hf_dtype_kwargs",
]

#: attribute path of the decoder layers (from the ``*ForCausalLM`` model) -> families using it
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "model.layers": "Gemma, Gemma2, Llama, Mistral, Qwen2 (and other Llama-style models)",
    "gpt_neox.layers": "GPT-NeoX, Pythia",
    "transformer.h": "GPT-2",
}
# the same layouts on the bare backbone (``Gemma2Model``, ``GPT2Model``, ...)
_BACKBONE_PATHS = ("layers", "h")


def _get_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (transformer blocks) of ``model``, in order.

    Supports the layouts in :data:`SUPPORTED_ARCHITECTURES`; anything else raises ``ValueError``.
    """
    for path in (*SUPPORTED_ARCHITECTURES, *_BACKBONE_PATHS):
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    supported = "; ".join(f"{fam} (`{path}`)" for path, fam in SUPPORTED_ARCHITECTURES.items())
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: supported architectures are {supported}"
    )


def _check_layer(layer: int, n: int, model: nn.Module) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise ValueError(
            f"layer={layer!r} is out of range: {type(model).__name__} has {n} decoder layers "
            f"(valid layers: 0 .. {n - 1})"
        )


def _hidden(output: Tensor | tuple) -> Tensor:
    """The hidden state in a decoder layer's output (a tensor in transformers 5, a tuple before)."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass right after the hooked layer."""


def capture_resid_post(
    model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """The residual stream after decoder layer ``layer``: ``[B, T] token ids -> [B, T, d_model]``.

    A forward hook on that layer stores its output and raises, so later layers never run. The hook runs
    after any other forward hook on the layer, so inside :func:`splice_resid_post` on the same layer it
    reads the spliced value. Runs under ``torch.inference_mode``; the returned tensor is on the model's
    device, in its dtype.
    """
    layers = decoder_layers(model)
    _check_layer(layer, len(layers), model)
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Tensor | tuple) -> None:
        captured.append(_hidden(output))  # [B, T, d_model]
        raise _StopForward

    # appended: runs after any other forward hook on the layer (a splice), so it sees what layer+1 gets
    handle = layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:  # pragma: no cover - a model whose forward skips its own layers
        raise RuntimeError(f"decoder layer {layer} of {type(model).__name__} was not called during forward")
    return captured[0]


@contextmanager
def splice_resid_post(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the ``with`` block, replace the output hidden state ``h`` of decoder layer ``layer`` by ``fn(h)``.

    ``fn`` maps ``[B, T, d_model] -> [B, T, d_model]``. If the layer returns a tuple (transformers < 5) the
    other elements are kept. The hook runs before any other forward hook on the layer (so
    ``output_hidden_states`` sees the spliced value) and is removed on exit, even after an exception.
    """
    layers = decoder_layers(model)
    _check_layer(layer, len(layers), model)

    def hook(module: nn.Module, args: Any, output: Tensor | tuple) -> Tensor | tuple:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = layers[layer].register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it under ``text_config``)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _config_int(config: Any, names: tuple[str, ...], what: str) -> int:
    """The first of ``names`` that the language-model config holds as an int."""
    cfg = _text_config(config)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the {what} in {type(config).__name__} (no {' / '.join(names[:2])})")


def lm_hidden_size(config: Any) -> int:
    """Width of the residual stream (``hidden_size``, or GPT-2's ``n_embd``) from a model config."""
    return _config_int(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def n_layers(config: Any) -> int:
    """Number of decoder layers (``num_hidden_layers``, or GPT-2's ``n_layer``) from a model config."""
    return _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"), "number of layers")


def hf_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` / ``from_config`` keyword for the weights' dtype: ``dtype`` since transformers
    4.56, ``torch_dtype`` before (the floor in setup.cfg is 4.44)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
