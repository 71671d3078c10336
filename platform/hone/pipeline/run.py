"""``hone pipeline``: the stages in order on one Ray session.

    train (one run, or a Ray Tune sweep) → [align: a run from that model, e.g. DPO] → registry version → [prune, a
    recovery run, its gate] → quantise behind the quality gate
    → deploy on Ray Serve → smoke-test the endpoint through the ``openai`` client

The pipeline directory (``<storage>/<name>-pipeline/``) keeps ``state.json`` and ``summary.json``.
A failed stage stops the pipeline with its reason; nothing after it runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from hone.artifacts import run_storage, sync_up, trusted_roots
from hone.config import Pipeline, PipelineConfigError, Problem, shipped_recipe
from hone.errors import PipelineError
from hone.pipeline.smoke import smoke_stage
from hone.pipeline.stages import align_stage, prune_stage, quantize_stage, serve_stage, train_stage
from hone.pipeline.state import State, banner, say
from hone.pipeline.summary import PipelineResult
from hone.runtime import dashboard_url, is_remote, port_in_use, stop_event
from hone.serving.runner import cpus_needed, serving_session
from hone.storage import uri_of as storage_uri
from hone.tune import SWEEP_EXTRA_CPUS

__all__ = ["quickstart_pipeline", "run_pipeline"]


def _cpus(p: Pipeline) -> float:
    """Extra logical CPUs a local session needs beyond the job's workers: the sweep's spare CPU or the replicas."""
    workers = p.job.distributed.max_workers * p.job.distributed.resources_per_worker.get("CPU", 1.0)
    tune_extra = SWEEP_EXTRA_CPUS if p.sweep else 0.0
    return max(tune_extra, cpus_needed(p.serve) - workers, 0.0)


def run_pipeline(p: Pipeline, *, address: str | None = None, storage_path: str | None = None, keep_serving: bool = False,
                 rerun: bool = False, on_ready: Callable[[PipelineResult], None] | None = None) -> PipelineResult:
    """Run the stages in order on one Ray session (local embedded unless ``address``/``RAY_ADDRESS``).

    Returns after the smoke test with everything it started shut down, unless ``keep_serving``:
    then a local endpoint is served until SIGINT/SIGTERM, a cluster's is left deployed.
    """
    cfg = p.config
    remote = is_remote(address)
    if not remote:  # a busy port would only show after the sweep: check now
        for key in ("port", "metrics_export_port"):
            port = getattr(p.serve, key)
            holder = port_in_use(p.serve.host, port)
            if holder:
                raise PipelineConfigError([Problem(f"serve.{key}", f"port {port} on {p.serve.host} is already in use by {holder}",
                                                   f"pass serve.{key}=N with a free port")], p.source)
    storage = run_storage(storage_path, p.job)
    folder = storage / f"{cfg.name}-pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    state = State(folder)
    result = PipelineResult(cfg.name, folder)
    stages = (["train"] + (["align"] if cfg.align else []) + (["prune"] if cfg.prune else []) + (["quantize"] if cfg.quantize else [])
              + ["serve"]
              + (["smoke_test"] if cfg.smoke_test else []))
    n = len(stages)
    started = time.time()
    # the versions this pipeline registers in its storage load again in its later stages
    with trusted_roots(storage_uri(storage) or storage), serving_session(p.serve, p.job, address, _cpus(p)):
        from ray import serve as ray_serve

        deployed = False
        try:
            what = (f"Ray Tune sweep over {', '.join(p.job.tune.search_space)} ({p.job.tune.scheduler}, {p.job.tune.searcher})"
                    if p.sweep and p.job.tune else f"the registered {cfg.train.model}, no training" if cfg.train.model
                    else "one training run")
            banner(1, n, "train", what if cfg.train.model else
                   f"{what}: {p.job.name}, {p.job.method.type} on {p.job.model.name}, {p.job.distributed.max_workers} workers "
                   f"{'ZeRO-' + str(p.job.distributed.deepspeed.stage) if p.job.distributed.deepspeed else 'DDP'}")
            result.stages["train"] = trained = train_stage(p, state, storage, address, rerun)
            i = 2
            if p.align_job is not None:
                a = p.align_job
                banner(i, n, "align", f"{a.name}: {a.preference.loss if a.preference else 'training'} from {trained['model']}, "
                                      f"{a.method.type}, {a.distributed.workers_text()} workers")
                result.stages["align"] = trained = align_stage(p, state, trained, storage, address, rerun)
                i += 1
            if cfg.prune:
                recover = f", {cfg.prune.recover_steps} recovery steps" if cfg.prune.recover_steps else ""
                banner(i, n, "prune", f"{trained['model']}: {cfg.prune.sparsity:.0%} of its {cfg.prune.method}{recover}, behind the "
                                      f"quality gate ({cfg.prune.eval_rows} rows)")
                result.stages["prune"] = pruned = prune_stage(p, state, trained, storage, address, rerun, remote=storage_uri(storage))
                trained = {**trained, "model": pruned["model"], "export": pruned["export"]}
                i += 1
            if cfg.quantize:
                methods = " and ".join(p.methods)
                banner(i, n, "quantize", f"{trained['model']} with {methods} behind the quality gate ({cfg.quantize.eval_rows} rows)")
                result.stages["quantize"] = quantize_stage(p, state, trained, rerun, remote=storage_uri(storage))
                i += 1
            banner(i, n, "serve", f"{trained['model']} on Ray Serve")
            chosen = result.stages.get("quantize") or {}
            serve_cfg, served = serve_stage(p, trained, address, remote, chosen["method"] if chosen.get("served") else "none")
            deployed = True
            result.stages["serve"] = served
            result.endpoint = served["url"] + "/v1"
            dashboard = dashboard_url()
            result.dashboard = f"http://{dashboard}" if dashboard else None
            if not remote:
                result.metrics_url = f"http://127.0.0.1:{p.serve.metrics_export_port}/metrics"
            if cfg.smoke_test:
                banner(i + 1, n, "smoke_test", f"{cfg.smoke_test.requests} held-out {cfg.smoke_test.split} rows through the openai client")
                result.stages["smoke_test"] = smoke_stage(p, state, serve_cfg, served["url"], rerun)
            result.wall_s = time.time() - started
            (folder / "summary.json").write_text(json.dumps({**result.__dict__, "folder": str(folder)}, indent=2, default=str))
            sync_up(folder, "state.json", "summary.json")  # a pipeline in object storage keeps its record there
            if on_ready:
                on_ready(result)
            if keep_serving and not remote:
                stop = stop_event()
                say(f"serving {result.endpoint} until Ctrl-C")
                while not stop.wait(0.5):
                    pass
        except PipelineError:
            raise
        except Exception as e:  # name the stage that failed
            stage = next((s for s in stages if s not in result.stages), stages[-1])
            raise PipelineError(stage, f"{type(e).__name__}: {e}") from e
        finally:
            if deployed and not (keep_serving and remote):
                try:
                    ray_serve.delete(p.serve.name) if remote else ray_serve.shutdown()
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
    return result


def quickstart_pipeline(tiny: bool = False) -> Path:
    """The shipped quickstart pipeline (``--tiny``: on the built-in tiny Llama)."""
    return shipped_recipe("pipelines/quickstart-tiny.yaml" if tiny else "pipelines/quickstart.yaml")
