"""Where a run (or a sweep) lives before it trains: opening a new one or the one to resume, the weights it starts
from, and the inputs a resume must find unchanged. Used by ``hone train``, ``hone tune`` and the pipeline's stages."""

from __future__ import annotations

import json
from pathlib import Path

from hone import storage
from hone.artifacts import INPUTS_FILE, JOB_FILE, new_run_dir, resolve_run_dir, run_storage, trusted_roots
from hone.config import JobConfig, load_job
from hone.errors import TrainError

__all__ = ["check_inputs", "open_run", "starting_point"]


def open_run(job: JobConfig | None, resume: str | None, storage_path: str | None = None, *, what: str = "run",
             run_dir: Path | None = None) -> tuple[JobConfig, Path]:
    """(the job, its directory) of a run or sweep: with ``resume``, the folder it names and the ``job.yaml`` it keeps;
    else ``job`` from its resolved starting weights (:func:`starting_point`) in a new folder under the storage path (or
    ``run_dir``), its ``job.yaml`` written there."""
    if resume:
        folder = resolve_run_dir(resume, storage_path, what=what)
        return load_job(folder / JOB_FILE, check_paths=False), folder
    if job is None:
        raise TrainError(f"give a job or a {what} to resume")
    root = run_storage(storage_path, job)
    with trusted_roots(storage.uri_of(root) or root):  # a version registered in this storage may be the start
        job = starting_point(job)  # a sweep from models:/… trains every trial from the same resolved weights
    name = job.run_name if what == "run" else f"{job.name}-{what}"
    folder = Path(run_dir or new_run_dir(root, name)).resolve()  # created: never shared
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JOB_FILE).write_text(job.to_yaml())
    return job, folder


def starting_point(job: JobConfig) -> JobConfig:
    """A job that starts from a hone model (``model.name: models:/sft@winner``, an export or a run) gets the local folder
    of its full weights instead (the run's ``job.yaml`` records that folder, so a resume trains on the same start
    even if the alias has moved since)."""
    from hone.modeling import is_hone_model, starting_weights

    if not is_hone_model(job.model.name):
        return job
    path = starting_weights(job.model.name, job.model.trust_remote_code)
    print(f"[hone] starting from {job.model.name} ({path})", flush=True)
    raw = job.to_dict()
    raw["model"]["name"] = path
    return JobConfig.model_validate(raw, context={"check_paths": False})


def check_inputs(run_dir: Path, now: dict[str, str]) -> None:
    """Refuse to resume a run whose data or tokenizer changed since it started: the resumed steps would train on other
    batches (or other token ids) than the checkpoint's, and the result would match neither."""
    path = run_dir / INPUTS_FILE
    if not path.exists():
        return  # a run from before hone recorded its inputs
    then = json.loads(path.read_text())
    changed = [what for what in ("data", "tokenizer") if then.get(what) != now[what]]
    if changed:
        raise TrainError(f"cannot resume {run_dir.name}: its {' and '.join(changed)} changed since the run started "
                         f"(fingerprint {', '.join(f'{w} {then.get(w)} → {now[w]}' for w in changed)}); restore them, or start a "
                         "new run (hone train JOB.yaml)")
