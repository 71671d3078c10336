"""Preference step cost: hone's DPO step against hone's SFT step and TRL's DPO trainer step, in one process.

Same model (SmolLM2-135M-Instruct + LoRA r8 on q/k/v/o), same review pairs from the built-in preference view (chat
template), 4 pairs a step, torch AdamW, fp32 on CPU. The SFT step trains on the chosen sequences only (what supervised
fine-tuning on the same data costs); the DPO steps run the policy on chosen and rejected and the reference (the adapter
disabled) without gradients. Ray Train and DeepSpeed are left out on purpose: this isolates the objective's cost
(``bench/train_overhead.py`` measures the distributed overhead).

    python bench/preference_step.py                    # ≈ 2 min on 2 cores
    python bench/preference_step.py --model builtin:tiny-llama --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from hone.config import validate_job
    from hone.data import load_tokenizer, prepare_data
    from hone.modeling import build_model, forward_loss
    from hone.training.objective import sequence_logps
    from hone.training.preference import collate_preference, preference_loss

    job = validate_job({"name": "bench", "model": {"name": args.model},
                        "data": {"source": "builtin:rotten-tomatoes", "format": "preference", "prompt_template": "chat",
                                 "max_length": 96, "max_samples": args.pairs * (args.steps + args.warmup), "validation": None},
                        "preference": {"loss": "dpo", "beta": 0.1},
                        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
                        "training": {"lr": 5e-4, "batch_size": args.pairs}})
    tokenizer = load_tokenizer(job)
    rows = list(prepare_data(job, tokenizer).train)
    batches = [rows[i * args.pairs:(i + 1) * args.pairs] for i in range(args.steps + args.warmup)]
    pad = tokenizer.pad_token_id

    def timed(step) -> list[float]:
        out = []
        for i, b in enumerate(batches):
            start = time.perf_counter()
            step(b)
            if i >= args.warmup:
                out.append(time.perf_counter() - start)
        return out

    def hone_model():
        torch.manual_seed(0)
        model = build_model(job)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)

    from hone.data import collate

    model, opt = hone_model()

    def sft(b):
        loss, _, _ = forward_loss(model, collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in b], pad), "causal_lm")
        loss.backward()
        opt.step()
        opt.zero_grad()

    times = {"hone SFT (chosen only)": timed(sft)}
    model, opt = hone_model()

    def dpo(b):
        batch = collate_preference(b, pad, paired=True)
        with torch.no_grad(), model.disable_adapter():
            ref = sequence_logps(model, batch)[0]
        loss, _ = preference_loss(job, batch, sequence_logps(model, batch), ref)
        loss.backward()
        opt.step()
        opt.zero_grad()

    times["hone DPO"] = timed(dpo)

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hone.data import load_splits

    raw = load_splits(job.data)["train"].select(range(len(rows)))
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in raw])
    model, _ = hone_model()
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, max_length=96, beta=0.1,
                                                         learning_rate=5e-4, report_to=[], use_cpu=True, bf16=False,
                                                         dataloader_num_workers=0),
                             train_dataset=pairs, processing_class=tokenizer)
        trainer.create_optimizer_and_scheduler(num_training_steps=len(batches))
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this step-by-step timing skips
        trl_batches = [trainer.data_collator([trainer.train_dataset[i * args.pairs + j] for j in range(args.pairs)])
                       for i in range(len(batches))]
        it = iter(trl_batches)

        def trl_step(_):
            trainer.training_step(trainer.model, next(it))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()

        times["TRL DPOTrainer"] = timed(trl_step)

    tokens = sum(len(r["input_ids"]) + len(r["rejected_ids"]) for r in rows) / len(rows)
    print(f"{args.model}, LoRA r8, {args.pairs} pairs/step (≈{tokens:.0f} tokens per pair), {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:<24} {t * 1000:8.1f} ms/step")
    print(f"  ratio hone DPO / hone SFT     {med['hone DPO'] / med['hone SFT (chosen only)']:.2f}×")
    print(f"  ratio hone DPO / TRL DPO      {med['hone DPO'] / med['TRL DPOTrainer']:.2f}× (below 1: hone is faster)")


if __name__ == "__main__":
    main()
