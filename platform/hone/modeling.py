"""Models: load the base model for a task, wrap it with the job's PEFT method, compute losses, evaluate.

The same functions run inside Ray Train workers and in a plain Python process (tests,
the quality gate, ``hone`` commands), so an export reloaded outside Ray reproduces the
metrics computed during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hone import assets
from hone.artifacts import EXPORT_INFO, MERGED_DIR, ModelSpec, model_class, publish_dir, resolve_ref
from hone.config import JobConfig
from hone.data import IGNORE_INDEX, collate
from hone.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ModelError",
    "build_model",
    "evaluate",
    "forward_loss",
    "is_hone_model",
    "load_base_model",
    "load_model",
        "model_device",
    "rank_batches",
    "starting_weights",
    "torch_dtype",
    "unwrap",
]


def torch_dtype(job: JobConfig) -> torch.dtype:
    import torch

    if job.model.dtype != "auto":
        return getattr(torch, job.model.dtype)
    # Train from fp32 weights: DeepSpeed keeps fp32 master weights and casts for bf16/fp16.
    return torch.float32


def _quantization_config(job: JobConfig) -> Any:
    """bitsandbytes 4/8-bit config for QLoRA. CUDA only: checked here, not faked."""
    import torch

    if not torch.cuda.is_available():
        raise ModelError("method.type qlora needs a CUDA GPU on the training workers (bitsandbytes); none is visible")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelError("method.type qlora needs bitsandbytes: pip install 'hone[gpu]'") from e
    from transformers import BitsAndBytesConfig

    q = job.method.qlora
    compute = getattr(torch, q.compute_dtype)
    if q.bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(job: JobConfig, path: str | None = None) -> Any:
    """The pretrained model for the job's task (no adapter), from ``path`` or the job's model."""
    source = path or assets.resolve_model(job.model.name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(job), "trust_remote_code": job.model.trust_remote_code}
    if path is None and job.model.revision:
        kwargs["revision"] = job.model.revision
    if job.method.type == "qlora":
        kwargs["quantization_config"] = _quantization_config(job)
    if job.task.type == "sequence_classification":
        labels = job.task.labels or [str(i) for i in range(job.task.num_labels or 2)]
        model = model_class(job.task.type).from_pretrained(
            source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, **kwargs
        )
    else:
        model = model_class(job.task.type).from_pretrained(source, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def is_hone_model(name: str) -> bool:
    """Whether a job's ``model.name`` names a hone model (a ``models:/`` reference, an export, a run) to start from."""
    from pathlib import Path

    return name.startswith("models:/") or (Path(name).expanduser() / EXPORT_INFO).exists()


def starting_weights(ref: str, trust_remote_code: bool = False) -> str:
    """A local Hugging Face folder holding the full weights of a hone model reference, for a job that starts from it
    (``model.name: models:/sft@winner``: preference tuning after supervised fine-tuning). A full export is used as it
    is; an adapter export is its run's merged model when there is one, else it is merged once into
    ``$HONE_HOME/cache/merged/`` (with its tokenizer). Quantised artifacts are refused."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    spec = resolve_ref(ref)
    if spec.kind == "quantized":
        raise ModelError(f"model.name {ref} is a quantised artifact: fine-tune from the full-precision model it was made from")
    if spec.kind != "export" or not spec.adapter:
        return spec.path
    merged = Path(spec.path).parent / MERGED_DIR
    if (merged / EXPORT_INFO).exists():
        return str(merged)
    weights = Path(spec.path) / "adapter_model.safetensors"
    stamp = f"{Path(spec.path).resolve()}:{weights.stat().st_mtime_ns if weights.exists() else 0}"
    target = assets.hone_home() / "cache" / "merged" / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    if not (target / EXPORT_INFO).exists():
        model, tokenizer = load_model(spec, merge_adapter=True, trust_remote_code=trust_remote_code)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / EXPORT_INFO).write_text(json.dumps({**spec.info, "kind": "merged-model"}, indent=2, default=str))
        publish_dir(partial, target)
    return str(target)


def _check_targets(model: Any, targets: Any, key: str) -> None:
    """Fail early, with the names that do exist, when target modules match nothing."""
    if targets is None or targets == "all-linear":
        return
    import torch

    names = [n for n, m in model.named_modules() if n]
    leaf_linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    )
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(f"{key}: {missing} match no module of {type(model).__name__}; its linear modules are {leaf_linear}")


def _peft_config(job: JobConfig, model: Any, total_steps: int) -> Any:
    import peft

    task_type = peft.TaskType.SEQ_CLS if job.task.type == "sequence_classification" else peft.TaskType.CAUSAL_LM
    m = job.method
    if m.type in ("lora", "qlora"):
        lo = m.lora
        _check_targets(model, lo.target_modules, "method.lora.target_modules")
        return peft.LoraConfig(task_type=task_type, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                               target_modules=lo.target_modules, modules_to_save=lo.modules_to_save, bias=lo.bias,
                               use_dora=lo.use_dora, use_rslora=lo.use_rslora)
    if m.type == "adalora":
        a = m.adalora
        _check_targets(model, a.target_modules, "method.adalora.target_modules")
        return peft.AdaLoraConfig(task_type=task_type, init_r=a.init_r, target_r=a.target_r, lora_alpha=a.alpha,
                                  lora_dropout=a.dropout, tinit=a.tinit, tfinal=a.tfinal, deltaT=a.delta_t,
                                  target_modules=a.target_modules, total_step=max(total_steps, a.tinit + a.tfinal + 1))
    if m.type == "prefix_tuning":
        p = m.prefix_tuning
        return peft.PrefixTuningConfig(
            task_type=task_type,
            num_virtual_tokens=p.num_virtual_tokens,
            prefix_projection=p.prefix_projection,
            encoder_hidden_size=p.encoder_hidden_size,
        )
    if m.type == "ia3":
        i = m.ia3
        _check_targets(model, i.target_modules, "method.ia3.target_modules")
        return peft.IA3Config(task_type=task_type, target_modules=i.target_modules, feedforward_modules=i.feedforward_modules)
    raise AssertionError(m.type)


def build_model(job: JobConfig, total_steps: int = 1) -> Any:
    """Base model + the job's method, ready to train. Seed torch first for identical new weights."""
    model = load_base_model(job)
    if job.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if job.method.is_peft:
            model.enable_input_require_grads()
    if job.method.type == "qlora":
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.training.gradient_checkpointing)
    if job.method.is_peft:
        import peft

        model = peft.get_peft_model(model, _peft_config(job, model, total_steps))
    return model


# --------------------------------------------------------------------------- loss and evaluation


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside DeepSpeed/DDP engines and PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module  # DeepSpeedEngine, DistributedDataParallel
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def forward_loss(
    model: Any, batch: dict[str, torch.Tensor], task: str, *, reduction: str = "mean", sparse_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, n_targets, logits-for-classification) for one batch.

    Causal LM: cross-entropy over the label tokens only. With ``sparse_logits`` the output
    layer is computed only at positions that predict a label (``logits_to_keep``), which
    gives the same loss without materialising the full vocabulary at every position.
    """
    import torch
    import torch.nn.functional as F

    if task == "sequence_classification":
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction=reduction)
        return loss, torch.tensor(batch["labels"].numel()), logits

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    positions = mask.any(dim=0).nonzero().squeeze(-1)  # positions t whose logits predict a label at t+1
    if sparse_logits and positions.numel() and _accepts_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        chosen = targets[:, positions]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        chosen = targets
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), chosen.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (chosen != IGNORE_INDEX).sum()
    if reduction == "sum":
        return token_loss, count, None
    return token_loss / count.clamp(min=1), count, None


def rank_batches(rows: Sequence[Any], batch_size: int, rank: int, world_size: int) -> Iterator[tuple[list[Any], float]]:
    """This rank's evaluation batches of ``rows`` (rows ``rank::world_size``) with their weight: every rank yields
    the same number of batches (ZeRO-3 gathers parameters collectively), a short shard padding with weight-0 copies
    of the first row."""
    mine = list(rows[rank::world_size])
    for b in range(math.ceil(math.ceil(len(rows) / world_size) / batch_size)):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        yield (chunk, 1.0) if chunk else (list(rows[:1]), 0.0)


def evaluate(
    model: Any,
    rows: Sequence[dict[str, Any]],
    job: JobConfig,
    pad_id: int,
    *,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Metrics over ``rows`` (each rank takes rows rank::world_size; sums are all-reduced).

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively), padding short shards with zero-weight batches.
    """
    import torch

    task = job.task.type
    num_labels = job.task.num_labels or 0
    # Sums: [loss_sum, n_targets] + confusion matrix (classification).
    loss_sum = torch.zeros(2, dtype=torch.float64)
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64)
    device = model_device(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for chunk, weight in rank_batches(rows, batch_size, rank, world_size):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id, task).items()}
            loss, count, logits = forward_loss(model, batch, task, reduction="sum")
            loss_sum += weight * torch.tensor([float(loss), float(count)], dtype=torch.float64)
            if task == "sequence_classification" and weight:
                preds = logits.argmax(-1)
                for t, p in zip(batch["labels"].tolist(), preds.tolist()):
                    confusion[t, p] += 1
    model.train(was_training)
    if all_reduce is not None:
        loss_sum = all_reduce(loss_sum)
        confusion = all_reduce(confusion) if task == "sequence_classification" else confusion
    eval_loss = float(loss_sum[0] / max(loss_sum[1], 1))
    metrics = {"eval_loss": eval_loss}
    if task == "causal_lm":
        metrics["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
        metrics["eval_tokens"] = float(loss_sum[1])
    else:
        metrics.update(_classification_metrics(confusion))
    return metrics


def model_device(model: Any) -> torch.device:
    """Where the model's (first real) parameters live: batches are moved there."""
    import torch

    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, and precision/recall/F1 of class 1 (binary) or macro-averaged (more classes)."""
    total = float(confusion.sum())
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    pick = (lambda v: float(v[1])) if confusion.shape[0] == 2 else (lambda v: float(v.mean()))
    return {
        "eval_accuracy": float(tp.sum()) / max(total, 1.0),
        "eval_precision": pick(precision),
        "eval_recall": pick(recall),
        "eval_f1": pick(f1),
    }


# --------------------------------------------------------------------------- exports and generation


def load_model(spec: ModelSpec, device: str = "cpu", *, merge_adapter: bool = True, num_labels: int | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any resolved model reference: the one loader every stage uses
    (``hone eval``, quantisation and its gate, serving, the merged export).

    An adapter export is loaded onto its base (``merge_adapter``: merged into it); a quantised artifact exactly
    as its recipe made it; a plain model in fp32 (bf16 on a GPU). ``device``: ``cpu``, ``cuda`` or ``auto``.
    ``trust_remote_code`` is the caller's (the operator's serve or job YAML): the flag an export's own ``hone.json``
    carries is never used, since whoever can write the export could then run code here.
    """
    import torch
    from transformers import AutoTokenizer

    if spec.kind == "quantized":
        from hone.quantized import load_quantized

        model, tokenizer, _ = load_quantized(spec.path, device=None if device == "auto" else device)
        return model, tokenizer
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.kind == "export":
        job = spec.job
        assert job is not None, f"{spec.path}: an export carries its job"
        job = job.model_copy(update={"model": job.model.model_copy(update={"trust_remote_code": trust_remote_code})})
        tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
        if spec.adapter:
            import peft

            model = peft.PeftModel.from_pretrained(load_base_model(job), spec.path)
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            model = model_class(job.task.type).from_pretrained(spec.path, dtype=torch_dtype(job), trust_remote_code=trust_remote_code)
    else:
        folder = assets.resolve_model(spec.path)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        labels = num_labels or (len(spec.labels) if spec.labels else None)
        kwargs = {"num_labels": labels} if spec.task == "sequence_classification" and labels else {}
        model = model_class(spec.task).from_pretrained(folder, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                       trust_remote_code=trust_remote_code, **kwargs)
    if device == "cuda":
        model = model.to("cuda")
    return model.eval(), tokenizer
