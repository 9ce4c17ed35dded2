"""mtsae.evals.core: CE-loss / KL scores with an SAE spliced into a tiny LM (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtsae.evals.core import CORE_SUM_KEYS, core_lm_metrics, finalize_core_metrics
from mtsae.lm.loading import LMUnavailableError, load_causal_lm
from mtsae.sae.model import MTSAE
from mtsae.sae.scale import ScaledSAE
from tests.helpers.lm import offline_hub, tiny_lm_dir

D = 64  # residual width of the tiny LM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    path = tiny_lm_dir(tmp_path_factory, "gemma2")
    tok = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(str(path), dtype="float32", device="cpu")
    docs = [json.loads(line)["text"] for line in (path / "corpus.jsonl").read_text().splitlines()]
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    stream = [t for d in ids for t in (*d, tok.eos_token_id)]
    n = len(stream) // 23
    rows = torch.tensor(stream[: n * 23]).view(n, 23)
    rows = torch.cat([torch.full((n, 1), tok.bos_token_id), rows], dim=1)  # [n, 24]: BOS + text with EOS
    # a few training steps (~2 s): a random LM predicts uniformly, and zero ablation then changes nothing
    _train(model, rows[:-6])
    rows = rows[-6:].clone()  # held out
    mask = torch.ones_like(rows)
    rows[5, -4:], mask[5, -4:] = tok.pad_token_id, 0  # a right-padded row
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    return model, rows, mask, special


def _train(model: torch.nn.Module, rows: torch.Tensor, steps: int = 30) -> None:
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = rows[torch.randint(0, len(rows), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)


def identity_sae() -> MTSAE:
    """A per-token ReLU SAE whose reconstruction is exactly its input: f = relu([x, -x]), W_dec = [I; -I]."""
    sae = MTSAE(D, 2 * D, dilations=[], activation="relu")
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d_in, d_sae]
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # [d_sae, d_in], unit-norm rows
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae() -> MTSAE:
    """An SAE whose reconstruction is zero (zero decoder and bias)."""
    sae = MTSAE(D, 2 * D, dilations=[1, 2])
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.mark.parametrize("act_scale", [1.0, 3.7])
def test_perfect_reconstruction_scores_one(tiny, act_scale: float) -> None:
    model, rows, mask, special = tiny
    sae = ScaledSAE(identity_sae(), act_scale)  # an SAE trained on act_scale * x, seen from raw x
    sums = core_lm_metrics(model, sae, 1, rows, mask, special, batch_size=4)
    assert set(sums) == set(CORE_SUM_KEYS) and all(v.dtype == torch.float64 for v in sums.values())
    m = finalize_core_metrics(sums)
    assert m["ce_loss_zero"] > m["ce_loss_clean"] + 0.01  # zero ablation hurts, so the score is defined
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-5) and m["kl_div_sae"] < 1e-6
    # special tokens are not averaged: BOS (6), EOS in the text, the 4 pads
    n_special = sum(int((rows[:, :-1] == s).sum()) for s in special)
    assert m["n_tokens"] == rows[:, :-1].numel() - n_special


def test_zero_reconstruction_scores_zero(tiny) -> None:
    model, rows, mask, special = tiny
    m = finalize_core_metrics(core_lm_metrics(model, zero_sae(), 2, rows, mask, special, batch_size=6))
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_zero"])


def test_sums_add_across_shards(tiny) -> None:
    """What DDP does: each rank sums over its rows; the sums of the shards equal the sums of all rows."""
    model, rows, mask, special = tiny
    torch.manual_seed(0)
    sae = MTSAE(D, 128, dilations=[1, 2]).eval()
    whole = core_lm_metrics(model, sae, 1, rows, mask, special, batch_size=3)
    parts = [core_lm_metrics(model, sae, 1, rows[i::2], mask[i::2], special, batch_size=2) for i in range(2)]
    for k in CORE_SUM_KEYS:
        torch.testing.assert_close(parts[0][k] + parts[1][k], whole[k], rtol=1e-5, atol=1e-6)
    m = finalize_core_metrics(whole)
    assert m["ce_loss_clean"] < m["ce_loss_zero"] and m["kl_div_zero"] > 0


def test_special_positions_keep_the_original_activation(tiny) -> None:
    """An SAE that returns garbage changes nothing if every position is special."""

    class Garbage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, valid):
            return type("Out", (), {"x_hat": torch.full_like(x, 1e4)})()

    model, rows, mask, special = tiny
    sums = core_lm_metrics(model, Garbage(), 1, rows, mask, special + list(range(512)), batch_size=6)
    assert float(sums["n_ce"]) == 0 and float(sums["kl_sae"]) == 0
    with pytest.raises(ValueError, match="no valid"):
        finalize_core_metrics(sums)


def test_unreachable_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    with pytest.raises(LMUnavailableError, match="does not exist"):
        load_causal_lm(str(tmp_path / "no" / "model"))
    with pytest.raises(LMUnavailableError, match="hf download google/gemma-2-2b"):
        load_causal_lm("google/gemma-2-2b")


def test_callback_checks_the_lm_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable model fails at setup, not at the first validation hours into training."""
    from types import SimpleNamespace

    from callbacks.core_metrics import CoreLMMetrics
    from data.lm_source import LMSource

    offline_hub(monkeypatch)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    source = LMSource(
        model_name=str(tmp_path / "no-such-model"), layer=0, dataset=str(tmp_path / "corpus.jsonl")
    )
    trainer = SimpleNamespace(datamodule=SimpleNamespace(source=source))
    with pytest.raises(Exception, match="no-such-model"):
        CoreLMMetrics().setup(trainer, None, "fit")


def _sink_mask(model, rows, mask, special, rule: float) -> torch.Tensor:
    """The positions the rule ``rule`` keeps, from layer 1's output of every batch of 3 rows."""
    from mtsae.evals.unlearning.intervention import valid_token_mask
    from mtsae.lm.hooks import capture_resid_post
    from mtsae.sae.positions import ordinary_positions

    parts = []
    for i in range(0, len(rows), 3):
        h = capture_resid_post(model, 1, rows[i : i + 3], mask[i : i + 3])
        parts.append(ordinary_positions(h, valid_token_mask(rows[i : i + 3], mask[i : i + 3], special), rule))
    return torch.cat(parts)


def test_activation_sinks_keep_their_activation_and_are_not_averaged(tiny) -> None:
    """``max_norm_multiple`` (docs/design.md §3): positions the rule drops are spliced like special tokens.
    A multiple just above 1 drops about half of the tiny LM's tokens (those above the batch's median)."""
    from mtsae.lm.hooks import decoder_layers

    model, rows, mask, special = tiny
    rule = 1.05
    kept = _sink_mask(model, rows, mask, special, rule)
    valid = _sink_mask(model, rows, mask, special, 1e30)  # the rule never fires: the special-token mask
    assert 0 < int(kept.sum()) < int(valid.sum())

    class Garbage(torch.nn.Module):
        max_norm_multiple = rule

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, valid):
            return type("Out", (), {"x_hat": torch.full_like(x, 1e4)})()

    seen: list[torch.Tensor] = []
    handle = decoder_layers(model)[1].register_forward_hook(  # after the splice: what later layers read
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        sums = core_lm_metrics(model, Garbage(), 1, rows, mask, special, batch_size=3)
    finally:
        handle.remove()
    assert float(sums["n_ce"]) == int(kept[:, :-1].sum()) and float(sums["n_kl"]) == int(kept.sum())
    # per batch: clean, SAE-spliced, zero-ablated forwards; the spliced ones keep the dropped positions
    for b in range(2):
        clean, spliced, zeroed = seen[3 * b : 3 * b + 3]
        k = kept[3 * b : 3 * b + 3]
        assert torch.equal(spliced[~k], clean[~k]) and torch.equal(zeroed[~k], clean[~k])
        assert (spliced[k] == 1e4).all() and (zeroed[k] == 0).all()


def test_unlearning_sparsity_does_not_count_activation_sinks(tiny) -> None:
    from mtsae.evals.unlearning.pipeline import feature_sparsities

    model, rows, mask, special = tiny
    rows = rows[:3]  # unpadded rows: feature_sparsities reads them without an attention mask
    ones = torch.ones_like(rows)
    sae = identity_sae()
    valid = _sink_mask(model, rows, ones, special, 1e30)  # the special-token mask
    assert int(feature_sparsities(model, sae, 1, rows, special, batch_size=3).n_tokens) == int(valid.sum())
    sae.max_norm_multiple = 1.05
    kept = _sink_mask(model, rows, ones, special, 1.05)
    acc = feature_sparsities(model, sae, 1, rows, special, batch_size=3)
    assert 0 < int(acc.n_tokens) == int(kept.sum()) < int(valid.sum())
    # the codes at the dropped positions are not counted: the identity SAE fires at every kept position
    assert float(acc.active_counts.max()) <= int(kept.sum())
