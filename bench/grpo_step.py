"""GRPO's training pass: each prompt once for its group (shared key/value cache, logits on completion positions) against
every completion's whole row with logits everywhere (what hone's trainer did before, and what TRL's ``GRPOTrainer``
does), the same batch, model and LoRA, in one run; with the loss and gradients of both compared.

SmolLM2-135M-Instruct with a LoRA r8 adapter on q/k/v/o (the shipped recipe's), fp32 on CPU, the built-in Rotten
Tomatoes prompts view through the chat template, ``--prompts`` prompts × ``--k`` completions (each a label and EOS, as the
recipe's constrained rollouts answer). Timed: forward, GRPO loss and backward, median of ``--reps`` after a warm-up.

    python bench/grpo_step.py                       # 8 prompts × 8 completions, ≈ 1 min on 2 cores
    python bench/grpo_step.py --prompts 4 --k 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from machine import cpu_flags  # bench/machine.py: python puts bench/ on the path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets
    from hone.config import validate_job
    from hone.data.prompts import prompt_and_answer
    from hone.data.sources import held_out_rows
    from hone.training.grpo import grpo_loss
    from hone.training.objective import completion_logps, grouped_batch, token_logps

    torch.manual_seed(0)
    path = assets.resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                       init_lora_weights=False))
    model.train()
    job = validate_job({"name": "bench", "model": {"name": args.model}, "task": "causal_lm",
                        "data": {"source": "builtin:rotten-tomatoes", "format": "prompts", "prompt_template": "chat", "max_length": 128},
                        "grpo": {"k": args.k, "max_new_tokens": 8, "rewards": [{"type": "exact_match"}]},
                        "method": {"type": "lora"}, "training": {"eval_metric": "eval_reward"}})
    prompts, completions = [], []
    for row in held_out_rows(job.data, "train", args.prompts).to_list():
        text, _ = prompt_and_answer(row, job.data, tok)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"][-120:])
        for j in range(args.k):
            completions.append(tok("positive" if j % 2 else "negative", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    grouped = grouped_batch(prompts, completions, tok.pad_token_id)
    seqs = [prompts[b // args.k] + c for b, c in enumerate(completions)]
    width = max(map(len, seqs))
    rows = {"input_ids": torch.full((len(seqs), width), tok.pad_token_id),
            "attention_mask": torch.zeros(len(seqs), width, dtype=torch.long), "labels": torch.full((len(seqs), width), -100)}
    for b, seq in enumerate(seqs):
        p = len(prompts[b // args.k])
        rows["input_ids"][b, : len(seq)] = torch.tensor(seq)
        rows["attention_mask"][b, : len(seq)] = 1
        rows["labels"][b, p : len(seq)] = torch.tensor(completions[b])
    adv = torch.tensor([1.0 if j % 2 else -1.0 for j in range(len(completions))])

    def whole() -> tuple:
        logps, mask = token_logps(model, rows, trim=False)
        out = torch.zeros(len(seqs), grouped["labels"].shape[1])
        for b, c in enumerate(completions):
            p = len(prompts[b // args.k])
            out[b, : len(c)] = logps[b, p - 1 : p - 1 + len(c)]
        return out, grouped["labels"] != -100

    def shared() -> tuple:
        return completion_logps(model, grouped)

    results = {}
    for name, fn in (("whole rows", whole), ("shared prompts", shared)):
        times, loss = [], None
        for rep in range(args.reps + 1):
            model.zero_grad()
            start = time.perf_counter()
            logps, mask = fn()
            loss, _ = grpo_loss(job, logps, logps.detach(), adv, mask, None)
            loss.backward()
            if rep:  # the first pass warms up
                times.append(time.perf_counter() - start)
        results[name] = (statistics.median(times), float(loss), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (t0, l0, g0), (t1, l1, g1) = results["whole rows"], results["shared prompts"]
    diff = max(float((a - b).abs().max()) for a, b in zip(g0, g1))
    tokens = sum(len(s) for s in seqs)
    print(f"{args.model}, LoRA r8 q/k/v/o, fp32, {args.prompts} prompts × {args.k} completions ({tokens} tokens as whole rows); "
          f"{os.cpu_count()} CPUs, flags: {cpu_flags()}")
    print(f"  whole rows, logits everywhere : {t0:6.2f} s  (loss {l0:+.6f})")
    print(f"  shared prompts, completion logits: {t1:6.2f} s  (loss {l1:+.6f}; largest gradient difference {diff:.1e})")
    print(f"  training pass: shared / whole = {t1 / t0:.2f}x")


if __name__ == "__main__":
    main()
