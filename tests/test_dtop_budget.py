"""dtop with a FLOPs budget: exact per-stage exit quotas, ``flops=`` solved at apply time, and calibration.

Same tiny float64 segmenter as ``test_dtop.py`` (4 blocks, 4x6 patches, exits after 1 and 2 blocks, 3 classes).
FLOPs are the project's counter (``torch.utils.flop_counter`` via ``measure_flops``) on one image at a time.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.test_dtop import NUM_PATCHES, _FakeCamVid, images, tiny_segmenter
from tokenprune.calibrate import calibrate_report
from tokenprune.core.early_exit import quota_counts, select_quota_exits, solve_exit_counts
from tokenprune.measure.flops import measure_flops
from tokenprune.methods.dtop import budget_cost, share_grid


def image_sets() -> list[torch.Tensor]:
    """Random images of three seeds, near-constant images and a strongly scaled set: any images."""
    flat = torch.full((3, 3, 28, 42), 0.3, dtype=torch.float64) + 1e-3 * images(3, seed=5)
    return [images(3, seed=1), images(3, seed=2), 6.0 * images(3, seed=3), flat]


def exits_per_stage(state, stages: int) -> torch.Tensor:
    """``(B, S)`` tokens each image exited at each boundary."""
    return torch.stack([(state.exit_stage == s).sum(dim=1) for s in range(stages)], dim=1)


# ------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("flops", [0.95, 0.8, 0.65, 0.5, 0.4])
def test_flops_budget_lands_within_two_percent_for_any_images(flops: float) -> None:
    model = tiny_segmenter()
    dense = measure_flops(model, images(1))
    patch = tokenprune.apply(model, "dtop", flops=flops)
    counts = patch.runtime.method.counts
    for x in image_sets():
        for i in range(len(x)):
            measured = measure_flops(model, x[i : i + 1])
            assert measured / dense == pytest.approx(flops, abs=0.02)
            assert float(patch.adapter.early_exit_flops(patch.state)[0]) == pytest.approx(measured, rel=1e-12)
            assert patch.adapter.planned_flops(counts) == pytest.approx(measured, rel=1e-12)  # known before the images
    patch.remove()


@pytest.mark.parametrize("quota", [[0.25, 0.25], [0.5, 0.0], [0.0, 0.7], [0.1, 0.9], [1.0, 0.0], [0.3, 0.3]])
def test_quota_is_exact_per_image_and_every_token_predicted_once(quota: list[float]) -> None:
    model = tiny_segmenter()
    patch = tokenprune.apply(model, "dtop", quota=quota, keep_top_k=2)
    expected = quota_counts(quota, NUM_PATCHES)
    assert patch.runtime.method.counts == expected
    for x in image_sets():
        with torch.no_grad():
            out = model(x)
        state = patch.state
        assert out.shape == (len(x), 3, 4, 6) and bool(torch.isfinite(out).all())
        assert exits_per_stage(state, 2).tolist() == [expected] * len(x)
        assert bool((state.predictions == 1).all())
        assert state.final_tokens.tolist() == [NUM_PATCHES - sum(expected)] * len(x)
    patch.remove()


def test_zero_saving_is_bit_exact_and_remove_restores() -> None:
    model, x = tiny_segmenter(), images()
    blocks = list(model.backbone.blocks)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(x)
    for options in [{"quota": [0.0, 0.0]}, {"flops": 1.0}, {"quota": [0, 0], "keep_top_k": 0}]:
        patch = tokenprune.apply(model, "dtop", **options)
        assert patch.runtime.method.counts == [0, 0]
        with torch.no_grad():
            assert torch.equal(model(x), reference)
        patch.remove()
    patch = tokenprune.apply(model, "dtop", flops=0.6)
    with torch.no_grad():
        assert not torch.equal(model(x), reference)
    patch.remove()
    assert "forward" not in model.__dict__
    assert all(a is b for a, b in zip(model.backbone.blocks, blocks, strict=True))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("options", [{"flops": 0.6}, {"quota": [0.3, 0.2], "keep_top_k": 1}, {"quota": [0.9, 0.1]}])
def test_batch_equals_one_by_one(options: dict) -> None:
    model, x = tiny_segmenter(), images()
    patch = tokenprune.apply(model, "dtop", **options)
    with torch.no_grad():
        batched = model(x)
        stages = patch.state.exit_stage.clone()
        singles, single_stages = [], []
        for i in range(len(x)):
            singles.append(model(x[i : i + 1]))
            single_stages.append(patch.state.exit_stage)
    assert torch.equal(stages, torch.cat(single_stages))
    assert len({tuple(s.tolist()) for s in stages}) > 1, "the test needs images that exit different tokens"
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    patch.remove()


def test_the_most_confident_tokens_exit() -> None:
    model, x = tiny_segmenter(), images(4)
    with torch.no_grad():
        _, aux = model(x, return_aux=True)
    confidence = aux[0].softmax(dim=1).amax(dim=1).flatten(1)  # (B, M) first aux head, all tokens live
    patch = tokenprune.apply(model, "dtop", quota=[0.25, 0.0], keep_top_k=0)
    with torch.no_grad():
        model(x)
    exited = patch.state.exit_stage == 0
    for b in range(4):
        assert confidence[b][exited[b]].min() >= confidence[b][~exited[b]].max()
    patch.remove()


def naive_quota_exits(logits: torch.Tensor, valid: torch.Tensor, count: int, keep_top_k: int) -> torch.Tensor:
    """Per image in float64 Python: rank live tokens (unprotected first, most confident first, lower position
    first) and take ``count``; protected = the ``keep_top_k`` most confident of each predicted class."""
    out = torch.zeros(valid.shape, dtype=torch.bool)
    probs = logits.double().softmax(dim=-1)
    for b in range(logits.shape[0]):
        live = [j for j in range(logits.shape[1]) if valid[b, j]]
        conf = {j: float(probs[b, j].max()) for j in live}
        label = {j: int(probs[b, j].argmax()) for j in live}
        protected = set()
        for k in set(label.values()):
            members = sorted((j for j in live if label[j] == k), key=lambda j: (-conf[j], j))
            protected |= set(members[:keep_top_k])
        ranked = sorted(live, key=lambda j: (j in protected, -conf[j], j))
        for j in ranked[:count]:
            out[b, j] = True
    return out


@pytest.mark.parametrize("count, keep_top_k", [(0, 2), (3, 0), (5, 1), (9, 2), (12, 3), (40, 1)])
def test_quota_selection_matches_a_naive_reference(count: int, keep_top_k: int) -> None:
    gen = torch.Generator().manual_seed(count + 7 * keep_top_k)
    logits = 3.0 * torch.randn(4, 12, 3, generator=gen, dtype=torch.float64)
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[1, 9:] = False  # padded rows: pads never exit nor take a keep slot
    valid[3, 4:] = False
    got = select_quota_exits(logits, valid, count, keep_top_k)
    assert torch.equal(got, naive_quota_exits(logits, valid, count, keep_top_k))
    assert got.sum(dim=1).tolist() == [min(count, int(v)) for v in valid.sum(dim=1)]


def test_quota_counts_round_trip_and_never_overflow() -> None:
    assert quota_counts([c / 884 for c in (370, 216)], 884) == [370, 216]
    assert quota_counts([0.5, 0.5], 25) == [12, 13]  # cumulative: round(12.5) = 12 exited, then 25 in all
    for quota in ([0.34, 0.33, 0.33], [0.999, 0.001], [1 / 3, 1 / 3]):
        counts = quota_counts(quota, 7)
        assert sum(counts) <= 7 and all(c >= 0 for c in counts)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"flops": 0.0}, ValueError, r"in \(0, 1\]"),
        ({"flops": 1.2}, ValueError, r"in \(0, 1\]"),
        ({"flops": 0.05}, ValueError, r"outside what early exit reaches on this segmenter: \[0\.\d+, 1\]"),
        ({"quota": [0.6, 0.5]}, ValueError, r"fractions in \[0, 1\].*summing to at most 1"),
        ({"quota": [-0.1, 0.2]}, ValueError, r"fractions in \[0, 1\]"),
        ({"quota": [0.2, 0.2, 0.2]}, ValueError, r"3 entries; this segmenter has 2 exit stages"),
        ({"quota": []}, TypeError, "non-empty list"),
        ({"quota": 0.3}, TypeError, "non-empty list"),
        ({"quota": ["a", 0.1]}, TypeError, "fractions"),
        ({"quota": [0.2, 0.2], "flops": 0.5}, ValueError, "either quota .* or flops"),
        ({"quota": [0.2, 0.2], "threshold": 0.9}, ValueError, "threshold and quota exclude each other"),
        ({"flops": 0.5, "threshold": 0.9}, ValueError, "threshold and flops exclude each other"),
        ({"flops": 0.5, "r": 2}, ValueError, "either r or flops"),
    ],
)
def test_bad_budgets_raise_naming_the_valid_range(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tokenprune.apply(tiny_segmenter(), "dtop", **options)


def test_solver_range_is_the_all_exit_at_first_boundary_cost() -> None:
    model = tiny_segmenter()
    patch = tokenprune.apply(model, "dtop", quota=[1.0, 0.0])
    cost = budget_cost(patch.adapter)
    least = cost([NUM_PATCHES, 0])
    assert solve_exit_counts(least, NUM_PATCHES, 2, cost) == [NUM_PATCHES, 0]
    with pytest.raises(ValueError, match="outside what early exit reaches"):
        solve_exit_counts(least - 1e-3, NUM_PATCHES, 2, cost)
    patch.remove()


# ------------------------------------------------------------------------------------------ calibration


def kl_tokens(reduced: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || reduced), from ``(B, K, h, w)`` maps, in float64."""
    p = reference.double().log_softmax(dim=1)
    q = reduced.double().log_softmax(dim=1)
    return float((p.exp() * (p - q)).sum(dim=1).mean())


def test_calibrate_picks_the_least_divergent_quota_at_the_budget() -> None:
    model, x = tiny_segmenter(), images(4, seed=4)
    with torch.no_grad():
        reference = model(x)
    report = calibrate_report(model, "dtop", flops=0.6, images=x, max_evals=5, progress=False)
    assert tokenprune.api.get_patch(model) is None  # nothing left patched
    assert set(report.config) == {"quota", "keep_top_k"} and report.method == "dtop" and report.images == 4
    assert 1 < report.evaluations <= 5 and report.divergence <= report.constant_divergence
    assert report.flops_ratio == pytest.approx(0.6, abs=0.02)
    # The reported objective is what an independent KL of the applied config gives.
    patch = tokenprune.apply(model, "dtop", **report.config)
    with torch.no_grad():
        out = model(x)
    assert kl_tokens(out, reference) == pytest.approx(report.divergence, rel=1e-6)
    patch.remove()
    dense = measure_flops(model, x[:1])
    patch = tokenprune.apply(model, "dtop", **report.config)
    assert measure_flops(model, x[:1]) / dense == pytest.approx(report.flops_ratio, rel=1e-12)
    patch.remove()
    again = tokenprune.calibrate(model, "dtop", flops=0.6, images=x, max_evals=5, progress=False)
    assert again == report.config  # deterministic


def test_calibrate_refuses_bad_input() -> None:
    model, x = tiny_segmenter(), images(2)
    with pytest.raises(ValueError, match=r"outside what early exit reaches"):
        tokenprune.calibrate(model, "dtop", flops=0.01, images=x, progress=False)
    with pytest.raises(ValueError, match=r"flops budget must be a number in \(0, 1\]"):
        tokenprune.calibrate(model, "dtop", flops=1.5, images=x, progress=False)
    with pytest.raises(ValueError, match=r"drop \['threshold'\]"):
        tokenprune.calibrate(model, "dtop", flops=0.6, images=x, progress=False, threshold=0.9)
    with pytest.raises(ValueError, match="max_evals must be an int >= 1"):
        tokenprune.calibrate(model, "dtop", flops=0.6, images=x, progress=False, max_evals=0)
    with pytest.raises(ValueError, match="needs images"):
        tokenprune.calibrate(model, "dtop", flops=0.6, images=None, progress=False)
    tokenprune.apply(model, "dtop", flops=0.6)
    with pytest.raises(RuntimeError, match="already patched"):
        tokenprune.calibrate(model, "dtop", flops=0.6, images=x, progress=False)


def test_share_grid_covers_the_simplex() -> None:
    assert share_grid(2, 2) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert len(share_grid(3, 4)) == 15 and all(sum(s) == pytest.approx(1.0) for s in share_grid(3, 4))


def test_budget_rows_in_the_segmentation_harness() -> None:
    from tokenprune.measure.tasks import segmentation as measure
    from tokenprune.zoo import camvid as seg

    model, data = tiny_segmenter(), _FakeCamVid()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seg, "CAMVID_CLASSES", ("a", "b", "c"))
        row = measure.evaluate_segmenter(model, data, "dtop", {"flops": 0.7}, batch_size=2, progress=False)
    low, high = row["gflops_per_image_min_max"]
    assert low == high == pytest.approx(row["gflops_per_image"])  # the saving no longer moves with the images
    assert row["flops_ratio"] == pytest.approx(0.7, abs=0.02)
    assert row["gflops_measured_batched"] == pytest.approx(row["gflops_per_image"], rel=1e-9)  # no padding
    assert row["config"]["threshold"] is None and row["config"]["flops"] == 0.7
