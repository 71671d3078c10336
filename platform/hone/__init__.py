"""hone: fine-tune LLMs with Ray Train + DeepSpeed, search with Ray Tune, serve on Ray Serve.

The public surface is small on purpose; everything else is internal.
"""

from hone.config import JobConfig, JobConfigError, json_schema, load_job, validate_job
from hone.data import DataError, prepare_data
from hone.train import TrainError, TrainResult, train
from hone.tune import SweepResult, sweep

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "JobConfig",
    "JobConfigError",
    "SweepResult",
    "TrainError",
    "TrainResult",
    "__version__",
    "json_schema",
    "load_job",
    "prepare_data",
    "sweep",
    "train",
    "validate_job",
]
