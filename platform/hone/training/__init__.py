"""Training on Ray Train: the run's plan (steps, data order, RNG), the DeepSpeed/DDP engines, the worker loop,
driver-side progress, and :func:`train` (the driver)."""

from hone.training.driver import TrainResult, train
from hone.training.plan import Schedule, TrainError, schedule, total_steps

__all__ = ["Schedule", "TrainError", "TrainResult", "schedule", "total_steps", "train"]
