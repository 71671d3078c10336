"""The pipeline's stages: train (one run or a sweep) → [align: a run from that model] → registry version → quantise
behind the gate → deploy.

Each stage's output is the next one's input through the model registry; a stage whose input
fingerprint matches ``state.json`` and whose output still exists is reused, not rerun.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hone import registry, storage
from hone.artifacts import QUANTIZED_INFO
from hone.config import JobConfig, Pipeline, ServeConfig
from hone.data import dataset_fingerprint
from hone.errors import PipelineError
from hone.pipeline.state import State, fingerprint, say

__all__ = ["align_stage", "base_url", "prune_stage", "quantize_stage", "serve_stage", "train_fingerprint", "train_stage", "worth_serving"]


def train_fingerprint(p: Pipeline) -> str:
    """What the train stage's result depends on: the job (overrides applied; not where runs are written), whether it is
    a sweep, and the content of its data (a file edited in place is new data)."""
    inputs = p.job.to_dict()
    inputs["training"]["storage_path"] = None
    return fingerprint({"job": inputs, "sweep": p.sweep, "data": dataset_fingerprint(p.job)})


def train_stage(p: Pipeline, state: State, storage: Path, address: str | None, rerun: bool) -> dict[str, Any]:
    from hone.tune import format_table, sweep

    job = p.job
    if p.config.train.model is not None:
        return _given(p.config.train.model)
    fp = train_fingerprint(p)

    reused = None if rerun else state.reusable("train", fp, _registered)
    if reused is not None:
        say(f"train: reusing {reused['model']} (the job and its overrides are unchanged since {state.data['train']['at']})")
        return {**reused, "skipped": True}
    started = time.time()
    if job.model.name.startswith("builtin:"):  # built once here rather than inside the first trial's workers
        from hone import assets

        assets.resolve_model(job.model.name)
    name = p.registered_model
    if p.sweep:
        assert job.tune is not None
        result = sweep(job, address=address, storage_path=str(storage))
        if result.winner is None or result.registered is None:
            raise PipelineError("train", f"no trial of the sweep {result.sweep_dir} completed with a {job.tune.metric}; "
                                         f"see {result.sweep_dir}/trials.csv and the trial logs")
        metric = job.tune.metric
        out = {
            "sweep": True,
            "sweep_dir": str(result.sweep_dir),
            "metric": metric,
            "model": f"models:/{name}/{result.registered['version']}",
            "export": str(result.winner["export"]),
            "table": format_table(result.trials, job, result.winner),
            "trials": [
                {"trial": r["trial"], "params": r["params"], "value": r[metric], "steps": r["steps"], "status": r["status"]}
                for r in result.trials
            ],
            "winner": {"trial": result.winner["trial"], "params": result.winner["params"], "value": result.winner[metric]},
        }
    else:
        out = _one_run("train", job, name, storage, address)
    out["seconds"] = time.time() - started
    state.record("train", fp, out)
    return {**out, "skipped": False}


def _given(ref: str) -> dict[str, Any]:
    """``train.model``: a registered model taken as it is (pinned to the version the alias names now)."""
    reg = registry.resolve_model_ref(ref)
    tags = reg["tags"]
    say(f"train: taking {ref} = models:/{reg['name']}/{reg['version']} (trained elsewhere; nothing trained here)")
    return {"sweep": False, "given": ref, "model": f"models:/{reg['name']}/{reg['version']}", "export": reg["source"],
            "metric": tags.get("hone.metric", "-"), "value": float(tags.get("hone.metric_value", "nan")), "seconds": 0.0,
            "skipped": True}


def _registered(out: dict[str, Any]) -> bool:
    """Whether a recorded stage's registered model still exists."""
    return Path(registry.resolve_model_ref(out["model"])["source"]).is_dir()


def _one_run(stage: str, job: JobConfig, name: str, storage: Path, address: str | None) -> dict[str, Any]:
    """One training run, its export registered as ``models:/NAME`` by the job's metric."""
    from hone.training import train

    run = train(job, address=address, storage_path=str(storage), track=True)
    if run.export_dir is None or run.mlflow_run_id is None:
        raise PipelineError(stage, f"the run {run.run_dir} wrote no export to register")
    metric = job.training.eval_metric if "eval_loss" in run.metrics else "loss"
    value = float(run.metrics.get(metric, run.metrics.get("loss", float("nan"))))
    reg = registry.register_winner(name, run.mlflow_run_id, run.export_dir, metric, value)
    print(f"[hone] {registry.describe(reg, metric, value)}", flush=True)
    return {"sweep": False, "run_dir": str(run.run_dir), "metric": metric, "value": value,
            "model": f"models:/{name}/{reg.version}", "export": str(run.export_dir)}


def align_stage(p: Pipeline, state: State, trained: dict[str, Any], storage: Path, address: str | None,
                rerun: bool) -> dict[str, Any]:
    """Train the align job from the train stage's model (its ``model.name`` replaced by it) and register the result
    under the align job's name; reused while that model, the job and its data are unchanged."""
    assert p.align_job is not None
    raw = p.align_job.to_dict()
    raw["model"]["name"] = trained["model"]
    job = JobConfig.model_validate(raw, context={"check_paths": False})
    inputs = job.to_dict()
    inputs["training"]["storage_path"] = None
    fp = fingerprint({"job": inputs, "from": trained["model"], "export": trained["export"], "data": dataset_fingerprint(job)})

    reused = None if rerun else state.reusable("align", fp, _registered)
    if reused is not None:
        say(f"align: reusing {reused['model']} (trained from {trained['model']}, the job unchanged since {state.data['align']['at']})")
        return {**reused, "skipped": True}
    started = time.time()
    out = {**_one_run("align", job, p.align_job.name, storage, address), "from": trained["model"],
           "objective": job.preference.loss if job.preference else "sft"}
    out["seconds"] = time.time() - started
    state.record("align", fp, out)
    return {**out, "skipped": False}


def prune_stage(p: Pipeline, state: State, trained: dict[str, Any], storage_root: Path, address: str | None, rerun: bool,
                remote: str | None = None) -> dict[str, Any]:
    """Prune the trained model, fine-tune it briefly from there when ``recover_steps`` is set, and gate the result against
    the trained model on the engine that serves it. Its output names the model the later stages take: the pruned one
    (registered as ``<name>-pruned``) when it passed and decodes faster, else the trained one, with why."""
    from dataclasses import asdict

    from hone.artifacts import resolve_ref
    from hone.quantize import GateThresholds, gate_pruned, prune
    from hone.quantize.prune import record_gate
    from hone.serving.choice import choose_engine

    pr = p.config.prune
    assert pr is not None
    ref = trained["model"]
    recover = p.recover_job.to_dict() if p.recover_job is not None else None
    if recover is not None:
        recover["training"]["storage_path"] = None
    fp = fingerprint({"model": ref, "export": trained["export"], "prune": pr.model_dump(), "recover": recover,
                      "data": dataset_fingerprint(p.recover_job) if p.recover_job is not None else None})
    reused = None if rerun else state.reusable("prune", fp, lambda out: not out["served"] or _registered(out))
    if reused is not None:
        say(f"prune: reusing the verdict of {state.data['prune']['at']} (same model and settings): {reused['why']}")
        return {**reused, "skipped": True}
    if remote and p.recover_job is not None:
        raise PipelineError("prune", "a recovery run from a pruned model in object storage is not supported yet: run this "
                                     "pipeline with a local or shared --storage-path, or drop prune.recover_steps")
    started = time.time()
    spec = resolve_ref(ref)  # once: a registered model's content is hashed on every resolution
    assert spec.registry is not None, f"{ref}: the train stage's models are registered"
    name = f"{spec.registry['name']}-pruned"
    engine = choose_engine(p.serve, spec, "none")
    folder_name = f"{spec.slug()}-{pr.method}-{pr.sparsity:g}"
    out_dir = storage.join(remote, "pruned", folder_name) if remote else storage_root / f"{p.config.name}-pipeline" / "pruned" / folder_name
    folder, stats = prune(ref, pr.sparsity, method=pr.method, out=out_dir, calibration_rows=pr.calibration_rows)
    candidate, recovered = str(out_dir), None
    if p.recover_job is not None:
        raw = p.recover_job.to_dict()
        raw["model"]["name"] = candidate
        job = JobConfig.model_validate(raw, context={"check_paths": False})
        say(f"prune: recovery fine-tune of the pruned model, {pr.recover_steps} steps of {job.name} ({job.method.type})")
        recovered = _one_run("prune", job, name, storage_root, address)
        candidate = recovered["model"]
    result = gate_pruned(ref, candidate, n=pr.eval_rows, thresholds=GateThresholds(pr.max_loss_increase, pr.max_accuracy_drop),
                         engine=engine.engine)
    print(result.table(), flush=True)
    if recovered is None:
        record_gate(folder, result)
    served = result.passed and (result.faster or not pr.require_speedup)
    speed = (f"{result.pruned['decode_ms_per_token']:.1f} ms/token against {result.original['decode_ms_per_token']:.1f} unpruned "
             f"on {engine.engine} ({result.speedup:.2f}x)")
    why = (f"the quality gate failed ({result.rule})" if not result.passed else
           f"it decodes faster: {speed}" if result.faster else
           f"it passed its gate but does not decode faster: {speed}" + ("" if pr.require_speedup else "; prune.require_speedup is off"))
    if served and recovered is None:
        if remote:
            storage.upload(folder / "hone.json", storage.join(candidate, "hone.json"))  # with its gate record
        reg = registry.register_winner(name, None, folder, "eval_loss", result.pruned["eval_loss"])
        candidate = f"models:/{name}/{reg.version}"
    chosen = {"model": candidate, "export": registry.resolve_model_ref(candidate)["source"]} if served else \
        {"model": ref, "export": trained["export"]}
    say(f"prune: serving the pruned model {candidate}: {why}" if served else f"prune: serving the unpruned {ref}: {why}")
    out = {"method": pr.method, "sparsity": pr.sparsity, "stats": asdict(stats), "recover_steps": pr.recover_steps,
           "candidate": candidate, "engine": engine.engine, "passed": result.passed, "rule": result.rule, "original": result.original,
           "pruned": result.pruned, "table": result.table(), "served": served, "why": why, **chosen, "seconds": time.time() - started}
    state.record("prune", fp, out)
    return {**out, "skipped": False}


def worth_serving(original: dict[str, Any], quantized: dict[str, Any]) -> tuple[bool, str]:
    """Whether a quantised model (that passed its gate) is worth serving over full precision, and why: it decodes
    faster, or within 5% of its speed with a smaller peak memory."""
    o_ms, q_ms = original["decode_ms_per_token"], quantized["decode_ms_per_token"]
    o_mb, q_mb = original["peak_rss_mb"], quantized["peak_rss_mb"]
    speed = f"{q_ms:.1f} ms/token against {o_ms:.1f} for full precision"
    if q_ms < o_ms:
        return True, f"it decodes faster: {speed}"
    if q_ms <= 1.05 * o_ms and q_mb < o_mb:
        return True, f"as fast within 5% ({speed}) with a smaller peak memory ({q_mb:.0f} MB against {o_mb:.0f})"
    return False, f"it decodes slower ({speed}) and does not save memory at equal speed"


def quantize_stage(p: Pipeline, state: State, trained: dict[str, Any], rerun: bool, remote: str | None = None) -> dict[str, Any]:
    """Quantise the trained model with each candidate method behind the gate and choose what to serve: the fastest
    candidate that passed its gate and is worth serving (:func:`worth_serving`), else full precision. ``remote``: the
    pipeline's object-store root, where artifacts are uploaded (``<remote>/quantized/…``) and which the registry's tag
    names. Fails when no candidate passes its gate: nothing is deployed."""
    q = p.config.quantize
    assert q is not None and p.methods
    tried: list[dict[str, Any]] = []
    for method in p.methods:  # the original is measured once (on hone's engine) and compared with every candidate
        baseline = next((t["original_measured"] for t in tried if t.get("original_measured")), None)
        tried.append(_quantize_one(p, state, trained, method, rerun, remote, baseline))
    passed = [t for t in tried if t["passed"]]
    if not passed:
        rules = "; ".join(f"{t['method']}: {t['rule']}" for t in tried)
        raise PipelineError(
            "quantize",
            (f"the {tried[0]['method']} model failed its quality gate ({tried[0]['rule']})" if len(tried) == 1 else
             f"every candidate failed its quality gate ({rules})") + "; nothing was deployed."
            " Loosen quantize.max_loss_increase / max_accuracy_drop knowingly, pick another quantize.method, or drop "
            "the quantize stage to serve full precision",
        )
    decided = [_decide(t, q.require_speedup, quiet=len(tried) > 1) for t in passed]
    served = [d for d in decided if d["served"]]
    best = min(served or decided, key=lambda d: d["quantized"]["decode_ms_per_token"])
    if len(tried) > 1:
        for t in tried:
            verdict = "passed" if t["passed"] else "FAILED"
            say(f"quantize: {t['method']}: gate {verdict} ({t['rule']}), {t['quantized']['decode_ms_per_token']:.1f} ms/token "
                f"against {t['original']['decode_ms_per_token']:.1f} in full precision")
        say(f"quantize: serving the {best['method']} model: {best['why']}" if best["served"] else
            f"quantize: no candidate is worth serving over full precision ({best['why']}): serving full precision")
    candidates = [{k: t[k] for k in ("method", "passed", "rule", "original", "quantized", "artifact")} for t in tried]
    return {**{k: v for k, v in best.items() if k != "original_measured"}, "candidates": candidates}


def _quantize_one(p: Pipeline, state: State, trained: dict[str, Any], method: str, rerun: bool, remote: str | None,
                  baseline: dict[str, float] | None = None) -> dict[str, Any]:
    """One candidate: quantised and gated (or reused: same model, method and gate as a passed earlier run)."""
    from hone.quantize import GateThresholds, quantize

    q = p.config.quantize
    assert q is not None
    ref = trained["model"]
    key = "quantize" if len(p.methods) == 1 else f"quantize:{method}"
    fp = fingerprint({"model": ref, "export": trained["export"], "method": method,
                      **q.model_dump(exclude={"method"})})

    def exists(out: dict[str, Any]) -> bool:
        info = json.loads((Path(out["artifact"]) / QUANTIZED_INFO).read_text())
        return (info.get("gate") or {}).get("passed") is True

    reused = None if rerun else state.reusable(key, fp, exists)
    if reused is not None:
        reg = registry.resolve_model_ref(ref)  # the serve stage finds the artifact through this tag
        registry.tag_version(
            reg["name"], reg["version"], {f"hone.quantized.{method}": reused["artifact"], f"hone.quantized.{method}.gate": "passed"}
        )
        say(f"quantize: reusing {reused['artifact']} (same model, method and gate since {state.data[key]['at']})")
        return {**reused, "skipped": True}
    started = time.time()
    target = None
    if remote:
        from hone.artifacts import quantized_dir, resolve_ref

        target = storage.join(remote, "quantized", quantized_dir(resolve_ref(ref), method).name)
    result = quantize(ref, method, n=q.eval_rows, thresholds=GateThresholds(q.max_loss_increase, q.max_accuracy_drop), out=target,
                      calibration_rows=q.calibration_rows, original=baseline)
    print(result.table(), flush=True)
    out = {
        "method": method,
        "artifact": str(result.artifact),
        "passed": result.passed,
        "rule": result.gate["rule"],
        "original": result.original,
        "quantized": result.quantized,
        "table": result.table(),
        "seconds": time.time() - started,
    }
    state.record(key, fp, out, ok=result.passed)
    return {**out, "skipped": False, "original_measured": result.measured_original}


def _decide(out: dict[str, Any], required: bool, quiet: bool = False) -> dict[str, Any]:
    worth, why = worth_serving(out["original"], out["quantized"])
    serve_it = worth or not required
    if not quiet:
        say(f"quantize: serving the {out['method']} model: {why if worth else 'quantize.require_speedup is off'}" if serve_it else
            f"quantize: the {out['method']} model passed its gate, but {why}: serving full precision "
            "(quantize.require_speedup: false serves it anyway)")
    return {**out, "served": serve_it, "why": why}


def serve_stage(p: Pipeline, trained: dict[str, Any], address: str | None, remote: bool,
                quantization: str = "none") -> tuple[ServeConfig, dict[str, Any]]:
    """Deploy the trained model, quantised with ``quantization`` (the quantize stage's choice) or in full precision."""
    from hone.serving.runner import serve

    # the name clients call stays the pipeline's, whichever model (pruned or not) the earlier stages chose
    cfg = p.serve.model_copy(update={"model": trained["model"], "quantization": quantization, "served_model_name": p.serve.served_name()})
    started = time.time()
    try:
        spec = serve(cfg, address=address, block=False, access_log=False)
    except Exception as e:  # deployment errors become the stage's reason
        raise PipelineError("serve", str(e)) from e
    auto = cfg.autoscaling_config
    replicas = (
        f"autoscaling {auto.get('min_replicas', 1)}-{auto.get('max_replicas', 1)} replicas"
        if auto
        else f"{cfg.num_replicas or 1} replica(s)"
    )
    return cfg, {
        "served_name": cfg.served_name(),
        "model": cfg.model,
        "quantization": cfg.quantization,
        "engine": spec.engine,
        "engine_reason": spec.engine_reason,
        "replicas": replicas,
        "seconds": time.time() - started,
        "url": base_url(cfg, remote),
    }


def base_url(cfg: ServeConfig, remote: bool = False) -> str:
    """Where clients reach the endpoint: this machine for a local Ray; the head node (the GCS host) on a
    cluster, whose proxy must then listen beyond loopback (serve.host: 0.0.0.0)."""
    host = cfg.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
        if remote:
            import ray

            host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
