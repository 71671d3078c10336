"""Object-store paths on this machine: a URI's local mirror stays inside hone's mirror root."""

from __future__ import annotations

import pytest

from hone import storage


def test_a_uri_s_mirror_stays_inside_the_mirror_root(home):
    assert storage.mirror("s3://bucket/runs/a") == storage.mirror("s3://bucket/runs/a/") == home / "remote" / "s3" / "bucket" / "runs" / "a"
    assert storage.uri_of(storage.mirror("s3://bucket/runs/a")) == "s3://bucket/runs/a"
    for bad in ("s3://bucket/../../etc", "s3://bucket/runs/../../x", "s3://bucket//runs", "s3://bucket/./runs", "s3://../x"):
        with pytest.raises(storage.StorageError, match="cannot be mirrored"):
            storage.mirror(bad)
