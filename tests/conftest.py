"""Shared model factories: small random-weight timm ViTs covering every form the adapter supports.

The forms themselves live in ``tests/helpers/vit_forms.py`` (with the Hugging Face encoders), so the ViT
matrix suite and the form-specific tests build the very same models.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import vit_forms

torch.set_num_threads(2)

#: The timm forms by name (the Hugging Face ones are ``vit_forms.FORMS`` entries with ``attn``).
MODELS = {name: form for name, form in vit_forms.FORMS.items() if not form.hf}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """A fresh eval-mode model, a batch of 2 inputs and the apply() options it needs."""
    return vit_forms.build(name)


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param
