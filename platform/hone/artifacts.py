"""The artifact layout: where runs, exports and quantised artifacts live, and what a model reference means.

One home for the on-disk contract every stage shares:

- a **run directory** ``<storage>/<run>``: ``job.yaml``, ``tokenizer/``, ``metrics.jsonl``, Ray's
  ``checkpoint_*`` folders, ``export/`` (``hone.json`` describes it) and ``export-merged/``;
- a **quantised artifact** ``$HONE_HOME/quantized/<model>-<method>/`` (``quantization.json``);
- **model references**: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the registry), an export,
  a run (name or directory), a quantised artifact, ``builtin:NAME``, a local path or a hub id. :func:`resolve_ref`
  turns any of them into one typed :class:`ModelSpec`; ``hone.modeling.load_model`` loads any spec.

This module is cheap to import (no torch): the registry is consulted only for ``models:/`` references.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hone import assets, storage
from hone.errors import ArtifactError

if TYPE_CHECKING:
    from hone.config import JobConfig

__all__ = [
    "EXPORT_DIR", "EXPORT_INFO", "INPUTS_FILE", "JOB_FILE", "MERGED_DIR", "METRICS_FILE", "MODEL_ROOTS_ENV",
    "QUANTIZED_INFO", "QUANTIZED_STATE", "TOKENIZER_DIR", "ArtifactError", "MetricsFollower", "ModelSpec",
    "append_metrics", "check_model_source", "default_storage", "fetch_model", "localize", "model_class", "model_roots",
    "model_uri", "new_run_dir", "parse_metrics", "publish_dir", "quantized_dir", "read_metrics", "resolve_ref",
    "resolve_run_dir", "run_storage", "sync_down", "sync_up", "trusted_roots",
]

EXPORT_DIR = "export"
MERGED_DIR = "export-merged"
EXPORT_INFO = "hone.json"
JOB_FILE = "job.yaml"
INPUTS_FILE = "inputs.json"  # what the run trained on: data and tokenizer fingerprints, checked on resume
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
QUANTIZED_INFO = "quantization.json"
QUANTIZED_STATE = "quantized.pt"
MODEL_ROOTS_ENV = "HONE_MODEL_ROOTS"
"""Folders and bucket prefixes (comma-separated) that registry versions may load from, besides ``$HONE_HOME/runs``."""


# --------------------------------------------------------------------------- runs


def default_storage() -> Path:
    """Where runs, sweeps and pipelines go unless told otherwise: ``$HONE_HOME/runs``."""
    return assets.hone_home() / "runs"


def run_storage(storage_path: str | None, job: JobConfig | None = None) -> Path:
    """The storage root of a new run, sweep or pipeline: ``--storage-path``, else the job's ``training.storage_path``,
    else :func:`default_storage`. An object-store URI is checked (:func:`hone.storage.check`) and stands here as its
    local mirror folder: files written there are uploaded by the stage that writes them (:func:`sync_up`)."""
    chosen = str(storage_path or (job.training.storage_path if job is not None else None) or default_storage())
    if storage.is_uri(chosen):
        storage.check(chosen)
        return storage.mirror(chosen)
    return Path(chosen).expanduser().resolve()


def sync_up(run_dir: Path, *names: str) -> None:
    """Upload these files or folders of a run (or sweep) folder to its object-store location, if it has one."""
    uri = storage.uri_of(run_dir)
    if uri is None:
        return
    for name in names:
        if (run_dir / name).exists():
            storage.upload(run_dir / name, storage.join(uri, name))


def sync_down(run_dir: Path, *names: str) -> None:
    """Fetch these files or folders of a run from its object-store location into its local mirror (those it has)."""
    uri = storage.uri_of(run_dir)
    if uri is None:
        return
    for name in names:
        if storage.exists(storage.join(uri, name)):
            storage.download(storage.join(uri, name), run_dir / name)


def resolve_run_dir(run: str, storage_path: str | None = None, what: str = "run") -> Path:
    """A run (or sweep) given as a directory, a URI, or a name under the storage path: the folder holding its job.yaml.
    A run in object storage is fetched into its local mirror (its job, inputs, metrics and tokenizer; Ray Train reads
    its checkpoints from the store itself)."""
    if storage.is_uri(run) or (storage_path and storage.is_uri(storage_path) and not Path(run).expanduser().exists()):
        uri = run if storage.is_uri(run) else storage.join(storage_path, run)
        storage.check(uri)
        local = storage.mirror(uri)
        if not storage.exists(storage.join(uri, JOB_FILE)):
            raise ArtifactError(f"no hone {what} at {uri} (no {JOB_FILE} there)")
        local.mkdir(parents=True, exist_ok=True)
        sync_down(local, JOB_FILE, INPUTS_FILE, METRICS_FILE, TOKENIZER_DIR, "sweep.json")
        return local.resolve()
    candidate = Path(run).expanduser()
    if not (candidate / JOB_FILE).exists():
        candidate = Path(storage_path or default_storage()).expanduser() / run
    if not (candidate / JOB_FILE).exists():
        raise ArtifactError(f"no hone {what} at {run!r} (looked for {JOB_FILE} there and under {storage_path or default_storage()})")
    return candidate.resolve()


def publish_dir(staged: Path, final: Path) -> None:
    """Replace ``final`` with the complete directory ``staged`` (same filesystem): never a half-written
    directory under the final name, and the old one is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- metrics.jsonl


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl text: one JSON object per complete line; blank lines and a last line still
    being written are skipped."""
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metric history, one record per step in step order; a step logged twice (a resumed or restarted
    run repeats the steps after its checkpoint) keeps its last record."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for m in parse_metrics(path.read_text()):
        by_step[int(m.get("step", 0))] = m
    return [by_step[k] for k in sorted(by_step)]


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one record (a report of the training run) to the run's metrics.jsonl."""
    with open(Path(run_dir) / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


class MetricsFollower:
    """Reads the records appended to a run's metrics.jsonl since the last call (the driver's progress display)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read().decode()
        complete = data[: data.rfind("\n") + 1]
        self._offset += len(complete.encode())
        return parse_metrics(complete)


# --------------------------------------------------------------------------- model references


@dataclass(frozen=True)
class ModelSpec:
    """What a model reference resolved to: a hone ``export``, a ``quantized`` artifact, or a plain ``model``
    (``builtin:NAME``, a local Hugging Face directory or a hub id)."""

    ref: str
    """The reference as given."""
    kind: Literal["export", "quantized", "model"]
    path: str
    """The export or artifact directory; for a plain model, the name ``assets.resolve_model`` takes."""
    task: str
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    """``hone.json`` of an export, ``quantization.json`` of an artifact; empty for a plain model."""
    registry: dict[str, Any] | None = field(default=None, compare=False)
    """The registry version a ``models:/`` reference resolved to (name, version, source, tags, aliases)."""
    origin: str | None = field(default=None, compare=False)
    """The object-storage URI ``path`` is a local mirror of (None: a local folder or a name). A process on another
    machine fetches it again from there (:func:`localize`) rather than read this machine's mirror."""

    @property
    def job(self) -> JobConfig | None:
        """The job that made this model (exports and artifacts carry it), with ``model.trust_remote_code`` off: that flag
        comes from the operator's serve or job YAML, never from an artifact whoever can write it could have edited."""
        from hone.config import JobConfig

        raw = self.info.get("job")
        if not raw:
            return None
        raw = {**raw, "model": {**(raw.get("model") or {}), "trust_remote_code": False}}
        return JobConfig.model_validate(raw, context={"check_paths": False})

    @property
    def labels(self) -> list[str] | None:
        return list(((self.info.get("job") or {}).get("task") or {}).get("labels") or []) or None

    @property
    def adapter(self) -> bool:
        """An export of a PEFT adapter (loaded onto its base)."""
        return self.kind == "export" and self.info.get("kind") == "adapter"

    def slug(self) -> str:
        """A short, stable folder name for things derived from this model (quantised artifacts)."""
        if self.registry:
            return f"{self.registry['name']}-v{self.registry['version']}"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.path).name or self.path).strip("-")[:40]
        key = str(Path(self.path).resolve()) if self.kind != "model" else self.path
        return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def model_uri(uri: str) -> str:
    """The folder in object storage that holds the model ``uri`` names: itself, or a run's export."""
    storage.check(uri)
    if not any(storage.exists(storage.join(uri, marker)) for marker in (EXPORT_INFO, QUANTIZED_INFO, "config.json",
                                                                          "adapter_config.json")):
        if storage.exists(storage.join(uri, EXPORT_DIR, EXPORT_INFO)):
            return storage.join(uri, EXPORT_DIR)
        raise ArtifactError(f"{uri} holds no model (no {EXPORT_INFO}, {QUANTIZED_INFO} or config.json, and no {EXPORT_DIR}/)")
    return uri


def fetch_model(uri: str) -> Path:
    """A model in object storage (an export, a quantised artifact, a Hugging Face folder, or a run: its export) as a
    local folder: its mirror under this machine's ``$HONE_HOME``, fetched again only when the objects changed (their
    names, sizes and times). One process of this machine fetches a model at a time (a lock beside its mirror), so a
    replica loading the folder never sees it replaced by another replica's fetch."""
    import fcntl

    uri = model_uri(uri)
    local = storage.mirror(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:  # one fetch at a time per machine: never replaced mid-load
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = storage.digest(uri)
        stamp = local.parent / f".{local.name}.digest"
        if not (local.is_dir() and stamp.exists() and stamp.read_text() == digest):
            storage.download(uri, local)
            stamp.write_text(digest)
    return local


def _read_info(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


def _task_of(info: dict[str, Any]) -> str:
    return str(info.get("task") or ((info.get("job") or {}).get("task") or {}).get("type") or "causal_lm")


# --------------------------------------------------------------------------- where registry versions may point


def model_roots() -> list[str]:
    """Where a registry version's source may lie: hone's default storage (``$HONE_HOME/runs``) and each folder or bucket
    prefix listed in ``$HONE_MODEL_ROOTS``. Whoever can write to the registry can point a version anywhere; hone loads
    only what lies inside these roots (and only the content recorded at registration)."""
    roots = [str(default_storage().resolve())]
    for entry in os.environ.get(MODEL_ROOTS_ENV, "").split(","):
        entry = entry.strip()
        if entry:
            roots.append(entry.rstrip("/") if storage.is_uri(entry) else str(Path(entry).expanduser().resolve()))
    return roots


@contextlib.contextmanager
def trusted_roots(*roots: str | Path) -> Iterator[None]:
    """Add the storage roots this command was given (a job's ``storage_path``, ``--storage-path``) to
    ``$HONE_MODEL_ROOTS`` while it runs: the versions it registers there load again in its later stages, its Ray workers
    and the processes it starts."""
    before = os.environ.get(MODEL_ROOTS_ENV)
    os.environ[MODEL_ROOTS_ENV] = ",".join([*(before.split(",") if before else []), *(str(r) for r in roots)])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MODEL_ROOTS_ENV, None)
        else:
            os.environ[MODEL_ROOTS_ENV] = before


def check_model_source(ref: str, source: str) -> None:
    """Refuse a registry version whose source lies outside :func:`model_roots` (paths are compared resolved, so ``..``
    and symbolic links do not lead out)."""
    roots = model_roots()
    if storage.is_uri(source):
        storage.mirror(source)  # refuses empty, '.' and '..' segments
        inside = any(storage.is_uri(r) and (source.rstrip("/") == r or source.startswith(r + "/")) for r in roots)
    else:
        resolved = Path(source).expanduser().resolve()
        inside = any(not storage.is_uri(r) and resolved.is_relative_to(r) for r in roots)
    if not inside:
        raise ArtifactError(f"{ref} points at {source}, outside the roots hone loads registered models from ({', '.join(roots)}); "
                            f"refusing it. If that location is yours, add it to {MODEL_ROOTS_ENV} (comma-separated folders and "
                            "bucket prefixes) in the environment of the command (and of the cluster's nodes)")


def _check_content(ref: str, registration: dict[str, Any], folder: Path) -> None:
    from hone.registry import CONTENT_TAG

    recorded = registration["tags"].get(CONTENT_TAG)
    if not recorded:
        raise ArtifactError(f"{ref} was registered without a content hash, so hone cannot tell whether {registration['source']} "
                            f"still holds what was registered; check it, then record its hash with: hone models trust "
                            f"{registration['name']} {registration['version']}")
    actual = storage.content_sha256(folder)
    if actual != recorded:
        raise ArtifactError(f"{ref}: {registration['source']} no longer holds what was registered (content hash {actual[:12]}... "
                            f"vs {recorded[:12]}... recorded); its files were changed after registration. Register it again, or "
                            f"if the change is yours: hone models trust {registration['name']} {registration['version']}")


def resolve_ref(ref: str) -> ModelSpec:
    """Any model reference → :class:`ModelSpec`. Raises :class:`ArtifactError` (or the registry's error) when
    a reference that must name a hone export does not, or when a registry version points outside :func:`model_roots`
    or at content other than what was registered."""
    registry = None
    path = ref
    if ref.startswith("models:/"):
        from hone.registry import resolve_model_ref

        registry = resolve_model_ref(ref)
        path = registry["source"]
        check_model_source(ref, path)
    origin = None
    if storage.is_uri(path):
        origin = model_uri(path)
        path = str(fetch_model(origin))
    if registry:
        _check_content(ref, registry, Path(path))
    folder = Path(path).expanduser()
    if (folder / QUANTIZED_INFO).exists():
        info = _read_info(folder, QUANTIZED_INFO)
        return ModelSpec(ref, "quantized", str(folder), _task_of(info), info, registry, origin)
    if not (folder / EXPORT_INFO).exists() and not ref.startswith((assets.PREFIX, "models:/")):
        try:  # a run (its directory, or its name under the storage path): its export
            candidate = resolve_run_dir(ref) / EXPORT_DIR
            if (candidate / EXPORT_INFO).exists():
                folder = candidate
        except ArtifactError:
            pass  # not a run: a model name or hub id
    if (folder / EXPORT_INFO).exists():
        info = _read_info(folder, EXPORT_INFO)
        return ModelSpec(ref, "export", str(folder), _task_of(info), info, registry, origin)
    if registry:
        raise ArtifactError(f"{ref} points at {path}, which is not a hone export")
    if ref.startswith(assets.PREFIX):
        assets.check_builtin_model(ref)
    task = "sequence_classification" if ref == "builtin:minilm" else "causal_lm"
    return ModelSpec(ref, "model", ref, task)


def localize(spec: ModelSpec, content_sha256: str | None) -> ModelSpec:
    """``spec`` as this machine reads it: a model from object storage is fetched into this machine's own mirror (cached,
    fetched again only when the objects changed) and must hash to ``content_sha256``, what the process that resolved the
    reference found there; anything else is returned as it is. Serve replicas call this, so no replica reads another
    node's disk."""
    if spec.origin is None:
        return spec
    folder = fetch_model(spec.origin)
    if content_sha256 is not None:
        actual = storage.content_sha256(folder)
        if actual != content_sha256:
            raise ArtifactError(f"{spec.origin} changed after {spec.ref} was resolved (content hash {actual[:12]}... vs "
                                f"{content_sha256[:12]}...): refusing to serve other weights than the deployment resolved; "
                                "deploy again")
    return replace(spec, path=str(folder))


def model_class(task: str) -> Any:
    """The transformers auto class for a task: the one place a task picks its model class."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM


def quantized_dir(spec: ModelSpec, method: str) -> Path:
    """Where ``hone quantize REF --method M`` writes its artifact by default."""
    return assets.hone_home() / "quantized" / f"{spec.slug()}-{method}"


def new_run_dir(storage: Path, name: str) -> Path:
    """A fresh, timestamped directory under ``storage``, created here: ``mkdir`` either creates it or fails, so two runs
    started in the same second (two shells, two sweep drivers) never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        run_dir = storage / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1
