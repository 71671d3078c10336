"""One scorer for every method of a comparison: the same held-out rows, the same prompts (few-shot examples before them
for prompting), the same greedy decoding and answer matching, the same figures.

A classifier (``sequence_classification``, e.g. a MiniLM head) answers with its predicted label: it reads its own view
of the same held-out rows (the review text, not the prompt), and each must be the task row's text with its answer.

Few-shot examples come from the task job's training split, drawn with the method's seed, never a row whose prompt is
among the held-out rows (a row can appear in both when a source repeats a text).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from hone.config import JobConfig
from hone.config.compare import ScoringConfig

__all__ = ["HeldOut", "classifier_rows", "few_shot_examples", "few_shot_prompt", "model_figures", "score_answers",
           "score_classifier"]


@dataclass
class HeldOut:
    """The rows every method is scored on and how: the same for all, named by ``digest``."""

    job: JobConfig
    rows: list[dict[str, Any]]
    labels: list[str] | None
    """The answers' label set when they form one (2 to 20 distinct) and constrained scoring is on: the choice asked."""
    max_tokens: int
    digest: str
    """sha256 of the rows (in order): a method scored on other rows would show another digest."""

    @classmethod
    def load(cls, job: JobConfig, cfg: ScoringConfig) -> HeldOut:
        from hone.data import held_out_rows, prompt_messages

        rows = [dict(r) for r in held_out_rows(job.data, cfg.split, cfg.rows)]
        answers = {prompt_messages(r, job.data)[1].strip() for r in rows}
        labels = sorted(answers) if cfg.constrained and 2 <= len(answers) <= 20 else None
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        return cls(job, rows, labels, cfg.max_tokens, digest)

    def sampling(self) -> Any:
        """Greedy, a constrained choice among the labels when the rows have a label set."""
        from hone.generation import Sampling

        max_tokens = self.max_tokens
        if self.labels:  # room for the longest label spelled a character a token (an untrained model may) and its end
            max_tokens = max(max_tokens, max(len(label) for label in self.labels) + 1)
        return Sampling(max_tokens=max_tokens, structured={"choice": self.labels} if self.labels else None)

    def prompts(self, tokenizer: Any, examples: list[dict[str, Any]] | None = None) -> tuple[list[str], list[str]]:
        """(prompts, expected answers): each held-out row formatted as in training, after ``examples`` when given."""
        from hone.data import prompt_and_answer

        if examples:
            return [few_shot_prompt(r, examples, self.job, tokenizer) for r in self.rows], \
                   [prompt_and_answer(r, self.job.data, tokenizer)[1] for r in self.rows]
        pairs = [prompt_and_answer(r, self.job.data, tokenizer) for r in self.rows]
        return [p for p, _ in pairs], [a for _, a in pairs]


def few_shot_examples(job: JobConfig, held_out: HeldOut, shots: int, seed: int, balanced: bool = True) -> list[dict[str, Any]]:
    """``shots`` training rows drawn with ``seed`` (the same rows for the same seed), none whose prompt is a held-out one;
    ``balanced`` (when the answers form a label set): the labels take turns, as evenly as the rows allow, and the chosen
    rows are then shuffled, so neither a label prior nor the last example's label is what the examples teach."""
    from hone.data import load_splits, prompt_messages

    if shots == 0:
        return []
    held = {json.dumps(prompt_messages(r, job.data)[0], sort_keys=True) for r in held_out.rows}
    train = load_splits(job.data)["train"]
    order = list(range(len(train)))
    rng = random.Random(seed)
    rng.shuffle(order)
    buckets: dict[str, list[dict[str, Any]]] = {}
    for i in order:
        row = dict(train[i])
        messages, answer = prompt_messages(row, job.data)
        if json.dumps(messages, sort_keys=True) in held:
            continue
        buckets.setdefault(answer.strip() if balanced and held_out.labels else "", []).append(row)
        if not (balanced and held_out.labels) and len(buckets[""]) == shots:
            return buckets[""]
    picked: list[dict[str, Any]] = []
    while len(picked) < shots and any(buckets.values()):
        for rows in buckets.values():  # in the order each label first came up
            if rows and len(picked) < shots:
                picked.append(rows.pop(0))
    if len(picked) < shots:
        raise ValueError(f"the training split has only {len(picked)} rows that are not held out; {shots} shots asked")
    rng.shuffle(picked)
    return picked


def few_shot_prompt(row: dict[str, Any], examples: list[dict[str, Any]], job: JobConfig, tokenizer: Any) -> str:
    """The held-out row's prompt after the examples: earlier chat turns (each example's user turn and its answer) through
    the chat template, or, for a plain prompt template, each example's prompt and answer before the row's prompt."""
    from hone.data import prompt_and_answer, prompt_messages

    if job.data.prompt_template == "chat" or job.data.format in ("messages", "sharegpt"):
        turns: list[dict[str, str]] = []
        for ex in examples:
            messages, answer = prompt_messages(ex, job.data)
            turns += [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
        messages, _ = prompt_messages(row, job.data)
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        return tokenizer.apply_chat_template(system + turns + rest, tokenize=False, add_generation_prompt=True)
    shown = "".join(p + a + "\n\n" for p, a in (prompt_and_answer(ex, job.data, tokenizer) for ex in examples))
    return shown + prompt_and_answer(row, job.data, tokenizer)[0]


def score_answers(model: Any, tokenizer: Any, held_out: HeldOut, prompts: list[str],
                  expected: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy of greedy answers (a constrained choice among the labels when the rows have a label set)."""
    from hone.generation import TransformersGenerator, answer_matches

    outs = TransformersGenerator(model, tokenizer).generate(prompts, held_out.sampling())
    texts = [g[0].text for g in outs]
    results = [{"expected": a, "generated": t, "correct": c} for a, t, c in zip(expected, texts, answer_matches(texts, expected))]
    return sum(r["correct"] for r in results) / max(len(results), 1), results


def _weights_mb(model: Any) -> float:
    """MB of a model's weights as loaded."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6


def _median_ms(call: Any, repeats: int) -> float:
    """The median wall time of ``call()`` over ``repeats`` calls, in ms."""
    import statistics
    import time

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def model_figures(model: Any, tokenizer: Any, held_out: HeldOut, prompt: str, *, loss: bool) -> dict[str, float]:
    """The served model's figures: size (MB of weights), greedy decode ms/token and ms per answer (``prompt``, batch 1,
    the median of 3) on hone's transformers engine, and, when ``loss``, the answer-token eval loss on the held-out rows
    as training evaluates it."""
    from hone.data import tokenize_split
    from hone.generation import TransformersGenerator, decode_ms_per_token
    from hone.modeling import evaluate

    engine = TransformersGenerator(model, tokenizer)
    out = {"size_mb": _weights_mb(model), "decode_ms_per_token": decode_ms_per_token(engine, new_tokens=16, repeats=3),
           "answer_ms": _median_ms(lambda: engine.generate([prompt], held_out.sampling()), repeats=3)}
    if loss:
        import datasets

        tokenized, _ = tokenize_split(datasets.Dataset.from_list(held_out.rows), held_out.job, tokenizer, "test", pack=False,
                                      masked=True)
        out["eval_loss"] = evaluate(model, list(tokenized), held_out.job, tokenizer.pad_token_id)["eval_loss"]
    return out


def classifier_rows(job: JobConfig, held_out: HeldOut, split: str) -> tuple[Any, list[str]]:
    """The classifier job's own held-out rows and the task's answers for them, checked to be the task's rows in the
    task's order: row ``i``'s text is in task row ``i``'s prompt and its label is that row's answer. Raises
    ``ValueError`` naming the first row that is not."""
    import datasets

    from hone.data import held_out_rows, prompt_messages

    rows = held_out_rows(job.data, split, len(held_out.rows))
    feature = rows.features.get(job.data.columns.label)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else job.task.labels
    if len(rows) != len(held_out.rows):
        raise ValueError(f"the classifier's data has {len(rows)} {split} rows, the task {len(held_out.rows)}")
    answers = []
    for i, (mine, theirs) in enumerate(zip(rows, held_out.rows)):
        messages, answer = prompt_messages(theirs, held_out.job.data)
        text, label = str(mine[job.data.columns.text]).strip(), mine[job.data.columns.label]
        label = names[label] if isinstance(label, int) and names else str(label)
        if not text or text not in "\n".join(m["content"] for m in messages) or label.strip() != answer.strip():
            raise ValueError(f"the classifier's {split} row {i} ({text[:40]!r}, {label!r}) is not the task's row {i}: "
                             "give it the task's data source, seed and split settings")
        answers.append(answer.strip())
    return rows, answers


def score_classifier(model: Any, tokenizer: Any, job: JobConfig, held_out: HeldOut,
                     split: str) -> tuple[float, list[dict[str, Any]], dict[str, float]]:
    """(accuracy, answers, figures) of a classifier on the task's held-out rows (:func:`classifier_rows`): its predicted
    label counted against the task's answer. Figures: the eval loss (cross-entropy over its labels, as training
    evaluates it), size and ms per answer (one held-out text, batch 1, the median of 5 after a warm-up)."""
    import torch

    from hone.data import collate, tokenize_split
    from hone.modeling import forward_loss

    rows, expected = classifier_rows(job, held_out, split)
    tokenized = list(tokenize_split(rows, job, tokenizer, "test", pack=False, masked=True)[0])
    names = model.config.id2label
    predicted: list[str] = []
    loss = 0.0
    with torch.no_grad():
        for start in range(0, len(tokenized), 16):
            batch = collate(tokenized[start:start + 16], tokenizer.pad_token_id, job.task.type)
            total, _, logits = forward_loss(model, batch, job.task.type, reduction="sum")
            loss += float(total)
            predicted += [names[int(i)] for i in logits.argmax(-1)]
        one = collate(tokenized[:1], tokenizer.pad_token_id, job.task.type)
        one.pop("labels")
        model(**one)  # a warm-up
        answer_ms = _median_ms(lambda: model(**one), repeats=5)
    answers = [{"expected": a, "generated": p, "correct": p == a} for a, p in zip(expected, predicted)]
    figures = {"eval_loss": loss / max(len(tokenized), 1), "answer_ms": answer_ms, "size_mb": _weights_mb(model)}
    return sum(a["correct"] for a in answers) / max(len(answers), 1), answers, figures
