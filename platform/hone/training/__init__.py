"""Training on Ray Train: the run's plan (steps, data order, RNG), the DeepSpeed/DDP engines, the worker loop,
the objectives (supervised fine-tuning, DPO/IPO/SimPO/ORPO/KTO), driver-side progress, and :func:`train` (the driver)."""

from hone.training.driver import TrainResult, starting_point, train
from hone.training.objectives import Objective, preference_loss, sequence_logps
from hone.training.plan import Schedule, TrainError, schedule, total_steps

__all__ = ["Objective", "Schedule", "TrainError", "TrainResult", "preference_loss", "schedule", "sequence_logps", "starting_point",
           "total_steps", "train"]
