"""The ``hone`` command line. Each subcommand is a thin wrapper over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hone import assets
from hone.config import KINDS, METHODS, ConfigError, json_schema, load_file, load_job

EXIT_INVALID = 2


def _cmd_validate(args: argparse.Namespace) -> int:
    kind, cfg = load_file(args.file, args.overrides)
    if args.print:
        print(cfg.to_yaml(), end="")
    print(f"ok: {args.file} — {cfg.summary()}", file=sys.stderr if args.print else sys.stdout)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from hone.config import reference_markdown

    text = reference_markdown(args.kind).rstrip() if args.markdown else json.dumps(json_schema(args.kind), indent=2)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from hone.data import preview

    job = load_job(args.job, args.overrides)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(preview(job, n=args.n, split=args.split, color=color))
    return 0


def _job_or_resume(args: argparse.Namespace, command: str, what: str) -> Any:
    """The validated job, or None when resuming (a resumed run/sweep keeps its own job.yaml)."""
    if args.resume and args.job:
        raise SystemExit(f"hone {command}: give a job file or --resume {what}, not both (a resumed {what.lower()} keeps its own job.yaml)")
    if not args.resume and not args.job:
        raise SystemExit(f"hone {command}: give a job file (or --resume {what})")
    return None if args.resume else load_job(args.job, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from hone.training import train

    job = _job_or_resume(args, "train", "RUN")
    result = train(job, resume=args.resume, address=args.address, storage_path=args.storage_path)
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("loss", "eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1") if k in m)
    print(f"done: {result.run_dir.name} — step {m.get('step')}/{m.get('total_steps')}, {shown}")
    if result.export_dir:
        print(f"export: {result.export_dir}")
    if result.merged_dir:
        print(f"merged: {result.merged_dir}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from hone.tune import format_table, sweep

    job = _job_or_resume(args, "tune", "SWEEP")
    result = sweep(job, resume=args.resume, address=args.address, storage_path=args.storage_path)
    swept = load_job(result.sweep_dir / "job.yaml", check_paths=False)
    print(format_table(result.trials, swept, result.winner))
    print(f"sweep: {result.sweep_dir}  (trials.csv, trials.json, metric_vs_step.png, params_vs_metric.png)")
    if result.winner:
        print(f"winner: trial {result.winner['trial']} {swept.tune.metric} {result.winner[swept.tune.metric]:.5g} "
              f"params {result.winner['params']}")
    if result.registered:
        r = result.registered
        where = "now points at it" if r["alias_moved"] else f"stays on v{r['alias_version']} (not beaten; hone models promote moves it)"
        print(f"registered: {r['ref']}; models:/{r['name']}@{r['alias']} {where}")
    return 0 if result.winner else 1


def _cmd_models(args: argparse.Namespace) -> int:
    from hone import registry

    if args.models_command == "list":
        models = registry.list_models()
        if not models:
            print(f"no registered models (tracking URI {registry.tracking_uri()})")
        for m in models:
            aliases = ", ".join(f"@{a}→v{v}" for a, v in sorted(m["aliases"].items()))
            print(f"{m['name']:32s} latest v{m['latest']}  {aliases}")
    elif args.models_command == "show":
        for v in registry.show_model(args.name):
            aliases = " ".join("@" + a for a in v["aliases"])
            metrics = ", ".join(f"{k} {val:.4g}" for k, val in sorted(v["metrics"].items()) if k.startswith("final_"))
            print(f"v{v['version']} {aliases}\n  source: {v['source']}\n  metrics: {metrics}")
            for k, val in sorted(v["lineage"].items()):
                print(f"  {k}: {val}")
    elif args.models_command == "trust":
        from hone.artifacts import check_model_source

        ref = f"models:/{args.name}/{args.version}"
        check_model_source(ref, registry.resolve_model_ref(ref)["source"])
        digest = registry.record_content(args.name, args.version)
        print(f"{ref}: recorded its content (sha256 {digest[:12]}...); it loads while its files stay exactly these")
    else:
        registry.promote(args.name, args.version, args.alias)
        print(f"models:/{args.name}@{args.alias} → version {args.version}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an export (or a run's export, or its untuned base) on a held-out split."""
    from hone.evaluation import evaluate_model

    report = evaluate_model(args.target, split=args.split, n=args.n, base=args.base, max_new_tokens=args.max_new_tokens)
    for r in report.examples[: args.show]:
        print(f"  expected {r['expected']!r:12} generated {r['generated']!r}")
    print(report.line())
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Quantise a model behind the quality gate; exit 3 when the gate fails."""
    from hone.quantize import GateThresholds, quantize

    job = load_job(args.job, check_paths=False) if args.job else None
    thresholds = GateThresholds(max_relative_loss_increase=args.max_loss_increase, max_accuracy_drop=args.max_accuracy_drop)
    result = quantize(args.model, args.method, out=args.out, n=args.n, thresholds=thresholds, job=job,
                      calibration_rows=args.calibration_rows)
    print(result.table())
    print(f"[hone] artifact: {result.artifact}")
    if not result.passed:
        print("[hone] the quality gate FAILED: `hone serve` refuses this artifact unless --allow-failed-gate", file=sys.stderr)
        return 3
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Deploy a serve YAML on Ray Serve (or write the plain Ray Serve config)."""
    import yaml

    from hone.config import load_serve_config

    overrides = list(args.overrides)
    if args.port:
        overrides.append(f"port={args.port}")
    if args.allow_failed_gate:
        overrides.append("allow_failed_gate=true")
    cfg = load_serve_config(args.config, overrides)
    if args.emit_serve_config is not None:
        from hone.serving.runner import serve_config_document

        text = "# Ray Serve config generated by `hone serve --emit-serve-config` (serve deploy / KubeRay serveConfigV2)\n"
        text += yaml.safe_dump(serve_config_document(cfg), sort_keys=False)
        if args.emit_serve_config == "-":
            print(text, end="")
        else:
            Path(args.emit_serve_config).write_text(text)
            print(f"[hone] wrote {args.emit_serve_config}")
        return 0
    from hone.serving.runner import serve

    serve(cfg, address=args.address, ready_file=args.ready_file)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    """Validate locally, then submit through the Ray Jobs API."""
    from hone.submit import follow_logs, submit

    command = "tune" if args.tune else "serve" if args.serve else "train"
    sub = submit(args.file, args.overrides, address=args.address, command=command, upload=args.upload,
                 shared_paths=args.shared_path or (), storage_path=args.storage_path, submission_id=args.id)
    print(f"[hone] submitted {sub.id} to {sub.address}: {sub.entrypoint}")
    print(f"[hone] follow it: hone jobs logs {sub.id} --follow   (or: ray job logs {sub.id} --address {sub.address} --follow)")
    if args.follow:
        status = follow_logs(args.address, sub.id)
        print(f"[hone] {sub.id}: {status}")
        return 0 if status.endswith("SUCCEEDED") else 1
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    """list | status | logs | stop, over the Ray Jobs API."""
    from hone.submit import follow_logs, job_client

    client = job_client(args.address)
    if args.jobs_command == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'submission id':32} {'status':10} {'hone':6} entrypoint")
        for j in jobs:
            print(f"{(j.submission_id or j.job_id or ''):32} {str(j.status).split('.')[-1]:10} {(j.metadata or {}).get('hone', ''):6} "
                  f"{j.entrypoint}")
        return 0
    if args.jobs_command == "status":
        info = client.get_job_info(args.id)
        print(f"{args.id}: {str(info.status).split('.')[-1]}" + (f" — {info.message}" if info.message else ""))
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            status = follow_logs(args.address, args.id)
            return 0 if status.endswith("SUCCEEDED") else 1
        print(client.get_job_logs(args.id), end="")
        return 0
    stopped = client.stop_job(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'not running'}")
    return 0


def _run_pipeline(path: Path, args: argparse.Namespace) -> int:
    import time

    from hone.pipeline import format_summary, load_pipeline, run_pipeline

    started = time.time()
    pipeline = load_pipeline(path, args.overrides)
    print(f"[hone] {pipeline.summary()} ({path})", flush=True)

    def ready(result: Any) -> None:
        result.wall_s = time.time() - started
        print("\n" + format_summary(result), flush=True)

    run_pipeline(pipeline, address=args.address, storage_path=args.storage_path, keep_serving=args.keep_serving,
                 rerun=args.rerun, on_ready=ready)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """Run a pipeline YAML (train/sweep → quantise → serve → smoke test), or the quickstart's (``--tiny``: the tiny Llama)."""
    from hone.pipeline import quickstart_pipeline

    return _run_pipeline(Path(args.pipeline) if "pipeline" in args else quickstart_pipeline(tiny=args.tiny), args)


def _cmd_compare(args: argparse.Namespace) -> int:
    """Run a comparison YAML: every method trained (or prompted) and scored on the same held-out rows."""
    from hone.comparison import format_table, run_compare
    from hone.config import load_compare, shipped_recipe

    path = args.file or shipped_recipe(f"pipelines/compare-methods-{'tiny' if args.tiny else 'smollm2-sentiment'}.yaml")
    comparison = load_compare(path, args.overrides)
    print(f"[hone] {comparison.summary()} ({path})", flush=True)
    result = run_compare(comparison, address=args.address, storage_path=args.storage_path)
    print("\n" + format_table(result), flush=True)
    return 0 if result.winner else 1


def _cmd_builtins(args: argparse.Namespace) -> int:
    print("models:")
    for name, doc in assets.BUILTIN_MODELS.items():
        print(f"  {name:32s} {doc}")
    print("datasets:")
    for name, doc in assets.BUILTIN_DATASETS.items():
        print(f"  {name:32s} {doc}")
    return 0


def _threshold(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override a field, e.g. training.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hone", description="Fine-tune, tune and serve LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _inspect_commands(sub)
    _training_commands(sub)
    _serving_commands(sub)
    _cluster_commands(sub)
    return parser


def _inspect_commands(sub: Any) -> None:
    """The subcommands for the YAML and the data, before any Ray work."""
    p = sub.add_parser("validate", help="validate a job, serve or pipeline YAML (no Ray work)")
    p.add_argument("file", help="a hone YAML: a job, a serve config or a pipeline (its kind: key, or told by its keys)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override a field, e.g. training.lr=1e-4")
    p.add_argument("--print", action="store_true", help="print the resolved YAML with all defaults")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON schema of a job, serve or pipeline YAML (for editors)")
    p.add_argument("--kind", default="job", choices=KINDS, help="which YAML (default: job)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--markdown", action="store_true", help="the YAML reference as Markdown tables instead")
    p.set_defaults(fn=_cmd_schema)

    p = sub.add_parser("data", help="inspect a job's data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("preview", help="print formatted examples with the trained-on tokens marked")
    _job_args(q)
    q.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    q.add_argument("--split", default="train", choices=["train", "validation", "test"])
    q.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    q.set_defaults(fn=_cmd_data_preview)


def _training_commands(sub: Any) -> None:
    """The subcommands for training, sweeps, the registry and evaluation."""
    p = sub.add_parser("train", help="run a fine-tuning job on Ray Train + DeepSpeed")
    p.add_argument("job", nargs="?", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override a field, e.g. training.lr=1e-4")
    p.add_argument("--resume", metavar="RUN", help="continue a run (its directory, or its name under the storage path)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--storage-path", help="where runs live (default: training.storage_path, else $HONE_HOME/runs)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("tune", help="run a Ray Tune sweep over the job's tune: section; register the winner")
    p.add_argument("job", nargs="?", help="job YAML file with a tune: section")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--resume", metavar="SWEEP", help="continue an interrupted sweep (finished trials are kept)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--storage-path", help="where sweeps live (default: training.storage_path, else $HONE_HOME/runs)")
    p.set_defaults(fn=_cmd_tune)

    p = sub.add_parser("models", help="the model registry (MLflow)")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    models_sub.add_parser("list", help="registered models and their aliases").set_defaults(fn=_cmd_models)
    q = models_sub.add_parser("show", help="versions of a model with metrics and lineage")
    q.add_argument("name")
    q.set_defaults(fn=_cmd_models)
    q = models_sub.add_parser("promote", help="point an alias at a version")
    q.add_argument("name")
    q.add_argument("version", type=int)
    q.add_argument("--alias", default="winner", help="the alias to move (default: winner), whatever the versions' metrics say")
    q.set_defaults(fn=_cmd_models)
    q = models_sub.add_parser("trust", help="record what a version's source holds now as its registered content "
                                            "(a version registered without one, or a source you changed on purpose)")
    q.add_argument("name")
    q.add_argument("version", type=int)
    q.set_defaults(fn=_cmd_models)

    p = sub.add_parser("eval", help="evaluate an export on a held-out split (loss; accuracy of generated answers)")
    p.add_argument("target", help="an export directory, a run directory or name, or models:/NAME@ALIAS")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("-n", type=int, default=200, help="rows to evaluate (default 200)")
    p.add_argument("--base", action="store_true", help="evaluate the untuned base model instead, for comparison")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--show", type=int, default=0, help="print this many generations")
    p.set_defaults(fn=_cmd_eval)


def _serving_commands(sub: Any) -> None:
    """The subcommands for quantising, serving, and the pipelines that chain every stage."""
    p = sub.add_parser("quantize", help="quantise a model behind a quality gate (original vs quantised on held-out data)")
    p.add_argument("model", help="models:/NAME@ALIAS, an export or run, builtin:NAME, or a model path")
    p.add_argument("--method", choices=METHODS,
                   help="default: int8-dynamic on CPU, int8-weight-only on GPU")
    p.add_argument("--out", help="artifact directory (default: $HONE_HOME/quantized/<model>-<method>)")
    p.add_argument("-n", type=int, default=64, help="validation rows the gate evaluates (default 64)")
    p.add_argument("--job", help="take the evaluation data from this job instead of the export's own")
    p.add_argument("--calibration-rows", type=int, default=64,
                   help="w8a8-int8: training rows for SmoothQuant + GPTQ calibration (default 64; 0 = round to nearest)")
    p.add_argument("--max-loss-increase", type=_threshold, default=0.01,
                   help="causal LM: allowed relative eval-loss increase (default 0.01; 'none' = not checked)")
    p.add_argument("--max-accuracy-drop", type=_threshold, default=0.01,
                   help="allowed drop of classification accuracy, or of generated-answer accuracy for causal LMs on "
                        "instruction/chat data (default 0.01 = 1 point; 'none' = not checked)")
    p.set_defaults(fn=_cmd_quantize)

    p = sub.add_parser("serve", help="serve a model on Ray Serve behind an OpenAI-compatible API")
    p.add_argument("config", help="serve YAML (serving/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. port=8001")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--port", type=int, help="HTTP port (overrides the YAML)")
    p.add_argument("--allow-failed-gate", action="store_true", help="serve a quantised artifact whose quality gate failed")
    p.add_argument("--emit-serve-config", nargs="?", const="-", metavar="PATH",
                   help="write the plain Ray Serve config (serve deploy / KubeRay) instead of serving")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(fn=_cmd_serve)

    def pipeline_args(p: argparse.ArgumentParser, serving: bool = True) -> None:
        p.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="override a field, e.g. serve.port=8001 or quantize.max_accuracy_drop=0.05 (a pipeline), task.rows=100")
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local embedded Ray)")
        p.add_argument("--storage-path", help="where runs, sweeps and the pipeline state live (default: $HONE_HOME/runs)")
        if not serving:
            return
        p.add_argument("--keep-serving", action="store_true",
                       help="leave the endpoint up after the smoke test (local: until Ctrl-C; a cluster: deployed)")
        p.add_argument("--rerun", action="store_true", help="run every stage again even when its outputs exist for the same inputs")

    p = sub.add_parser("pipeline", help="run a pipeline YAML: train or sweep → quantise → serve → smoke test")
    p.add_argument("pipeline", help="pipeline YAML (jobs/pipelines/*.yaml)")
    pipeline_args(p)
    p.set_defaults(fn=_cmd_pipeline)

    p = sub.add_parser("compare", help="which method? prompting, LoRA, full, DPO, GRPO scored on the same held-out rows")
    p.add_argument("file", nargs="?", help="comparison YAML (default: jobs/pipelines/compare-methods-smollm2-sentiment.yaml)")
    p.add_argument("--tiny", action="store_true", help="without FILE: the shipped comparison on the built-in tiny Llama (minutes)")
    pipeline_args(p, serving=False)
    p.set_defaults(fn=_cmd_compare)

    p = sub.add_parser("quickstart", help="the whole platform on the built-ins: sweep → quantise → serve → smoke test")
    p.add_argument("--tiny", action="store_true", help="the same stages on the built-in tiny Llama (about 2 minutes)")
    pipeline_args(p)
    p.set_defaults(fn=_cmd_pipeline)


def _cluster_commands(sub: Any) -> None:
    """The subcommands for jobs on a Ray cluster, and what ships built in."""
    p = sub.add_parser("submit", help="validate a job here, then submit it to a Ray cluster through the Jobs API")
    p.add_argument("file", help="job YAML (train / --tune) or serve YAML (--serve)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--address", help="Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--tune", action="store_true", help="submit `hone tune` (a sweep) instead of `hone train`")
    kind.add_argument("--serve", action="store_true", help="submit `hone serve` (a long-running service)")
    p.add_argument("--upload", action="store_true", help="send local data/model files with the job (small files only)")
    p.add_argument("--shared-path", action="append", metavar="PREFIX",
                   help="local paths under PREFIX are on storage every node mounts (repeatable; also $HONE_SHARED_PATHS)")
    p.add_argument("--storage-path", help="where the run is written on the cluster (shared storage for multi-node runs)")
    p.add_argument("--id", help="submission id (default: Ray's raysubmit_...)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit with its result")
    p.set_defaults(fn=_cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop submitted jobs (Ray Jobs API)")
    jobs_sub = p.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    for name, text in (("list", "submitted jobs"), ("status", "one job's status"), ("logs", "one job's logs"), ("stop", "stop a job")):
        q = jobs_sub.add_parser(name, help=text)
        if name != "list":
            q.add_argument("id", help="submission id")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.add_argument("--address", help="Jobs API address (default: $RAY_ADDRESS)")
        q.set_defaults(fn=_cmd_jobs)

    p = sub.add_parser("builtins", help="list the built-in offline models and datasets")
    p.set_defaults(fn=_cmd_builtins)

def _known_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to do: printed without a traceback (``HONE_DEBUG=1`` shows it)."""
    from hone.errors import (
        ArtifactError,
        ClusterError,
        DataError,
        ModelError,
        PipelineError,
        QuantizeError,
        RegistryError,
        ServeError,
        StorageError,
        SubmitError,
        TrainError,
    )

    return (ArtifactError, ClusterError, DataError, FileNotFoundError, ModelError, PipelineError, QuantizeError, RegistryError,
            ServeError, StorageError, SubmitError, TrainError)


def main(argv: Sequence[str] | None = None) -> int:
    from hone.runtime import quiet_libraries

    quiet_libraries(console=True)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`hone data preview job.yaml -n 2 data.max_length=64`).
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    fn: Callable[[argparse.Namespace], int] = args.fn
    if os.environ.get("HONE_SUBMITTED"):
        from hone.submit import enter_stable_workdir

        enter_stable_workdir()
    try:
        return fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except _known_errors() as e:
        if os.environ.get("HONE_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
