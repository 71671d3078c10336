"""Training overhead: hone train (Ray Train + DeepSpeed) against a plain single-process torch loop.

Same model, data, batch order and steps. The plain loop runs the same loss (hone's
``forward_loss``) with torch AdamW, clipping and the same schedule, so the ratio is the
cost of Ray Train + DeepSpeed, not of a different computation. A second baseline uses the
Hugging Face default loss (full-vocabulary logits at every position) for reference.

Time per step is wall time between two reports (steps ``warmup`` .. ``steps - log``), so
Ray's report round-trips are included; the first steps and the final export are not.

    python bench/train_overhead.py                 # SmolLM2-135M LoRA, 25 steps (≈ 6 min on 2 cores)
    python bench/train_overhead.py --model builtin:tiny-llama --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HONE_MLFLOW", "0")  # registry logging happens after fit and is not measured


def job_dict(args: argparse.Namespace, workers: int, stage: int | None, cpus: float) -> dict:
    return {
        "name": "bench",
        "model": {"name": args.model},
        "data": {
            "source": "builtin:rotten-tomatoes",
            "format": "alpaca",
            "prompt_template": "chat",
            "max_length": args.max_length,
            "max_samples": 4096,
            "validation": None,
        },
        "method": {
            "type": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        },
        "distributed": {
            "num_workers": workers,
            "deepspeed": None if stage is None else {"stage": stage},
            "resources_per_worker": {"CPU": cpus},
        },
        "training": {
            "lr": 2e-4,
            "max_steps": args.steps,
            "batch_size": args.batch,
            "log_every": args.log,
            "max_grad_norm": 1.0,
            "scheduler": "constant",
        },
    }


def plain_loop(args: argparse.Namespace, hf_loss: bool) -> float:
    """Seconds per step of a single-process loop over the same batches."""
    import torch

    from hone.config import validate_job
    from hone.data import collate, load_tokenizer, prepare_data
    from hone.modeling import build_model, forward_loss
    from hone.training.plan import Schedule, seed_all

    torch.set_num_threads(args.threads)
    job = validate_job(job_dict(args, 1, 0, args.threads))
    tokenizer = load_tokenizer(job)
    rows = list(prepare_data(job, tokenizer).train)
    seed_all(job.training.seed)
    model = build_model(job).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.training.lr)
    sched = Schedule(len(rows), args.batch, 1, 1, job.training.seed)
    marks = {}
    for step in range(args.steps - args.log):
        batch = collate([rows[i] for i in sched.micro_rows(step, 0, 0)], tokenizer.pad_token_id)
        loss = model(**batch).loss if hf_loss else forward_loss(model, batch, "causal_lm")[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks[step + 1] = time.perf_counter()
    return (marks[args.steps - args.log] - marks[args.warmup]) / (args.steps - args.log - args.warmup)


def hone_run(args: argparse.Namespace, workers: int, stage: int | None, storage: str) -> tuple[float, float]:
    """(seconds per step, samples per second) of hone train, from the report timestamps."""
    from hone.config import validate_job
    from hone.training import train

    cpus = args.threads / workers
    job = validate_job(job_dict(args, workers, stage, cpus))
    result = train(job, storage_path=storage, quiet=True)
    times = {m["step"]: m["time"] for m in result.history}
    a, b = args.warmup, args.steps - args.log
    per_step = (times[b] - times[a]) / (b - a)
    return per_step, args.batch * workers / per_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--log", type=int, default=5, help="report every N steps (the timing marks)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads in total (plain loop and hone alike)")
    parser.add_argument("--runs", default="zero0,zero2,zero2x2,ddp", help="hone runs to time (comma-separated: zero0, zero2, zero2x2, ddp)")
    args = parser.parse_args()
    args.warmup = args.log
    if args.steps < 3 * args.log:
        parser.error("--steps must be at least 3 × --log")

    import ray

    from hone.config import validate_job
    from hone.runtime import worker_env

    print(
        f"model {args.model}, LoRA r=8 q/k/v/o, batch {args.batch}/worker, ≤{args.max_length} tokens, "
        f"steps {args.warmup}..{args.steps - args.log} timed, {args.threads} CPU threads",
        flush=True,
    )
    rows = []
    base = plain_loop(args, hf_loss=False)
    rows.append(("plain torch loop (baseline)", base, args.batch / base))
    hf = plain_loop(args, hf_loss=True)
    rows.append(("plain loop, HF full-vocab loss", hf, args.batch / hf))
    ray.init(
        address="local",
        num_cpus=args.threads,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env(validate_job(job_dict(args, 1, 0, args.threads)))},
    )
    with tempfile.TemporaryDirectory() as storage:
        runs = {
            "zero0": ("hone 1 worker ZeRO-0", 1, 0),
            "zero2": ("hone 1 worker ZeRO-2", 1, 2),
            "zero2x2": ("hone 2 workers ZeRO-2", 2, 2),
            "ddp": ("hone 1 worker DDP (deepspeed: null)", 1, None),
        }
        for key in args.runs.split(","):
            label, workers, stage = runs[key]
            per_step, throughput = hone_run(args, workers, stage, storage)
            rows.append((label, per_step, throughput))
    ray.shutdown()

    print()
    print("| run | s/step | step-time ratio | samples/s | throughput ratio |")
    print("|---|---|---|---|---|")
    for label, per_step, throughput in rows:
        print(f"| {label} | {per_step:.3f} | {per_step / base:.2f}× | {throughput:.2f} | {throughput / (args.batch / base):.2f}× |")
    print()
    first = next((r for r in rows if r[0] == "hone 1 worker ZeRO-0"), None)
    if first:
        ratio = first[1] / base
        print(json.dumps({"zero0_1worker_step_ratio": round(ratio, 3), "target": 1.10, "met": ratio <= 1.10}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
