"""hone pipeline / hone quickstart: validation before any work, the tiny quickstart end to end
(real sweep → registry → quantisation gate → Ray Serve → openai client), re-runs that skip
finished stages, and a failed stage that stops the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, free_port, hone

PIPELINES = sorted(p for p in (REPO / "jobs" / "pipelines").glob("*.yaml") if "kind: compare" not in p.read_text())


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_validate(path):
    from hone.pipeline import load_pipeline

    p = load_pipeline(path)
    assert p.config.name == path.stem.removeprefix("pipeline-") and (p.sweep or p.config.train.model)
    assert p.serve.autoscaling_config and p.serve.autoscaling_config["max_replicas"] == 2
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("hone " in line and path.name in line for line in header), f"{path.name} must open with its command"


def test_bad_pipeline_is_refused_before_any_work(tmp_path, repo):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "model": {"name": "builtin:tiny-llama"}, "data": {"source": "builtin:rotten-tomatoes", "format": "text"}}))
    bad = tmp_path / "pipeline.yaml"
    bad.write_text(yaml.safe_dump({
        "train": {"job": "job.yaml", "sweep": True},
        "prune": {"sparsity": 0.3, "recover_overrides": ["training.lr=1e-4"], "max_loss_increase": None, "max_accuracy_drop": None},
        "quantize": {"method": "bnb-4bit", "max_loss_increase": None, "max_accuracy_drop": None},
        "serve": {"model": "builtin:tiny-llama", "port": 0},
        "smoke_test": {"requests": 4},
    }))
    started = time.time()
    out = hone("pipeline", str(bad), "--storage-path", str(tmp_path / "runs"), timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    for text in ("train.sweep", "no tune.search_space", "quantize.method", "quantize: the quality gate would check nothing",
                 "serve.model", "comes from the earlier stages", "serve.port", "smoke_test", "no prompts and answers",
                 "prune: the quality gate would check nothing", "prune.recover_overrides: apply to a recovery run"):
        assert text in out.stderr, (text, out.stderr)
    assert not (tmp_path / "runs").exists() and time.time() - started < 60

    missing = tmp_path / "missing.yaml"
    missing.write_text("train: {job: nowhere.yaml}\nquantize: {metod: int8-dynamic}\n")
    out = hone("pipeline", str(missing), timeout=120)
    assert out.returncode == 2 and "nowhere.yaml" in out.stderr and "quantize.metod" in out.stderr, out.stderr


def test_an_align_stage_is_validated_with_the_pipeline(tmp_path, repo):
    """The align job (trained from the train stage's model) is checked with everything else; the later stages serve
    what it registers."""
    from hone.config import PipelineConfigError
    from hone.pipeline import load_pipeline

    p = load_pipeline(repo / "jobs" / "pipelines" / "sft-dpo-smollm2.yaml")
    assert p.align_job is not None and p.align_job.preference.loss == "dpo"
    assert p.serve.model == "models:/dpo-smollm2-sentiment@winner" and p.registered_model == "smollm2-sentiment"
    assert "sweep → dpo → quantise → serve" in p.summary()

    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({"name": "sft", "model": {"name": "builtin:tiny-llama"},
                                                       "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca"}}))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({"name": "sft", "model": {"name": "builtin:tiny-llama"},
                                                       "data": {"source": "builtin:rotten-tomatoes", "format": "preference"},
                                                       "preference": {"loss": "kto"}}))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"kind": "pipeline", "name": "p", "train": {"job": "sft.yaml"},
                                                            "align": {"job": "dpo.yaml"}, "smoke_test": None}))
    with pytest.raises(PipelineConfigError) as e:
        load_pipeline(tmp_path / "pipeline.yaml")
    paths = [problem.path for problem in e.value.problems]
    assert any(path.startswith("align.job →") and path.endswith("data.format") for path in paths), paths


def test_a_pipeline_reruns_training_when_its_data_content_changes(tmp_path):
    """The train stage is reused only for the same inputs, data content included: a file edited in place (same size,
    same timestamps) is new data; the same content at another time is not."""
    from hone.pipeline import load_pipeline
    from hone.pipeline.stages import train_fingerprint

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review number {i} was fine"}) + "\n" for i in range(40)))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"name": "fp", "model": {"name": "builtin:tiny-llama"},
                                                       "data": {"source": str(data), "format": "text"}}))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"kind": "pipeline", "train": {"job": "job.yaml"}, "smoke_test": None}))
    before = train_fingerprint(load_pipeline(tmp_path / "pipeline.yaml"))
    stat = data.stat()
    data.write_text(data.read_text().replace("number 7 was fine", "number 7 was bad!"))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size
    edited = train_fingerprint(load_pipeline(tmp_path / "pipeline.yaml"))
    assert edited != before
    os.utime(data)  # touched, same content
    assert train_fingerprint(load_pipeline(tmp_path / "pipeline.yaml")) == edited


def _quickstart(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return hone("quickstart", "--tiny", *args, env=env, timeout=timeout)


@pytest.mark.slow
def test_tiny_quickstart_end_to_end_then_reruns(repo, home, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HONE_API_KEYS")}
    env["HONE_API_KEYS"] = "smoke-key"  # auth on: the smoke test must authenticate like any client
    storage = tmp_path / "runs"
    ports = [f"serve.port={free_port()}", f"serve.metrics_export_port={free_port()}"]
    started = time.time()
    out = _quickstart(["--storage-path", str(storage), *ports], env, 600)
    first_wall = time.time() - started
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    text = out.stdout
    for stage in ("[1/4] train", "[2/4] quantize", "[3/4] serve", "[4/4] smoke_test", "hone pipeline quickstart-tiny: done in"):
        assert stage in text, stage
    for line in ("accuracy    untuned", "latency     p50", "throughput", "quality gate PASSED", "endpoint  http://127.0.0.1:",
                 "metrics   http://127.0.0.1:", "metric_vs_step.png"):
        assert line in text, line

    folder = storage / "quickstart-tiny-pipeline"
    summary = json.loads((folder / "summary.json").read_text())
    smoke = summary["stages"]["smoke_test"]
    assert smoke["ok"] == smoke["requests"] == 32 and smoke["failed"] == 0
    assert 0 <= smoke["accuracy"] <= 1 and 0 <= smoke["untuned_accuracy"] <= 1
    assert smoke["latency_p50_s"] > 0 and smoke["requests_per_s"] > 0 and smoke["ttft_s"] > 0

    # The sweep: ASHA stopped the hopeless learning rate at the grace period; the winner is registered with lineage.
    train = summary["stages"]["train"]
    sweep_dir = Path(train["sweep_dir"])
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert sorted(t["status"] for t in trials) == ["completed", "stopped early"], trials
    stopped = next(t for t in trials if t["status"] == "stopped early")
    assert stopped["steps"] < 12 and stopped["export"] is None and stopped["params"]["training.lr"] == 1e-5
    best = next(t for t in trials if t["status"] == "completed")
    assert json.loads((sweep_dir / "sweep.json").read_text())["winner"]["trial"] == best["trial"]
    for name in ("trials.csv", "params_vs_metric.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    assert (sweep_dir / "metric_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from hone import registry

    ref = registry.resolve_model_ref("models:/quickstart-tiny@winner")
    assert ref["source"] == best["export"] and train["model"] == f"models:/quickstart-tiny/{ref['version']}"
    # Both candidates were gated, each verdict on the same registry version the serve stage deployed; the faster one was
    # served, on the engine that loads its format (bf16 only on vLLM, int8-dynamic only on hone's engine).
    quantized, served = summary["stages"]["quantize"], summary["stages"]["serve"]
    assert [c["method"] for c in quantized["candidates"]] == ["int8-dynamic", "bf16"]
    assert all(c["passed"] for c in quantized["candidates"]), quantized["candidates"]
    fastest = min(quantized["candidates"], key=lambda c: c["quantized"]["decode_ms_per_token"])
    assert quantized["method"] == served["quantization"] == fastest["method"]
    assert served["engine"] == ("vllm" if fastest["method"] == "bf16" else "transformers"), served
    assert served["engine_reason"] and f"engine {served['engine']}" in text
    for method in ("int8-dynamic", "bf16"):
        assert ref["tags"][f"hone.quantized.{method}.gate"] == "passed"
    assert Path(ref["tags"][f"hone.quantized.{fastest['method']}"]) == Path(quantized["artifact"])
    lineage = registry.show_model("quickstart-tiny")[-1]["lineage"]
    assert lineage["hone.base_model"] == "builtin:tiny-llama" and lineage["hone.method"] == "lora"
    assert lineage["hone.zero_stage"] == "2" and len(lineage["hone.dataset_fingerprint"]) == 12
    assert lineage["hone.git_commit"] and lineage["hone.sweep"] == sweep_dir.name
    listed = hone("models", "list", env=env, timeout=120)
    assert "quickstart-tiny" in listed.stdout and "@winner→v1" in listed.stdout

    # Same inputs again: training and quantisation are reused, the endpoint is deployed and checked again.
    started = time.time()
    again = _quickstart(["--storage-path", str(storage), *ports], env, 400)
    assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-6000:]
    assert "train: reusing models:/quickstart-tiny/1" in again.stdout and "quantize: reusing" in again.stdout
    assert "Trial status" not in again.stdout and len(list(storage.glob("*-sweep-*"))) == 1
    assert time.time() - started < first_wall
    assert json.loads((folder / "summary.json").read_text())["stages"]["train"]["skipped"] is True

    # With a prune stage: the winner pruned, a 2-step recovery run through Ray Train, the gate against the unpruned model
    # on the serving engine (vLLM loads the pruned config), and the quantize stage given the model it chose. Then a stage
    # that fails stops the pipeline with its reason; nothing after it runs.
    prune = ["prune.sparsity=0.5", "prune.recover_steps=2", "prune.eval_rows=16", "prune.calibration_rows=16",
             "prune.max_loss_increase=0.5", "prune.max_accuracy_drop=0.5"]
    failed = _quickstart(["--storage-path", str(storage), *ports, *prune, "quantize.max_loss_increase=-1",
                          "quantize.method=int8-dynamic"], env, 500)
    assert failed.returncode == 1, failed.stdout[-4000:] + failed.stderr[-4000:]
    assert "pipeline stopped at stage quantize" in failed.stderr and "failed its quality gate" in failed.stderr
    assert "[4/5] serve" not in failed.stdout and "train: reusing" in failed.stdout
    state = json.loads((folder / "state.json").read_text())
    assert state["quantize"]["ok"] is False and state["train"]["ok"] is True
    pruned = state["prune"]["output"]
    assert pruned["stats"]["intermediate_after"] == pruned["stats"]["intermediate_before"] // 2 and pruned["recover_steps"] == 2
    assert pruned["candidate"] == "models:/quickstart-tiny-pruned/1" and pruned["passed"] and pruned["engine"] == "vllm"
    assert pruned["pruned"]["params_m"] < pruned["original"]["params_m"] and pruned["pruned"]["decode_ms_per_token"] > 0
    faster = pruned["pruned"]["decode_ms_per_token"] < pruned["original"]["decode_ms_per_token"]
    assert pruned["served"] is faster and pruned["model"] == (pruned["candidate"] if faster else train["model"]), pruned
    assert f"━━ [3/5] quantize: {pruned['model']} with int8-dynamic" in failed.stdout
    recovered = registry.resolve_model_ref(pruned["candidate"])
    assert json.loads((Path(recovered["source"]) / "hone.json").read_text())["job"]["model"]["name"].endswith("mlp-channels-0.5")


def test_a_quantised_model_is_served_only_when_it_is_worth_it():
    """The quickstart's gate once measured torchao int8 at 118 ms/token against 94 for fp32: that model passes its gate
    but is not served; a faster one is, and so is one as fast with less memory."""
    from hone.pipeline.stages import worth_serving

    fp32 = {"decode_ms_per_token": 94.0, "peak_rss_mb": 900.0}
    assert worth_serving(fp32, {"decode_ms_per_token": 118.0, "peak_rss_mb": 700.0}) == (
        False, "it decodes slower (118.0 ms/token against 94.0 for full precision) and does not save memory at equal speed")
    assert worth_serving(fp32, {"decode_ms_per_token": 60.0, "peak_rss_mb": 950.0})[0]
    assert worth_serving(fp32, {"decode_ms_per_token": 97.0, "peak_rss_mb": 600.0})[0]
    assert not worth_serving(fp32, {"decode_ms_per_token": 97.0, "peak_rss_mb": 950.0})[0]
