"""A module whose import has effects: validating a config that names it must never import it."""

import os
import sys

MARKER = os.environ.get("FINETUNE_TEST_IMPORT_MARKER")
if MARKER:
    with open(MARKER, "a") as marker:
        marker.write(f"imported in {os.getpid()}\n")
if os.environ.get("FINETUNE_TEST_IMPORT_EXIT"):
    sys.exit(3)


def metric(prompts, completions, references):
    return 1.0


def reward(completions, **kwargs):
    return [1.0 for _ in completions]
