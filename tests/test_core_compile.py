"""Slow: a patched model under torch.compile gives the eager patched output."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.conftest import build


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_patched_model_under_torch_compile(method):
    model, images, _ = build("reg4_qknorm_layerscale")
    patch = tokenprune.apply(model, method, r=4)
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model)(images)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert patch.state.num_tokens == patch.state.num_original - 16
