"""Structured pruning of a Llama-style model: MLP channels (the same number removed from every layer) or whole decoder
layers, so the result is a standard Hugging Face config (a smaller ``intermediate_size`` or ``num_hidden_layers``) that
transformers and vLLM load unchanged, and smaller and faster on every engine (unstructured sparsity is neither on a CPU).

Importance is Wanda's (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv:2306.11695) |weight| × ‖input activation‖ taken per channel, as its structured variant does (An et al., 2024,
FLAP, arXiv:2312.11983): channel ``j`` of a layer's MLP scores ‖X_j‖₂ · Σ_i |W_down[i, j]|, where X_j is the channel's
activation (``act(gate) * up``, the input of ``down_proj``) over calibration rows of the job's own training split.
A layer keeps its highest-scoring channels; ``gate_proj``/``up_proj`` lose those rows and ``down_proj`` those columns.

Layers are scored by ShortGPT's Block Influence (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect", arXiv:2403.03853): 1 − the mean cosine similarity of a layer's input and output hidden states
over the calibration tokens; the layers that change their input least are removed.

:func:`prune` writes the pruned model as a hone export (``hone.json`` records what was cut, from what, and its gate);
:func:`gate_pruned` measures it against the unpruned model, each in a fresh process, with the quantisation gate's measures
(:func:`hone.quantize.gate.gate_verdict`) plus decode speed on the engine that will serve it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hone import assets, storage
from hone.artifacts import EXPORT_INFO, publish_dir, resolve_ref
from hone.config import JobConfig
from hone.config.quantization import PRUNE_METHODS, GateThresholds, QuantizeError
from hone.modeling import load_model
from hone.quantize.gate import Source, calibration_batches, gate_verdict, measure_in_child, measure_on_vllm, resolve_source

__all__ = ["PRUNE_METHODS", "PruneResult", "PruneStats", "channel_scores", "gate_pruned", "kept_channels", "kept_layers", "layer_scores",
           "prune", "prune_layers", "prune_mlp_channels", "pruned_dir", "record_gate"]


@dataclass
class PruneStats:
    intermediate_before: int
    intermediate_after: int
    params_before: int
    params_after: int
    layers_before: int = 0
    layers_after: int = 0
    removed_layers: list[int] = field(default_factory=list)

    @property
    def fewer_params(self) -> float:
        """The fraction of the model's parameters removed."""
        return 1.0 - self.params_after / self.params_before


def _mlps(model: Any) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in layers or []]
    if not mlps or not all(m is not None and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")) for m in mlps):
        raise QuantizeError(f"{type(model).__name__} has no gated MLP (gate_proj/up_proj/down_proj per layer) to prune: "
                            "MLP channel pruning takes Llama, Qwen, Mistral and SmolLM-style models")
    return mlps


def _calibrate(model: Any, batches: Sequence[Any], handles: list[Any]) -> None:
    """Run ``batches`` through ``model`` (no gradients, no cache) for the hooks behind ``handles``, then remove them."""
    import torch

    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def channel_scores(model: Any, batches: Sequence[Any]) -> list[Any]:
    """Each layer's MLP channel importance (a tensor of ``intermediate_size``) over ``batches`` (1 × T token tensors)."""
    import torch

    mlps = _mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]

    def hook(i: int) -> Any:
        def record(_: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[i] += (x * x).sum(0).cpu()
        return record

    _calibrate(model, batches, [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)])
    return [s.sqrt() * m.down_proj.weight.detach().abs().double().sum(0).cpu() for s, m in zip(sums, mlps)]


def kept_channels(intermediate: int, sparsity: float, multiple: int = 32) -> int:
    """Channels each layer keeps: ``(1 - sparsity) × intermediate`` rounded to a multiple of ``multiple`` (kernels
    prefer aligned widths), at least ``multiple``."""
    if not 0.0 <= sparsity < 1.0:
        raise QuantizeError(f"sparsity must be in [0, 1), not {sparsity}")
    return max(multiple, min(intermediate, int(round((1.0 - sparsity) * intermediate / multiple)) * multiple))


def prune_mlp_channels(model: Any, scores: Sequence[Any], keep: int) -> PruneStats:
    """Keep each layer's ``keep`` highest-scoring MLP channels, in place; the config's ``intermediate_size`` follows."""
    import torch

    mlps = _mlps(model)
    before_width = mlps[0].down_proj.in_features
    before = sum(p.numel() for p in model.parameters())
    for m, score in zip(mlps, scores):
        idx = torch.sort(torch.topk(score, keep).indices).values  # the kept channels, in their order
        for name in ("gate_proj", "up_proj"):
            old = getattr(m, name)
            new = torch.nn.Linear(old.in_features, keep, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
            new.weight.data = old.weight.data[idx].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[idx].clone()
            setattr(m, name, new)
        old = m.down_proj
        new = torch.nn.Linear(keep, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
        new.weight.data = old.weight.data[:, idx].clone()
        if old.bias is not None:
            new.bias.data = old.bias.data.clone()
        m.down_proj = new
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = keep
    model.config.intermediate_size = keep
    return PruneStats(before_width, keep, before, sum(p.numel() for p in model.parameters()), len(mlps), len(mlps))


def layer_scores(model: Any, batches: Sequence[Any]) -> list[float]:
    """Each decoder layer's Block Influence over ``batches`` (1 × T token tensors): 1 − mean cos(input, output)."""
    import torch

    _mlps(model)  # a Llama-style model, or a clear error
    layers = model.model.layers
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook(i: int) -> Any:
        def record(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = (args[0] if args else kwargs["hidden_states"]).detach().double()
            y = (output[0] if isinstance(output, tuple) else output).detach().double()
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            sums[i] += float((1.0 - cos).sum())
            counts[i] += cos.numel()
        return record

    _calibrate(model, batches, [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)])
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def kept_layers(layers: int, sparsity: float) -> int:
    """Layers kept: ``(1 - sparsity) × layers`` rounded, at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise QuantizeError(f"sparsity must be in [0, 1), not {sparsity}")
    return max(1, layers - int(round(sparsity * layers)))


def prune_layers(model: Any, scores: Sequence[float], keep: int) -> PruneStats:
    """Keep the ``keep`` layers of highest influence, in their order, in place; the config's ``num_hidden_layers`` (and
    ``layer_types``, where the config has one) follow, and each attention's cache index is renumbered."""
    import torch

    layers = model.model.layers
    before = sum(p.numel() for p in model.parameters())
    kept = sorted(sorted(range(len(layers)), key=lambda i: -scores[i])[:keep])
    for j, i in enumerate(kept):
        if hasattr(layers[i], "self_attn") and hasattr(layers[i].self_attn, "layer_idx"):
            layers[i].self_attn.layer_idx = j
    removed = [i for i in range(len(layers)) if i not in kept]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    width = model.config.intermediate_size
    return PruneStats(width, width, before, sum(p.numel() for p in model.parameters()), len(layers), keep, removed)


# --------------------------------------------------------------------------- the command: prune, then gate


def pruned_dir(ref: str, method: str, sparsity: float) -> Path:
    """Where ``hone prune REF`` writes by default."""
    return assets.hone_home() / "pruned" / f"{resolve_ref(ref).slug()}-{method}-{sparsity:g}"


def _check_destination(folder: Path) -> None:
    """hone replaces only what it made: an existing destination must be a pruned export of hone's (or an empty folder)."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink():
        if not any(folder.iterdir()):
            return
        info = folder / EXPORT_INFO
        if info.is_file() and "pruned" in json.loads(info.read_text()):
            return
    raise QuantizeError(f"{folder} exists and is not a model hone pruned (no {EXPORT_INFO} with a 'pruned' record): hone replaces "
                        "only its own; give another folder")


def prune(ref: str, sparsity: float, *, method: str = "mlp-channels", out: str | Path | None = None, job: JobConfig | None = None,
          calibration_rows: int = 64, quiet: bool = False) -> tuple[Path, PruneStats]:
    """Prune ``ref`` (an adapter export merged first) and write it as a hone export: ``out`` (a folder or an object-store
    URI; default :func:`pruned_dir`), published complete or not at all. Importance comes from ``calibration_rows`` rows of
    the training split of ``job`` (default: the model's own job), never from the held-out rows the gate evaluates on."""
    if method not in PRUNE_METHODS:
        raise QuantizeError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")
    if calibration_rows < 1:
        raise QuantizeError("pruning scores channels on training rows: give calibration_rows >= 1")
    source = resolve_source(ref, job)
    if source.job.task.type != "causal_lm":
        raise QuantizeError(f"{ref} is a {source.job.task.type} model: hone prunes causal LMs (their MLP channels)")
    kept_channels(4096, sparsity)  # refuses a sparsity outside [0, 1) before anything is loaded
    remote = str(out) if out is not None and storage.is_uri(str(out)) else None
    if remote:
        storage.check(remote)
    folder = storage.mirror(remote) if remote else Path(out) if out else pruned_dir(ref, method, sparsity)
    _check_destination(folder)
    say = (lambda *_: None) if quiet else (lambda msg: print(f"[hone] {msg}", flush=True))
    model, tokenizer = load_model(source.spec)
    batches = calibration_batches(source.job, tokenizer, calibration_rows)
    if method == "layers":
        n = model.config.num_hidden_layers
        say(f"pruning {ref}: scoring its {n} layers (Block Influence) on {calibration_rows} training rows")
        stats = prune_layers(model, layer_scores(model, batches), kept_layers(n, sparsity))
        kept = f"kept {stats.layers_after} of {n} layers (removed {stats.removed_layers})"
    else:
        width = model.config.intermediate_size
        say(f"pruning {ref}: scoring its {width} MLP channels per layer on {calibration_rows} training rows")
        stats = prune_mlp_channels(model, channel_scores(model, batches), kept_channels(width, sparsity))
        kept = f"kept {stats.intermediate_after} of {width} channels per layer"
    say(f"{kept}: {stats.params_before / 1e6:.1f} M → {stats.params_after / 1e6:.1f} M parameters ({stats.fewer_params:.1%} fewer)")
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    info = {"kind": "model", "base_model": ref, "method": "pruned", "task": "causal_lm", "created": time.time(),
            "pruned": {"method": method, "sparsity": sparsity, "from": ref, "from_path": source.spec.path,
                       "calibration_rows": calibration_rows, **asdict(stats)},
            "job": source.job.to_dict()}
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
    publish_dir(staging, folder)
    if remote:  # hone.json last: a folder without it is not an export
        for f in sorted(folder.iterdir(), key=lambda f: f.name == EXPORT_INFO):
            storage.upload(f, storage.join(remote, f.name))
    return folder, stats


@dataclass
class PruneResult:
    """A pruned (and perhaps recovered) model measured against the unpruned one."""

    model: str
    engine: str
    passed: bool
    rule: str
    original: dict[str, float]
    pruned: dict[str, float]
    gate: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """The unpruned model's decode ms/token over the pruned one's, on :attr:`engine`."""
        return self.original["decode_ms_per_token"] / self.pruned["decode_ms_per_token"]

    @property
    def faster(self) -> bool:
        return self.pruned["decode_ms_per_token"] < self.original["decode_ms_per_token"]

    def table(self) -> str:
        keys = [k for k in ("params_m", "eval_loss", "answer_accuracy", "decode_ms_per_token", "peak_rss_mb") if k in self.original]
        lines = [f"{'':22} {'unpruned':>12} {'pruned':>12}"]
        lines += [f"{k:22} {self.original[k]:12.4f} {self.pruned[k]:12.4f}" for k in keys]
        lines.append(f"decode speed-up on {self.engine}: {self.speedup:.2f}x; quality gate {'PASSED' if self.passed else 'FAILED'}: "
                     f"{self.rule}")
        return "\n".join(lines)


def gate_pruned(original: str, pruned: str, *, job: JobConfig | None = None, n: int = 64, thresholds: GateThresholds | None = None,
                engine: str = "transformers", quiet: bool = False) -> PruneResult:
    """Measure ``pruned`` (a pruned export, or a model fine-tuned from one) against ``original`` on the first ``n`` held-out
    rows of ``job`` (default: the original's own), each in a fresh process; ``engine: vllm`` measures greedy answers and
    decode speed again on vLLM (both in full precision), the engine that will serve it."""
    if n < 1:
        raise QuantizeError(f"the quality gate needs at least one evaluation row (got n={n})")
    if engine not in ("transformers", "vllm"):
        raise QuantizeError(f"engine must be transformers or vllm, not {engine!r}")
    thresholds = thresholds or GateThresholds()
    source = resolve_source(original, job)
    candidate = Source(resolve_ref(pruned), source.job)
    if not quiet:
        print(f"[hone] measuring the unpruned and the pruned model on {n} held-out rows, each in a fresh process"
              + (", then both on vLLM" if engine == "vllm" else ""), flush=True)
    before, after = measure_in_child(source, None, n), measure_in_child(candidate, None, n)
    if engine == "vllm":
        import torch

        target = candidate if candidate.spec.adapter else Path(candidate.spec.path)
        on_vllm = measure_on_vllm(source, target, n, dtype="auto" if torch.cuda.is_available() else "float32")
        before.update(on_vllm[0])
        after.update(on_vllm[1])
    verdict = gate_verdict("causal_lm", before, after, thresholds)
    return PruneResult(pruned, engine, bool(verdict["passed"]), verdict["rule"], before, after, verdict)


def record_gate(folder: Path, result: PruneResult) -> None:
    """Write the gate's verdict and figures into the pruned export's ``hone.json`` (replaced whole, never half-written)."""
    info = json.loads((folder / EXPORT_INFO).read_text())
    info["pruned"]["gate"] = {"passed": result.passed, "rule": result.rule, "engine": result.engine, "original": result.original,
                              "pruned": result.pruned}
    partial = folder / f".{EXPORT_INFO}.partial"
    partial.write_text(json.dumps(info, indent=2, default=str))
    os.replace(partial, folder / EXPORT_INFO)
