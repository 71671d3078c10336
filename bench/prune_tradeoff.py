"""Structured pruning's trade-off on the SmolLM2 sentiment winner: MLP channels or whole layers removed
(``hone.quantize.prune``) at several sparsities, before and after a recovery fine-tune, against the unpruned model, all in
one run.

1. The winner: ``jobs/lora-smollm2-sentiment.yaml`` trained here (LoRA, merged), or ``--model`` (a merged export).
2. Each sparsity: channel importance from 64 training rows, the same channels cut from every layer, saved as a plain
   Hugging Face model (a smaller ``intermediate_size``).
3. ``--recover``: those sparsities fine-tuned again with the recipe (Ray Train, merged) from the pruned model, its LoRA
   adapter on the MLP projections too.
4. Every model: parameters; held-out accuracy on 200 validation reviews, scored as ``hone compare`` scores (greedy, a
   constrained choice between the labels, transformers); and on vLLM (its CPU build, fp32, one process for all models)
   greedy decode ms/token and free-text answer accuracy.

    python bench/prune_tradeoff.py                                  # ≈ 20 min on 2 cores
    python bench/prune_tradeoff.py --model RUN/export --sparsity 0.25 0.5 --recover 0.5
    python bench/prune_tradeoff.py --method layers --sparsity 0.2 0.34 --recover 0.2 0.34
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from machine import cpu_flags  # bench/machine.py: python puts bench/ on the path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "lora-smollm2-sentiment.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a merged export of the recipe (default: train it here)")
    ap.add_argument("--method", default="mlp-channels", choices=["mlp-channels", "layers"],
                    help="what is cut: MLP channels (Wanda-sp) or whole layers (ShortGPT's Block Influence)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    ap.add_argument("--recover", type=float, nargs="*", default=[0.4, 0.5])
    ap.add_argument("--recover-job", help="the recovery run's job (default: the recipe, its LoRA adapter on the MLP too), "
                                          "e.g. jobs/full-zero3-smollm2.yaml for full fine-tuning")
    ap.add_argument("--recover-steps", type=int, help="the recovery run's steps (default: its job's)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--out", default=None, help="folder for the models and results (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from hone.artifacts import resolve_ref
    from hone.comparison.scoring import HeldOut, score_answers
    from hone.config import JobConfig, load_job
    from hone.config.compare import ScoringConfig
    from hone.data import held_out_rows, prompt_and_answer, tokenize_split
    from hone.modeling import load_model
    from hone.quantize.prune import channel_scores, kept_channels, kept_layers, layer_scores, prune_layers, prune_mlp_channels
    from hone.runtime import vllm_python
    from hone.training import train

    out = Path(args.out or tempfile.mkdtemp(prefix="hone-prune-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"[bench] CPU: {os.cpu_count()} cores, {cpu_flags()}; output in {out}", flush=True)
    job = load_job(RECIPE)
    if args.model:
        winner = Path(args.model)
    else:
        result = train(job, storage_path=str(out / "runs"), quiet=True)
        winner = result.merged_dir or result.export_dir
        print(f"[bench] trained the winner in {time.time() - started:.0f} s: {winner}", flush=True)
    model, tokenizer = load_model(resolve_ref(str(winner)))
    held = HeldOut.load(job, ScoringConfig(job=str(RECIPE), split="validation", rows=args.rows, max_tokens=8))

    calibration, _ = tokenize_split(held_out_rows(job.data, "train", 64), job, tokenizer, "train", pack=False)
    batches = [torch.tensor([list(r["input_ids"])]) for r in calibration]
    scores = layer_scores(model, batches) if args.method == "layers" else channel_scores(model, batches)
    width, depth = model.config.intermediate_size, model.config.num_hidden_layers
    models: dict[str, Path] = {"unpruned": out / "unpruned"}
    model.save_pretrained(models["unpruned"])
    tokenizer.save_pretrained(models["unpruned"])
    stats = {"unpruned": {"params": sum(p.numel() for p in model.parameters()), "intermediate_size": width, "layers": depth}}
    prefix = "layers" if args.method == "layers" else "mlp"
    for s in args.sparsity:
        pruned = copy.deepcopy(model)
        st = (prune_layers(pruned, scores, kept_layers(depth, s)) if args.method == "layers" else
              prune_mlp_channels(pruned, scores, kept_channels(width, s)))
        name = f"{prefix}-{s:g}"
        models[name] = out / name
        pruned.save_pretrained(models[name])
        tokenizer.save_pretrained(models[name])
        stats[name] = {"params": st.params_after, "intermediate_size": st.intermediate_after, "layers": st.layers_after,
                       "fewer_params": st.fewer_params, "removed_layers": st.removed_layers}
        del pruned
    for s in args.recover:
        name = f"{prefix}-{s:g}"
        t0 = time.time()
        raw = load_job(args.recover_job).to_dict() if args.recover_job else job.to_dict()
        raw["model"]["name"] = str(models[name])
        if not args.recover_job:  # the recipe from the pruned model, its adapter on the MLP too (where the cut was)
            raw["method"]["lora"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if args.recover_steps:
            raw["training"]["max_steps"] = args.recover_steps
        recovered = train(JobConfig.model_validate(raw), storage_path=str(out / "runs"), quiet=True)
        tag = f"{name}+{'lora' if not args.recover_job else Path(args.recover_job).stem}"
        models[tag] = recovered.merged_dir or recovered.export_dir
        stats[tag] = {**stats[name], "recovery_s": time.time() - t0}
        print(f"[bench] recovered {name} in {time.time() - t0:.0f} s", flush=True)

    for name, folder in models.items():  # transformers, constrained: as hone compare scores
        m, tok = load_model(resolve_ref(str(folder)))
        prompts, expected = held.prompts(tok)
        stats[name]["accuracy"] = score_answers(m, tok, held, prompts, expected)[0]
        del m
    answers = [{"ids": tokenizer(p, add_special_tokens=False)["input_ids"], "expected": a}
               for p, a in (prompt_and_answer(r, job.data, tokenizer) for r in held.rows)]
    (out / "answers.json").write_text(json.dumps(answers))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [vllm_python(), "-m", "hone.quantize.vllm_speed", "--answers", str(out / "answers.json")]
    for folder in models.values():
        cmd += [str(folder), "float32"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("[")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"vLLM measurement failed: {(run.stderr or run.stdout)[-3000:]}")
    for name, measured in zip(models, json.loads(lines[-1])):
        stats[name].update({f"vllm_{k}": v for k, v in measured.items()})

    base = stats["unpruned"]
    print(f"\nCPU {cpu_flags()}; {args.rows} validation reviews; {time.time() - started:.0f} s in all")
    print("| model | layers | MLP width | params | fewer params | accuracy (constrained, transformers) | vLLM answer accuracy | "
          "vLLM decode ms/token | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, st in stats.items():
        print(f"| {name} | {st['layers']} | {st['intermediate_size']} | {st['params'] / 1e6:.1f} M | {st.get('fewer_params', 0.0):.1%} | "
              f"{st['accuracy']:.3f} | {st['vllm_answer_accuracy']:.3f} | {st['vllm_decode_ms_per_token']:.1f} | "
              f"{base['vllm_decode_ms_per_token'] / st['vllm_decode_ms_per_token']:.2f}x |")
    (out / "prune.json").write_text(json.dumps({"cpu": cpu_flags(), "stats": stats}, indent=2, default=str))
    print(f"wrote {out / 'prune.json'}")


if __name__ == "__main__":
    main()
