"""lmms-eval loads the task class named in ``tokenprune_easyvqa.yaml`` from this file, next to it."""

from tokenprune.integrations.lmms.easyvqa_task import EasyVQATask

__all__ = ["EasyVQATask"]
