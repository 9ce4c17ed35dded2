"""SAEBench's custom-SAE interface (mtsae.saebench.SAEBenchSAE) against the checks SAEBench applies.

SAEBench's package does not install beside this project's pins (it downgrades numpy and datasets), so
``saebench_checks`` restates its contract from its source: ``sae_bench/custom_saes/base_sae.py``
(``BaseSAE.test_sae``, ``check_decoder_norms``), ``sae_bench/sae_bench_utils/general_utils.py``
(``load_and_format_sae``, ``_standardize_sae_cfg``, ``str_to_dtype``), the custom-SAE README and the
attributes its evaluations read (``evals/core/main.py``, ``evals/absorption/k_sparse_probing.py``).
Where ``sae_bench`` imports, its own ``load_and_format_sae`` and decoder-norm checks run too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtsae import MTSAE, SAEMetadata, save_sae
from mtsae.saebench import SAEBenchSAE, current_token_encoder
from tests.conftest import tiny_sae

D_IN = 32
SAEBENCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}
SAEBENCH_DTYPES["bfloat16"] = torch.bfloat16


def saebench_checks(sae: torch.nn.Module, acts_1LD: torch.Tensor) -> None:
    """What SAEBench requires of and checks on a custom SAE before and while it evaluates it."""
    cfg = sae.cfg
    # README: encode / decode / forward, device and dtype attributes, a cfg with d_in and d_sae
    assert all(callable(getattr(sae, m)) for m in ("encode", "decode", "forward"))
    assert isinstance(sae.dtype, torch.dtype) and isinstance(sae.device, (torch.device, str))
    assert isinstance(sae, torch.nn.Module)
    # BaseSAE.test_sae: weight shapes
    assert sae.W_dec.shape == (cfg.d_sae, cfg.d_in)
    assert sae.W_enc.shape == (cfg.d_in, cfg.d_sae)
    assert sae.b_enc.shape == (cfg.d_sae,) and sae.b_dec.shape == (cfg.d_in,)
    assert isinstance(sae.W_dec, torch.nn.Parameter)  # README: SCR, TPP and absorption use W_dec.data
    # general_utils.check_decoder_norms (load_and_format_sae calls it on every custom SAE)
    norms = torch.norm(sae.W_dec.data, dim=1).to(dtype=sae.W_dec.dtype)
    tol = 1e-2 if sae.W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
    assert torch.allclose(norms, torch.ones_like(norms), atol=tol)
    # _standardize_sae_cfg: reads these (hook_layer, hook_name, model_name must be set), then writes
    # them back with architecture_str and a metadata object
    for name in ("hook_head_index", "context_size", "prepend_bos", "model_from_pretrained_kwargs"):
        assert hasattr(cfg, name), name
    assert cfg.hook_layer is not None and cfg.hook_name is not None and cfg.model_name is not None
    assert cfg.hook_name == f"blocks.{cfg.hook_layer}.hook_resid_post"
    cfg.architecture_str = cfg.architecture() if callable(cfg.architecture) else cfg.architecture
    cfg.metadata = object()
    cfg.dataset_trust_remote_code = True
    # results files store cfg.to_dict() as JSON; core/main.py loads the LM in str_to_dtype(cfg.dtype)
    json.dumps(cfg.to_dict())
    assert SAEBENCH_DTYPES[cfg.dtype] == sae.dtype == sae.W_dec.dtype
    # core/main.py weight statistics
    assert torch.isfinite(sae.W_enc.norm(dim=-2)).all() and torch.isfinite(sae.b_enc).all()
    # BaseSAE.test_sae: one prompt [1, L, D]; forward on its flattened [(1 L), D] equals decode(encode)
    acts = acts_1LD.to(device=sae.device, dtype=sae.dtype)
    encoded = sae.encode(acts)
    decoded = sae.decode(encoded)
    assert encoded.shape == (*acts.shape[:2], cfg.d_sae) and decoded.shape == acts.shape
    flattened = acts.reshape(-1, acts.shape[-1])
    assert torch.allclose(sae(flattened).reshape(acts.shape), decoded)
    l0 = (encoded[:, 1:] > 0).float().sum(-1)
    assert l0.mean() > 0


def _randomised(sae: MTSAE) -> MTSAE:
    with torch.no_grad():
        sae.conv_weight.add_(torch.randn_like(sae.conv_weight) * 0.3)
        sae.W_enc.normal_(0, D_IN**-0.5)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def _acts(L: int = 24) -> torch.Tensor:
    x = torch.randn(1, L, D_IN)
    x[:, 0] *= 100  # a BOS activation, huge as in Gemma
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"cascade": True}, {"activation": "topk", "activation_kwargs": {"k": 8}}])
def test_mtsae_passes_saebench_checks(kw: dict, dtype: torch.dtype) -> None:
    adapter = SAEBenchSAE(
        _randomised(tiny_sae(**kw)), "gemma-2-2b", 12, context_size=128, flat_input="sequence"
    )
    adapter = adapter.to(device="cpu", dtype=dtype)  # what every SAEBench eval does first
    assert adapter.cfg.dtype == str(dtype).removeprefix("torch.") and adapter.cfg.architecture == "mtsae"
    saebench_checks(adapter, _acts())


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_per_token_sae_passes_saebench_checks(activation: str) -> None:
    kwargs = {"k": 8} if "topk" in activation else {}
    sae = _randomised(tiny_sae(dilations=[], activation=activation, activation_kwargs=kwargs))
    adapter = SAEBenchSAE(sae, "pythia-70m-deduped", 3)  # 2-D inputs are tokens: no flat_input needed
    saebench_checks(adapter, _acts())
    assert adapter.cfg.architecture == {"relu": "standard", "topk": "topk"}.get(activation, "jumprelu")
    x = torch.randn(2, 9, D_IN)
    torch.testing.assert_close(adapter.encode(x), sae.encode(x))  # the SAE itself, BOS included
    torch.testing.assert_close(adapter.W_enc, sae.W_enc.detach())


def test_mtsae_encodes_sequences_with_their_context() -> None:
    sae = _randomised(tiny_sae())
    adapter = SAEBenchSAE(sae, "gemma-2-2b", 12)
    x = torch.randn(3, 20, D_IN)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[:, 0] = False
    f = adapter.encode(x)
    torch.testing.assert_close(f, sae.encode(x, valid))
    assert torch.all(f[:, 0] == 0)  # the BOS position has no features
    nearby = x.clone()
    nearby[:, 9] += 1.0
    assert not torch.allclose(adapter.encode(nearby)[:, 10], f[:, 10])  # token 10 sees token 9
    bos = x.clone()
    bos[:, 0] *= 1000
    torch.testing.assert_close(adapter.encode(bos), f)  # the BOS does not leak into its neighbours
    torch.testing.assert_close(adapter(x), sae.decode(f))


def test_2d_inputs_of_an_mtsae_need_a_decision() -> None:
    sae = _randomised(tiny_sae())
    x = torch.randn(10, D_IN)
    with pytest.raises(ValueError, match="flat_input='sequence'.*flat_input='tokens'"):
        SAEBenchSAE(sae, "m", 0).encode(x)
    tokens = SAEBenchSAE(sae, "m", 0, flat_input="tokens").encode(x)
    torch.testing.assert_close(tokens, sae.encode(x[:, None])[:, 0])  # each token alone, not masked
    assert (tokens > 0).any()
    sequence = SAEBenchSAE(sae, "m", 0, flat_input="sequence").encode(x)
    assert not torch.allclose(sequence[1:], tokens[1:])  # the same rows read as one sequence
    with pytest.raises(ValueError, match="flat_input must be one of"):
        SAEBenchSAE(sae, "m", 0, flat_input="guess")


@pytest.mark.parametrize("cascade", [False, True])
def test_W_enc_is_the_weight_on_the_current_token(cascade: bool) -> None:
    sae = _randomised(tiny_sae(cascade=cascade))
    x = torch.randn(1, 12, D_IN)
    valid = torch.zeros(1, 12, dtype=torch.bool)
    valid[0, -1] = True  # only the last token: its context is zero
    pre = sae(x, valid).pre[0, -1]
    want = (x[0, -1] - sae.b_dec) @ current_token_encoder(sae) + sae.b_enc
    torch.testing.assert_close(pre, want.detach(), atol=1e-5, rtol=1e-5)
    # written out: the W_enc block of each branch times its offset-0 taps (a cascade multiplies them)
    taps = sae.conv_weight.detach()[:, :, -1]
    taps = taps.cumprod(0) if cascade else taps
    blocks = sae.W_enc.detach().view(len(sae.dilations), D_IN, 64)
    by_hand = sum(taps[s][:, None] * blocks[s] for s in range(len(sae.dilations)))
    torch.testing.assert_close(current_token_encoder(sae), by_hand, atol=1e-5, rtol=1e-5)


def test_from_folder_reads_the_export(tmp_path: Path) -> None:
    meta = SAEMetadata(
        model_name="gemma-2-2b", layer=19, hook_name="blocks.19.hook_resid_post", context_size=1024
    )
    save_sae(_randomised(tiny_sae()), tmp_path / "sae", meta)
    adapter = SAEBenchSAE.from_folder(tmp_path / "sae", flat_input="sequence")
    cfg = adapter.cfg
    assert (cfg.model_name, cfg.hook_layer, cfg.hook_name, cfg.context_size) == (
        "gemma-2-2b",
        19,
        "blocks.19.hook_resid_post",
        1024,
    )
    assert cfg.dilations == [1, 2, 4, 8]
    assert SAEBenchSAE.from_folder(
        tmp_path / "sae", model_name="google/gemma-2-2b"
    ).cfg.model_name.startswith("google")
    save_sae(tiny_sae(), tmp_path / "bare")
    with pytest.raises(ValueError, match="pass model_name= and hook_layer="):
        SAEBenchSAE.from_folder(tmp_path / "bare")


def test_a_bare_mtsae_fails_the_checks() -> None:
    """Why the adapter exists: W_enc is [n_scales·d_in, d_sae] and there is no cfg, device or dtype."""
    with pytest.raises(AttributeError, match="cfg"):
        saebench_checks(tiny_sae(), _acts())


@pytest.mark.parametrize("kw", [{}, {"dilations": [], "activation": "jumprelu"}])
def test_saebench_itself_accepts_the_adapter(kw: dict) -> None:
    """With SAEBench importable (it does not install beside this project's pins): its own loader and checks."""
    general_utils = pytest.importorskip(
        "sae_bench.sae_bench_utils.general_utils", reason="sae-bench is not installed (it pins numpy<2)"
    )
    from sae_bench.custom_saes.base_sae import BaseSAE

    adapter = SAEBenchSAE(
        _randomised(tiny_sae(**kw)), "gemma-2-2b", 12, context_size=128, flat_input="sequence"
    )
    sae_id, sae, _ = general_utils.load_and_format_sae("mtsae", adapter, "cpu")
    assert sae_id == "custom_sae" and sae.cfg.architecture_str == adapter.cfg.architecture
    sae = sae.to(device="cpu", dtype=general_utils.str_to_dtype("bfloat16"))
    assert general_utils.str_to_dtype(sae.cfg.dtype) == sae.dtype == torch.bfloat16
    assert general_utils.check_decoder_norms(sae.W_dec.data) and BaseSAE.check_decoder_norms(sae)
    saebench_checks(sae, _acts())
