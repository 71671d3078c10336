"""hone's preference losses against TRL's trainers (the reference implementation), on the tiny model, in-process.

The same batch of pairs goes through TRL's ``DPOTrainer.compute_loss`` (sigmoid DPO) and ``CPOTrainer`` (SimPO, the
reference-free objective) and through :func:`hone.training.preference.preference_loss`; loss, rewards and every
parameter's gradient must agree to 1e-5 at the first step. ORPO's odds-ratio term is checked against TRL's too.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hone.training.objective import sequence_logps
from hone.training.preference import collate_preference, preference_loss, preference_metrics

from tests.helpers import make_job

pytest.importorskip("trl")

PAIRS = [
    {"prompt": "Classify: a splendid, moving film.\n", "chosen": "positive", "rejected": "negative"},
    {"prompt": "Classify: dull and far too long.\n", "chosen": "negative", "rejected": "positive"},
    {"prompt": "Classify: the cast is wonderful, the plot less so; still worth it.\n", "chosen": "positive",
     "rejected": "negative, and I would not watch it again"},
    {"prompt": "Classify: a mess.\n", "chosen": "negative", "rejected": "positive"},
]


def _model(seed: int = 0):
    from transformers import AutoModelForCausalLM

    from hone import assets

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model("builtin:tiny-llama"), dtype=torch.float32)
    with torch.no_grad():  # the built-in's weights are random: nudge them so the pairs' log-probs differ clearly
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _hone_batch(trl_batch):
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    return {"input_ids": trl_batch["input_ids"], "attention_mask": trl_batch["attention_mask"], "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    a, b = float(a), float(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


def _compare_grads(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        diff = (ours[name] - theirs[name]).abs().max().item()
        scale = max(1.0, theirs[name].abs().max().item())
        assert diff <= 1e-5 * scale, f"{name}: gradient differs by {diff}"


def _same_step(our_loss, their_loss, stats, theirs, ours, policy) -> dict:
    """hone's loss, rewards, margin, accuracy and every gradient equal TRL's; returns hone's metrics."""
    m = preference_metrics(stats)
    assert _close(our_loss, their_loss), (float(our_loss), float(their_loss))
    for ours_key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
        assert _close(m[ours_key], theirs[trl_key]), (ours_key, m[ours_key], theirs[trl_key])
    _compare_grads(_grads(ours), _grads(policy))
    return m


def test_dpo_matches_trl(tmp_path, tiny_tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = _model()
    reference = _model(seed=1)  # a reference other than the policy: rewards and margins are not zero
    ours = copy.deepcopy(policy)
    ours_ref = copy.deepcopy(reference)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=96, beta=0.3, report_to=[],
                     use_cpu=True, bf16=False, loss_type=["sigmoid"], dataloader_num_workers=0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    policy.train()
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    job = make_job(data={"format": "preference", "max_length": 96}, preference={"loss": "dpo", "beta": 0.3})
    hb = _hone_batch(batch)
    ours.train()
    with torch.no_grad():
        ref = sequence_logps(ours_ref, hb)[0]
    our_loss, stats = preference_loss(job, hb, sequence_logps(ours, hb), ref)
    our_loss.backward()
    m = _same_step(our_loss, loss, stats, theirs, ours, policy)
    assert _close(m["logps_chosen"], theirs["logps/chosen"])
    assert abs(float(m["reward_margin"])) > 0  # the step is informative, not a tie


def _pairs_in_hone_layout(batch, pad_id):
    """TRL's (chosen_*, rejected_*) batch as hone's rows: the same sequences, labels -100 outside the response."""
    rows = []
    for i in range(len(batch["chosen_input_ids"])):
        keep_c, keep_r = batch["chosen_attention_mask"][i].bool(), batch["rejected_attention_mask"][i].bool()
        rows.append({"input_ids": batch["chosen_input_ids"][i][keep_c].tolist(), "labels": batch["chosen_labels"][i][keep_c].tolist(),
                     "rejected_ids": batch["rejected_input_ids"][i][keep_r].tolist(),
                     "rejected_labels": batch["rejected_labels"][i][keep_r].tolist()})
    return collate_preference(rows, pad_id, paired=True)


def test_simpo_matches_trl(tmp_path, tiny_tokenizer):
    """Reference-free: TRL's CPO trainer with loss_type simpo and cpo_alpha 0 is SimPO."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = _model()
    ours = copy.deepcopy(policy)
    args = CPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=96, beta=2.0, loss_type="simpo",
                     cpo_alpha=0.0, simpo_gamma=0.7, label_smoothing=0.1, report_to=[], use_cpu=True, bf16=False,
                     dataloader_num_workers=0)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    policy.train()
    loss, theirs = trainer.get_batch_loss_metrics(policy, batch)
    loss.backward()

    hb = _pairs_in_hone_layout(batch, tiny_tokenizer.pad_token_id)
    job = make_job(data={"format": "preference", "max_length": 96},
                   preference={"loss": "simpo", "beta": 2.0, "gamma": 0.7, "label_smoothing": 0.1})
    ours.train()
    our_loss, stats = preference_loss(job, hb, sequence_logps(ours, hb), None)
    our_loss.backward()
    _same_step(our_loss, loss, stats, theirs, ours, policy)


def test_orpo_odds_ratio_term_matches_trl(tmp_path, tiny_tokenizer):
    """ORPO: the odds-ratio term and rewards equal TRL's. The SFT term differs on purpose: TRL's ORPO trainer takes
    the NLL over prompt and response, hone (like the ORPO paper) over the chosen response only."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = _model()
    ours = copy.deepcopy(policy)
    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=96, beta=0.2,
                      report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    policy.train()
    loss, theirs = trainer.get_batch_loss_metrics(policy, batch)

    hb = _pairs_in_hone_layout(batch, tiny_tokenizer.pad_token_id)
    job = make_job(data={"format": "preference", "max_length": 96}, preference={"loss": "orpo", "beta": 0.2})
    ours.train()
    logps = sequence_logps(ours, hb)
    our_loss, stats = preference_loss(job, hb, logps, None)
    n = len(PAIRS)
    our_nll = logps[2][:n].sum() / logps[1][:n].sum()
    m = preference_metrics(stats)
    assert _close(our_loss - our_nll, float(loss) - theirs["nll_loss"])
    assert _close(m["rewards_chosen"], theirs["rewards/chosen"])
    assert _close(m["rewards_rejected"], theirs["rewards/rejected"])
    assert _close(m["reward_accuracy"], theirs["rewards/accuracies"])
