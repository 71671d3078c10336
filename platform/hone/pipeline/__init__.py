"""``hone pipeline``: declared stages from a job to a smoke-tested endpoint (the YAML itself: :mod:`hone.config.pipeline`).

- :mod:`hone.pipeline.state`: ``state.json`` fingerprints, so re-runs skip finished stages
- :mod:`hone.pipeline.stages`: train or sweep → registry → quantise behind the gate → deploy
- :mod:`hone.pipeline.smoke`: the smoke test through the ``openai`` client
- :mod:`hone.pipeline.summary`: the closing summary
- :mod:`hone.pipeline.run`: :func:`run_pipeline`, the stages on one Ray session
"""

from hone.config.pipeline import Pipeline, PipelineConfig, PipelineConfigError, load_pipeline
from hone.pipeline.run import quickstart_pipeline, run_pipeline
from hone.pipeline.state import PipelineError
from hone.pipeline.summary import PipelineResult, format_summary

__all__ = ["Pipeline", "PipelineConfig", "PipelineConfigError", "PipelineError", "PipelineResult", "format_summary", "load_pipeline",
           "quickstart_pipeline", "run_pipeline"]
