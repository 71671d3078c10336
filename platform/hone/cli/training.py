"""``hone train``, ``tune``, ``models`` and ``eval``: training, sweeps, the registry and evaluation."""

from __future__ import annotations

import argparse
from typing import Any

from hone.cli.common import job_or_resume
from hone.config import load_job

__all__ = ["add_commands"]


def _cmd_train(args: argparse.Namespace) -> int:
    from hone.training import train

    job = job_or_resume(args, "train", "RUN")
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

    job = job_or_resume(args, "tune", "SWEEP")
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


def add_commands(sub: Any) -> None:
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
