"""``python -m tokenprune.integrations.lmms``: prints the folder to pass as lmms-eval's ``--include_path``."""

from tokenprune.integrations.lmms import TASKS_DIR

print(TASKS_DIR)
