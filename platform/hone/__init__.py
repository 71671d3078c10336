"""hone: fine-tune LLMs with Ray Train + DeepSpeed, search with Ray Tune, serve on Ray Serve.

The public surface: one function per stage, the configs they take and the errors they raise.
Importing ``hone`` is cheap; each stage imports its heavy libraries when it runs.

    job = hone.load_job("jobs/tiny-smoke.yaml")
    run = hone.train(job)                       # Ray Train + DeepSpeed
    result = hone.sweep(job)                    # Ray Tune; registers the winner
    report = hone.evaluate_model(str(run.export_dir))
    q = hone.quantize("models:/tiny-smoke@winner", "int8-dynamic")
    hone.serve(hone.load_serve_config("serving/tiny.yaml"))
    hone.run_pipeline(hone.load_pipeline("jobs/pipelines/quickstart-tiny.yaml"))
    result = hone.run_compare(hone.load_compare("jobs/pipelines/compare-methods-tiny.yaml"))
    hone.submit("jobs/tiny-smoke.yaml", address="http://head:8265")
"""

from hone.artifacts import ModelSpec, resolve_ref
from hone.comparison import CompareResult, run_compare
from hone.config import (
                         CompareConfigError,
                         Comparison,
                         ConfigError,
                         JobConfig,
                         JobConfigError,
                         Pipeline,
                         PipelineConfigError,
                         ServeConfig,
                         ServeConfigError,
                         json_schema,
                         load_compare,
                         load_file,
                         load_job,
                         load_pipeline,
                         load_serve_config,
                         validate_job,
)
from hone.config.quantization import GateThresholds
from hone.data import prepare_data
from hone.errors import (
                         ArtifactError,
                         DataError,
                         PipelineError,
                         QuantizeError,
                         ServeError,
                         SubmitError,
                         TrainError,
)
from hone.evaluation import EvalReport, evaluate_model
from hone.pipeline import PipelineResult, run_pipeline
from hone.quantize import QuantizeResult, quantize
from hone.serving import serve
from hone.submit import Submission, submit
from hone.training import TrainResult, train
from hone.tune import SweepResult, sweep
from hone.version import __version__

__all__ = [
    "ArtifactError", "CompareConfigError", "CompareResult", "Comparison", "ConfigError", "DataError", "EvalReport",
    "GateThresholds", "JobConfig", "JobConfigError", "ModelSpec", "Pipeline", "PipelineConfigError", "PipelineError",
    "PipelineResult", "QuantizeError", "QuantizeResult", "ServeConfig", "ServeConfigError", "ServeError", "Submission",
    "SubmitError", "SweepResult", "TrainError", "TrainResult", "__version__", "evaluate_model", "json_schema", "load_compare",
    "load_file", "load_job", "load_pipeline", "load_serve_config", "prepare_data", "quantize", "resolve_ref", "run_compare",
    "run_pipeline", "serve", "submit", "sweep", "train", "validate_job",
]
