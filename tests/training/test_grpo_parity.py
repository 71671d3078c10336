"""hone's GRPO loss against TRL's ``GRPOTrainer._compute_loss`` (the reference implementation), on the tiny model,
in-process: one prompt's group of four completions (different lengths), advantages of both signs, old log-probs
away from the current ones (so the ratio is clipped on some tokens), a KL term to another model, a temperature.
Loss and every parameter's gradient must agree to 1e-5, for each of the three normalisations.

TRL 1.16 defaults to ``loss_type: dapo`` and ``use_bias_correction_kl: True`` (the KL term multiplied by the policy
ratio, whose gradient adds KL × ∇log p); hone's KL is the GRPO paper's k3 estimator, TRL's ``use_bias_correction_kl:
False``, which the comparison sets."""

from __future__ import annotations

import copy

import pytest
import torch

from hone.training.grpo import grpo_loss
from hone.training.objective import token_logps

from tests.helpers import make_job

pytest.importorskip("trl")

COMPLETIONS = [[5, 17, 9, 2, 44, 31], [8, 8, 120], [301, 7, 7, 7, 19], [64]]
ADVANTAGES = [1.3, -0.4, -0.9, 0.0]


def _model(seed: int):
    from transformers import AutoModelForCausalLM

    from hone import assets

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model("builtin:tiny-llama"), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("masked", [False, True], ids=["all", "truncated-masked"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_matches_trl(tmp_path, tiny_tokenizer, loss_type, masked):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy, reference = _model(0), _model(1)
    ours = copy.deepcopy(policy)
    width, temperature, beta = max(len(c) for c in COMPLETIONS), 0.8, 0.05
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=width,
                      beta=beta, epsilon=0.2, loss_type=loss_type, temperature=temperature, use_cpu=True, bf16=False,
                      report_to=[], dataloader_num_workers=0,
                      num_iterations=2,  # the loss of a later pass over the same rollouts: the old log-probs are given
                      use_bias_correction_kl=False)  # TRL 1.16's default multiplies the KL by the ratio; hone's is GRPO's k3

    def zero(completions, **_):
        return [0.0] * len(completions)

    trainer = GRPOTrainer(model=policy, reward_funcs=[zero], args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * 4),
                          processing_class=tiny_tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; this test calls one step's loss directly
    prompt = tiny_tokenizer("Classify: a splendid, moving film.")["input_ids"]
    p = len(prompt)
    completion_ids = torch.tensor([c + [tiny_tokenizer.pad_token_id] * (width - len(c)) for c in COMPLETIONS])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in COMPLETIONS])
    if masked:  # mask_truncated_completions: TRL zeroes a cut completion's mask, hone its labels; it still has its advantage
        completion_mask[0] = 0
    prompt_ids = torch.tensor([prompt] * 4)
    hone_batch = {"input_ids": torch.cat([prompt_ids, completion_ids], 1), "attention_mask": torch.cat([torch.ones_like(prompt_ids),
                                                                                                       completion_mask], 1)}
    hone_batch["labels"] = hone_batch["input_ids"].masked_fill(hone_batch["attention_mask"] == 0, -100)
    hone_batch["labels"][:, :p] = -100
    if masked:
        hone_batch["labels"][0] = -100
    with torch.no_grad():
        current, mask = token_logps(policy, hone_batch, temperature)
        ref_full = token_logps(reference, hone_batch, temperature)[0]
    torch.manual_seed(3)
    old_full = (current + 0.3 * torch.randn_like(current)) * mask  # some ratios leave [0.8, 1.2]: clipping matters
    completion_cols = slice(p - 1, p - 1 + width)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor(ADVANTAGES),
              "old_per_token_logps": old_full[:, completion_cols], "ref_per_token_logps": ref_full[:, completion_cols]}
    policy.train()
    theirs = trainer._compute_loss(policy, inputs)  # the loss of one GRPO step, as TRL computes it
    theirs.backward()

    job = make_job(data={"format": "prompts", "max_length": 96},
                   grpo={"k": 4, "max_new_tokens": width, "beta": beta, "epsilon": 0.2, "loss_type": loss_type,
                         "temperature": temperature, "rewards": [{"type": "exact_match"}]},
                   training={"eval_metric": "eval_reward"})
    ours.train()
    logps, mask = token_logps(ours, hone_batch, temperature)
    loss, parts = grpo_loss(job, logps, old_full, torch.tensor(ADVANTAGES), mask, ref_full)
    loss.backward()
    assert abs(float(loss) - float(theirs)) <= 1e-5 * max(1.0, abs(float(theirs))), (float(loss), float(theirs))
    assert float(parts["clipped"]) > 0  # the clipped branch was exercised
    for (name, a), (_, b) in zip(ours.named_parameters(), policy.named_parameters()):
        diff = (a.grad - b.grad).abs().max().item()
        assert diff <= 1e-5 * max(1.0, b.grad.abs().max().item()), f"{name}: gradient differs by {diff}"



def test_completion_log_probs_with_shared_prompts_equal_those_of_whole_sequences(tiny_tokenizer):
    """GRPO's trainer runs each prompt once and continues its k completions from the prompt's key/value cache, computing
    logits on completion positions only. With prompts of different lengths (left-padded), completions of different
    lengths (right-padded) and a grammar's token mask, the log-probs, the loss and every gradient equal those of every
    row run whole; and without the mask, those of plain right-padded sequences (the layout SFT and DPO use, whose
    own logits start at the batch's first label, :func:`token_logps`'s ``trim``, equal to logits everywhere)."""
    from hone.grammar import Constraints, token_bitmask
    from hone.training.objective import completion_logps, grouped_batch

    policy = _model(0)
    vocab = int(policy.config.vocab_size)
    grammar = Constraints(tiny_tokenizer, vocab).compile({"choice": ["negative", "positive"]}, any_whitespace=True)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("Classify: a splendid, moving, generous and funny film.", "Classify: dull.")]
    answers = [tiny_tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("positive", "negative", "negative", "positive")]
    answers[3] = answers[3][:1]  # a truncated completion: rows of different lengths
    job = make_job(data={"format": "prompts", "max_length": 96},
                   grpo={"k": 2, "max_new_tokens": 4, "rewards": [{"type": "exact_match"}]}, training={"eval_metric": "eval_reward"})
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def run(fn):
        policy.zero_grad()
        logps, mask = fn()
        loss, _ = grpo_loss(job, logps, logps.detach() + 0.1 * mask, advantages, mask, None)
        loss.backward()
        return logps.detach(), mask, float(loss), [p.grad.clone() for p in policy.parameters()]

    def same(a, b, bound=1e-5):
        assert torch.equal(a[1], b[1]) and (a[0] - b[0]).abs().max() <= bound and abs(a[2] - b[2]) <= 1e-6, (a[2], b[2])
        for x, y in zip(a[3], b[3]):
            assert (x - y).abs().max() <= bound * max(1.0, float(y.abs().max()))

    batch = grouped_batch(prompts, answers, tiny_tokenizer.pad_token_id)
    assert batch["prompt_mask"][1, 0] == 0 and batch["labels"][3, -1] == -100  # left-padded prompts, right-padded answers
    masked = {**batch, "bitmask": token_bitmask(grammar, [(1, a) for a in answers], 4, batch["labels"].shape[1], vocab)}
    shared, whole = run(lambda: completion_logps(policy, masked, 0.9)), run(lambda: completion_logps(policy, masked, 0.9, shared=False))
    same(shared, whole)
    assert (shared[0][shared[1]] > -30).all()  # the grammar allowed every completion token scored
    # the plain layout: each row prompt + answer, right-padded, labels on the answer
    seqs = [prompts[b // 2] + a for b, a in enumerate(answers)]
    width = max(map(len, seqs))
    plain = {"input_ids": torch.full((4, width), tiny_tokenizer.pad_token_id), "attention_mask": torch.zeros(4, width, dtype=torch.long),
             "labels": torch.full((4, width), -100)}
    for b, seq in enumerate(seqs):
        plain["input_ids"][b, : len(seq)] = torch.tensor(seq)
        plain["attention_mask"][b, : len(seq)] = 1
        plain["labels"][b, len(prompts[b // 2]) : len(seq)] = torch.tensor(answers[b])

    def gathered(fn):  # the plain layout's log-probs moved to completion columns
        logps, mask = fn()
        out = torch.zeros(4, batch["labels"].shape[1])
        for b, a in enumerate(answers):
            out[b, : len(a)] = logps[b, len(prompts[b // 2]) - 1 : len(prompts[b // 2]) - 1 + len(a)]
        return out, batch["labels"] != -100

    unmasked = run(lambda: completion_logps(policy, batch, 0.9))
    for trim in (True, False):
        same(unmasked, run(lambda trim=trim: gathered(lambda: token_logps(policy, plain, 0.9, trim=trim))))
