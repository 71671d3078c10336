"""The smoke test: held-out rows sent to the endpoint through the ``openai`` client, compared with the untuned
base model's answers to the same rows; every request must succeed."""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hone.config import Pipeline, ServeConfig
from hone.errors import PipelineError
from hone.pipeline.state import State, fingerprint, say
from hone.pipeline.summary import pct
from hone.privacy import redact

__all__ = ["smoke_stage", "untuned_accuracy"]


def untuned_accuracy(p: Pipeline, state: State, rows: list[dict[str, Any]], rerun: bool) -> float:
    """The base model's greedy answers to the same rows, in this process (cached in the state)."""
    from hone.data import load_tokenizer
    from hone.generation import TransformersGenerator, answer_accuracy
    from hone.modeling import load_base_model

    sm = p.config.smoke_test
    assert sm is not None
    fp = fingerprint({"model": p.job.model.model_dump(), "data": p.job.data.model_dump(), "split": sm.split, "n": len(rows),
                       "max_tokens": sm.max_tokens})
    reused = None if rerun else state.reusable("untuned", fp, lambda out: True)
    if reused is not None:
        return float(reused["accuracy"])
    say(f"smoke test: answering the {len(rows)} rows with the untuned {p.job.model.name} for comparison")
    tokenizer = load_tokenizer(p.job)
    model = load_base_model(p.job).eval()
    accuracy, _ = answer_accuracy(TransformersGenerator(model, tokenizer), rows, p.job, tokenizer, max_tokens=sm.max_tokens)
    del model
    state.record("untuned", fp, {"accuracy": accuracy})
    return accuracy


class _ReplicaWatch:
    """Counts the model deployment's RUNNING replicas once a second (the autoscaler at work)."""

    def __init__(self, app: str):
        self.app, self.seen, self._stop = app, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                dep = serve.status().applications[self.app].deployments["ModelServer"]
                n = int(dep.replica_states.get("RUNNING", 0))
                if not self.seen or self.seen[-1] != n:
                    self.seen.append(n)
            except Exception:  # noqa: BLE001 - best effort: a status hiccup is not a failed smoke test
                pass
            self._stop.wait(1.0)

    def __enter__(self) -> _ReplicaWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _api_key() -> str:
    keys = [k.strip() for k in os.environ.get("HONE_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else "no-key"


def smoke_stage(p: Pipeline, state: State, cfg: ServeConfig, base: str, rerun: bool) -> dict[str, Any]:
    import httpx
    import openai

    from hone.data import held_out_rows, load_tokenizer, prompt_and_answer, prompt_messages
    from hone.generation import answer_matches

    sm = p.config.smoke_test
    assert sm is not None
    job = p.job
    rows = [dict(r) for r in held_out_rows(job.data, sm.split, sm.requests)]
    classify = job.task.type == "sequence_classification"
    chat = not classify and not (job.data.format in ("alpaca", "preference", "unpaired") and job.data.prompt_template == "alpaca")
    untuned = untuned_accuracy(p, state, rows, rerun) if sm.compare_untuned and not classify else None

    client = openai.OpenAI(base_url=base + "/v1", api_key=_api_key(), max_retries=6, timeout=300)
    served = cfg.served_name()
    listed = [m.id for m in client.models.list().data]
    if served not in listed:
        raise PipelineError("smoke_test", f"/v1/models lists {listed}, not {served!r}")
    tokenizer = None if chat or classify else load_tokenizer(job)
    labels = list(job.task.labels or []) if classify else []
    extra: dict[str, Any] = {}
    if sm.constrained and not classify and job.data.format in ("alpaca", "messages", "sharegpt"):  # a label, never a sentence
        answers_seen = sorted({str(prompt_messages(r, job.data)[1]).strip() for r in rows})
        if 2 <= len(answers_seen) <= 20 and all(answers_seen):
            extra = {"extra_body": {"structured_outputs": {"choice": answers_seen}}}

    def one(row: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            if classify:
                label = row[job.data.columns.label]
                expected = labels[label] if isinstance(label, int) and labels else str(label)
                r = httpx.post(base + "/v1/classify", json={"model": served, "input": str(row[job.data.columns.text])},
                               headers={"Authorization": f"Bearer {_api_key()}"}, timeout=300)
                r.raise_for_status()
                text, tokens = str(r.json()["data"][0]["label"]), 0
            elif chat:
                messages, expected = prompt_messages(row, job.data)
                r = client.chat.completions.create(model=served, messages=messages, max_tokens=sm.max_tokens, temperature=0, **extra)
                text, tokens = r.choices[0].message.content or "", r.usage.completion_tokens if r.usage else 0
            else:
                prompt, expected = prompt_and_answer(row, job.data, tokenizer)
                r = client.completions.create(model=served, prompt=prompt, max_tokens=sm.max_tokens, temperature=0, **extra)
                text, tokens = r.choices[0].text, r.usage.completion_tokens if r.usage else 0
            return {"ok": True, "text": text, "expected": expected, "tokens": tokens, "latency": time.perf_counter() - started}
        except Exception as e:  # noqa: BLE001 - counted and reported below
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "latency": time.perf_counter() - started}

    say(f"smoke test: {len(rows)} held-out {sm.split} rows → {base}/v1 ({sm.concurrency} concurrent)")
    started = time.perf_counter()
    answers: list[dict[str, Any]] = []
    with _ReplicaWatch(cfg.name) as watch, ThreadPoolExecutor(sm.concurrency) as pool:
        futures = [pool.submit(one, row) for row in rows]
        for i, future in enumerate(futures, 1):  # in order: the answers line up with the rows
            answers.append(future.result())
            if i % max(1, len(rows) // 4) == 0 and i < len(rows):
                say(f"smoke test: {i}/{len(rows)} answered ({time.perf_counter() - started:.0f} s)")
    wall = time.perf_counter() - started
    ttft = None
    if not classify:  # one streamed request: time to the first content
        messages, _ = prompt_messages(rows[0], job.data) if chat else ([], "")
        t0 = time.perf_counter()
        stream = (client.chat.completions.create(model=served, messages=messages, max_tokens=sm.max_tokens, temperature=0, stream=True,
                                                 **extra)
                  if chat else client.completions.create(model=served, prompt=prompt_and_answer(rows[0], job.data, tokenizer)[0],
                                                         max_tokens=sm.max_tokens, temperature=0, stream=True, **extra))
        for chunk in stream:
            piece = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) if chunk.choices else None
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
    failed = [a for a in answers if not a["ok"]]
    ok = [a for a in answers if a["ok"]]
    latencies = sorted(a["latency"] for a in ok) or [float("nan")]
    if classify:
        correct = [a["text"] == a["expected"] for a in ok]
    else:
        correct = answer_matches([a["text"] for a in ok], [a["expected"] for a in ok]) if ok else []
    accuracy = sum(correct) / len(answers) if answers else None
    out = {"split": sm.split, "requests": len(rows), "concurrency": sm.concurrency, "ok": len(ok), "failed": len(failed),
           "accuracy": accuracy, "untuned_accuracy": untuned, "latency_p50_s": statistics.median(latencies),
           "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "ttft_s": ttft,
           "requests_per_s": len(ok) / wall, "completion_tokens_per_s": sum(a["tokens"] for a in ok) / wall,
           "replicas_seen": "→".join(map(str, watch.seen)) if watch.seen else None, "seconds": wall,
           "constrained_to": extra["extra_body"]["structured_outputs"]["choice"] if extra else None,
           "examples": [{"expected": a["expected"], "answered": a["text"], "correct": c} for a, c in zip(ok[:3], correct)]}
    shown = redact if cfg.redact_logs else str  # what the pipeline prints and keeps about requests
    out["examples"] = [{**e, "expected": shown(e["expected"]), "answered": shown(e["answered"])} for e in out["examples"]]
    if failed:
        raise PipelineError("smoke_test", f"{len(failed)} of {len(rows)} requests failed; first: {shown(failed[0]['error'])}")
    if sm.min_accuracy is not None and (accuracy or 0.0) < sm.min_accuracy:
        raise PipelineError("smoke_test", f"the endpoint answered {pct(accuracy)} right, below smoke_test.min_accuracy "
                                          f"{pct(sm.min_accuracy)}")
    return out
