"""lmms-eval plugin: the ``tokenprune`` model (any supported VLM, reduced by any method) and the local
``tokenprune_easyvqa`` task.

``pip install 'tokenprune[lmms]'`` registers the model through lmms-eval's ``lmms_eval.models`` entry point
(:func:`manifests`), so ``lmms-eval --model tokenprune --model_args pretrained=<path|zoo name|hub id>,method=aim,
flops=0.25 --tasks <task>`` scores any lmms-eval task with a reduced model. lmms-eval (0.7.3) finds tasks only in
its own folder and in ``--include_path``: :data:`TASKS_DIR` holds ``tokenprune_easyvqa``
(``python -m tokenprune.integrations.lmms`` prints it).
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the shipped lmms-eval tasks (pass it as ``--include_path``).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def manifests():
    """The ``lmms_eval.models`` entry point: the ``tokenprune`` model's manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="tokenprune", simple_class_path="tokenprune.integrations.lmms.model.TokenPrune")]
