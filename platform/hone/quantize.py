"""Quantise an export (or a registered model, or a built-in) behind a quality gate.

``hone quantize REF --method M`` loads the model (LoRA exports merged first), quantises it,
writes an artifact directory, then measures the original and the quantised model each in a
fresh process (the artifact is reloaded from disk exactly as the server loads it): the job's
validation metric, size on disk, peak resident memory and greedy decode latency. A quantised
model whose metric degrades beyond the threshold is marked failed (in the artifact and, for
``models:/`` references, on the registry version); ``hone serve`` refuses it unless told otherwise.

Methods: ``int8-dynamic`` (torch dynamic int8 of every linear layer, CPU), ``int8-weight-only``
(torchao, CPU or GPU), ``int4-weight-only`` (torchao, GPU), ``bnb-8bit`` / ``bnb-4bit``
(bitsandbytes, GPU).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hone import assets
from hone.config import JobConfig, validate_job

__all__ = ["METHODS", "CPU_DEFAULT", "GateThresholds", "QuantizeError", "QuantizeResult", "quantize", "load_quantized",
           "quantized_artifact", "resolve_source"]

METHODS = ("int8-dynamic", "int8-weight-only", "int4-weight-only", "bnb-8bit", "bnb-4bit")
_GPU_ONLY = {"int4-weight-only", "bnb-8bit", "bnb-4bit"}
# Measured on the 2-core reference machine with SmolLM2-135M (greedy decode, ms per token): fp32 67,
# dynamic int8 38-39, torchao int8 weight-only 73 (no faster int8 CPU kernel): dynamic int8 is the CPU default.
CPU_DEFAULT = "int8-dynamic"
GPU_DEFAULT = "int8-weight-only"
INFO_FILE = "quantization.json"
_STATE_FILE = "quantized.pt"


class QuantizeError(RuntimeError):
    """The model cannot be quantised (unknown method, GPU-only method on CPU, not a model)."""


@dataclass(frozen=True)
class GateThresholds:
    """How much worse the quantised model may be; ``None`` leaves that measure unchecked.

    ``max_relative_loss_increase``: eval loss, relative (causal LM). ``max_accuracy_drop``: accuracy
    points as a fraction (classification accuracy; for causal LM on instruction/chat data, the accuracy
    of the generated answers, the measure a task like sentiment is judged by).
    """

    max_relative_loss_increase: float | None = 0.01
    max_accuracy_drop: float | None = 0.01

    def __post_init__(self) -> None:
        if self.max_relative_loss_increase is None and self.max_accuracy_drop is None:
            raise QuantizeError("the quality gate would check nothing: give a loss or an accuracy threshold")


@dataclass
class QuantizeResult:
    artifact: Path
    method: str
    passed: bool
    original: dict[str, float]
    quantized: dict[str, float]
    gate: dict[str, Any] = field(default_factory=dict)

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
class _Source:
    """Where the model to quantise comes from."""

    ref: str
    kind: str  # "export" | "model"
    path: str  # export directory, or a model name/path for resolve_model
    job: JobConfig
    registry: dict[str, Any] | None = None

    def slug(self) -> str:
        if self.registry:
            return f"{self.registry['name']}-v{self.registry['version']}"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.path).name or self.path).strip("-")[:40]
        return f"{stem}-{hashlib.sha256(str(Path(self.path).resolve() if self.kind == 'export' else self.path).encode()).hexdigest()[:8]}"


def _default_eval_job(model: str, task: str = "causal_lm") -> JobConfig:
    """The rotten-tomatoes view used to gate a model that carries no job of its own."""
    if task == "sequence_classification":
        data = {"source": "builtin:rotten-tomatoes", "format": "classification", "max_length": 128}
        return validate_job({"model": {"name": model}, "task": {"type": task, "num_labels": 2}, "data": data, "method": "full"},
                            check_paths=False)
    data = {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 128}
    return validate_job({"model": {"name": model}, "data": data, "method": "full"}, check_paths=False)


def resolve_source(ref: str, job: JobConfig | None = None) -> _Source:
    """A model reference: ``models:/NAME@ALIAS``, an export directory, a run's export, a built-in, a path or hub id."""
    from hone.train import EXPORT_DIR, resolve_run_dir

    registry_info = None
    path = ref
    if ref.startswith("models:/"):
        from hone.registry import resolve_model_ref

        registry_info = resolve_model_ref(ref)
        path = registry_info["source"]
    folder = Path(path)
    if (folder / INFO_FILE).exists():
        raise QuantizeError(f"{ref} is already a quantised artifact ({folder / INFO_FILE})")
    if not (folder / "hone.json").exists() and not ref.startswith(("builtin:", "models:/")) and not folder.exists():
        try:  # a run name or directory
            candidate = resolve_run_dir(ref) / EXPORT_DIR
            if (candidate / "hone.json").exists():
                folder = candidate
        except Exception:  # noqa: BLE001 - not a run: treat as a model name below
            pass
    if (folder / "hone.json").exists():
        info = json.loads((folder / "hone.json").read_text())
        export_job = JobConfig.model_validate(info["job"], context={"check_paths": False})
        return _Source(ref, "export", str(folder), job or export_job, registry_info)
    if registry_info:
        raise QuantizeError(f"{ref} points at {path}, which is not a hone export")
    if ref.startswith("builtin:"):
        assets.check_builtin_model(ref)
    task = "sequence_classification" if ref == "builtin:minilm" else "causal_lm"
    return _Source(ref, "model", ref, job or _default_eval_job(ref, task))


def _load_original(source: _Source) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer); LoRA exports are merged into their base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hone.modeling import load_export

    if source.kind == "export":
        model, tokenizer, _, info = load_export(source.path)
        if info.get("kind") == "adapter":
            model = model.merge_and_unload()
        return model.eval(), tokenizer
    path = assets.resolve_model(source.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if source.job.task.type == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=source.job.task.num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- quantisation


def _check_method(method: str) -> None:
    import torch

    if method not in METHODS:
        raise QuantizeError(f"unknown quantisation method {method!r}; choose one of {', '.join(METHODS)}")
    if method in _GPU_ONLY and not torch.cuda.is_available():
        raise QuantizeError(f"{method} needs a CUDA GPU (no GPU here); on CPU use int8-dynamic or int8-weight-only")
    if method.startswith("bnb-"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise QuantizeError(f"{method} needs bitsandbytes: pip install 'hone[gpu]'") from e


# Output layers stay in full precision (as bitsandbytes' llm_int8_skip_modules does): the LM head
# is often tied to the embeddings, whose outlier rows int8 represents badly.
_SKIP = ("lm_head", "score", "classifier", "embed_out")
# Dynamic int8 also quantises activations per tensor; the MLP output projection's inputs carry the
# outlier features LLM.int8() describes. Measured on SmolLM2-135M (16 validation rows, eval loss
# 1.479 in fp32): every linear layer dynamic-int8 4.54; all but down_proj 1.63 at the same speed.
_SKIP_DYNAMIC = _SKIP + ("down_proj", "fc2", "dense_4h_to_h")


def _quantized_linears(model: Any, skip: tuple[str, ...] = _SKIP) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in skip]


def _default_modules(model: Any, method: str) -> list[str]:
    return _quantized_linears(model, _SKIP_DYNAMIC if method == "int8-dynamic" else _SKIP)


def _apply(model: Any, method: str, modules: list[str] | None = None) -> Any:
    """Quantise ``modules`` (default: the method's recipe) of ``model`` in place and return it.

    The artifact records the module list, so it reloads with the recipe it was made with.
    """
    modules = modules if modules is not None else _default_modules(model, method)
    if method == "int8-dynamic":
        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {name: per_channel_dynamic_qconfig for name in modules}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    chosen = set(modules)
    keep = lambda module, fqn: fqn in chosen  # noqa: E731
    if method == "int8-weight-only":
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=keep)
    elif method == "int4-weight-only":
        quantize_(model, Int4WeightOnlyConfig(group_size=128), filter_fn=keep)
    else:
        raise QuantizeError(f"{method} is applied at load time, not in place")
    return model


def _skeleton(folder: Path, task: str, device: str = "cpu") -> Any:
    """An fp32 model of the artifact's architecture (weights come from the quantised state dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    model = cls.from_config(config)
    return model.to(device).eval()


def load_quantized(folder: str | Path, device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info) from a quantised artifact, loaded exactly as the server loads it."""
    import torch
    from transformers import AutoTokenizer

    folder = Path(folder)
    info_path = folder / INFO_FILE
    if not info_path.exists():
        raise QuantizeError(f"{folder} is not a quantised artifact (no {INFO_FILE})")
    info = json.loads(info_path.read_text())
    method, task = info["method"], info["task"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = device or ("cuda" if method in _GPU_ONLY or (torch.cuda.is_available() and method != "int8-dynamic") else "cpu")
    if method.startswith("bnb-"):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
        return cls.from_pretrained(folder, device_map=device).eval(), tokenizer, info
    model = _apply(_skeleton(folder, task, device), method, info.get("quantized_modules"))
    state = torch.load(folder / _STATE_FILE, map_location=device, weights_only=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise QuantizeError(f"{folder}: state dict does not match the architecture (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {unexpected[:5]})")
    return model.eval(), tokenizer, info


def _save(model: Any, tokenizer: Any, method: str, folder: Path) -> None:
    import torch

    tokenizer.save_pretrained(folder)
    base = getattr(model, "config", None)
    if method.startswith("bnb-"):
        model.save_pretrained(folder)
        return
    base.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / _STATE_FILE)


def _bnb_load(source: _Source, method: str) -> tuple[Any, Any]:
    """bitsandbytes quantises while loading: save the merged fp model once, reload it 8/4-bit."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    model, tokenizer = _load_original(source)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = (BitsAndBytesConfig(load_in_8bit=True) if method == "bnb-8bit" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"))
        cls = AutoModelForSequenceClassification if source.job.task.type == "sequence_classification" else AutoModelForCausalLM
        quantized = cls.from_pretrained(tmp, quantization_config=config, device_map="cuda")
    return quantized.eval(), tokenizer


def quantized_artifact(ref: str, method: str) -> Path:
    """Where ``hone quantize REF --method M`` writes its artifact by default."""
    return assets.hone_home() / "quantized" / f"{resolve_source(ref).slug()}-{method}"


# --------------------------------------------------------------------------- measurement


def _eval_rows(job: JobConfig, tokenizer: Any, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(raw rows, tokenized rows): the first ``n`` validation rows (training rows when there is no validation split)."""
    from hone.data import load_splits, tokenize_split

    splits = load_splits(job.data.model_copy(update={"max_eval_samples": None}))
    split = "validation" if "validation" in splits else "train"
    rows = splits[split].select(range(min(n, len(splits[split]))))
    tokenized, _ = tokenize_split(rows, job, tokenizer, split, pack=False)
    return list(rows), list(tokenized)


def _answers_gated(job: JobConfig) -> bool:
    """Causal LM data with a prompt and an expected answer: the gate also compares generated answers."""
    return job.task.type == "causal_lm" and job.data.format in ("alpaca", "messages", "sharegpt")


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _measure(spec: dict[str, Any], queue: Any) -> None:
    """Child process: load one model, evaluate it, time greedy decoding, report peak RSS."""
    try:
        import logging
        import resource
        import warnings

        for name in ("torchao", "torch.utils._pytree", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning)
        import torch

        from hone.modeling import evaluate, generation_accuracy, model_device

        torch.manual_seed(0)
        source: _Source = spec["source"]
        if spec["artifact"]:
            model, tokenizer, _ = load_quantized(spec["artifact"])
        else:
            model, tokenizer = _load_original(source)
            if torch.cuda.is_available() and spec.get("method") != "int8-dynamic":
                model = model.to("cuda")  # compare like with like: the GPU methods run on the GPU
        device = model_device(model)
        raw, rows = _eval_rows(source.job, tokenizer, spec["n"])
        metrics = evaluate(model, rows, source.job, tokenizer.pad_token_id)
        out = {k: v for k, v in metrics.items() if k != "eval_tokens"}
        if _answers_gated(source.job):
            out["answer_accuracy"], _ = generation_accuracy(model, tokenizer, raw, source.job, max_new_tokens=12)
        if source.job.task.type == "causal_lm":
            prompt = tokenizer("The movie was", return_tensors="pt").to(device)
            new = 32
            with torch.no_grad():
                model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                started = time.perf_counter()
                model.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out["decode_ms_per_token"] = (time.perf_counter() - started) * 1000 / new
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


def _measure_in_child(source: _Source, artifact: Path | None, n: int, method: str) -> dict[str, float]:
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


def _original_size_mb(model: Any) -> float:
    """Size of the fp weights as safetensors (the original model's files on disk)."""
    return sum(t.numel() * t.element_size() for t in {id(p): p for p in model.state_dict().values()}.values()) / 2**20


def _gate(task: str, original: dict[str, float], quantized: dict[str, float], thresholds: GateThresholds) -> dict[str, Any]:
    """Every checked measure must hold: accuracy drop (classification accuracy, or generated-answer accuracy)
    and, for causal LMs, the relative eval-loss increase."""
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
    failed = [metric for metric, change, allowed, _ in checks if allowed is not None and change > allowed + 1e-12]
    return {"passed": not failed, "rule": "; ".join(text for *_, text in checks), "failed": failed,
            "changes": {metric: change for metric, change, _, _ in checks}}


def quantize(ref: str, method: str | None = None, *, out: str | Path | None = None, n: int = 64,
             thresholds: GateThresholds | None = None, job: JobConfig | None = None, quiet: bool = False) -> QuantizeResult:
    """Quantise ``ref`` with ``method`` (default: the device's default), gate it, record the verdict."""
    import torch

    method = method or (GPU_DEFAULT if torch.cuda.is_available() else CPU_DEFAULT)
    _check_method(method)
    thresholds = thresholds or GateThresholds()
    source = resolve_source(ref, job)
    folder = Path(out) if out else assets.hone_home() / "quantized" / f"{source.slug()}-{method}"
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
        modules = _default_modules(model, method)
        model = _apply(model, method, modules)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _save(model, tokenizer, method, staging)
    info: dict[str, Any] = {"method": method, "source": ref, "source_path": source.path, "task": source.job.task.type,
                            "job": source.job.to_dict(), "created": time.time(), "gate": {"passed": None},
                            "quantized_modules": None if method.startswith("bnb-") else modules}
    (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    del model

    say(f"measuring the original and the quantised model on {n} {source.job.data.source} rows (each in a fresh process)")
    original = _measure_in_child(source, None, n, method)
    quantized = _measure_in_child(source, staging, n, method)
    original["size_mb"] = original_mb if original_mb is not None else float("nan")
    quantized["size_mb"] = _folder_mb(staging) - sum(p.stat().st_size for p in staging.glob("tokenizer*")) / 2**20
    gate = _gate(source.job.task.type, original, quantized, thresholds)
    info["gate"] = {**gate, "thresholds": thresholds.__dict__, "original": original, "quantized": quantized, "eval_rows": n}
    (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)  # the artifact appears complete or not at all
    if source.registry:
        from hone.registry import tag_version

        reg = source.registry
        tag_version(reg["name"], reg["version"], {
            f"hone.quantized.{method}": str(folder),
            f"hone.quantized.{method}.gate": "passed" if gate["passed"] else "failed",
            f"hone.quantized.{method}.report": json.dumps({"rule": gate["rule"], "original": original, "quantized": quantized})[:5000],
        })
    return QuantizeResult(folder, method, bool(gate["passed"]), original, quantized, gate)
