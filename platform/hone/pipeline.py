"""``hone pipeline``: declared stages from a job to a smoke-tested endpoint.

    train (one run, or a Ray Tune sweep) → registry version → quantise behind the quality gate
    → deploy on Ray Serve → smoke-test the endpoint through the ``openai`` client

A pipeline YAML names a job file and says how each later stage behaves; everything is validated
(the job, the serve settings, the quantisation method) before any Ray work. Each stage's output is
the next one's input through the model registry: the trained/winning export becomes
``models:/NAME/VERSION``, the quantised artifact is a tag on that version, and the deployment
serves that version with that quantisation.

The pipeline directory (``<storage>/<name>-pipeline/``) keeps ``state.json``, a fingerprint of
each stage's inputs with what it produced: a re-run skips training and quantisation (and the
untuned baseline) when their inputs are unchanged and their outputs still exist. A failed stage
stops the pipeline with its reason; nothing after it runs. ``summary.json`` holds the last run's
summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml
from pydantic import Field, ValidationError

from hone.config import (JobConfig, JobConfigError, Problem, _problems_from_validation, _Section, _set_path, load_job,
                         parse_overrides)
from hone.quantize import METHODS
from hone.serving.config import ServeConfig, ServeConfigError, validate_serve_config

__all__ = ["Pipeline", "PipelineConfig", "PipelineConfigError", "PipelineError", "PipelineResult", "load_pipeline",
           "run_pipeline", "format_summary"]


class PipelineConfigError(JobConfigError):
    """A pipeline YAML failed validation; ``problems`` lists every problem with its path."""

    what = "the pipeline"


class PipelineError(RuntimeError):
    """A stage failed; the pipeline stopped there."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        super().__init__(f"pipeline stopped at stage {stage}: {reason}")


# --------------------------------------------------------------------------- schema


class TrainStage(_Section):
    """Stage 1: one training run, or a Ray Tune sweep over the job's ``tune:`` section."""

    job: str
    """The job YAML, relative to the pipeline file."""
    overrides: list[str] = Field(default_factory=list)
    """``key.path=value`` overrides applied to the job, as on the command line."""
    sweep: bool | None = None
    """Run the job's ``tune:`` section (default: when the job has one) rather than one training run."""


class QuantizeStage(_Section):
    """Stage 2: quantise the trained model and compare it with the original (``hone quantize``)."""

    method: Literal[METHODS] | None = None  # type: ignore[valid-type]
    """Quantisation method (default: int8-dynamic on CPU, int8-weight-only on GPU)."""
    eval_rows: int = Field(default=64, ge=1)
    """Validation rows the quality gate evaluates both models on."""
    max_loss_increase: float | None = 0.01
    """Allowed relative eval-loss increase (causal LM); null: not checked."""
    max_accuracy_drop: float | None = 0.01
    """Allowed accuracy drop as a fraction (classification accuracy, or generated-answer accuracy); null: not checked."""


class SmokeTestStage(_Section):
    """Stage 4: held-out rows sent to the endpoint through the ``openai`` client; every request must succeed."""

    split: Literal["validation", "test"] = "test"
    """Held-out split the requests come from."""
    requests: int = Field(default=100, ge=1)
    """Rows sent (the first N of the split)."""
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once."""
    max_tokens: int = Field(default=12, ge=1)
    """``max_tokens`` of each request (also what the untuned model gets)."""
    compare_untuned: bool = True
    """Also measure the untuned base model on the same rows (in this process, greedy) for comparison."""
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Fail the pipeline when the endpoint answers fewer than this fraction right."""


class PipelineConfig(_Section):
    """A pipeline: train → quantise → serve → smoke test, each stage feeding the next through the registry."""

    name: str
    """Pipeline name (its directory under the storage path; the Ray Serve application name by default)."""
    train: TrainStage
    quantize: QuantizeStage | None = None
    """Omit to serve the trained model in full precision."""
    serve: dict[str, Any] = Field(default_factory=dict)
    """Serve YAML settings (``hone serve``'s schema) except ``model`` and ``quantization``, which come from the earlier stages."""
    smoke_test: SmokeTestStage | None = Field(default_factory=SmokeTestStage)
    """Omit (null) to deploy without a smoke test."""


@dataclass
class Pipeline:
    """A validated pipeline: its config, the resolved job and the serve config it deploys."""

    config: PipelineConfig
    job: JobConfig
    serve: ServeConfig
    sweep: bool
    method: str | None
    source: str

    @property
    def registered_model(self) -> str:
        return _registered_name(self.job, self.sweep)


def _registered_name(job: JobConfig, sweep: bool) -> str:
    return (job.tune.registered_model if sweep and job.tune else None) or job.name


def load_pipeline(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Pipeline:
    """Read and validate a pipeline YAML with every file it names; no Ray work."""
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError([Problem("", f"pipeline file {str(path)!r} does not exist")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineConfigError([Problem("", f"not valid YAML: {e}")], str(path)) from None
    if not isinstance(raw, dict):
        raise PipelineConfigError([Problem("", f"a pipeline must be a mapping of stages, got {type(raw).__name__}")], str(path))
    raw.setdefault("name", path.stem)
    pairs, problems = parse_overrides(overrides, PipelineConfig)
    for key, value in pairs:
        _set_path(raw, key, value)
    if problems:
        raise PipelineConfigError(problems, str(path))
    problems: list[Problem] = []
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = _problems_from_validation(e, raw, PipelineConfig)
        train = raw.get("train")
        if isinstance(train, dict) and isinstance(train.get("job"), str):  # report the job's problems too
            problems += _job_problems(path, train["job"], train.get("overrides") or [])[1]
        raise PipelineConfigError(problems, str(path)) from None

    job, job_problems = _job_problems(path, cfg.train.job, cfg.train.overrides)
    if job is None:
        raise PipelineConfigError(job_problems, str(path))
    job_path = _job_path(path, cfg.train.job)
    sweep = cfg.train.sweep if cfg.train.sweep is not None else job.tune is not None
    if sweep and (job.tune is None or not job.tune.search_space):
        problems.append(Problem("train.sweep", f"the job {job_path} has no tune.search_space to sweep",
                                "add a tune: section to the job, or set train.sweep: false for one training run"))
    method = None
    if cfg.quantize is not None:
        import torch

        from hone.quantize import CPU_DEFAULT, GPU_DEFAULT, GateThresholds, QuantizeError, _check_method

        method = cfg.quantize.method or (GPU_DEFAULT if torch.cuda.is_available() else CPU_DEFAULT)
        try:
            _check_method(method)
        except QuantizeError as e:
            problems.append(Problem("quantize.method", str(e)))
        try:
            GateThresholds(cfg.quantize.max_loss_increase, cfg.quantize.max_accuracy_drop)
        except QuantizeError as e:
            problems.append(Problem("quantize", str(e), "give max_loss_increase or max_accuracy_drop"))
    for key in ("model", "quantization"):
        if key in cfg.serve:
            problems.append(Problem(f"serve.{key}", "comes from the earlier stages (the trained model and quantize.method)",
                                    f"remove serve.{key}"))
    serve_raw = {"name": cfg.name, **{k: v for k, v in cfg.serve.items() if k not in ("model", "quantization")},
                 "model": f"models:/{_registered_name(job, sweep)}@winner", "quantization": method or "none"}
    serve_cfg = None
    try:
        serve_cfg = validate_serve_config(serve_raw)
    except ServeConfigError as e:
        problems += [Problem(f"serve.{p.path}" if p.path else "serve", p.message, p.hint) for p in e.problems]
    if cfg.smoke_test is not None and cfg.serve.get("api_keys_file") and not os.environ.get("HONE_API_KEYS"):
        problems.append(Problem("smoke_test", "the endpoint will require an API key and only key hashes are configured "
                                              "(serve.api_keys_file)", "set HONE_API_KEYS to a key for the smoke test to send"))
    if cfg.smoke_test is not None and job.task.type == "causal_lm" and job.data.format == "text":
        problems.append(Problem("smoke_test", "the job's data (format text) has no prompts and answers to send",
                                "use instruction/chat data, or smoke_test: null"))
    if problems:
        raise PipelineConfigError(problems, str(path))
    assert serve_cfg is not None
    return Pipeline(cfg, job, serve_cfg, sweep, method, str(path))


def _job_path(pipeline: Path, job: str) -> Path:
    return Path(job) if Path(job).is_absolute() else pipeline.parent / job


def _job_problems(pipeline: Path, job: str, overrides: Sequence[str]) -> tuple[JobConfig | None, list[Problem]]:
    job_path = _job_path(pipeline, job)
    try:
        return load_job(job_path, list(overrides)), []
    except JobConfigError as e:
        return None, [Problem(f"train.job → {job_path}" + (f": {p.path}" if p.path else ""), p.message, p.hint) for p in e.problems]


# --------------------------------------------------------------------------- state


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    """``state.json``: per stage, the fingerprint of its inputs and its output (written atomically)."""

    def __init__(self, folder: Path):
        self.path = folder / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def reusable(self, stage: str, fingerprint: str, exists: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        entry = self.data.get(stage)
        if entry and entry.get("fingerprint") == fingerprint and entry.get("ok"):
            try:
                if exists(entry["output"]):
                    return entry["output"]
            except Exception:  # noqa: BLE001 - a vanished output means: run the stage again
                return None
        return None

    def record(self, stage: str, fingerprint: str, output: dict[str, Any], *, ok: bool = True) -> None:
        self.data[stage] = {"fingerprint": fingerprint, "ok": ok, "output": output, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


# --------------------------------------------------------------------------- result


@dataclass
class PipelineResult:
    name: str
    folder: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per stage: ``skipped`` (bool), ``seconds`` and the stage's own figures."""
    wall_s: float = 0.0
    endpoint: str | None = None
    dashboard: str | None = None
    metrics_url: str | None = None


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def format_summary(result: PipelineResult) -> str:
    """The closing summary: trials, gate figures, accuracy, latency/throughput, and where to look."""
    lines = [f"━━ hone pipeline {result.name}: done in {_duration(result.wall_s)} ━━"]
    st = result.stages
    tr = st.get("train", {})
    if tr:
        again = " (reused: same inputs)" if tr.get("skipped") else f" ({_duration(tr['seconds'])})"
        if tr.get("sweep"):
            trials = tr["trials"]
            stopped = sum(1 for t in trials if t["status"] != "completed")
            w = tr["winner"]
            params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in w["params"].items())
            lines.append(f"train     sweep of {len(trials)} trials, {stopped} stopped early{again}; winner {w['trial']}: {params}, "
                         f"{tr['metric']} {w['value']:.4g}")
            lines += ["          " + row for row in tr["table"].splitlines()]
        else:
            lines.append(f"train     one run{again}: {tr['metric']} {tr['value']:.4g}")
        lines.append(f"          registered {tr['model']} (@winner)")
    q = st.get("quantize")
    if q:
        again = " (reused: same inputs)" if q.get("skipped") else f" ({_duration(q['seconds'])})"
        lines.append(f"quantize  {q['method']}, quality gate {'PASSED' if q['passed'] else 'FAILED'}{again}: {q['rule']}")
        lines += ["          " + row for row in q["table"].splitlines()[:-1]]
    elif tr:
        lines.append("quantize  (not in this pipeline: served in full precision)")
    sv = st.get("serve")
    if sv:
        lines.append(f"serve     {sv['served_name']} = {sv['model']} ({sv['quantization']}), {sv['replicas']} "
                     f"(ready in {_duration(sv['seconds'])})")
    sm = st.get("smoke_test")
    if sm:
        lines.append(f"smoke     {sm['requests']} held-out {sm['split']} rows through the openai client, {sm['concurrency']} concurrent: "
                     f"{sm['ok']}/{sm['requests']} answered")
        if sm.get("accuracy") is not None:
            untuned = sm.get("untuned_accuracy")
            lines.append(f"          accuracy    untuned {_pct(untuned)} → served {_pct(sm['accuracy'])}" if untuned is not None
                         else f"          accuracy    served {_pct(sm['accuracy'])}")
        lines.append(f"          latency     p50 {sm['latency_p50_s']:.2f} s, p95 {sm['latency_p95_s']:.2f} s"
                     + (f"; first token {sm['ttft_s']:.2f} s (streamed)" if sm.get("ttft_s") is not None else ""))
        lines.append(f"          throughput  {sm['requests_per_s']:.2f} requests/s, {sm['completion_tokens_per_s']:.1f} completion tokens/s"
                     + (f"; replicas seen {sm['replicas_seen']}" if sm.get("replicas_seen") else ""))
        if sm.get("examples"):
            for ex in sm["examples"]:
                mark = "" if ex.get("correct") is None else ("✓ " if ex["correct"] else "✗ ")
                lines.append(f"          {mark}expected {ex['expected']!r:12} answered {ex['answered']!r}")
    where = []
    if result.endpoint:
        where.append(f"endpoint  {result.endpoint}")
    if result.dashboard:
        where.append(f"dashboard {result.dashboard}")
    if result.metrics_url:
        where.append(f"metrics   {result.metrics_url}  (Prometheus; hone_* series appear as ray_hone_*)")
    if tr.get("sweep_dir"):
        where.append(f"plots     {tr['sweep_dir']}/metric_vs_step.png, params_vs_metric.png (trials.csv, trials.json)")
    where.append(f"state     {result.folder}/state.json, summary.json")
    lines += ["where     " + where[0], *("          " + w for w in where[1:])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- stages


def _say(msg: str) -> None:
    print(f"[hone] {msg}", flush=True)


def _banner(i: int, n: int, stage: str, what: str) -> None:
    print(f"\n━━ [{i}/{n}] {stage}: {what}", flush=True)


def _train_stage(p: Pipeline, state: _State, storage: Path, address: str | None, rerun: bool) -> dict[str, Any]:
    from hone import registry
    from hone.train import train
    from hone.tune import format_table, sweep

    job = p.job
    inputs = job.to_dict()
    inputs["training"]["storage_path"] = None  # where runs are written is not an input of the result
    fp = _fingerprint({"job": inputs, "sweep": p.sweep})

    def exists(out: dict[str, Any]) -> bool:
        return Path(registry.resolve_model_ref(out["model"])["source"]).is_dir()

    reused = None if rerun else state.reusable("train", fp, exists)
    if reused is not None:
        _say(f"train: reusing {reused['model']} (the job and its overrides are unchanged since {state.data['train']['at']})")
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
        out = {"sweep": True, "sweep_dir": str(result.sweep_dir), "metric": metric, "model": f"models:/{name}/{result.registered['version']}",
               "export": str(result.winner["export"]), "table": format_table(result.trials, job, result.winner),
               "trials": [{"trial": r["trial"], "params": r["params"], "value": r[metric], "steps": r["steps"], "status": r["status"]}
                          for r in result.trials],
               "winner": {"trial": result.winner["trial"], "params": result.winner["params"], "value": result.winner[metric]}}
    else:
        run = train(job, address=address, storage_path=str(storage), track=True)
        if run.export_dir is None or run.mlflow_run_id is None:
            raise PipelineError("train", f"the run {run.run_dir} wrote no export to register")
        metric = job.training.eval_metric if "eval_loss" in run.metrics else "loss"
        value = float(run.metrics.get(metric, run.metrics.get("loss", float("nan"))))
        version = registry.register_winner(name, run.mlflow_run_id, run.export_dir, metric, value)
        out = {"sweep": False, "run_dir": str(run.run_dir), "metric": metric, "value": value, "model": f"models:/{name}/{version}",
               "export": str(run.export_dir)}
    out["seconds"] = time.time() - started
    state.record("train", fp, out)
    return {**out, "skipped": False}


def _quantize_stage(p: Pipeline, state: _State, trained: dict[str, Any], rerun: bool) -> dict[str, Any]:
    from hone.quantize import INFO_FILE, GateThresholds, quantize
    from hone.registry import resolve_model_ref, tag_version

    q = p.config.quantize
    assert q is not None and p.method is not None
    ref = trained["model"]
    fp = _fingerprint({"model": ref, "export": trained["export"], "method": p.method, **q.model_dump()})

    def exists(out: dict[str, Any]) -> bool:
        info = json.loads((Path(out["artifact"]) / INFO_FILE).read_text())
        return (info.get("gate") or {}).get("passed") is True

    reused = None if rerun else state.reusable("quantize", fp, exists)
    if reused is not None:
        reg = resolve_model_ref(ref)  # the serve stage finds the artifact through this tag
        tag_version(reg["name"], reg["version"], {f"hone.quantized.{p.method}": reused["artifact"],
                                                  f"hone.quantized.{p.method}.gate": "passed"})
        _say(f"quantize: reusing {reused['artifact']} (same model, method and gate since {state.data['quantize']['at']})")
        return {**reused, "skipped": True}
    started = time.time()
    result = quantize(ref, p.method, n=q.eval_rows, thresholds=GateThresholds(q.max_loss_increase, q.max_accuracy_drop))
    print(result.table(), flush=True)
    out = {"method": p.method, "artifact": str(result.artifact), "passed": result.passed, "rule": result.gate["rule"],
           "original": result.original, "quantized": result.quantized, "table": result.table(), "seconds": time.time() - started}
    state.record("quantize", fp, out, ok=result.passed)
    if not result.passed:
        raise PipelineError("quantize", f"the {p.method} model failed its quality gate ({result.gate['rule']}); nothing was deployed. "
                                        f"Loosen quantize.max_loss_increase / max_accuracy_drop knowingly, pick another "
                                        f"quantize.method, or drop the quantize stage to serve full precision")
    return {**out, "skipped": False}


def _serve_stage(p: Pipeline, trained: dict[str, Any], address: str | None, remote: bool) -> tuple[ServeConfig, dict[str, Any]]:
    from hone.serving.runner import serve

    cfg = p.serve.model_copy(update={"model": trained["model"]})
    started = time.time()
    try:
        serve(cfg, address=address, block=False, access_log=False)
    except Exception as e:  # noqa: BLE001 - deployment errors become the stage's reason
        raise PipelineError("serve", str(e)) from e
    auto = cfg.autoscaling_config
    replicas = (f"autoscaling {auto.get('min_replicas', 1)}-{auto.get('max_replicas', 1)} replicas" if auto
                else f"{cfg.num_replicas or 1} replica(s)")
    return cfg, {"served_name": cfg.served_name(), "model": cfg.model, "quantization": cfg.quantization, "replicas": replicas,
                 "seconds": time.time() - started, "url": _base_url(cfg, remote)}


def _base_url(cfg: ServeConfig, remote: bool = False) -> str:
    """Where clients reach the endpoint: this machine for a local Ray; the head node (the GCS host) on a
    cluster, whose proxy must then listen beyond loopback (serve.host: 0.0.0.0)."""
    host = cfg.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
        if remote:
            import ray

            host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _untuned_accuracy(p: Pipeline, state: _State, rows: list[dict[str, Any]], rerun: bool) -> float:
    """The base model's greedy answers to the same rows, in this process (cached in the state)."""
    from hone.data import load_tokenizer
    from hone.modeling import generation_accuracy, load_base_model

    sm = p.config.smoke_test
    assert sm is not None
    fp = _fingerprint({"model": p.job.model.model_dump(), "data": p.job.data.model_dump(), "split": sm.split, "n": len(rows),
                       "max_tokens": sm.max_tokens})
    reused = None if rerun else state.reusable("untuned", fp, lambda out: True)
    if reused is not None:
        return float(reused["accuracy"])
    _say(f"smoke test: answering the {len(rows)} rows with the untuned {p.job.model.name} for comparison")
    tokenizer = load_tokenizer(p.job)
    model = load_base_model(p.job).eval()
    accuracy, _ = generation_accuracy(model, tokenizer, rows, p.job, max_new_tokens=sm.max_tokens)
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

    def __enter__(self) -> "_ReplicaWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _api_key() -> str:
    keys = [k.strip() for k in os.environ.get("HONE_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else "no-key"


def _smoke_stage(p: Pipeline, state: _State, cfg: ServeConfig, base: str, rerun: bool) -> dict[str, Any]:
    import httpx
    import openai

    from hone.data import load_splits, load_tokenizer, prompt_and_answer, prompt_messages
    from hone.modeling import answer_matches

    sm = p.config.smoke_test
    assert sm is not None
    job = p.job
    splits = load_splits(job.data.model_copy(update={sm.split: getattr(job.data, sm.split) or 0.1, "max_eval_samples": None}))
    if sm.split not in splits:
        raise PipelineError("smoke_test", f"the job's data has no {sm.split} split")
    rows = [dict(r) for r in splits[sm.split].select(range(min(sm.requests, len(splits[sm.split]))))]
    classify = job.task.type == "sequence_classification"
    chat = not classify and not (job.data.format == "alpaca" and job.data.prompt_template == "alpaca")
    untuned = _untuned_accuracy(p, state, rows, rerun) if sm.compare_untuned and not classify else None

    client = openai.OpenAI(base_url=base + "/v1", api_key=_api_key(), max_retries=6, timeout=300)
    served = cfg.served_name()
    listed = [m.id for m in client.models.list().data]
    if served not in listed:
        raise PipelineError("smoke_test", f"/v1/models lists {listed}, not {served!r}")
    tokenizer = None if chat or classify else load_tokenizer(job)
    labels = list(job.task.labels or []) if classify else []

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
                r = client.chat.completions.create(model=served, messages=messages, max_tokens=sm.max_tokens, temperature=0)
                text, tokens = r.choices[0].message.content or "", r.usage.completion_tokens if r.usage else 0
            else:
                prompt, expected = prompt_and_answer(row, job.data, tokenizer)
                r = client.completions.create(model=served, prompt=prompt, max_tokens=sm.max_tokens, temperature=0)
                text, tokens = r.choices[0].text, r.usage.completion_tokens if r.usage else 0
            return {"ok": True, "text": text, "expected": expected, "tokens": tokens, "latency": time.perf_counter() - started}
        except Exception as e:  # noqa: BLE001 - counted and reported below
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "latency": time.perf_counter() - started}

    _say(f"smoke test: {len(rows)} held-out {sm.split} rows → {base}/v1 ({sm.concurrency} concurrent)")
    started = time.perf_counter()
    answers: list[dict[str, Any]] = []
    with _ReplicaWatch(cfg.name) as watch, ThreadPoolExecutor(sm.concurrency) as pool:
        futures = [pool.submit(one, row) for row in rows]
        for i, future in enumerate(futures, 1):  # in order: the answers line up with the rows
            answers.append(future.result())
            if i % max(1, len(rows) // 4) == 0 and i < len(rows):
                _say(f"smoke test: {i}/{len(rows)} answered ({time.perf_counter() - started:.0f} s)")
    wall = time.perf_counter() - started
    ttft = None
    if not classify:  # one streamed request: time to the first content
        messages, _ = prompt_messages(rows[0], job.data) if chat else ([], "")
        t0 = time.perf_counter()
        stream = (client.chat.completions.create(model=served, messages=messages, max_tokens=sm.max_tokens, temperature=0, stream=True)
                  if chat else client.completions.create(model=served, prompt=prompt_and_answer(rows[0], job.data, tokenizer)[0],
                                                         max_tokens=sm.max_tokens, temperature=0, stream=True))
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
           "examples": [{"expected": a["expected"], "answered": a["text"], "correct": c} for a, c in zip(ok[:3], correct)]}
    if failed:
        raise PipelineError("smoke_test", f"{len(failed)} of {len(rows)} requests failed; first: {failed[0]['error']}")
    if sm.min_accuracy is not None and (accuracy or 0.0) < sm.min_accuracy:
        raise PipelineError("smoke_test", f"the endpoint answered {_pct(accuracy)} right, below smoke_test.min_accuracy "
                                          f"{_pct(sm.min_accuracy)}")
    return out


# --------------------------------------------------------------------------- driver


def _cpus(p: Pipeline) -> float:
    """Extra logical CPUs a local session needs beyond the job's workers: the sweep's spare CPU or the replicas."""
    from hone.serving.runner import _cpus_needed
    from hone.tune import _DATA_TASK_CPU, _TRIAL_DRIVER_CPU

    workers = p.job.distributed.num_workers * p.job.distributed.resources_per_worker.get("CPU", 1.0)
    tune_extra = _TRIAL_DRIVER_CPU + _DATA_TASK_CPU if p.sweep else 0.0
    return max(tune_extra, _cpus_needed(p.serve) - workers, 0.0)


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "in use"
        try:
            sock.bind(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port))
        except OSError:
            return False
    return True


def run_pipeline(p: Pipeline, *, address: str | None = None, storage_path: str | None = None, keep_serving: bool = False,
                 rerun: bool = False, on_ready: Callable[[PipelineResult], None] | None = None) -> PipelineResult:
    """Run the stages in order on one Ray session (local embedded unless ``address``/``RAY_ADDRESS``).

    Returns after the smoke test with everything it started shut down, unless ``keep_serving``:
    then a local endpoint is served until SIGINT/SIGTERM, a cluster's is left deployed.
    """
    from hone.serving.runner import _dashboard_url, _stop_event, serving_session
    from hone.train import default_storage

    cfg = p.config
    remote = bool(address or os.environ.get("RAY_ADDRESS"))
    if not remote:  # a busy port would only show after the sweep: check now
        for key in ("port", "metrics_export_port"):
            port = getattr(p.serve, key)
            if not _port_free(p.serve.host, port):
                raise PipelineConfigError([Problem(f"serve.{key}", f"port {port} on {p.serve.host} is already in use",
                                                   f"pass serve.{key}=N with a free port")], p.source)
    storage = Path(storage_path or p.job.training.storage_path or default_storage()).expanduser().resolve()
    folder = storage / f"{cfg.name}-pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    state = _State(folder)
    result = PipelineResult(cfg.name, folder)
    stages = ["train"] + (["quantize"] if cfg.quantize else []) + ["serve"] + (["smoke_test"] if cfg.smoke_test else [])
    n = len(stages)
    started = time.time()
    with serving_session(p.serve, p.job, address, _cpus(p)):
        import ray
        from ray import serve as ray_serve

        deployed = False
        try:
            what = (f"Ray Tune sweep over {', '.join(p.job.tune.search_space)} ({p.job.tune.scheduler}, {p.job.tune.searcher})"
                    if p.sweep and p.job.tune else "one training run")
            _banner(1, n, "train", f"{what}: {p.job.name}, {p.job.method.type} on {p.job.model.name}, {p.job.distributed.num_workers} "
                                  f"workers {'ZeRO-' + str(p.job.distributed.deepspeed.stage) if p.job.distributed.deepspeed else 'DDP'}")
            result.stages["train"] = trained = _train_stage(p, state, storage, address, rerun)
            i = 2
            if cfg.quantize:
                _banner(i, n, "quantize", f"{trained['model']} with {p.method} behind the quality gate ({cfg.quantize.eval_rows} rows)")
                result.stages["quantize"] = _quantize_stage(p, state, trained, rerun)
                i += 1
            _banner(i, n, "serve", f"{trained['model']} on Ray Serve")
            serve_cfg, served = _serve_stage(p, trained, address, remote)
            deployed = True
            result.stages["serve"] = served
            result.endpoint = served["url"] + "/v1"
            dashboard = _dashboard_url(ray)
            result.dashboard = f"http://{dashboard}" if dashboard else None
            if not remote:
                result.metrics_url = f"http://127.0.0.1:{p.serve.metrics_export_port}/metrics"
            if cfg.smoke_test:
                _banner(i + 1, n, "smoke_test", f"{cfg.smoke_test.requests} held-out {cfg.smoke_test.split} rows through the openai client")
                result.stages["smoke_test"] = _smoke_stage(p, state, serve_cfg, served["url"], rerun)
            result.wall_s = time.time() - started
            (folder / "summary.json").write_text(json.dumps({**result.__dict__, "folder": str(folder)}, indent=2, default=str))
            if on_ready:
                on_ready(result)
            if keep_serving and not remote:
                stop = _stop_event()
                _say(f"serving {result.endpoint} until Ctrl-C")
                while not stop.wait(0.5):
                    pass
        except PipelineError:
            raise
        except Exception as e:  # noqa: BLE001 - name the stage that failed
            stage = next((s for s in stages if s not in result.stages), stages[-1])
            raise PipelineError(stage, f"{type(e).__name__}: {e}") from e
        finally:
            if deployed and not (keep_serving and remote):
                try:
                    ray_serve.delete(p.serve.name) if remote else ray_serve.shutdown()
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
    return result
