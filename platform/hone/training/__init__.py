"""Training on Ray Train: the run's plan (steps, data order, RNG), the DeepSpeed/DDP engines, the worker loop,
driver-side progress, and :func:`train` (the driver)."""

from hone.training.driver import TrainResult, train
from hone.training.plan import Schedule, TrainError, total_steps

__all__ = ["Schedule", "TrainError", "TrainResult", "total_steps", "train"]
