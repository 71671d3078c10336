"""The model registry: every export logged to MLflow; sweep winners registered with an alias.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a team server, unchanged), else a local SQLite
database under ``$HONE_HOME/mlflow``. Local SQLite writers are serialised with a file lock
so concurrent sweeps on one machine never lose a write.

``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` resolve to the export directory that a
version was registered from (``resolve_model_ref``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hone import assets, storage
from hone.config import JobConfig, metric_mode
from hone.data import dataset_fingerprint
from hone.errors import RegistryError
from hone.runtime import quiet_libraries

__all__ = ["CONTENT_TAG", "WINNER", "Registration", "RegistryError", "describe", "list_models", "log_run", "promote",
           "record_content", "register_winner", "resolve_model_ref", "show_model", "tag_version", "tracking_uri"]

WINNER = "winner"
EXPORT_TAG = "hone.export_dir"
"""The version tag holding where its export lies (a path or URI): the version's source, also where MLflow's own
``source`` must be ``runs:/RUN/export`` (a server, a local export)."""
_RUN_EXPORT = "export"  # the artifact path a runs:/ source names
CONTENT_TAG = "hone.content_sha256"
"""The version tag holding the SHA-256 of its source's files at registration (``hone.storage.content_sha256``): a version
loads only while its source still holds exactly that."""


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = assets.hone_home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _artifact_root() -> str:
    return str(assets.hone_home() / "mlflow" / "artifacts")


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    """An MlflowClient; local SQLite access is serialised across processes by a file lock."""
    import fcntl

    from mlflow.tracking import MlflowClient

    quiet_libraries()
    # The URI goes to this client only: mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI to this process's
    # environment, pinning every later lookup (and every Ray worker and submitted job it starts) to this store.
    uri = tracking_uri()
    if not uri.startswith("sqlite:"):
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
        return
    lock = assets.hone_home() / "mlflow" / "registry.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)  # also when MLFLOW_TRACKING_URI names a SQLite file elsewhere
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield MlflowClient(tracking_uri=uri, registry_uri=uri)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _experiment(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else _artifact_root())


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def log_run(job: JobConfig, run_dir: Path, export_dir: Path, history: list[dict[str, Any]], final: dict[str, Any], *,
            experiment: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
    """Log a finished run (params, metrics over steps, lineage tags, export location); returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    from hone.version import __version__

    params: dict[str, str] = {}
    _flatten("", job.model_dump(mode="json", exclude={"tune"}), params)
    tags = {
        "hone.base_model": job.model.name,
        "hone.method": job.method.type,
        "hone.task": job.task.type,
        "hone.zero_stage": str(job.distributed.deepspeed.stage) if job.distributed.deepspeed else "ddp",
        "hone.dataset": job.data.source,
        "hone.dataset_fingerprint": dataset_fingerprint(job),
        "hone.git_commit": _git_commit(),
        "hone.version": __version__,
        "hone.run_dir": str(run_dir),
        "hone.export_dir": storage.uri_of(export_dir) or str(export_dir),
        "mlflow.runName": run_dir.name,
        **(extra_tags or {}),
    }
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), int(m.get("time", 0) * 1000) or now, int(m["step"]))
               for m in history for k, v in m.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time", "total_steps")]
    metrics += [Metric(f"final_{k}", float(v), now, int(final.get("step", 0))) for k, v in final.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("eval_", "loss"))]
    with _client() as client:
        run = client.create_run(_experiment(client, experiment or f"hone/{job.name}"), tags=tags, run_name=run_dir.name)
        items = list(params.items())
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])
        for i in range(0, len(metrics), 500):
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 500])
        client.log_batch(run.info.run_id, tags=[RunTag("hone.final_metrics", json.dumps(final, default=str)[:5000])])
        client.set_terminated(run.info.run_id)
    return run.info.run_id


@dataclass(frozen=True)
class Registration:
    """A version just registered, and where ``alias`` points now."""

    name: str
    version: int
    alias: str
    alias_version: int
    previous: dict[str, Any] | None
    """The version the alias pointed at before (version, metric, value), if any."""

    @property
    def alias_moved(self) -> bool:
        return self.alias_version == self.version


def _better(value: float, than: dict[str, Any] | None, metric: str) -> bool:
    """Whether ``value`` of ``metric`` beats the alias's current version (one with another metric or no finite value loses)."""
    if than is None or than.get("metric") != metric:
        return than is None
    try:
        old = float(than["value"])
    except (TypeError, ValueError):
        return True
    if not math.isfinite(old):
        return True
    return value < old if metric_mode(metric) == "min" else value > old


def register_winner(name: str, run_id: str | None, export_dir: Path, metric: str, value: float, *, alias: str = WINNER,
                    sweep: str | None = None) -> Registration:
    """Register an export as a new version of ``name``; ``alias`` moves to it only if it beats the version the alias
    points at on ``metric`` (``promote`` moves an alias unconditionally). A non-finite value is refused.

    Concurrent sweeps cannot leave the alias on the worse model: on a local SQLite store a file lock serialises them; on
    an MLflow server (no locks, no compare-and-set) each registration is followed by a check that converges: the alias
    must end on the best of the version it held and every version registered since this one began (:func:`_settle`)."""
    if not math.isfinite(value):
        raise RegistryError(f"{metric} = {value} is not finite: a diverged model is never registered")
    source = storage.uri_of(export_dir) or str(export_dir)  # a run in object storage: the version points there
    tags = {"hone.metric": metric, "hone.metric_value": repr(value), EXPORT_TAG: source, CONTENT_TAG: storage.content_sha256(source)}
    if sweep:
        tags["hone.sweep"] = sweep
    registered = source
    if not storage.is_uri(source) and tracking_uri().startswith(("http://", "https://")):
        # An MLflow server accepts a local path as a version's source only inside its run's MLflow artifacts: the version
        # names its run's export (runs:/RUN/export) and the path it lies at on the shared volume is its hone.export_dir tag.
        if not run_id:
            raise RegistryError(f"an MLflow server registers the local export {source} only with the run that made it "
                                "(HONE_MLFLOW=0 logged none); keep runs in object storage (training.storage_path: s3://...) "
                                "or turn tracking on")
        registered = f"runs:/{run_id}/{_RUN_EXPORT}"
    with _client() as client:  # SQLite: one lock around read-compare-set
        try:
            client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST)
            with contextlib.suppress(Exception):  # another process created it meanwhile
                client.create_registered_model(name, tags={"hone": "true"})
        previous = _alias_target(client, name, alias)
        floor = max((int(v.version) for v in client.search_model_versions(f"name='{name}'")), default=0)
        version = int(client.create_model_version(name, source=registered, run_id=run_id, tags=tags).version)
        final = _settle(client, name, alias, metric, floor)
    return Registration(name, version, alias, final, previous)


def _alias_target(client: Any, name: str, alias: str) -> dict[str, Any] | None:
    """{version, metric, value} of the version ``alias`` points at (None: no version carries it)."""
    try:
        current = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no version carries the alias yet
        return None
    return {"version": int(current.version), "metric": current.tags.get("hone.metric"), "value": current.tags.get("hone.metric_value")}


def _settle(client: Any, name: str, alias: str, metric: str, floor: int, rounds: int = 20) -> int:
    """Move ``alias`` to the best of its current version and every version above ``floor`` registered on ``metric``, then
    read both again until they agree (a concurrent registration may have set the alias from an older reading); returns
    where the alias ends. Every contender folds the same versions in version order, so they all converge on one."""
    for _ in range(rounds):
        current = _alias_target(client, name, alias)
        best = current
        contenders = sorted((v for v in client.search_model_versions(f"name='{name}'")
                             if int(v.version) > floor and v.tags.get("hone.metric") == metric), key=lambda v: int(v.version))
        for v in contenders:
            try:
                candidate = float(v.tags.get("hone.metric_value", "nan"))
            except ValueError:
                continue
            if math.isfinite(candidate) and (best is None or (best["version"] != int(v.version) and _better(candidate, best, metric))):
                best = {"version": int(v.version), "metric": metric, "value": repr(candidate)}
        if best is None:
            return 0
        if current is not None and current["version"] == best["version"]:
            return best["version"]
        client.set_registered_model_alias(name, alias, str(best["version"]))
    raise RegistryError(f"@{alias} of {name!r} did not settle after {rounds} rounds: other registrations keep moving it; "
                        f"check it with hone models show {name}")


def describe(reg: Registration, metric: str, value: float) -> str:
    """One line on where a registration left the alias."""
    line = f"registered models:/{reg.name}/{reg.version} ({metric} {value:.5g})"
    if reg.alias_moved:
        return line + f"; @{reg.alias} → v{reg.version}"
    prev = reg.previous or {}
    reason = (f"v{prev.get('version')} has {prev.get('metric')} {prev.get('value')}, which this version does not beat"
              if prev.get("metric") == metric else f"v{prev.get('version')} was chosen by {prev.get('metric')}, not {metric}")
    return line + (f"; @{reg.alias} stays on v{reg.alias_version}: {reason} "
                   f"(hone models promote {reg.name} {reg.version} --alias {reg.alias} moves it anyway)")


def promote(name: str, version: int, alias: str) -> None:
    with _client() as client:
        try:
            client.get_model_version(name, str(version))
        except Exception as e:
            raise RegistryError(f"no version {version} of registered model {name!r}") from e
        client.set_registered_model_alias(name, alias, str(version))


def record_content(name: str, version: int) -> str:
    """Record what a version's source holds now as the content it must keep (a version registered before hone recorded
    one, or a source its owner changed on purpose); returns the hash."""
    found = resolve_model_ref(f"models:/{name}/{version}")
    digest = storage.content_sha256(found["source"])
    tag_version(name, version, {CONTENT_TAG: digest})
    return digest


def tag_version(name: str, version: int, tags: dict[str, str]) -> None:
    """Set tags on one model version (quantisation verdicts, serving notes)."""
    with _client() as client:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias
    name, _, version = body.partition("/")
    if not version:
        raise RegistryError(f"{ref!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version, None


def resolve_model_ref(ref: str) -> dict[str, Any]:
    """{name, version, source, tags, aliases} for ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    name, version, alias = _parse_ref(ref)
    with _client() as client:
        try:
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except Exception as e:
            raise RegistryError(f"{ref!r} does not resolve: no registered model {name!r} with "
                                f"{'alias ' + alias if alias else 'version ' + str(version)}") from e
        return {"name": name, "version": int(mv.version), "source": _source(mv), "tags": dict(mv.tags), "aliases": list(mv.aliases),
                "run_id": mv.run_id}


def _source(mv: Any) -> str:
    """Where a version's export lies: its source, or for ``runs:/RUN/export`` (a local export on an MLflow server) the path
    its hone.export_dir tag records."""
    if str(mv.source).startswith("runs:/"):
        if not mv.tags.get(EXPORT_TAG):
            raise RegistryError(f"version {mv.version} of {mv.name!r} ({mv.source}) is not a hone export: it has no {EXPORT_TAG} tag")
        return str(mv.tags[EXPORT_TAG])
    return str(mv.source)


def list_models() -> list[dict[str, Any]]:
    with _client() as client:
        out = []
        for rm in client.search_registered_models():
            out.append(
                {
                    "name": rm.name,
                    "aliases": dict(rm.aliases) if isinstance(rm.aliases, dict) else {a.alias: a.version for a in rm.aliases},
                    "latest": max((int(v.version) for v in client.search_model_versions(f"name='{rm.name}'")), default=0),
                }
            )
        return out


def show_model(name: str) -> list[dict[str, Any]]:
    """Every version with its metrics and lineage (run tags)."""
    with _client() as client:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise RegistryError(f"no registered model {name!r}")
        out = []
        for found in sorted(versions, key=lambda v: int(v.version)):
            v = client.get_model_version(name, found.version)  # search results carry no aliases
            run = client.get_run(v.run_id) if v.run_id else None
            out.append(
                {
                    "version": int(v.version),
                    "aliases": list(v.aliases),
                    "source": _source(v),
                    "tags": dict(v.tags),
                    "metrics": dict(run.data.metrics) if run else {},
                    "lineage": {
                        k: val for k, val in (run.data.tags.items() if run else []) if k.startswith("hone.") and k != "hone.final_metrics"
                    },
                }
            )
        return out
