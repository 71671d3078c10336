"""GRPO rollout throughput: hone's rollout engine (a vLLM Ray actor, as the training loop calls it) against TRL's
``GRPOTrainer`` generating with transformers, the same model, prompts and sampling, in one run.

Same model (SmolLM2-135M-Instruct; TRL trains a LoRA r8 adapter on q/k/v/o as hone's recipe does), the built-in Rotten
Tomatoes prompts view through the chat template, 4 prompts × 4 completions a step, at most 8 new tokens, temperature
1, fp32 on CPU, every core to each (the engine actor reserves them all). hone: ``RolloutPool.generate`` on one engine,
timed around the call the trainer makes (Ray included).
TRL: its ``_generate_single_turn`` (``model.generate`` on the policy) timed inside ``GRPOTrainer.train``. Tokens are
the completion tokens each returned (TRL's cut after EOS). vLLM is not installed beside TRL here (it needs its own
environment), so TRL's vLLM mode is not measured.

    python bench/grpo_rollout.py            # ≈ 3 min on 2 cores
    python bench/grpo_rollout.py --steps 10
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
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from hone import assets
    from hone.config import validate_job
    from hone.data import load_tokenizer, prepare_data

    n = args.prompts * args.steps
    job = validate_job({"name": "bench", "model": {"name": args.model},
                        "data": {"source": "builtin:rotten-tomatoes", "format": "prompts", "prompt_template": "chat",
                                 "max_length": 160, "max_samples": n, "validation": None},
                        "grpo": {"k": args.k, "max_new_tokens": args.max_new_tokens, "rewards": [{"type": "exact_match"}],
                                 "rollout_resources": {"CPU": os.cpu_count() or 1}},  # the cores TRL's generate uses
                        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16,
                                                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
                        "distributed": {"num_workers": 1, "deepspeed": None}, "training": {"batch_size": args.prompts}})
    tokenizer = load_tokenizer(job)
    rows = list(prepare_data(job, tokenizer).train)[:n]
    model_dir = assets.resolve_model(args.model)
    hone_rate = _hone(job, rows, model_dir, args)
    trl_rate = _trl(rows, model_dir, args)
    print(f"rollout tokens/s: hone (vLLM engine actor) {hone_rate:.1f}, TRL GRPOTrainer (transformers generate) {trl_rate:.1f} "
          f"→ hone {hone_rate / trl_rate:.2f}× TRL")


def _hone(job, rows, model_dir, args) -> float:
    import json

    import ray

    from hone.generation import Sampling
    from hone.runtime import ray_session
    from hone.training.rollout import start_pool, stop_pool

    params = Sampling(n=args.k, max_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    with ray_session(job, None):
        pool = start_pool(job, str(model_dir), "bench-rollout")
        try:
            ray.get(pool.generate.remote(0, [list(rows[0]["input_ids"][: rows[0]["prompt_len"]])], params, [0]))  # warm-up
            tokens, seconds = 0, []
            for s in range(args.steps):
                batch = rows[s * args.prompts:(s + 1) * args.prompts]
                prompts = [list(r["input_ids"][: r["prompt_len"]]) for r in batch]
                start = time.perf_counter()
                out = ray.get(pool.generate.remote(s, prompts, params, list(range(len(prompts)))))
                seconds.append(time.perf_counter() - start)
                tokens += sum(len(o.token_ids) for g in out["groups"] for o in g)
        finally:
            stop_pool(pool)
    print(f"hone: {tokens} tokens in {sum(seconds):.2f} s (median step {statistics.median(seconds):.3f} s); "
          f"prompts e.g. {json.loads(rows[0]['row'])['prompt'][:60]!r}")
    return tokens / sum(seconds)


def _trl(rows, model_dir, args) -> float:
    import json

    import datasets
    import peft
    from trl import GRPOConfig, GRPOTrainer

    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": json.loads(r["row"])["prompt"]}] for r in rows]})
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), num_generations=args.k, max_completion_length=args.max_new_tokens,
                        per_device_train_batch_size=args.prompts * args.k, max_steps=args.steps, use_cpu=True, bf16=False,
                        learning_rate=5e-4, logging_steps=1, report_to=[], temperature=1.0, beta=0.0, save_strategy="no",
                        disable_tqdm=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=config,
                          train_dataset=data, peft_config=lora)
    timings: list[tuple[float, int]] = []
    generate = trainer._generate_single_turn  # noqa: SLF001 - the generation TRL's step makes

    def timed(*a, **kw):
        start = time.perf_counter()
        completion_ids, logprobs = generate(*a, **kw)
        timings.append((time.perf_counter() - start, sum(len(c) for c in completion_ids)))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed  # noqa: SLF001
    trainer.train()
    measured = timings[1:] or timings  # the first generation warms up
    seconds, tokens = sum(t for t, _ in measured), sum(k for _, k in measured)
    print(f"TRL: {tokens} tokens in {seconds:.2f} s over {len(measured)} generation(s)")
    return tokens / seconds


if __name__ == "__main__":
    main()
