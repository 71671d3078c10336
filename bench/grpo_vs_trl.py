"""GRPO against TRL on the same task, machine and wall-clock budget: held-out answer accuracy against wall time, both
curves in one plot, from one run of this script.

hone: the shipped recipe ``jobs/grpo-smollm2-sentiment.yaml`` as ``hone train`` runs it (a local Ray cluster, 2 training
workers with DeepSpeed ZeRO-2, one vLLM rollout engine actor, rollouts constrained to the two labels), its held-out
greedy answer accuracy read from the run's ``eval_reward`` records (before training and every 10 steps), at the time
each record was written since ``hone.train`` was called (Ray, the engine's start and the evaluations included).

TRL: ``GRPOTrainer`` generating with transformers in this process, every core, given hone's whole wall time as its
budget (model load and trainer set-up included; the bench's own evaluations excluded). The same model (SmolLM2-135M-
Instruct, fp32), LoRA (r 8, alpha 16, q/k/v/o), learning rate (1e-4, constant; hone's recipe warms up over its first step), k (8), prompts a
step (16, so 128 completions and one optimiser step a step: per-device batch 32 × 4 accumulation steps), temperature
1, at most 8 new tokens, beta 0, GRPO loss with rewards scaled by the group's spread, the same class-balanced training
prompts formatted by the same chat template, and the same reward: hone's ``exact_match`` (``hone.training.rewards.score``)
on TRL's completions. TRL's transformers path has no structured outputs, so its rollouts are free text: that is the
difference a user gets.

One scorer for both at the end: constrained greedy choice on the 100 validation reviews hone evaluates on, the label
whose first token the model rates higher after the prompt (what greedy decoding under hone's two-label grammar picks).
It scores the untuned model, TRL's model at every ``--trl-eval-every`` steps, and hone's final export, so the figure
read from hone's records (vLLM) can be checked against it (transformers).

    python bench/grpo_vs_trl.py                              # ≈ 20 min on 2 cores: hone's run, then TRL's
    python bench/grpo_vs_trl.py --steps 10 --out /tmp/g.png  # a shorter budget
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_flags  # bench/machine.py: python puts bench/ on the path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HONE_MLFLOW", "0")

RECIPE = Path(__file__).resolve().parent.parent / "jobs" / "grpo-smollm2-sentiment.yaml"


class ChoiceScorer:
    """Constrained greedy choice between the labels: the one whose first token the model rates higher after the
    prompt. One prompt at a time (no padding to shift positions)."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], labels: list[str]):
        self.tokenizer, self.pairs, self.labels = tokenizer, pairs, labels
        firsts = [tokenizer.encode(label, add_special_tokens=False)[0] for label in labels]
        if len(set(firsts)) != len(firsts):
            raise SystemExit(f"the labels {labels} share a first token: a first-token choice cannot tell them apart")
        self.firsts = firsts
        self.ids = [tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids for p, _ in pairs]

    def __call__(self, model) -> dict[str, float]:
        import torch

        was_training = model.training
        model.eval()
        right, picked = 0, {label: 0 for label in self.labels}
        with torch.no_grad():
            for ids, (_, answer) in zip(self.ids, self.pairs):
                logits = model(input_ids=ids.to(model.device)).logits[0, -1]
                label = self.labels[int(torch.argmax(logits[self.firsts]))]
                picked[label] += 1
                right += label == answer.strip().casefold()
        model.train(was_training)
        n = len(self.pairs)
        return {"accuracy": right / n, **{f"answer_{k}": v / n for k, v in picked.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="hone's training steps (its recipe's 30); TRL gets hone's wall time")
    ap.add_argument("--trl-eval-every", type=int, default=2)
    ap.add_argument("--out", default="grpo_vs_trl.png", help="the plot")
    ap.add_argument("--json", default=None, help="also write both curves here")
    args = ap.parse_args()

    import hone
    from hone.config import load_job
    from hone.data import held_out_rows, load_splits, load_tokenizer, prompt_and_answer

    job = load_job(str(RECIPE), [f"training.max_steps={args.steps}"])
    tokenizer = load_tokenizer(job)
    labels = [str(c) for c in job.grpo.structured_outputs["choice"]]
    held_out = [prompt_and_answer(r, job.data, tokenizer) for r in held_out_rows(job.data, "validation", job.data.max_eval_samples)]
    train_rows = list(load_splits(job.data)["train"])
    scorer = ChoiceScorer(tokenizer, held_out, labels)
    print(f"[bench] CPU: {os.cpu_count()} cores, {cpu_flags()}; {len(train_rows)} training prompts, {len(held_out)} held-out reviews",
          flush=True)

    # ---- hone, as a user runs the recipe
    with tempfile.TemporaryDirectory(prefix="bench-hone-") as storage:
        start = time.time()
        result = hone.train(job, storage_path=storage, quiet=True, track=False)
        hone_wall = time.time() - start
        records = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl") if line.strip()]
        hone_curve = [(0.0, 0, records[0]["initial_eval_reward"])]
        hone_curve += [(r["time"] - start, r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
        step_times = sorted(r["step_time_s"] for r in records if "step_time_s" in r)
        median_step = step_times[len(step_times) // 2]
        from transformers import AutoModelForCausalLM

        final = scorer(AutoModelForCausalLM.from_pretrained(result.merged_dir))
    print(f"[bench] hone: {args.steps} steps in {hone_wall:.0f} s (median step {median_step:.1f} s); held-out accuracy "
          + ", ".join(f"step {s} {a:.2f} @ {t:.0f} s" for t, s, a in hone_curve)
          + f"; its final export by this bench's scorer: {final['accuracy']:.2f}", flush=True)

    trl_curve, trl_median, base = _trl(job, train_rows, scorer, hone_wall, args)
    hone_final, trl_final = hone_curve[-1][2], trl_curve[-1][2]
    print(f"\nCPU {cpu_flags()}; budget {hone_wall:.0f} s (hone's run)")
    print("| | untuned | after the budget | steps | median step |")
    print("|---|---|---|---|---|")
    print(f"| hone (vLLM rollouts, constrained) | {hone_curve[0][2]:.2f} | {hone_final:.2f} | {hone_curve[-1][1]} | {median_step:.1f} s |")
    print(f"| TRL GRPOTrainer (transformers generate) | {base:.2f} | {trl_final:.2f} | {trl_curve[-1][1]} | {trl_median:.1f} s |")
    lead = "hone" if hone_final > trl_final else "TRL" if trl_final > hone_final else "neither"
    print(f"held-out accuracy after the same wall time: {lead} leads by {abs(hone_final - trl_final) * 100:.0f} points")
    _plot(args.out, hone_curve, trl_curve, hone_wall)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_flags(), "budget_s": hone_wall, "hone": hone_curve, "trl": trl_curve,
                                               "hone_final_by_bench_scorer": final["accuracy"], "median_step_s":
                                               {"hone": median_step, "trl": trl_median}}, indent=1))


def _trl(job, train_rows, scorer, budget_s: float, args) -> tuple[list[tuple[float, int, float]], float, float]:
    import datasets
    import peft
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hone import assets
    from hone.data import load_tokenizer, prompt_and_answer
    from hone.training.rewards import score, total_reward

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(job.training.seed)
    tokenizer = load_tokenizer(job)
    answer_column = job.data.columns.answer
    pairs = [prompt_and_answer(r, job.data, tokenizer) for r in train_rows]
    data = datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], answer_column: [a for _, a in pairs]})

    def reward(prompts, completions, **columns):
        rows = [{answer_column: a} for a in columns[answer_column]]
        return [total_reward(job, t) for t in score(job, prompts, completions, rows)]

    prompts_per_step = job.training.batch_size * job.distributed.num_workers
    k = job.grpo.k
    micro = 32 if (prompts_per_step * k) % 32 == 0 else k
    lora = job.method.lora
    clock = {"start": time.perf_counter(), "paused": 0.0}
    curve: list[tuple[float, int, float]] = []
    step_times: list[float] = []

    def elapsed() -> float:
        return time.perf_counter() - clock["start"] - clock["paused"]

    class Budget(TrainerCallback):
        last = None

        def on_step_begin(self, a, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, model=None, **kw):
            step_times.append(time.perf_counter() - self.last)
            out = elapsed() >= budget_s
            if out or state.global_step % args.trl_eval_every == 0:
                paused = time.perf_counter()
                got = scorer(model)
                clock["paused"] += time.perf_counter() - paused
                curve.append((elapsed(), state.global_step, got["accuracy"]))
                print(f"[bench] TRL step {state.global_step} @ {elapsed():.0f} s: held-out {got['accuracy']:.2f} "
                      f"(answer_positive {got['answer_positive']:.2f})", flush=True)
            if out:
                control.should_training_stop = True

    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), num_generations=k, max_completion_length=job.grpo.max_new_tokens,
                        per_device_train_batch_size=micro, gradient_accumulation_steps=prompts_per_step * k // micro,
                        max_steps=10_000, use_cpu=True, bf16=False, learning_rate=job.training.lr,
                        lr_scheduler_type="constant", weight_decay=job.training.weight_decay,
                        temperature=job.grpo.temperature, beta=job.grpo.beta, loss_type=job.grpo.loss_type,
                        scale_rewards="group" if job.grpo.scale_rewards else "none", epsilon=job.grpo.epsilon,
                        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=job.training.seed)
    trainer = GRPOTrainer(model=str(assets.resolve_model(job.model.name)), reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=tokenizer,
                          peft_config=peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    paused = time.perf_counter()
    base = scorer(trainer.model)["accuracy"]
    clock["paused"] += time.perf_counter() - paused
    curve.append((0.0, 0, base))
    trainer.add_callback(Budget())
    trainer.train()
    rewards = [(h["step"], h["reward"], h.get("completions/clipped_ratio")) for h in trainer.state.log_history if "reward" in h]
    print("[bench] TRL's training reward by step (clipped = completions cut at max_new_tokens): "
          + ", ".join(f"{s}: {r:.3f} (clipped {c:.2f})" if c is not None else f"{s}: {r:.3f}" for s, r, c in rewards), flush=True)
    step_times.sort()
    return curve, step_times[len(step_times) // 2], base


def _plot(out: str, hone_curve, trl_curve, budget_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curve, mark in (("hone (vLLM rollouts, constrained)", hone_curve, "o-"),
                              ("TRL GRPOTrainer (transformers generate)", trl_curve, "s-")):
        ax.plot([t / 60 for t, _, _ in curve], [a for _, _, a in curve], mark, label=name)
    ax.axvline(budget_s / 60, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("wall time since the run started (min)")
    ax.set_ylabel("held-out answer accuracy (100 reviews)")
    ax.set_title(f"GRPO, SmolLM2-135M + LoRA, Rotten Tomatoes\n2 cores, {cpu_flags()}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"[bench] plot: {out}")


if __name__ == "__main__":
    main()
