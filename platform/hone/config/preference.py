"""The ``preference:`` section of a job: preference fine-tuning (DPO and its relatives) instead of supervised fine-tuning.

A job with this section trains on ``data.format: preference`` rows (prompt, chosen, rejected) or, for KTO,
``data.format: unpaired`` rows (prompt, completion, a boolean label), through the same Ray Train + DeepSpeed loop,
checkpoints, sweeps, registry, gate and serving as supervised fine-tuning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hone.config.base import Section

__all__ = ["PREFERENCE_LOSSES", "PREF_METRICS", "PreferenceConfig"]

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto")
# Metrics a preference run reports on its validation pairs (each also without ``eval_`` for the training steps).
PREF_METRICS = ("loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_rewards_chosen", "eval_rewards_rejected",
                "eval_logps_chosen", "eval_logps_rejected")
_DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


class PreferenceConfig(Section):
    """Preference objective and its hyperparameters (the losses follow TRL's definitions).

    ``dpo``: sigmoid DPO (Rafailov et al.), ``label_smoothing`` > 0 gives conservative DPO. ``ipo``: squared loss on the
    per-token log-ratio difference. ``simpo``: reference-free, length-normalised log-probs with a target margin ``gamma``.
    ``orpo``: reference-free, the chosen response's NLL plus ``beta`` (λ) times the log odds-ratio term. ``kto``:
    unpaired desirable/undesirable completions against a batch KL estimate, weighted by ``desirable_weight`` and
    ``undesirable_weight``. DPO, IPO and KTO compare with a reference model: with adapters (LoRA and friends), the
    base model with the adapter disabled (no second copy); with full fine-tuning, a frozen copy of the starting model,
    sharded like the policy under ZeRO-3.
    """

    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = "dpo"
    """The objective."""
    beta: float | None = Field(default=None, gt=0)
    """Strength of the preference term: DPO/IPO/KTO β (the reference KL weight), SimPO's reward scale, ORPO's λ.
    Default: 0.1, or 2.0 for simpo."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """dpo and simpo: assumed probability that a pair's preference is flipped (conservative DPO)."""
    gamma: float = Field(default=0.5, ge=0.0)
    """simpo: target reward margin, as ``gamma / beta`` on the length-normalised log-ratio (TRL's ``simpo_gamma``)."""
    desirable_weight: float = Field(default=1.0, gt=0)
    """kto: weight of the desirable (label true) completions' losses."""
    undesirable_weight: float = Field(default=1.0, gt=0)
    """kto: weight of the undesirable (label false) completions' losses."""
    max_prompt_length: int | None = Field(default=None, ge=1)
    """Tokens of prompt kept when a prompt and its longest response exceed ``data.max_length`` (the prompt's start is
    cut first, then the responses' ends). Default: half of ``data.max_length``."""

    @model_validator(mode="after")
    def _per_loss(self) -> PreferenceConfig:
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise ValueError(f"preference.label_smoothing applies to dpo and simpo, not {self.loss}")
        if self.loss != "kto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            raise ValueError(f"preference.desirable_weight/undesirable_weight apply to kto, not {self.loss}")
        return self

    @property
    def strength(self) -> float:
        """``beta`` with the objective's default."""
        return self.beta if self.beta is not None else _DEFAULT_BETA[self.loss]

    @property
    def uses_reference(self) -> bool:
        """Whether the objective compares with a reference model (SimPO and ORPO do not)."""
        return self.loss in ("dpo", "ipo", "kto")

    @property
    def paired(self) -> bool:
        """Whether rows are (prompt, chosen, rejected) pairs; KTO reads unpaired labelled completions."""
        return self.loss != "kto"
