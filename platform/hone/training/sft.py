"""Supervised fine-tuning: the token cross-entropy of a causal LM (or a classifier's), the default recipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hone.training.objective import Objective

if TYPE_CHECKING:
    import torch

__all__ = ["SFTObjective"]


class SFTObjective(Objective):
    """The model's own loss on the labels (prompt tokens masked as the data says); evaluation: ``eval_loss`` and the
    job's ``eval_metric``."""

    name = "sft"

    def batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from hone.data import collate

        return {k: v.to(self.backend.device) for k, v in collate(rows, self.pad_id, self.job.task.type).items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        from hone.modeling import forward_loss

        return forward_loss(self.backend.module, batch, self.job.task.type)[0], None

    def evaluate(self, rows: Sequence[dict[str, Any]], batch_size: int, rank: int) -> dict[str, float]:
        from hone.modeling import evaluate

        return evaluate(self.backend.module, rows, self.job, self.pad_id, batch_size=batch_size, rank=rank,
                        world_size=self.world_size, all_reduce=self.all_reduce)
