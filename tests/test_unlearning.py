"""Tests for mtsae.unlearning: sparsity, selection, clamping, grid/score, core scores, planted LM test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtsae.lm import capture_resid_post, splice_resid_post
from mtsae.mcq import answer_probs
from mtsae.model import MTSAE
from mtsae.unlearning import (
    ClampIntervention,
    GridConfig,
    GridPoint,
    SparsityAccumulator,
    ce_loss_score,
    clamp_intervention,
    feature_sparsity,
    intervention_mask,
    kl_div_score,
    kl_per_token,
    next_token_ce,
    pooled_accuracy,
    select_features,
    unlearning_score,
    valid_token_mask,
)


# ---------------------------------------------------------------------------------------------- sparsity
def test_feature_sparsity_hand_worked() -> None:
    f = torch.tensor([[[1.0, 0.0, 2.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.3]]])  # [1, 3, 3]
    valid = torch.tensor([[True, False, True]])  # the middle token (say BOS) is ignored
    torch.testing.assert_close(feature_sparsity(f, valid), torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(feature_sparsity(f), torch.tensor([2 / 3, 1 / 3, 1.0]))


def test_sparsity_accumulator_streams_and_rejects_empty() -> None:
    f = torch.relu(torch.randn(4, 5, 7))
    valid = torch.rand(4, 5) > 0.3
    acc = SparsityAccumulator(7)
    acc.update(f[:1], valid[:1])
    acc.update(f[1:], valid[1:])
    torch.testing.assert_close(acc.compute(), feature_sparsity(f, valid))
    assert int(acc.n_tokens) == int(valid.sum())
    acc.reset()
    with pytest.raises(ValueError, match="no valid token"):
        acc.compute()
    with pytest.raises(ValueError, match="does not match"):
        feature_sparsity(f, valid[:, :2])


# ---------------------------------------------------------------------------------------------- selection
FORGET = [0.5, 0.9, 0.9, 0.0, 0.7, 0.9, 0.2]
RETAIN = [0.0, 0.01, 0.0, 0.0, 0.005, 0.0, 0.0099]


def test_select_features_hand_worked() -> None:
    # threshold 0.01: feature 1 has retain == threshold -> dropped (SAEBench drops retain >= threshold);
    # feature 3 never fires on the forget set -> never selected; 2 and 5 tie at 0.9 -> lower index first
    assert select_features(FORGET, RETAIN, 0.01, 3).tolist() == [2, 5, 4]
    assert select_features(FORGET, RETAIN, 0.01, 10).tolist() == [2, 5, 4, 0, 6]  # fewer than asked
    # threshold 0.001 also drops features 4 (0.005) and 6 (0.0099)
    assert select_features(torch.tensor(FORGET), torch.tensor(RETAIN), 0.001, 10).tolist() == [2, 5, 0]
    out = select_features(FORGET, RETAIN, 0.01, 0)
    assert out.dtype == torch.long and out.numel() == 0


def test_select_features_validates() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        select_features([0.1, 0.2], [0.0], 0.01, 1)
    with pytest.raises(ValueError, match="n_features"):
        select_features([0.1], [0.0], 0.01, -1)


# ---------------------------------------------------------------------------------------------- clamp
def _random_sae(dilations: list[int], d_in: int = 6, d_sae: int = 8) -> MTSAE:
    sae = MTSAE(d_in, d_sae, dilations=dilations)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_(std=0.1)
        sae.conv_weight.normal_()
    return sae


@pytest.mark.parametrize("dilations", [[], [1, 2]])
def test_clamp_matches_formula_and_error_term(dilations: list[int]) -> None:
    sae = _random_sae(dilations)
    x = torch.randn(2, 7, 6)  # [B, T, d_in]
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, 0] = False  # BOS
    valid[1, -1] = False  # PAD
    feats, m = [0, 3, 5], 4.0
    out = clamp_intervention(x, sae, torch.tensor(feats), m, valid)

    f = sae.encode(x, valid).detach()  # [B, T, d_sae]; MTSAE sees the whole sequence
    sel = f[..., feats]
    assert (sel > 0).any() and ((sel == 0) & valid[..., None]).any()  # both cases occur

    expected = x.clone().double()
    W = sae.W_dec.detach().double()
    for b in range(2):
        for t in range(7):
            for i in feats:
                if valid[b, t] and f[b, t, i] > 0:
                    expected[b, t] += (-m - f[b, t, i].double()) * W[i]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    # decode(clamped codes) + original error term
    f_clamped = f.clone()
    f_clamped[..., feats] = torch.where(sel > 0, torch.full_like(sel, -m), sel)
    via_error = sae.decode(f_clamped) + (x - sae.decode(f))
    torch.testing.assert_close(out, via_error.detach(), rtol=1e-5, atol=1e-5)

    # invalid positions and positions where no selected feature fires are bit-identical
    untouched = ~((sel > 0).any(-1)) | ~valid
    assert untouched.any()
    assert torch.equal(out[untouched], x[untouched])


def test_saebench_rule_matches_saebench_clamp_for_a_per_token_sae() -> None:
    """SAEBench's hook: encode unmasked, zero the codes at position 0, clamp, add the error term back.
    An EOS inside the row is clamped like any token under that rule."""
    sae = _random_sae([])
    ids = torch.tensor([[1, 5, 2, 6, 7, 8, 9], [1, 4, 4, 2, 2, 3, 5]])  # BOS 1, EOS 2 inside the rows
    x = torch.randn(2, 7, 6)
    feats, m = [0, 3, 5], 4.0
    f = sae.encode(x).detach()
    f[:, 0, :] = 0.0
    error = x - sae.decode(f)
    sel = f[..., feats]
    assert ((sel > 0) & (ids == 2)[..., None]).any()  # a selected feature fires at an EOS
    f[..., feats] = torch.where(sel > 0, torch.full_like(sel, -m), sel)
    reference = (error + sae.decode(f)).detach()
    ours = clamp_intervention(x, sae, feats, m, intervention_mask(ids, None, "saebench"))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[:, 0], x[:, 0])


def test_clamp_edge_cases() -> None:
    sae = _random_sae([])
    x = torch.randn(5, 6)  # [T, d_in]
    valid = torch.tensor([False, True, True, True, True])
    assert clamp_intervention(x, sae, [], 10.0, valid) is x
    out2d = clamp_intervention(x, sae, [1, 2], 10.0, valid)
    torch.testing.assert_close(out2d, clamp_intervention(x[None], sae, [1, 2], 10.0, valid[None])[0])
    out_bf16 = clamp_intervention(x.bfloat16(), sae, [1, 2], 10.0, valid)
    assert out_bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="feature indices"):
        clamp_intervention(x, sae, [8], 1.0, valid)


def test_valid_token_mask() -> None:
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 5, 2, 7, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = valid_token_mask(ids, mask, [1, 2, 0, None])  # BOS=1, EOS=2, PAD=0
    assert got.tolist() == [[False, False, False, True, True], [False, True, False, True, False]]


# ---------------------------------------------------------------------------------------------- grid + score
def test_intervention_mask_rules() -> None:
    ids = torch.tensor([[0, 0, 1, 7, 2, 8], [1, 5, 6, 2, 7, 9]])  # pad 0, BOS 1, EOS 2; row 0 left-padded
    mask = (ids != 0).long()
    special = [0, 1, 2]
    # SAEBench: everything attended but the first attended position, whatever its token (EOS is clamped)
    assert intervention_mask(ids, mask, "saebench", special).tolist() == [
        [False, False, False, True, True, True],
        [False, True, True, True, True, True],
    ]
    # this project's rule: special tokens by id
    assert intervention_mask(ids, mask, "special_tokens", special).tolist() == [
        [False, False, False, True, False, True],
        [False, True, True, False, True, True],
    ]
    # a decode step: one new position after 6 cached ones; the first position lies in the past
    step = torch.tensor([[2], [4]])
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert intervention_mask(step, full, "saebench", special, n_past=6).tolist() == [[True], [True]]
    assert intervention_mask(step, full, "special_tokens", special, n_past=6).tolist() == [[False], [True]]
    # a prompt whose first token is not BOS (a tokenizer without one): SAEBench still skips position 0
    assert intervention_mask(torch.tensor([[5, 6]]), None, "saebench").tolist() == [[False, True]]
    with pytest.raises(ValueError, match="does not cover"):
        intervention_mask(step, mask, "saebench", special, n_past=6)
    with pytest.raises(ValueError, match="unknown position rule"):
        intervention_mask(ids, mask, "first", special)


def test_grid_config() -> None:
    grid = GridConfig()
    pts = grid.points()
    assert len(pts) == 16 and len(set(pts)) == 16
    assert pts[0] == GridPoint(0.001, 10, 25.0) and pts[-1] == GridPoint(0.01, 20, 200.0)
    assert pts[1] == GridPoint(0.001, 10, 50.0)  # multiplier varies fastest (SAEBench order)
    assert list(grid) == pts
    with pytest.raises(ValueError, match="multipliers"):
        GridConfig(multipliers=[-1.0])
    with pytest.raises(ValueError, match="non-empty"):
        GridConfig(n_features=[])


def test_unlearning_score_hand_worked() -> None:
    results = [
        # pooled 199/200 = 0.995 (mean of subset accuracies would be 0.5): qualifies
        {"m": 25, "wmdp": 0.6, "mmlu": {"a": [False], "b": [True] * 199}},
        # pooled 197/200 = 0.985: does not qualify even though its WMDP accuracy is lowest
        {
            "m": 50,
            "wmdp": 0.3,
            "mmlu": {"a": {"correct": 97, "total": 100}, "b": {"correct": 100, "total": 100}},
        },
        # pooled exactly 0.99: qualifies (SAEBench disqualifies only < 0.99)
        {
            "m": 100,
            "wmdp": [True, True, False, False, False],
            "mmlu": {"a": torch.tensor([True] * 99 + [False])},
        },
        # ties with the previous one: the first wins
        {"m": 200, "wmdp": 0.4, "mmlu": {"a": [True] * 10}},
    ]
    score, best = unlearning_score(results)
    assert score == pytest.approx(0.6)
    assert best is not None and best["m"] == 100
    assert best["wmdp_accuracy"] == pytest.approx(0.4) and best["mmlu_accuracy"] == pytest.approx(0.99)
    assert pooled_accuracy(results[0]["mmlu"]) == pytest.approx(0.995)

    # none qualifies: every WMDP accuracy counts as 1, so the score is 0 (SAEBench)
    assert unlearning_score(results[1:2]) == (0.0, None)
    with pytest.raises(ValueError, match="at least one"):
        unlearning_score([])
    with pytest.raises(ValueError, match="per-question correctness or counts"):
        unlearning_score([{"wmdp": 0.5, "mmlu": {"a": 0.99}}])


# ---------------------------------------------------------------------------------------------- core scores
def test_ce_and_kl_scores() -> None:
    assert ce_loss_score(2.0, 2.0, 7.0) == pytest.approx(1.0)
    assert ce_loss_score(2.0, 7.0, 7.0) == pytest.approx(0.0)
    assert ce_loss_score(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(6.0)) == pytest.approx(0.75)
    assert math.isnan(ce_loss_score(2.0, 2.0, 2.0))
    assert kl_div_score(0.0, 0.5) == pytest.approx(1.0)
    assert kl_div_score(0.5, 0.5) == pytest.approx(0.0)
    assert math.isnan(kl_div_score(0.1, 0.0))


def test_per_token_ce_and_kl() -> None:
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    ce = next_token_ce(logits, ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(ce, ref.view(2, 4))
    other = torch.randn(2, 5, 11)
    kl = kl_per_token(logits, other)
    ref_kl = F.kl_div(
        F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(kl, ref_kl)
    assert torch.allclose(kl_per_token(logits, logits), torch.zeros(2, 5), atol=1e-6)


# ---------------------------------------------------------------------------------------------- planted
LAYER = 0
LETTER_IDS = torch.tensor([[10, 14], [11, 15], [12, 16], [13, 17]])  # "A"/" A", ... as raw token ids
SEQ_A = torch.tensor([[1, 20, 21, 22, 23, 24, 30]])  # the "question" whose activations express feature 0
SEQ_B = torch.tensor([[1, 25, 26, 27, 28, 29, 31]])  # an unrelated question


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _last_probs(model, ids: torch.Tensor, ctx=None) -> torch.Tensor:
    with torch.no_grad():
        if ctx is None:
            logits = model(input_ids=ids).logits
        else:
            with ctx:
                logits = model(input_ids=ids).logits
    return answer_probs(logits[:, -1], LETTER_IDS)  # [1, 4]


def _planted_sae(model, dilations: list[int]) -> tuple[MTSAE, int]:
    """Feature 0 fires only at the last token of SEQ_A; its decoder row lowers the answer's probability."""
    h_a = capture_resid_post(model, LAYER, SEQ_A).clone()[0]  # [T, 32]
    h_b = capture_resid_post(model, LAYER, SEQ_B).clone()[0]
    # encoder row: the part of A's last activation orthogonal to every other activation in A and B
    others = torch.cat([h_a[:-1], h_b]).T  # [32, 13]
    q, _ = torch.linalg.qr(others)
    w = h_a[-1] - q @ (q.T @ h_a[-1])
    w = w / w.norm()
    # decoder row: steepest descent of the log-probability of the model's answer at A's last position
    answer = int(_last_probs(model, SEQ_A).argmax())
    h_last = h_a[-1].clone().requires_grad_(True)

    def put_last(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h[:, :-1], h_last[None, None]], dim=1)

    with splice_resid_post(model, LAYER, put_last):
        logits = model(input_ids=SEQ_A).logits
    torch.log(answer_probs(logits[:, -1], LETTER_IDS)[0, answer]).backward()
    g = h_last.grad

    sae = MTSAE(32, 4, dilations=dilations)
    with torch.no_grad():
        n_blocks = max(1, len(dilations))
        W_enc = torch.randn(32 * n_blocks, 4)
        W_enc[:, 0] = 0.0
        W_enc[:32, 0] = w  # identity-initialised convs: block 0 sees the current token only
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))
        sae.b_dec.zero_()
        sae.W_dec[0] = g / g.norm()  # clamping adds -(m + f_0) W_dec[0]: along -grad
        sae.normalize_decoder_()
    return sae, answer


@pytest.mark.parametrize("dilations", [[], [1, 2]])
def test_planted_clamp_lowers_answer_only_where_feature_fires(dilations: list[int]) -> None:
    model = _tiny_llama()
    sae, answer = _planted_sae(model, dilations)
    valid_a = SEQ_A != 1  # BOS (id 1) excluded
    f_a = sae.encode(capture_resid_post(model, LAYER, SEQ_A).clone(), valid_a).detach()
    f_b = sae.encode(capture_resid_post(model, LAYER, SEQ_B).clone(), SEQ_B != 1).detach()
    assert f_a[0, -1, 0] > 1.0 and (f_a[0, :-1, 0] == 0).all() and (f_b[..., 0] == 0).all()

    features, m = torch.tensor([0]), 25.0
    clamp = ClampIntervention(model, LAYER, sae, features, m, special_ids=[1])
    for seq in (SEQ_A, SEQ_B):
        before = _last_probs(model, seq)
        # forward hook via mtsae.lm.splice_resid_post, valid mask from this sequence's tokens
        after = _last_probs(model, seq, clamp(seq, torch.ones_like(seq)))
        if seq is SEQ_A:
            assert after[0, answer] < 0.5 * before[0, answer], (before, after)
            assert int(after.argmax()) != answer  # here the clamp even flips the prediction
        else:
            assert torch.equal(after, before)  # unrelated question: identical probabilities

    # the same through a hand-written hook calling clamp_intervention directly
    def fn(h: torch.Tensor) -> torch.Tensor:
        return clamp_intervention(h, sae, features, m, valid_a)

    torch.testing.assert_close(
        _last_probs(model, SEQ_A, splice_resid_post(model, LAYER, fn)),
        _last_probs(model, SEQ_A, clamp(SEQ_A, torch.ones_like(SEQ_A))),
    )
