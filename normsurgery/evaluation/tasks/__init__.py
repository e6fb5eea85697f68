"""lm-eval task YAMLs shipped with normsurgery (registered through lm-eval's TaskManager include path)."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
OFFLINE_TASKS = ("shakespeare_ppl", "shakespeare_lastword", "shakespeare_nextline")
