"""The streaming statistics of the feature dashboard equal the same statistics computed on all data at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtsae.features.stats import FeatureStats, PowerOfTwoHistogram, StreamingTopK


def test_streaming_topk_equals_topk_of_everything() -> None:
    scores = torch.randn(5, 300)
    ids = torch.arange(300).expand(5, -1)
    tk = StreamingTopK(5, 7)
    for lo in range(0, 300, 37):  # uneven batches, some smaller than k
        tk.update(scores[:, lo : lo + 37], idx=ids[:, lo : lo + 37])
    want = scores.topk(7, dim=1)
    torch.testing.assert_close(tk.scores, want.values)
    assert torch.equal(tk.payload["idx"], want.indices)


def test_streaming_topk_keeps_no_empty_candidates() -> None:
    tk = StreamingTopK(2, 4)
    s = torch.tensor([[1.0, float("-inf"), 3.0], [float("-inf")] * 3])
    tk.update(s, row=torch.tensor([10, 11, 12]))
    assert tk.payload["row"].tolist() == [[12, 10, -1, -1], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match="payload keys"):
        tk.update(s, other=torch.tensor([1, 2, 3]))


def test_power_of_two_histogram_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    n, n_bins = 4, 16
    hist = PowerOfTwoHistogram(n, n_bins)
    chunks = []
    for scale in (0.01, 0.5, 3.0, 40.0, 0.2):  # the range grows several times: bins merge
        v = torch.rand(200, generator=gen) * scale
        items = torch.randint(0, n, (200,), generator=gen)
        v[::7] = 0.0  # zeros are not counted
        hist.update(v, items)
        chunks.append((v, items))
    v, items = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    for i in range(n):
        vals = v[(items == i) & (v > 0)].double().numpy()
        w = float(hist.width[i])
        assert vals.max() < n_bins * w <= 2 * vals.max()  # at least half of the bins in use
        want, _ = np.histogram(vals, bins=n_bins, range=(0, n_bins * w))
        assert hist.counts[i].tolist() == want.tolist()


def test_histogram_rejects_non_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        PowerOfTwoHistogram(3, n_bins=10)


def test_feature_stats_one_example_per_sequence() -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, d_sae = 24, 10, 6
    f = torch.relu(torch.randn(B, T, d_sae, generator=gen))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, 0] = False
    f[:, 0] = 100.0  # invalid positions never count
    f[:, :, 5] = 0.0  # a dead feature
    feats = torch.tensor([1, 3, 5])
    st = FeatureStats(feats, n_top=4, n_sample=8, n_bins=8, seed=0)
    for lo in range(0, B, 5):
        st.update(f[lo : lo + 5], valid[lo : lo + 5], torch.arange(lo, min(B, lo + 5)) + 1000)
    res = st.result()
    fv = f[:, 1:, feats]  # [B, T-1, 3] valid part
    assert res.n_tokens == B * (T - 1)
    assert res.n_fire.tolist() == (fv > 0).sum((0, 1)).tolist()
    rowmax, argmax = fv.max(dim=1)  # [B, 3]
    for j in range(2):
        want = rowmax[:, j].topk(4)
        torch.testing.assert_close(res.top_values[j], want.values)
        assert res.top_rows[j].tolist() == (want.indices + 1000).tolist()
        assert res.top_pos[j].tolist() == (argmax[want.indices, j] + 1).tolist()
        # the sample holds distinct firing sequences with their maxima
        rows = res.sample_rows[j][res.sample_rows[j] >= 0] - 1000
        assert len(set(rows.tolist())) == len(rows) == min(8, int((rowmax[:, j] > 0).sum()))
        torch.testing.assert_close(res.sample_values[j][: len(rows)], rowmax[rows, j])
    assert res.n_fire[2] == 0 and (res.top_rows[2] == -1).all() and res.hist_counts[2].sum() == 0
    assert res.hist_counts[:2].sum(1).tolist() == res.n_fire[:2].tolist()
