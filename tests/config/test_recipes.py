"""Every job recipe shipped in jobs/ validates and opens with its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from hone.config import load_job

# jobs/pipelines/ holds pipelines, not jobs: tests/pipeline/test_pipeline.py validates them
JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


def test_there_are_jobs():
    assert len(JOBS) >= 4


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_validates(path):
    job = load_job(path)
    assert job.name == path.stem


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_header_has_its_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("hone " in line and path.name in line for line in header), f"{path.name} must open with its command"
