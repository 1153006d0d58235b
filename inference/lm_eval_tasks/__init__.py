"""lm-eval task configs for the bundled zero-shot validation splits (``TaskManager(include_path=TASKS_DIR)``)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
