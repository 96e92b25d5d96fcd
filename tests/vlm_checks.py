"""Checks every vision-language adapter's tests share: zero reduction is exact, remove() restores exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import tokenprune


def assert_zero_reduction_exact(
    model: Any, inputs: dict, method: str, options: dict, greedy: Callable[[Any, dict], torch.Tensor]
) -> Any:
    """Patched with a reduction of zero: bit-equal logits and greedy tokens, no token reduced. Returns the patch."""
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = greedy(model, inputs)
        patch = tokenprune.apply(model, method, **options)
        got = model(**inputs).logits
        tokens = greedy(model, inputs)
    assert torch.equal(got, expected) and torch.equal(tokens, expected_tokens)
    assert not patch.state.reduced
    return patch


def assert_remove_restores(
    model: Any,
    inputs: dict,
    method: str,
    options: dict,
    greedy: Callable[[Any, dict], torch.Tensor],
    reduces: bool = True,
) -> None:
    """A reducing patch, used for a forward and generate(), then removed: modules, hooks, weights, outputs exact.

    While patched, ``tokenprune.disabled`` runs the original model (bit-exact). ``reduces``: whether ``options``
    remove tokens (False: the patched outputs equal the unpatched ones).
    """
    module_types = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = greedy(model, inputs)
        hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # HF adds its own lazily
        patch = tokenprune.apply(model, method, **options)
        reduced = model(**inputs).logits
        greedy(model, inputs)
        with tokenprune.disabled(model):
            assert torch.equal(model(**inputs).logits, expected)
        assert patch.remove() is model
        restored = model(**inputs).logits
        restored_tokens = greedy(model, inputs)
    if reduces:
        assert reduced.shape[1] < expected.shape[1]
    else:
        assert torch.equal(reduced, expected)
    assert torch.equal(restored, expected) and torch.equal(restored_tokens, expected_tokens)
    assert [(name, type(m)) for name, m in model.named_modules()] == module_types
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert not hasattr(model, "_tokenprune_patch")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def assert_batch_rows_equal_alone(
    model: Any,
    patch: Any,
    batched_logits: torch.Tensor,
    state: Any,
    singles: list[dict],
    lengths: list[int],
    side: str,
    exact: list[bool] | None = None,
) -> None:
    """Each sample's kept rows of a padded batch (``state``: the batch's) == that prompt run alone (atol 1e-5).

    Args:
        singles: Per sample, its unpadded ``model(**inputs)`` inputs; ``lengths``: its prompt length.
        side: ``"left"`` or ``"right"`` padding of the batch.
        exact: Per sample, whether its kept tokens must be those kept alone (default all). False (a random pick,
            whose draws differ in a batch): the same number of tokens and of visual tokens in every layer.
    """
    width = max(lengths)
    with torch.no_grad():
        for b, length in enumerate(lengths):
            alone = model(**singles[b]).logits[0]
            if exact is not None and not exact[b]:
                assert int(state.valid[b].sum()) == patch.state.num_tokens == alone.shape[0]
                assert [v[b] for v in state.visual_per_layer()] == [v[0] for v in patch.state.visual_per_layer()]
                continue
            offset = width - length if side == "left" else 0
            valid = state.valid[b]
            assert [i - offset for i in state.index[b][valid].tolist()] == patch.state.index[0].tolist()
            torch.testing.assert_close(batched_logits[b][valid], alone, rtol=0, atol=1e-5)


def assert_batched_generate_equals_alone(
    model: Any,
    greedy: Callable[..., torch.Tensor],
    batched: dict,
    singles: list[dict],
    lengths: list[int],
    **kwargs: Any,
) -> None:
    """Greedy tokens of a left-padded batch == those of each prompt generated alone (``kwargs``: to generate)."""
    width = max(lengths)
    with torch.no_grad():
        tokens = greedy(model, batched, **kwargs)
        for b, length in enumerate(lengths):
            alone = greedy(model, singles[b], **kwargs)
            assert tokens[b, width:].tolist() == alone[0, length:].tolist()
