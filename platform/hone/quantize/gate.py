"""``hone quantize``: quantise a model behind a quality gate.

``quantize(REF, METHOD)`` loads the model (LoRA exports merged first), quantises it, writes an
artifact directory, then measures the original and the quantised model each in a fresh process
(the artifact is reloaded from disk exactly as the server loads it): the job's validation metric,
size on disk, peak resident memory and greedy decode latency. A quantised model whose metric
degrades beyond the threshold is marked failed (in the artifact and, for ``models:/`` references,
on the registry version); ``hone serve`` refuses it unless told otherwise.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hone import storage
from hone.artifacts import QUANTIZED_INFO, ModelSpec, model_class, publish_dir, quantized_dir, resolve_ref
from hone.config import JobConfig, validate_job
from hone.config.quantization import VLLM_ONLY, GateThresholds, check_method, default_method
from hone.errors import QuantizeError
from hone.modeling import load_model
from hone.quantized import apply_method, artifact_digest, default_modules, load_quantized, save_quantized
from hone.runtime import quiet_libraries

__all__ = ["QuantizeResult", "Source", "calibration_batches", "gate_verdict", "measure_in_child", "measure_on_vllm", "quantize",
           "resolve_source"]


@dataclass
class QuantizeResult:
    artifact: Path
    method: str
    passed: bool
    original: dict[str, float]
    quantized: dict[str, float]
    gate: dict[str, Any] = field(default_factory=dict)
    measured_original: dict[str, float] = field(default_factory=dict)
    """The original's measures on hone's engine, before a vLLM format's decode timing replaced its speed: what a next
    candidate can reuse (``quantize(original=...)``)."""

    def table(self) -> str:
        keys = [k for k in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1", "answer_accuracy", "size_mb", "peak_rss_mb",
                            "decode_ms_per_token")
                if k in self.original]
        lines = [f"{'':22} {'original':>12} {self.method:>16}"]
        for k in keys:
            lines.append(f"{k:22} {self.original[k]:12.4f} {self.quantized[k]:16.4f}")
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"quality gate {verdict}: {self.gate['rule']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """The model to quantise and the job whose held-out data the gate evaluates it on."""

    spec: ModelSpec
    job: JobConfig


def _default_eval_job(model: str, task: str = "causal_lm") -> JobConfig:
    """The rotten-tomatoes view used to gate a model that carries no job of its own."""
    if task == "sequence_classification":
        data = {"source": "builtin:rotten-tomatoes", "format": "classification", "max_length": 128}
        return validate_job({"model": {"name": model}, "task": {"type": task, "num_labels": 2}, "data": data, "method": "full"},
                            check_paths=False)
    data = {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 128}
    return validate_job({"model": {"name": model}, "data": data, "method": "full"}, check_paths=False)


def resolve_source(ref: str, job: JobConfig | None = None) -> Source:
    """The model behind ``ref`` (any model reference but a quantised artifact) with its evaluation job: ``job``,
    else the export's own, else the built-in sentiment data for the model's task."""
    spec = resolve_ref(ref)
    if spec.kind == "quantized":
        raise QuantizeError(f"{ref} is already a quantised artifact ({Path(spec.path) / QUANTIZED_INFO})")
    return Source(spec, job or spec.job or _default_eval_job(ref, spec.task))


def _load_original(source: Source, device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer); LoRA exports are merged into their base."""
    num_labels = source.job.task.num_labels if source.spec.kind == "model" else None
    return load_model(source.spec, device, num_labels=num_labels)


def _bnb_load(source: Source, method: str) -> tuple[Any, Any]:
    """bitsandbytes quantises while loading: save the merged fp model once, reload it 8/4-bit."""
    import tempfile

    from transformers import BitsAndBytesConfig

    model, tokenizer = _load_original(source)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = (BitsAndBytesConfig(load_in_8bit=True) if method == "bnb-8bit" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"))
        quantized = model_class(source.job.task.type).from_pretrained(tmp, quantization_config=config, device_map="cuda")
    return quantized.eval(), tokenizer


# --------------------------------------------------------------------------- measurement


def _gate_split(job: JobConfig) -> str:
    """The split the gate evaluates on: validation, or training rows when the job has no validation data."""
    return "validation" if job.data.validation is not None else "train"


def _eval_rows(job: JobConfig, tokenizer: Any, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(raw rows, tokenized rows): the first ``n`` rows of :func:`_gate_split`."""
    from hone.data import held_out_rows, tokenize_split

    rows = held_out_rows(job.data, _gate_split(job), n)
    tokenized, _ = tokenize_split(rows, job, tokenizer, _gate_split(job), pack=False, masked=True)
    return list(rows), list(tokenized)


def calibration_batches(job: JobConfig, tokenizer: Any, n: int) -> list[Any]:
    """The first ``n`` rows of the job's training split, tokenised as training sees them (prompt and answer), one
    1 × T tensor each: what calibrated methods see of the data (never the held-out rows the gate evaluates on)."""
    import torch

    from hone.data import held_out_rows, tokenize_split

    rows, _ = tokenize_split(held_out_rows(job.data, "train", n), job, tokenizer, "train", pack=False, masked=True)
    return [torch.tensor([list(r["input_ids"])]) for r in rows]


def _answers_gated(job: JobConfig) -> bool:
    """Causal LM data with a prompt and an expected answer (a pair's is its chosen response): the gate also compares
    generated answers."""
    return job.task.type == "causal_lm" and job.data.format in ("alpaca", "messages", "sharegpt", "preference", "prompts")


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _measure(spec: dict[str, Any], queue: Any) -> None:
    """Child process: load one model, evaluate it, time greedy decoding, report peak RSS."""
    try:
        import resource
        import warnings

        quiet_libraries()
        warnings.filterwarnings("ignore", category=UserWarning)
        import torch

        from hone.generation import TransformersGenerator, answer_accuracy, decode_ms_per_token
        from hone.modeling import evaluate

        torch.manual_seed(0)
        source: Source = spec["source"]
        if spec["artifact"]:
            model, tokenizer, _ = load_quantized(spec["artifact"])
        else:
            on_gpu = torch.cuda.is_available() and spec.get("method") != "int8-dynamic"  # the GPU methods run on the GPU
            model, tokenizer = _load_original(source, "cuda" if on_gpu else "cpu")
        raw, rows = _eval_rows(source.job, tokenizer, spec["n"])
        metrics = evaluate(model, rows, source.job, tokenizer.pad_token_id)
        out = {k: v for k, v in metrics.items() if k != "eval_tokens"}
        if _answers_gated(source.job):
            out["answer_accuracy"], _ = answer_accuracy(TransformersGenerator(model, tokenizer), raw, source.job, tokenizer)
        if source.job.task.type == "causal_lm":
            out["decode_ms_per_token"] = decode_ms_per_token(TransformersGenerator(model, tokenizer))
        out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        out["peak_rss_mb"] = _peak_rss_mb(resource)
        queue.put(("ok", out))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _peak_rss_mb(resource: Any) -> float:
    """This process's peak resident memory. ``ru_maxrss`` survives execve, so a child spawned by a big parent
    would report the parent's peak; Linux's VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_in_child(source: Source, artifact: Path | None, n: int, method: str = "none") -> dict[str, float]:
    """``source``'s model (or the quantised ``artifact`` made from it) measured in a fresh process: the job's validation
    metrics on ``n`` held-out rows, answer accuracy, greedy decode ms/token on hone's engine, parameters (millions), peak
    resident memory."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    spec = {"source": source, "artifact": str(artifact) if artifact else None, "n": n, "method": method}
    proc = ctx.Process(target=_measure, args=(spec, queue))
    proc.start()
    try:
        status, payload = queue.get(timeout=1800)
    finally:
        proc.join(timeout=60)
    if status != "ok":
        raise QuantizeError(f"measuring {'the quantised' if artifact else 'the original'} model failed: {payload}")
    return payload


def measure_on_vllm(source: Source, artifact: Path | Source, n: int, dtype: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(original, candidate) as vLLM serves them, one after the other in one process of vLLM's environment: greedy
    decode ms/token and, for data with answers, the accuracy of greedy answers to the first ``n`` held-out rows (vLLM
    runs these formats with its own kernels and bf16 activations: the torch replica of their numerics is not what
    users get). ``artifact``: a quantised artifact (bf16 activations on CPU), or another model of the same job (a
    pruned one, written out merged) with ``dtype`` (float32 on CPU, as the original)."""
    import subprocess
    import tempfile

    import torch

    from hone.runtime import vllm_python

    try:
        python = vllm_python() or sys.executable
    except RuntimeError as e:
        raise QuantizeError(f"this format is measured on vLLM: {e}") from None
    gpu = torch.cuda.is_available()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with tempfile.TemporaryDirectory(prefix="hone-fp-") as tmp:
        model, tokenizer = _load_original(source)
        model.save_pretrained(Path(tmp) / "original", safe_serialization=True)
        tokenizer.save_pretrained(Path(tmp) / "original")
        del model
        if isinstance(artifact, Source):  # an export (an adapter too): written out merged, as vLLM loads a model
            folder = Path(tmp) / "candidate"
            model, candidate_tokenizer = _load_original(artifact)
            model.save_pretrained(folder, safe_serialization=True)
            candidate_tokenizer.save_pretrained(folder)
            del model
            artifact = folder
        args = []
        if _answers_gated(source.job):
            from hone.data import held_out_rows, prompt_and_answer

            raw = held_out_rows(source.job.data, _gate_split(source.job), n)
            pairs = [prompt_and_answer(r, source.job.data, tokenizer) for r in raw]
            answers = [{"ids": tokenizer(p, add_special_tokens=False)["input_ids"], "expected": a} for p, a in pairs]
            (Path(tmp) / "answers.json").write_text(json.dumps(answers))
            args = ["--answers", str(Path(tmp) / "answers.json")]
        # vLLM's int8 kernels on CPU take bf16 activations (fp32 is refused); the scales keep the precision
        models = [str(Path(tmp) / "original"), "auto" if gpu else "float32", str(artifact), dtype or ("auto" if gpu else "bfloat16")]
        out = subprocess.run([python, "-m", "hone.quantize.vllm_speed", *args, *models], capture_output=True, text=True, env=env,
                             timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    if out.returncode != 0 or not lines:
        raise QuantizeError(f"measuring the models on vLLM failed: {(out.stderr or out.stdout)[-2000:]}")
    original, quantized = (dict(m) for m in json.loads(lines[-1]))
    return original, quantized


def _measure_both(source: Source, staging: Path, n: int, method: str, original: dict[str, float] | None,
                  say: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(original, quantised, the original as measured on hone's engine): each in a fresh process (the original only
    when not given); a vLLM format's answers and decoding measured again on vLLM, the original in fp32 on it too."""
    original = dict(original) if original is not None else measure_in_child(source, None, n, method)
    measured_original = dict(original)
    quantized = measure_in_child(source, staging, n, method)
    if method in VLLM_ONLY:
        say("measuring greedy answers and decoding of both on vLLM, the engine that serves this format")
        on_vllm = measure_on_vllm(source, staging, n)
        original.update(on_vllm[0])
        quantized.update(on_vllm[1])
    return original, quantized, measured_original


def _original_size_mb(model: Any) -> float:
    """Size of the fp weights as safetensors (the original model's files on disk)."""
    return sum(t.numel() * t.element_size() for t in {id(p): p for p in model.state_dict().values()}.values()) / 2**20


def gate_verdict(task: str, original: dict[str, float], quantized: dict[str, float], thresholds: GateThresholds) -> dict[str, Any]:
    """Every checked measure must hold: accuracy drop (classification accuracy, or generated-answer accuracy) and, for
    causal LMs, the relative eval-loss increase. A non-finite measure of either model fails the gate: a comparison with
    NaN is never "worse than allowed", so it would otherwise pass."""
    checks: list[tuple[str, float, float | None, str]] = []
    accuracy = "eval_accuracy" if task == "sequence_classification" else "answer_accuracy"
    if task != "sequence_classification":
        rel = (quantized["eval_loss"] - original["eval_loss"]) / max(abs(original["eval_loss"]), 1e-12)
        allowed = thresholds.max_relative_loss_increase
        checks.append(("eval_loss", rel, allowed, f"eval loss {rel * 100:+.2f}% relative"
                       + (f" (allowed ≤ {allowed * 100:.2f}%)" if allowed is not None else " (not checked)")))
    if accuracy in original and accuracy in quantized:
        drop = original[accuracy] - quantized[accuracy]
        allowed = thresholds.max_accuracy_drop
        what = "accuracy" if accuracy == "eval_accuracy" else "answer accuracy"
        checks.append((accuracy, drop, allowed, f"{what} drop {drop * 100:+.2f} points"
                       + (f" (allowed ≤ {allowed * 100:.2f})" if allowed is not None else " (not checked)")))
    if all(allowed is None for _, _, allowed, _ in checks):
        raise QuantizeError(f"the quality gate checks nothing for this {task} model: "
                            + ("give an accuracy threshold" if task == "sequence_classification" else "give a loss threshold"))
    failed = [metric for metric, change, allowed, _ in checks
              if allowed is not None and not (math.isfinite(change) and change <= allowed + 1e-12)]
    rule = "; ".join(text for *_, text in checks)
    # size is NaN where it cannot be measured (bitsandbytes loads straight into 8/4 bit); it gates nothing
    broken = [f"{side} {key}" for side, measured in (("original", original), ("quantized", quantized))
              for key, value in measured.items() if key != "size_mb" and isinstance(value, float) and not math.isfinite(value)]
    if broken:
        failed = sorted(set(failed) | {"non-finite"})
        rule = f"non-finite measures ({', '.join(broken)}); {rule}"
    return {"passed": not failed, "rule": rule, "failed": failed, "changes": {metric: change for metric, change, _, _ in checks}}


def _check_destination(folder: Path) -> None:
    """hone replaces only what it made: an existing destination must be a quantised artifact (or an empty folder)."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and ((folder / QUANTIZED_INFO).is_file() or not any(folder.iterdir())):
        return
    raise QuantizeError(f"{folder} exists and is not a hone quantised artifact (no {QUANTIZED_INFO}): hone replaces only its own "
                        "artifacts; give --out a new folder")


def quantize(
    ref: str,
    method: str | None = None,
    *,
    out: str | Path | None = None,
    n: int = 64,
    thresholds: GateThresholds | None = None,
    job: JobConfig | None = None,
    quiet: bool = False,
    calibration_rows: int = 64,
    original: dict[str, float] | None = None,
) -> QuantizeResult:
    """Quantise ``ref`` with ``method`` (default: the device's default), gate it, record the verdict.

    ``calibration_rows``: training rows ``w8a8-int8`` is calibrated on (SmoothQuant + GPTQ,
    :mod:`hone.quantize.calibrate`); 0 rounds each weight to the nearest level instead. ``original``: the original
    model's measures from an earlier call on the same model, rows and device (:attr:`QuantizeResult.original`), so
    several candidates are compared with one measurement of it."""
    import torch

    method = method or default_method()
    check_method(method)
    if n < 1:
        raise QuantizeError(f"the quality gate needs at least one evaluation row (got n={n}): a gate that measures nothing "
                            "cannot pass")
    thresholds = thresholds or GateThresholds()
    source = resolve_source(ref, job)
    remote = str(out) if out is not None and storage.is_uri(str(out)) else None  # object storage: built here, then uploaded
    if remote:
        storage.check(remote)
    folder = storage.mirror(remote) if remote else Path(out) if out else quantized_dir(source.spec, method)
    _check_destination(folder)
    say = (lambda *_: None) if quiet else (lambda msg: print(f"[hone] {msg}", flush=True))

    say(f"quantising {ref} with {method}")
    if method.startswith("bnb-"):
        model, tokenizer = _bnb_load(source, method)
        original_mb, modules = None, None
    else:
        model, tokenizer = _load_original(source)
        original_mb = _original_size_mb(model)
        if method != "int8-dynamic" and torch.cuda.is_available():
            model = model.to("cuda")
        modules = default_modules(model, method)
        model = apply_method(model, method, modules)
    rounded, calibration = None, None
    if method == "w8a8-int8" and calibration_rows > 0:
        from hone.quantize.calibrate import calibrate_w8a8

        say(f"calibrating on {calibration_rows} training rows: SmoothQuant (α per layer), then GPTQ")
        rounded, calibration = calibrate_w8a8(model, modules, calibration_batches(source.job, tokenizer, calibration_rows))
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_quantized(model, tokenizer, method, staging, modules, rounded)
    info: dict[str, Any] = {
        "method": method,
        "source": ref,
        "source_path": source.spec.path,
        "task": source.job.task.type,
        "job": source.job.to_dict(),
        "created": time.time(),
        "gate": {"passed": None},
        "quantized_modules": None if method.startswith("bnb-") else modules,
        "calibration": calibration.to_dict() if calibration else None,
    }
    info["sha256"] = artifact_digest(staging)
    (staging / QUANTIZED_INFO).write_text(json.dumps(info, indent=2, default=str))
    del model

    say(f"measuring the original and the quantised model on {n} {source.job.data.source} rows (each in a fresh process)")
    original, quantized, measured_original = _measure_both(source, staging, n, method, original, say)
    original["size_mb"] = original_mb if original_mb is not None else float("nan")
    quantized["size_mb"] = _folder_mb(staging) - sum(p.stat().st_size for p in staging.glob("tokenizer*")) / 2**20
    gate = gate_verdict(source.job.task.type, original, quantized, thresholds)
    info["gate"] = {**gate, "thresholds": thresholds.__dict__, "original": original, "quantized": quantized, "eval_rows": n}
    (staging / QUANTIZED_INFO).write_text(json.dumps(info, indent=2, default=str))
    publish_dir(staging, folder)  # the artifact appears complete or not at all
    if remote:  # its description last: a folder without it is not an artifact
        for f in sorted(folder.iterdir(), key=lambda f: f.name == QUANTIZED_INFO):
            storage.upload(f, storage.join(remote, f.name))
    if source.spec.registry:
        from hone.registry import tag_version

        reg = source.spec.registry
        tag_version(
            reg["name"],
            reg["version"],
            {
                f"hone.quantized.{method}": remote or str(folder),
                f"hone.quantized.{method}.sha256": info["sha256"],
                f"hone.quantized.{method}.gate": "passed" if gate["passed"] else "failed",
                f"hone.quantized.{method}.report": json.dumps({"rule": gate["rule"], "original": original, "quantized": quantized})[:5000],
            },
        )
    return QuantizeResult(folder, method, bool(gate["passed"]), original, quantized, gate, measured_original)
