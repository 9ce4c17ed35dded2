"""Sparsifying activations (TopK, BatchTopK, JumpReLU, ReLU) and the AuxK / dead-latent helpers."""

from __future__ import annotations

import math

import pytest
import torch

from mtsae.sae.activations import ACTIVATIONS, BatchTopK, JumpReLU, ReLU, TopK, make_activation
from mtsae.sae.model import MTSAE
from mtsae.training.aux_losses import DeadLatentTracker, auxk_loss

D_IN, D_SAE, K = 16, 32, 4


def _valid(B: int = 3, T: int = 5) -> torch.Tensor:
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, 0] = False  # BOS
    valid[-1, -2:] = False  # PAD
    return valid


def _all_acts() -> dict[str, torch.nn.Module]:
    return {
        "relu": make_activation("relu", D_SAE),
        "topk": make_activation("topk", D_SAE, k=K),
        "batchtopk": make_activation("batchtopk", D_SAE, k=K, threshold_momentum=0.9),
        "jumprelu": make_activation("jumprelu", D_SAE, init_threshold=0.5, bandwidth=0.1),
    }


# ----------------------------------------------------------------------------- registry / options
def test_registry_and_flags():
    assert set(ACTIVATIONS) == {"relu", "topk", "batchtopk", "jumprelu"}
    acts = _all_acts()
    assert isinstance(acts["relu"], ReLU) and acts["relu"].uses_l1
    for name in ("topk", "batchtopk", "jumprelu"):
        assert not acts[name].uses_l1
    assert acts["topk"].uses_auxk and acts["batchtopk"].uses_auxk and not acts["jumprelu"].uses_auxk
    assert acts["jumprelu"].uses_l0 and not acts["topk"].uses_l0


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("nope", {}, "unknown activation"),
        ("relu", {"k": 3}, "takes no options"),
        ("topk", {}, "needs option"),
        ("topk", {"k": 0}, "0 < k"),
        ("topk", {"k": -2}, "0 < k"),
        ("topk", {"k": D_SAE + 1}, "0 < k"),
        ("topk", {"k": 2.5}, "integer"),
        ("topk", {"k": 4, "kk": 1}, "no option"),
        ("batchtopk", {"k": 0}, "0 < k"),
        ("batchtopk", {"k": 4, "threshold_momentum": 1.0}, "threshold_momentum"),
        ("batchtopk", {"k": 4, "threshold_momentum": -0.1}, "threshold_momentum"),
        ("jumprelu", {"bandwidth": -0.01}, "bandwidth"),
        ("jumprelu", {"bandwidth": 0.0}, "bandwidth"),
        ("jumprelu", {"init_threshold": 0.0}, "init_threshold"),
        ("jumprelu", {"k": 4}, "no option"),
    ],
)
def test_bad_options_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_activation(name, D_SAE, **kwargs)


@pytest.mark.parametrize("name", ["topk", "batchtopk", "jumprelu"])
def test_bad_fold_scale_and_mask_raise(name):
    act = _all_acts()[name]
    with pytest.raises(ValueError, match="positive"):
        act.fold_scale(0.0)
    with pytest.raises(ValueError, match="valid mask"):
        act(torch.randn(2, 3, D_SAE), torch.ones(3, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------- invalid positions
@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("training", [True, False])
def test_invalid_positions_are_zero(name, training):
    act = _all_acts()[name].train(training)
    pre = torch.randn(3, 5, D_SAE) + 1.0
    pre[~_valid()] = 100.0  # huge values (like Gemma's BOS) must still give 0
    if name == "batchtopk" and not training:
        act.train()(pre, _valid())  # estimate a threshold first
        act.eval()
    f = act(pre, _valid())
    assert f.shape == pre.shape
    assert (f[~_valid()] == 0).all()
    assert (f[_valid()] != 0).any()


# ----------------------------------------------------------------------------- TopK
def test_topk_keeps_exactly_k_largest_per_token():
    act = TopK(D_SAE, K)
    pre = torch.randn(3, 5, D_SAE) + 3.0  # (almost surely) more than k positive per token
    f = act(pre)
    assert ((f != 0).sum(-1) == K).all()
    top = pre.topk(K, dim=-1).indices
    assert torch.equal(torch.zeros_like(pre).scatter(-1, top, 1.0).bool(), f != 0)
    assert torch.equal(f[f != 0], pre[f != 0])  # kept values are not shrunk


def test_topk_relu_convention_and_gradient():
    act = TopK(D_SAE, K)
    pre = -torch.rand(2, D_SAE) - 0.1
    pre[0, :2] = torch.tensor([1.0, 2.0])  # only 2 positives: 2 non-zeros, never a negative code
    pre.requires_grad_(True)
    f = act(pre)
    assert (f >= 0).all()
    assert (f[0] != 0).sum() == 2 and (f[1] == 0).all()
    f.sum().backward()
    assert torch.equal(pre.grad != 0, f != 0)  # gradient only through the kept, positive entries


# ----------------------------------------------------------------------------- BatchTopK
def test_batchtopk_keeps_k_times_n_valid_over_the_batch():
    act = BatchTopK(D_SAE, K).train()
    valid = _valid()
    n = int(valid.sum())
    pre = torch.randn(3, 5, D_SAE) + 1.0
    pre[~valid] = 50.0  # invalid tokens must neither count in N nor take slots
    pre[1, 2] += 5.0  # one loud token: batch-level top-k gives it more than k latents
    f = act(pre, valid)
    assert (f != 0).sum() == K * n
    per_token = (f[valid] != 0).sum(-1)
    assert per_token.max() > K and per_token.min() < K
    # exactly the k·N largest of relu(pre) over the valid tokens
    kth = torch.relu(pre[valid]).flatten().topk(K * n).values.min()
    assert torch.equal(f[valid] != 0, pre[valid] >= kth)
    assert torch.equal(f[f != 0], pre[f != 0])


def test_batchtopk_threshold_is_learned_in_training_and_used_in_eval():
    m = 0.9
    act = BatchTopK(D_SAE, K, threshold_momentum=m).train()
    valid = _valid()
    assert act.threshold.item() < 0  # not estimated yet
    pre1 = torch.randn(3, 5, D_SAE)
    f1 = act(pre1, valid)
    first = f1[f1 > 0].min()
    assert act.threshold.item() == pytest.approx(first.item())
    pre2 = torch.randn(3, 5, D_SAE) * 2
    f2 = act(pre2, valid)
    expected = m * first + (1 - m) * f2[f2 > 0].min()
    assert act.threshold.item() == pytest.approx(expected.item(), rel=1e-6)

    act.eval()
    pre3 = torch.randn(3, 5, D_SAE)
    f3 = act(pre3)
    assert torch.equal(f3, pre3 * (pre3 > act.threshold))
    thr_before = act.threshold.clone()
    act(pre3)
    assert torch.equal(act.threshold, thr_before)  # eval never moves the threshold
    # eval is per token: a token's code does not depend on the rest of the batch
    assert torch.equal(act(pre3[:1]), f3[:1])
    # state_dict carries the threshold
    clone = BatchTopK(D_SAE, K)
    clone.load_state_dict(act.state_dict())
    assert torch.equal(clone.threshold, act.threshold)


# ----------------------------------------------------------------------------- JumpReLU
def _jump_pre(theta: float, eps: float) -> torch.Tensor:
    """[2, 3, D_SAE]: feature 0 sits within ε/2 of θ at 3 tokens, feature 1 far above, the rest far below."""
    pre = torch.full((2, 3, D_SAE), -1.0)
    pre[0, :, 0] = torch.tensor([theta - 0.3 * eps, theta + 0.2 * eps, theta + 0.4 * eps])
    pre[1, :, 1] = theta + 10 * eps
    return pre


def test_jumprelu_forward_and_ste_gradient_reaches_threshold():
    theta, eps = 0.5, 0.1
    act = JumpReLU(D_SAE, init_threshold=theta, bandwidth=eps)
    pre = _jump_pre(theta, eps).requires_grad_(True)
    f = act(pre)
    assert torch.equal(f, pre.detach() * (pre.detach() > theta))
    f.sum().backward()
    g = act.log_threshold.grad
    # ∂f/∂θ = −(θ/ε)·K((pre−θ)/ε), summed over the 3 near tokens with upstream 1; ∂θ/∂logθ = θ
    assert g[0].item() == pytest.approx(-3 * (theta / eps) * theta)
    assert (g[1:] == 0).all()  # far from θ: no gradient
    # the encoder sees ∂f/∂pre = H(pre − θ)
    assert torch.equal(pre.grad, (pre.detach() > theta).float())


def test_jumprelu_l0_penalty_value_and_threshold_gradient():
    theta, eps = 0.5, 0.1
    act = JumpReLU(D_SAE, init_threshold=theta, bandwidth=eps)
    pre = _jump_pre(theta, eps).requires_grad_(True)
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1, 2] = False
    l0 = act.l0_penalty(pre, valid)
    f = act(pre, valid)
    assert l0.item() == pytest.approx(((f != 0).sum(-1).float()[valid]).mean().item())
    l0.backward()
    g = act.log_threshold.grad
    # ∂H/∂θ = −(1/ε)·K(...) at the 3 near tokens (all valid), averaged over 5 valid tokens, × θ
    assert g[0].item() == pytest.approx(-3 / eps * theta / 5)
    assert (g[1:] == 0).all()
    assert pre.grad is None or (pre.grad == 0).all()  # L0 trains only θ


def test_jumprelu_threshold_is_positive_parameter():
    act = JumpReLU(D_SAE, init_threshold=0.001)
    names = dict(act.named_parameters())
    assert set(names) == {"log_threshold"}
    assert torch.allclose(act.threshold, torch.full((D_SAE,), 0.001))


# ----------------------------------------------------------------------------- fold_scale
@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "jumprelu"])
def test_fold_scale_is_consistent(name):
    c = 3.7
    act = _all_acts()[name]
    pre = torch.randn(3, 5, D_SAE)
    valid = _valid()
    if name == "batchtopk":
        act.train()(torch.randn(3, 5, D_SAE), valid)
        assert act.threshold.item() > 0
    act.eval()
    before = act(pre, valid)
    assert (before != 0).any()
    act.fold_scale(c)
    after = act(pre / c, valid)
    torch.testing.assert_close(after, before / c)
    if name == "batchtopk":  # training mode is homogeneous too
        act.train()
        torch.testing.assert_close(act(pre / c, valid), act(pre, valid) / c)


# ----------------------------------------------------------------------------- AuxK
def _auxk_inputs(n_tokens: int = 12):
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN), dim=1).requires_grad_(True)
    pre = torch.randn(n_tokens, D_SAE, requires_grad=True)
    residual = torch.randn(n_tokens, D_IN, requires_grad=True)
    return pre, residual, W_dec


def test_auxk_is_exactly_zero_without_dead_latents():
    pre, residual, W_dec = _auxk_inputs()
    loss = auxk_loss(pre, residual, W_dec, torch.zeros(D_SAE, dtype=torch.bool), k_aux=8)
    assert loss.item() == 0.0 and not loss.requires_grad


def test_auxk_matches_formula_and_only_trains_dead_latents():
    pre, residual, W_dec = _auxk_inputs()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 7, 20]] = True
    k_aux = 3
    loss = auxk_loss(pre, residual, W_dec, dead, k_aux=k_aux)
    assert loss.item() > 0

    # reference: dense, straight from the definition
    p = pre.detach().masked_fill(~dead, -math.inf)
    v, i = p.topk(k_aux, dim=-1)
    z = torch.zeros_like(p).scatter(-1, i, torch.relu(v))
    e = residual.detach()
    e_hat = z @ W_dec.detach()
    ref = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)

    loss.backward()
    assert residual.grad is None  # the residual is a target
    assert (pre.grad[:, ~dead] == 0).all() and (pre.grad[:, dead] != 0).any()
    assert (W_dec.grad[~dead] == 0).all() and (W_dec.grad[dead] != 0).any()


def test_auxk_respects_valid_and_k_aux_larger_than_dead():
    pre, residual, W_dec = _auxk_inputs(n_tokens=15)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:2] = True
    valid = _valid().flatten()
    full = auxk_loss(pre.view(3, 5, D_SAE), residual.view(3, 5, D_IN), W_dec, dead, 64, valid.view(3, 5))
    sub = auxk_loss(pre[valid], residual[valid], W_dec, dead, 64)
    assert full.item() == pytest.approx(sub.item())
    none_valid = torch.zeros(3, 5, dtype=torch.bool)
    assert auxk_loss(pre.view(3, 5, D_SAE), residual.view(3, 5, D_IN), W_dec, dead, 4, none_valid) == 0
    with pytest.raises(ValueError, match="k_aux"):
        auxk_loss(pre, residual, W_dec, dead, 0)


# ----------------------------------------------------------------------------- dead-latent tracker
def test_dead_latent_tracker_counts_valid_tokens_and_checkpoints():
    tracker = DeadLatentTracker(D_SAE)
    valid = _valid()
    n = int(valid.sum())
    f = torch.zeros(3, 5, D_SAE)
    f[1, 2, 3] = 1.0  # latent 3 fires at a valid token
    f[0, 0, 4] = 1.0  # latent 4 "fires" at BOS: does not count
    tracker.update(f, valid)
    assert tracker.tokens_since_fired[3] == 0 and tracker.tokens_since_fired[4] == n
    tracker.update(torch.zeros(3, 5, D_SAE), valid)
    assert tracker.tokens_since_fired[3] == n and tracker.tokens_since_fired[0] == 2 * n
    dead = tracker.dead_mask(2 * n)
    assert not dead[3] and dead[0] and dead.sum() == D_SAE - 1

    restored = DeadLatentTracker(D_SAE)
    restored.load_state_dict(tracker.state_dict())
    assert torch.equal(restored.tokens_since_fired, tracker.tokens_since_fired)
    with pytest.raises(ValueError, match="threshold_tokens"):
        tracker.dead_mask(0)


def _tracker_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        tracker = DeadLatentTracker(D_SAE)
        f = torch.zeros(2, 4, D_SAE)
        f[0, 1, rank] = 1.0  # latent 0 fires on rank 0 only, latent 1 on rank 1 only
        valid = torch.ones(2, 4, dtype=torch.bool)
        valid[:, 0] = False
        valid[rank, 3] = False  # the ranks see different numbers of valid tokens: 5 and 5
        tracker.update(torch.zeros(2, 4, D_SAE), valid)
        tracker.update(f, valid)
        torch.save({"counts": tracker.tokens_since_fired, "calls": len(calls)}, f"{out}/{rank}.pt")
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_dead_latent_tracker_is_global_under_ddp_with_one_collective_per_step(tmp_path) -> None:
    """Two gloo ranks: a latent that fired on either rank is reset on both; token counts are summed over
    ranks; each update is one all-reduce."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_tracker_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    per_step = 2 * 5  # valid tokens per update, summed over the two ranks
    for res in results:
        assert res["calls"] == 2  # one all-reduce per update
        counts = res["counts"]
        assert counts[0] == 0 and counts[1] == 0  # fired on one rank each: reset everywhere
        assert (counts[2:] == 2 * per_step).all()


# ----------------------------------------------------------------------------- in the model
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("topk", {"k": K}), ("batchtopk", {"k": K}), ("jumprelu", {"init_threshold": 0.05})],
)
def test_mtsae_with_each_activation_trains_one_step(name, kwargs):
    model = MTSAE(D_IN, D_SAE, dilations=[1, 2], activation=name, activation_kwargs=kwargs)
    x = torch.randn(2, 6, D_IN)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[:, 0] = False
    out = model(x, valid)
    loss = (x - out.x_hat).pow(2).sum(-1)[valid].mean()
    if model.act.uses_l0:
        loss = loss + 0.1 * model.act.l0_penalty(out.pre, valid)
    if model.act.uses_auxk:
        dead = torch.ones(D_SAE, dtype=torch.bool)
        loss = loss + auxk_loss(out.pre, x - out.x_hat, model.W_dec, dead, k_aux=D_IN // 2, valid=valid) / 32
    loss.backward()
    assert model.W_enc.grad is not None and model.W_enc.grad.abs().sum() > 0
    assert (out.f[~valid] == 0).all()
