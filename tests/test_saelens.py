"""SAELens's format: per-token SAEs export to it and import from it with equal outputs; MTSAEs are refused.

The round trips through the real library need the optional extra (``pip install -e ".[saelens]"``) and
are skipped without it; the layouts of public releases are also checked against hand-written folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtsae import load_sae, read_metadata
from mtsae.export import ExportFormatError, SAEMetadata
from mtsae.model import MTSAE
from mtsae.saelens import load_saelens, save_saelens
from tests.conftest import tiny_sae

D_IN, D_SAE = 16, 48
ACTIVATIONS = {
    "relu": {},
    "topk": {"k": 5},
    "jumprelu": {},
    "batchtopk": {"k": 5},
}
META = SAEMetadata(
    model_name="org/lm",
    layer=3,
    hook_name="blocks.3.hook_resid_post",
    context_size=128,
    prepend_bos=True,
    data={"dataset": "org/corpus"},
    training_tokens=12345,
)


def trained_like(activation: str) -> MTSAE:
    """A per-token SAE with random weights and, for the threshold activations, thresholds that matter."""
    sae = MTSAE(D_IN, D_SAE, dilations=[], activation=activation, activation_kwargs=ACTIVATIONS[activation])
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        if activation == "jumprelu":
            sae.act.log_threshold.copy_(torch.rand(D_SAE).mul(0.8).add(0.1).log())
    if activation == "batchtopk":  # one training forward sets the inference threshold
        sae.train()(torch.randn(64, D_IN))
    return sae.eval()


def saelens_sae(path: Path):
    sae_lens = pytest.importorskip("sae_lens", reason="the optional extra sae-lens is not installed")
    return sae_lens.SAE.load_from_disk(str(path), device="cpu")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_export_loads_back_as_the_same_sae(activation: str, tmp_path: Path) -> None:
    sae = trained_like(activation)
    save_saelens(sae, tmp_path / "sl", META)
    back = load_sae(tmp_path / "sl")
    x = torch.randn(2, 7, D_IN)
    with torch.no_grad():
        f = sae.encode(x)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(back.encode(x), f)
        torch.testing.assert_close(back.decode(f), sae.decode(f))
    assert back.activation_name == activation and back.dilations == []
    assert read_metadata(tmp_path / "sl") == META


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_export_loads_in_saelens_with_equal_outputs(activation: str, tmp_path: Path) -> None:
    sae = trained_like(activation)
    save_saelens(sae, tmp_path / "sl", META)
    theirs = saelens_sae(tmp_path / "sl")
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "org/lm" and theirs.cfg.metadata.context_size == 128
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(theirs.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(f), sae.decode(f), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x).x_hat, atol=1e-5, rtol=1e-5)


def test_an_mtsae_is_not_written_as_a_saelens_sae(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be saved as a SAELens SAE.*SAEBenchSAE"):
        save_saelens(tiny_sae(), tmp_path / "sl")
    assert not (tmp_path / "sl").exists()


# ---------------------------------------------------------------------------------------------- import
def _write(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _weights(scale_dec: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(D_SAE, D_IN, generator=g)
    if scale_dec:  # public SAEs often have decoder rows of other norms
        W_dec = W_dec * torch.rand(D_SAE, 1, generator=g).add(0.5)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.4,
        "W_dec": W_dec,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.2,
        "b_dec": torch.randn(D_IN, generator=g) * 0.3,
    }


def _reference(w: dict[str, torch.Tensor], x: torch.Tensor, arch: str, apply_b_dec: bool = True, k: int = 5):
    """Codes and reconstruction written out from SAELens's definitions (no folding)."""
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        f = torch.relu(pre)
    elif arch == "topk":
        vals, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        f = torch.relu(pre) * (pre > w["threshold"])
    W_dec = w["W_dec"] * w.get("scaling_factor", torch.ones(D_SAE))[:, None]
    return f, f @ W_dec + w["b_dec"]


def test_import_v6_jumprelu_folds_decoder_norms(tmp_path: Path) -> None:
    w = {**_weights(), "threshold": torch.rand(D_SAE) * 0.3 + 0.05}
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "architecture": "jumprelu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.0",
            "model_name": "gemma-2-2b",
            "hook_name": "blocks.12.hook_resid_post",
            "context_size": 1024,
            "neuronpedia_id": "gemma-2-2b/12-gemmascope-res-16k",
        },
    }
    imp = load_saelens(_write(tmp_path / "jr", cfg, w))
    x = torch.randn(40, D_IN)
    f_ref, x_hat_ref = _reference(w, x, "jumprelu")
    norms = w["W_dec"].norm(dim=1)
    with torch.no_grad():
        torch.testing.assert_close(imp.sae.encode(x), f_ref * norms, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(imp.sae(x).x_hat, x_hat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(imp.sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert imp.decoder_folded and imp.architecture == "jumprelu"
    assert imp.metadata.layer == 12 and imp.metadata.model_name == "gemma-2-2b"
    assert imp.metadata.context_size == 1024 and "neuronpedia_id" in imp.metadata.extra
    # without folding: the codes are SAELens's own
    raw = load_saelens(tmp_path / "jr", fold_decoder_norm=False)
    with torch.no_grad():
        torch.testing.assert_close(raw.sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)


def test_import_earlier_layout_topk_without_b_dec_on_input(tmp_path: Path) -> None:
    """The earlier SAELens layout: hook_point, activation_fn_str + kwargs, scaling_factor, no b_dec on input."""
    w = {**_weights(scale_dec=False), "scaling_factor": torch.rand(D_SAE) + 0.5}
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre",  # the input of block 8: the output of block 7
        "hook_point_layer": 8,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": True,
        "normalize_activations": False,
        "context_size": 128,
        "dtype": "float32",
        "sae_lens_training_version": "3.2.0",
    }
    imp = load_saelens(_write(tmp_path / "old", cfg, w))
    assert imp.architecture == "topk" and imp.sae.act.k == 5 and imp.metadata.layer == 7
    assert imp.metadata.hook_name == "blocks.8.hook_resid_pre" and imp.metadata.model_name == "gpt2-small"
    assert not imp.decoder_folded  # TopK cannot fold non-unit rows without changing its choice
    x = torch.randn(40, D_IN)
    f_ref, x_hat_ref = _reference(w, x, "topk", apply_b_dec=False)
    with torch.no_grad():
        torch.testing.assert_close(imp.sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(imp.sae(x).x_hat, x_hat_ref, atol=1e-5, rtol=1e-5)


def test_import_relu_folds_and_keeps_reconstruction(tmp_path: Path) -> None:
    w = _weights()
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "standard",
        "metadata": {"sae_lens_version": "6.0.0"},
    }
    sae = load_sae(_write(tmp_path / "relu", cfg, w))  # load_sae reads SAELens folders as per-token SAEs
    x = torch.randn(2, 9, D_IN)
    f_ref, x_hat_ref = _reference(w, x, "standard")
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref * w["W_dec"].norm(dim=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).x_hat, x_hat_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "gated"}, "architecture 'gated' cannot be imported"),
        ({"normalize_activations": "expected_average_only_in"}, "fold_activation_norm_scaling_factor"),
        ({"normalize_activations": "constant_norm_rescale"}, "not linear"),
        ({"reshape_activations": "hook_z"}, "hook_z"),
        ({"d_sae": D_SAE + 1}, r"W_enc is \(16, 48\), expected \(16, 49\)"),
    ],
)
def test_import_refuses_what_it_cannot_represent(change: dict, message: str, tmp_path: Path) -> None:
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "standard",
        "metadata": {"sae_lens_version": "6.1.0"},
    }
    path = _write(tmp_path / "bad", {**cfg, **change}, _weights())
    with pytest.raises(ExportFormatError, match=message):
        load_sae(path)


def test_import_refuses_a_non_positive_jumprelu_threshold(tmp_path: Path) -> None:
    w = {**_weights(), "threshold": torch.zeros(D_SAE)}
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "jumprelu",
        "metadata": {"sae_lens_version": "6.1.0"},
    }
    with pytest.raises(ExportFormatError, match="threshold is not positive"):
        load_saelens(_write(tmp_path / "jr0", cfg, w))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_saes_import_with_equal_outputs(arch: str, tmp_path: Path) -> None:
    """SAEs made and saved by SAELens itself (non-unit decoders), compared with SAELens's own outputs."""
    sae_lens = pytest.importorskip("sae_lens", reason="the optional extra sae-lens is not installed")
    from sae_lens.saes import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    made = {
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    }[arch]()
    with torch.no_grad():
        for name, p in made.named_parameters():
            p.copy_(torch.rand_like(p) * 0.3 + 0.05 if name == "threshold" else torch.randn_like(p) * 0.5)
    made.save_model(str(tmp_path / arch))
    fold = arch != "topk"  # SAELens refuses to fold a TopK decoder, and so does the import
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch), fold_W_dec_norm=fold)
    ours = load_saelens(tmp_path / arch).sae
    x = torch.randn(4, 6, D_IN)
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(ours.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
    assert math.isclose(float(ours.W_dec.detach().norm(dim=1).max()), 1.0, rel_tol=1e-5) == fold
