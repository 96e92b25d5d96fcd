"""Integrations with other tools: ``lmms`` (an lmms-eval model and task; ``pip install 'tokenprune[lmms]'``)."""
