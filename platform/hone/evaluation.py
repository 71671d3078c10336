"""``hone eval``: a model's metrics on held-out rows of its own job's data, the way training evaluates.

Loss (and perplexity or classification metrics) as the training loop computes them, and, for causal
LMs on instruction or chat data, the accuracy of greedy generated answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hone.artifacts import resolve_ref
from hone.data import held_out_rows, tokenize_split
from hone.errors import ArtifactError
from hone.generation import TransformersGenerator, answer_accuracy
from hone.modeling import evaluate, load_base_model, load_model

__all__ = ["EvalReport", "evaluate_model"]


@dataclass
class EvalReport:
    what: str
    """What was evaluated (an export, or the untuned base model)."""
    split: str
    rows: int
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    """Generated answers next to the expected ones (causal LMs on instruction/chat data)."""

    def line(self) -> str:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items() if k != "eval_tokens")
        return f"{self.what} on {self.rows} {self.split} rows: {shown}"


def evaluate_model(ref: str, *, split: str = "test", n: int = 200, base: bool = False, max_new_tokens: int = 12) -> EvalReport:
    """Evaluate an export (a run, its export directory, or ``models:/NAME@ALIAS``), or with ``base`` its untuned
    base model, on the first ``n`` rows of ``split`` of the export's own job data."""
    spec = resolve_ref(ref)
    job = spec.job
    if spec.kind != "export" or job is None:
        raise ArtifactError(f"{ref} is not a hone export: give a run, its export directory, or models:/NAME@ALIAS")
    model, tokenizer = load_model(spec, merge_adapter=False)
    what = f"export {spec.path}"
    if base:
        model, what = load_base_model(job).eval(), f"untuned base {job.model.name}"
    rows = held_out_rows(job.data, split, n)
    tokenized, _ = tokenize_split(rows, job, tokenizer, split, pack=False, masked=True)
    metrics = evaluate(model, list(tokenized), job, tokenizer.pad_token_id)
    examples: list[dict[str, Any]] = []
    if job.task.type == "causal_lm" and job.data.format != "text":
        metrics["accuracy"], examples = answer_accuracy(TransformersGenerator(model, tokenizer), list(rows), job, tokenizer,
                                                     max_tokens=max_new_tokens)
    return EvalReport(what, split, len(rows), metrics, examples)
