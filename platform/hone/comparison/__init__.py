"""``hone compare``: which method for this task and budget? Prompting, LoRA, full fine-tuning, preference tuning and GRPO
run side by side and are scored on the same held-out rows with the same scorer.

- :mod:`hone.comparison.scoring`: the held-out rows, few-shot prompts, the one scorer and the model's figures
- :mod:`hone.comparison.run`: each method in order (trained on the cluster, or prompted), failures kept as rows
- :mod:`hone.comparison.report`: the table, ``compare.json``/``.csv`` and the accuracy-against-time plot
"""

from hone.comparison.report import CompareResult, format_table
from hone.comparison.run import run_compare

__all__ = ["CompareResult", "format_table", "run_compare"]
