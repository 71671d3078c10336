"""Every error hone raises to its callers, in one place below everything else: a module raises or catches any of them
without importing the stage that first needed it. Each message says what to change.

``ConfigError`` and its per-file subclasses live with the config machinery (``hone.config``): they carry the list of
problems found in a YAML. Errors internal to one module (a bad request body, a weight sync) stay in that module."""

from __future__ import annotations

__all__ = [
    "ArtifactError", "ClusterError", "DataError", "ModelError", "PipelineError", "QuantizeError", "RegistryError",
    "ServeError", "StorageError", "SubmitError", "TrainError",
]


class StorageError(ValueError):
    """An object-store path cannot be used; the message says what to set."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or joined."""


class DataError(ValueError):
    """The data does not fit the job; the message names the setting to change."""


class RegistryError(RuntimeError):
    """A registry lookup or update failed; the message names the model/version/alias."""


class ArtifactError(ValueError):
    """A run, export or model reference cannot be found or is not what was asked for."""


class ModelError(ValueError):
    """The model does not fit the job (e.g. LoRA target modules it does not have)."""


class TrainError(RuntimeError):
    """A run cannot start or failed; the message says what to do."""


class QuantizeError(RuntimeError):
    """The model cannot be quantised (unknown method, GPU-only method on CPU, not a model)."""


class ServeError(RuntimeError):
    """The serve config names something that cannot be served (missing artifact, failed gate)."""


class PipelineError(RuntimeError):
    """A stage failed; the pipeline stopped there."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        super().__init__(f"pipeline stopped at stage {stage}: {reason}")


class SubmitError(RuntimeError):
    """The job cannot be submitted as given (unreachable cluster, local paths the cluster cannot see)."""
