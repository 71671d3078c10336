"""``hone compare``: every method of a comparison in order, each trained on the cluster (or prompted), then scored here
on the task's held-out rows by :mod:`hone.comparison.scoring`.

A method that fails (its run diverges or errors, its model does not load) is a failed row with its reason; the others
go on, and a method that starts ``from`` a failed one is skipped, saying why. Every trained model is registered as a
version of ``models:/NAME`` tagged with its method and what it started from; the most accurate one gets ``@winner``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from hone import registry
from hone.artifacts import run_storage, trusted_roots
from hone.comparison.report import CompareResult, write_outputs
from hone.comparison.scoring import HeldOut, few_shot_examples, model_figures, score_answers, score_classifier
from hone.config import JobConfig
from hone.config.compare import Comparison, MethodSpec
from hone.runtime import job_cpus, ray_session

__all__ = ["run_compare"]


def _say(text: str) -> None:
    print(f"[hone] compare: {text}", flush=True)


def run_compare(c: Comparison, *, address: str | None = None, storage_path: str | None = None) -> CompareResult:
    """Run and score every method; write ``compare.json``, ``compare.csv`` and ``compare.png`` in
    ``<storage>/<name>-compare/``; register the trained models (the most accurate as ``models:/NAME@winner``)."""
    from hone.storage import uri_of

    storage = run_storage(storage_path, c.task)
    folder = storage / f"{c.config.name}-compare"
    folder.mkdir(parents=True, exist_ok=True)
    held_out = HeldOut.load(c.task, c.config.task)
    how = f"a constrained choice among {held_out.labels}" if held_out.labels else "free greedy text"
    _say(f"{len(held_out.rows)} held-out {c.config.task.split} rows (sha256 {held_out.digest[:12]}), answers as {how}")
    result = CompareResult(c.config.name, folder, held_out.digest, c.config.task.split, len(held_out.rows), how)
    started = time.time()
    trained = [j for j in c.jobs.values() if j is not None]
    session = max(trained, key=job_cpus) if trained else None
    # one Ray session for every run (sized for the largest), and the exports this comparison registers load again to be scored
    with ray_session(session, address), trusted_roots(uri_of(storage) or storage):
        for i, m in enumerate(c.config.methods, 1):
            _say(f"[{i}/{len(c.config.methods)}] {m.name}: " + (f"{m.shots}-shot prompting" if m.prompting else
                                                                 f"{m.job}" + (f" from {m.start_from}" if m.start_from else "")))
            row: dict[str, Any] = {"method": m.name, "kind": "prompting" if m.prompting else "trained", "rows_sha256": held_out.digest}
            parent = result.row(m.start_from) if m.start_from else None
            if parent is not None and parent["status"] != "ok":
                row.update(status="skipped", error=f"it starts from {m.start_from}, which {parent['status']}")
            else:
                try:
                    row.update(_prompting(c, m, held_out) if m.prompting else
                               _trained(c, m, held_out, parent, address, storage))
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - one method's failure is its row; the others go on
                    row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            result.rows.append(row)
            _say(f"{m.name}: " + (f"accuracy {row['accuracy']:.3f}" if row["status"] == "ok" else f"{row['status']}: {row['error']}"))
        result.wall_s = time.time() - started
        result.winner = _register_winner(c, result)
    write_outputs(result)
    return result


def _prompting(c: Comparison, m: MethodSpec, held_out: HeldOut) -> dict[str, Any]:
    from hone.data import load_tokenizer, prompt_messages
    from hone.modeling import load_base_model

    assert m.shots is not None
    tokenizer = load_tokenizer(c.task)
    model = load_base_model(c.task).eval()
    examples = few_shot_examples(c.task, held_out, m.shots, m.seed, m.balanced)
    prompts, expected = held_out.prompts(tokenizer, examples)
    accuracy, answers = score_answers(model, tokenizer, held_out, prompts, expected)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    return {"accuracy": accuracy, "model": c.task.model.name, "shots": m.shots, "seed": m.seed,
            "example_answers": [prompt_messages(e, c.task.data)[1] for e in examples],
            "prompt_tokens_mean": sum(lengths) / len(lengths),
            "train_s": 0.0, "train_s_total": 0.0, "tokens_seen": 0, "trainable_params": 0,
            **model_figures(model, tokenizer, held_out, prompts[0], loss=m.shots == 0), "examples": answers[:4]}


def _trained(c: Comparison, m: MethodSpec, held_out: HeldOut, parent: dict[str, Any] | None, address: str | None,
             storage: Path) -> dict[str, Any]:
    from hone.artifacts import resolve_ref
    from hone.modeling import load_model
    from hone.training import train

    job = c.jobs[m.name]
    assert job is not None
    if parent is not None:  # like the pipeline's align stage: the job's model is the earlier method's
        raw = job.to_dict()
        raw["model"]["name"] = parent["model"]
        job = JobConfig.model_validate(raw, context={"check_paths": False})
    started = time.time()
    run = train(job, address=address, storage_path=str(storage), track=True, quiet=True)
    train_s = time.time() - started
    if run.export_dir is None:
        raise RuntimeError(f"the run {run.run_dir} wrote no export")
    metric = job.training.eval_metric if job.training.eval_metric in run.metrics else "loss"
    value = float(run.metrics.get(metric, float("nan")))
    name = f"{c.config.name}-{m.name}"
    reg = registry.register_winner(name, run.mlflow_run_id, run.export_dir, metric, value)
    lineage = {"hone.compare": c.config.name, "hone.method": m.name, "hone.from": job.model.name}
    registry.tag_version(reg.name, reg.version, lineage)
    model, tokenizer = load_model(resolve_ref(str(run.export_dir)))
    if job.task.type == "sequence_classification":  # its predicted label, on its own view of the same rows
        accuracy, answers, figures = score_classifier(model, tokenizer, job, held_out, c.config.task.split)
    else:
        prompts, expected = held_out.prompts(tokenizer)
        accuracy, answers = score_answers(model, tokenizer, held_out, prompts, expected)
        figures = model_figures(model, tokenizer, held_out, prompts[0], loss=True)
    history = run.history
    return {"accuracy": accuracy, "model": f"models:/{reg.name}/{reg.version}", "from": job.model.name,
            "objective": _objective(job), "method_type": job.method.type, "run_dir": str(run.run_dir),
            "export": str(run.export_dir), "mlflow_run_id": run.mlflow_run_id, "train_s": train_s,
            "train_s_total": train_s + (parent["train_s_total"] if parent else 0.0), "steps": run.metrics.get("step"),
            "tokens_seen": _tokens_seen(history), "trainable_params": _trainable(run.export_dir, model),
            "peak_memory_mb_per_worker": max((h.get("peak_memory_mb") or 0.0 for h in history), default=None),
            **figures, "examples": answers[:4]}


def _objective(job: JobConfig) -> str:
    if job.task.type != "causal_lm":
        return job.task.type
    if job.grpo is not None:
        return "grpo"
    return job.preference.loss if job.preference is not None else "sft"


def _tokens_seen(history: list[dict[str, Any]]) -> int:
    """Tokens the run trained on: the sum of its logged windows' counts (every worker's)."""
    return int(sum(h.get("tokens_trained", 0.0) for h in history))


def _trainable(export_dir: Path, model: Any) -> int:
    """What the run trained: an adapter's parameters (from its weights file), else every parameter of the model."""
    from safetensors import safe_open

    adapter = export_dir / "adapter_model.safetensors"
    if adapter.is_file():
        with safe_open(str(adapter), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return sum(p.numel() for p in model.parameters())


def _register_winner(c: Comparison, result: CompareResult) -> dict[str, Any] | None:
    """The most accurate method (the cheaper to train on a tie); a trained winner also becomes ``models:/NAME@winner``."""
    ok = [r for r in result.rows if r["status"] == "ok"]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["accuracy"], -r["train_s_total"]))
    winner = {"method": best["method"], "accuracy": best["accuracy"], "model": best["model"]}
    if best["kind"] == "trained":
        reg = registry.register_winner(c.config.name, best["mlflow_run_id"], Path(best["export"]), "accuracy", best["accuracy"])
        registry.promote(reg.name, reg.version, registry.WINNER)  # this comparison's winner, whatever an earlier one scored
        registry.tag_version(reg.name, reg.version, {"hone.compare": c.config.name, "hone.method": best["method"],
                                                     "hone.from": best["from"], "hone.rows_sha256": result.rows_sha256})
        winner["registered"] = f"models:/{reg.name}/{reg.version}"
        _say(f"winner {best['method']} (accuracy {best['accuracy']:.3f}): registered {winner['registered']} (@winner)")
    else:
        _say(f"winner {best['method']} (accuracy {best['accuracy']:.3f}): prompting, nothing to register; serve {best['model']} "
             "with its prompt")
    (result.folder / "winner.json").write_text(json.dumps(winner, indent=2))
    return winner
