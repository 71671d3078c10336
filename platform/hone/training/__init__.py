"""Training on Ray Train: the run's plan (steps, data order, RNG), the DeepSpeed/DDP backends, the worker loop, the
objectives as recipes (supervised fine-tuning, DPO/IPO/SimPO/ORPO/KTO, GRPO; :mod:`hone.training.objective`),
driver-side progress, and :func:`train` (the driver)."""

from hone.training.driver import TrainResult, train
from hone.training.objective import Objective, WorkerContext, objective_class, sequence_logps
from hone.training.plan import Schedule, TrainError, schedule, total_steps
from hone.training.preference import PreferenceObjective, preference_loss
from hone.training.runs import open_run, starting_point

__all__ = [
    "Objective", "PreferenceObjective", "Schedule", "TrainError", "TrainResult", "WorkerContext", "objective_class", "open_run",
    "preference_loss", "schedule", "sequence_logps", "starting_point", "total_steps", "train",
]
