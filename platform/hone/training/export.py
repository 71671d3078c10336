"""The export a run's last step writes: Hugging Face weights (full weights gathered under ZeRO-3, or a PEFT adapter,
optionally merged too) with ``hone.json`` describing them, published whole into the run (or uploaded to its object
store, ``hone.json`` last)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hone import storage
from hone.artifacts import EXPORT_DIR, EXPORT_INFO, MERGED_DIR, TOKENIZER_DIR, publish_dir
from hone.config import JobConfig

__all__ = ["write_export"]


def write_export(backend: Any, job: JobConfig, objective: str, run_dir: Path, run_uri: str | None, rank: int,
                 metrics: dict[str, Any], workers: list[dict[str, Any]]) -> None:
    """Write the Hugging Face export (every rank calls: ZeRO-3 gathers collectively) into the run, or, for a run in
    object storage, upload it there (``hone.json`` last: a folder without it is not an export)."""
    state = backend.full_state_dict()
    if rank != 0:
        return
    from hone.artifacts import resolve_ref
    from hone.modeling import load_model

    hf = backend.hf_module
    staging = Path(tempfile.mkdtemp(prefix="hone-export-"))
    try:
        tokenizer_dir = run_dir / TOKENIZER_DIR
        if run_uri and not tokenizer_dir.is_dir():  # rank 0 on a node that shares nothing with the driver
            tokenizer_dir = storage.download(storage.join(run_uri, TOKENIZER_DIR), staging / TOKENIZER_DIR)
        out = staging / EXPORT_DIR
        hf.save_pretrained(out, state_dict=state, safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, out / f.name)
        info = {
            "kind": "adapter" if job.method.is_peft else "model",
            "base_model": job.model.name,
            "method": job.method.type,
            "task": job.task.type,
            "objective": objective,
            "zero_stage": job.distributed.deepspeed.stage if job.distributed.deepspeed else None,
            "num_workers": len(workers),
            "workers": workers,
            "metrics": metrics,
            "job": job.to_dict(),
        }
        (out / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
        dirs = [EXPORT_DIR]
        if job.method.is_peft and job.method.merge_adapter:
            merged, _ = load_model(resolve_ref(str(out)), merge_adapter=True, trust_remote_code=job.model.trust_remote_code)
            merged.save_pretrained(staging / MERGED_DIR, safe_serialization=True)
            for f in tokenizer_dir.iterdir():
                shutil.copy2(f, staging / MERGED_DIR / f.name)
            ((staging / MERGED_DIR) / EXPORT_INFO).write_text(json.dumps({**info, "kind": "merged-model"}, indent=2, default=str))
            dirs.append(MERGED_DIR)
        for name in dirs:
            if run_uri:
                for f in sorted((staging / name).iterdir(), key=lambda f: f.name == EXPORT_INFO):
                    storage.upload(f, storage.join(run_uri, name, f.name))
                continue
            # copied next to the run (same filesystem), then swapped in: never a half-written export
            partial = run_dir / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(staging / name, partial)
            publish_dir(partial, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
