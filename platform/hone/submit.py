"""Submit hone jobs to any Ray cluster through the Ray Jobs API.

``hone submit JOB.yaml --address http://HEAD:8265`` validates the job here first (nothing is
sent when it is invalid), checks that every local path it names can be seen by the cluster,
then submits an ordinary Ray job whose entrypoint is the same ``hone`` command a user would run
on the head node, with the job file in the runtime environment's working directory. ``ray job
logs/status/stop`` work on it unchanged.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hone.config import ServeConfig, apply_overrides, load_serve_config, validate_job
from hone.config.base import apply_overrides_to
from hone.errors import SubmitError

__all__ = ["SECRETS", "SubmitError", "Submission", "enter_stable_workdir", "follow_logs", "job_client", "job_env", "local_paths",
           "resolve_address", "stage_uploads", "submit"]

# Ray's Jobs API refuses working directories above 500 MiB; leave room for the job file.
_UPLOAD_LIMIT = 100 * 2**20
_REMOTE_PREFIXES = ("builtin:", "s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://", "models:/")


FORWARDED = ("MLFLOW_TRACKING_URI", "HONE_DEBUG")
"""Settings a submitted job takes from the submitting shell (none of them secret)."""
SECRETS = ("HONE_API_KEYS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD",
           "MLFLOW_TRACKING_USERNAME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY")
"""Never sent with a job: a runtime_env is visible to anyone who can read the Jobs API or the dashboard. Jobs read
them from the cluster's own environment (KubeRay: a Secret in the pod spec; ray start: the node's environment)."""


@dataclass
class Submission:
    id: str
    address: str
    entrypoint: str


def resolve_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else ``RAY_ADDRESS``; ``HOST:PORT`` of a GCS means its dashboard."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host = address.removeprefix("ray://").split(":")[0]
    return f"http://{host}:8265"


def job_env(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(env_vars for the job's runtime_env, names of secrets set here that stay here)."""
    from urllib.parse import urlsplit

    env = {k: environ[k] for k in FORWARDED if environ.get(k)}
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if "://" in uri and (urlsplit(uri).username or urlsplit(uri).password):
        raise SubmitError("MLFLOW_TRACKING_URI carries credentials (user:password@...), which a submitted job's runtime_env would "
                          "show to anyone with the dashboard: set MLFLOW_TRACKING_USERNAME/PASSWORD (or _TOKEN) on the cluster instead")
    return env, [k for k in SECRETS if environ.get(k)]


def _check_reachable(address: str) -> None:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:  # noqa: S310 - the user's cluster
            r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({getattr(e, 'reason', e)}): is the cluster up and "
                          "its dashboard reachable? (ray start --head --dashboard-host=0.0.0.0)") from None


def job_client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    _check_reachable(url)
    return JobSubmissionClient(url)


def _is_local_path(value: str) -> bool:
    return bool(value) and not value.startswith(_REMOTE_PREFIXES) and (
        value.startswith(("/", "./", "../", "~")) or Path(value).exists() or any(ch in value for ch in "*?") and "/" in value)


def local_paths(raw: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    """(dotted key, value) of every field that names a local file or directory."""
    found = []
    if kind == "serve":
        keys = [("model", raw.get("model")), ("api_keys_file", raw.get("api_keys_file"))]
        keys += [(f"adapters.{k}", v) for k, v in (raw.get("adapters") or {}).items()]
    else:
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {"name": raw.get("model")}
        data = raw.get("data") or {}
        keys = [("model.name", model.get("name")), ("data.source", data.get("source"))]
        keys += [(f"data.{k}", data.get(k)) for k in ("validation", "test") if isinstance(data.get(k), str)]
    for key, value in keys:
        if isinstance(value, str) and _is_local_path(value):
            found.append((key, value))
    return found


def _glob_base(value: str) -> tuple[Path, str]:
    """(the folder a glob's matches lie under, the pattern below it): ``data/*/train.jsonl`` → (``data``, ``*/train.jsonl``)."""
    parts = Path(os.path.expanduser(value)).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return (Path(*parts[:first]) if first else Path(".")), str(Path(*parts[first:]))


def _shared(value: str, shared: Sequence[str]) -> bool:
    """Whether ``value`` lies under one of the ``shared`` folders (paths compared, not strings: /mnt/data2 is not under
    /mnt/data)."""
    target = (_glob_base(value)[0] if glob.has_magic(value) else Path(value).expanduser()).resolve()
    return any(target.is_relative_to(Path(p).expanduser().resolve()) for p in shared if p)


def stage_uploads(paths: list[tuple[str, str]], raw: dict[str, Any], workdir: Path) -> None:
    """Copy local files into the job's working directory and point the job at the copies; a glob's matches keep their
    folders below the pattern's base (``data/*/train.jsonl`` uploads every shard, each at its own path)."""
    total = 0
    for key, value in paths:
        magic = glob.has_magic(value)
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(value))) if magic else [Path(value).expanduser()]
        if not matches or not all(m.exists() for m in matches):
            raise SubmitError(f"{key}: {value} does not exist here, so it cannot be uploaded")
        dest_root = workdir / "files" / key.replace(".", "_")
        base, pattern = _glob_base(value) if magic else (None, Path(value).name)
        for m in matches:
            dest = dest_root / (m.name if base is None else m if base == Path(".") else m.relative_to(base))
            if m.is_dir():
                shutil.copytree(m, dest)
                total += sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(m, dest)
                total += dest.stat().st_size
        if total > _UPLOAD_LIMIT:
            raise SubmitError(f"--upload carries at most {_UPLOAD_LIMIT // 2**20} MiB through the Jobs API; {key} brings it to "
                              f"{total / 2**20:.0f} MiB: put the data on shared storage (NFS, an object store URI) instead")
        rel = dest_root.relative_to(workdir)
        new = str(rel / pattern)  # a glob keeps its pattern below its base, now matching the copies
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {"name": node.get(part)} if part == "model" else {}
            node = node[part]
        node[parts[-1]] = new


def submit(path: str, overrides: Sequence[str] = (), *, address: str | None = None, command: str = "train",
           upload: bool = False, shared_paths: Sequence[str] = (), storage_path: str | None = None,
           submission_id: str | None = None, extra_args: Sequence[str] = ()) -> Submission:
    """Validate ``path`` locally, then submit ``hone COMMAND`` for it through the Jobs API."""
    kind = "serve" if command == "serve" else "job"
    text = Path(path).read_text()
    raw = yaml.safe_load(text) or {}
    if kind == "serve":
        load_serve_config(path, overrides)  # raises ServeConfigError before anything is sent
        raw, _ = apply_overrides_to(raw, overrides, ServeConfig)
    else:
        raw = apply_overrides(raw, overrides)
        job = validate_job(raw, source=path)  # raises JobConfigError before anything is sent
        if command == "tune" and job.tune is None:
            raise SubmitError(f"{path} has no tune: section to sweep")
    shared = list(shared_paths) + [p for p in os.environ.get("HONE_SHARED_PATHS", "").split(":") if p]
    local = [(k, v) for k, v in local_paths(raw, kind) if not _shared(v, shared)]
    if local and not upload:  # before any network call: nothing is sent for a job the cluster could not run
        listed = "\n".join(f"  - {k}: {v}" for k, v in local)
        raise SubmitError(
            "the job names local paths the cluster's nodes cannot see:\n" + listed + "\n"
            "  options: put them on storage every node mounts and declare it (--shared-path /mnt/data, or "
            "HONE_SHARED_PATHS), use an object store URI (s3://, gs://), or pass --upload to send small files "
            f"(≤ {_UPLOAD_LIMIT // 2**20} MiB) with the job")
    env, withheld = job_env(dict(os.environ))
    if withheld:
        print(f"[hone] not sent with the job: {', '.join(withheld)} (secrets are read from the cluster's own environment: "
              "a KubeRay Secret, or the environment `ray start` ran in)", flush=True)
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="hone-submit-") as tmp:
        workdir = Path(tmp)
        if local:
            stage_uploads(local, raw, workdir)
        name = Path(path).name
        (workdir / name).write_text(yaml.safe_dump(raw, sort_keys=False))
        args = ["hone", command, name]
        if storage_path and command != "serve":
            args += ["--storage-path", storage_path]
        args += list(extra_args)
        entrypoint = shlex.join(args)
        import uuid

        submission_id = submission_id or f"hone-{command}-{uuid.uuid4().hex[:12]}"
        env.update({"HONE_SUBMITTED": "1", "HONE_SUBMISSION_ID": submission_id})
        runtime_env: dict[str, Any] = {"working_dir": str(workdir), "env_vars": env}
        sid = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                metadata={"hone": command, "job_file": name})
    return Submission(sid, resolve_address(address), entrypoint)


def follow_logs(address: str | None, submission_id: str) -> str:
    """Print a job's logs as they come until it ends; return its final status."""
    import asyncio

    client = job_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(submission_id))


def enter_stable_workdir() -> None:
    """Inside a submitted job: a submitted job runs in Ray's unpacked working_dir, which Ray may garbage-collect while
    the driver still runs (seen on the first job of a fresh cluster: os.getcwd() failing after training). Work from a
    copy under $HONE_HOME instead; the job file and uploaded files are small by construction."""
    import uuid

    from hone import assets

    target = assets.hone_home() / "submitted" / (os.environ.get("HONE_SUBMISSION_ID") or uuid.uuid4().hex[:12])
    if not target.exists():
        shutil.copytree(os.getcwd(), target)
    os.chdir(target)
