"""Hypothesis: invariants of the pure merge/prune core, for arbitrary shapes and schedules."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune.core.merge import bipartite_soft_matching, reduce_tokens
from tokenprune.core.prune import fuse_plan, keep_top_k
from tokenprune.state import TokenState

shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(0, 3),  # protected prefix
    st.integers(2, 40),  # reducible tokens
    st.integers(1, 8),  # channels
    st.integers(0, 2**16),  # seed
)


def _state(batch, n, protected, seed):
    x = torch.randn(batch, n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    state = TokenState.start(x, protected, trace_source=True)
    # Start from uneven sizes, as after earlier merges.
    state.size = torch.randint(1, 4, (batch, n, 1), generator=torch.Generator().manual_seed(seed)).double()
    state.source = state.source * 0 + torch.eye(n, dtype=torch.float64)
    return state


def _check(x, out, state, before_size, n, removed, protected):
    assert out.shape == (x.shape[0], n - removed, x.shape[-1])
    index = state.index
    assert torch.all(index[:, 1:] > index[:, :-1])  # spatial order kept
    assert torch.equal(index[:, :protected], torch.arange(protected).expand(x.shape[0], protected))
    torch.testing.assert_close(state.size.sum((1, 2)) + state.dropped, before_size.sum((1, 2)))


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_bipartite_merge_preserves_mass_and_order(shape, data):
    batch, protected, reducible, channels, seed = shape
    n = protected + reducible
    r = data.draw(st.integers(0, reducible // 2))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=gen, dtype=torch.float64)
    metric = torch.randn(batch, n, 5, generator=gen, dtype=torch.float64)
    state = _state(batch, n, protected, seed)
    before_size = state.size.clone()
    weighted_sum = (x * state.size).sum(1)
    src, dst, kept = bipartite_soft_matching(metric, r, protected)
    assert torch.all(src >= protected) and torch.all(dst >= protected)
    for row in range(batch):
        assert not torch.isin(src[row], kept[row]).any() and torch.isin(dst[row], kept[row]).all()
    out = reduce_tokens(x, state, kept, src, dst)
    _check(x, out, state, before_size, n, r, protected)
    # A size-weighted average conserves sum(size * x): merging moves mass, never creates it.
    torch.testing.assert_close((out * state.size).sum(1), weighted_sum)
    assert torch.all(state.dropped == 0)
    assert torch.equal(state.source.sum(1), torch.ones(batch, n, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_topk_prune_keeps_the_best_in_order(shape, data):
    batch, protected, reducible, channels, seed = shape
    n = protected + reducible
    n_keep = data.draw(st.integers(0, reducible))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=gen, dtype=torch.float64)
    scores = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    state = _state(batch, n, protected, seed)
    before_size = state.size.clone()
    kept = keep_top_k(scores, n_keep, protected)
    out = reduce_tokens(x, state, kept)
    _check(x, out, state, before_size, n, reducible - n_keep, protected)
    assert torch.equal(out, x.gather(1, kept.unsqueeze(-1).expand(-1, -1, channels)))
    if n_keep:
        worst_kept = scores[:, protected:].gather(1, kept[:, protected:] - protected).min(1).values
        dropped = torch.ones(batch, n, dtype=torch.bool)
        dropped.scatter_(1, kept, False)
        best_dropped = scores.masked_fill(~dropped, float("-inf")).max(1).values
        assert torch.all(worst_kept >= best_dropped)


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_fuse_plan_folds_the_rest_into_one_token(shape, data):
    batch, protected, reducible, channels, seed = shape
    if reducible < 2:
        return
    n = protected + reducible
    r = data.draw(st.integers(1, reducible - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=gen, dtype=torch.float64)
    scores = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.01
    state = _state(batch, n, protected, seed)
    before_size = state.size.clone()
    src, dst, kept = fuse_plan(scores, r, protected)
    weight = scores.unsqueeze(-1)
    out = reduce_tokens(x, state, kept, src, dst, weight=weight)
    _check(x, out, state, before_size, n, r, protected)
    assert torch.all(state.dropped == 0)
    # The fused token is the score-weighted mean of the r + 1 fused tokens.
    fused_positions = torch.cat([dst[:, :1], src], dim=1)
    w = weight.gather(1, fused_positions.unsqueeze(-1))
    expected = (x.gather(1, fused_positions.unsqueeze(-1).expand(-1, -1, channels)) * w).sum(1) / w.sum(1)
    slot = (kept == dst[:, :1]).float().argmax(1)
    torch.testing.assert_close(out[torch.arange(batch), slot], expected)
