"""The serve YAML's schema (hone.config.serve): Ray Serve's own settings checked by Ray's models, every shipped config valid."""

from __future__ import annotations

import pytest


def test_serve_config_validation():
    from hone.config import ServeConfigError, validate_serve_config

    with pytest.raises(ServeConfigError) as e:
        validate_serve_config({"model": "builtin:tiny-llama", "prot": 1, "autoscaling_config": {"min_replicas": 3, "max_replicas": 1},
                               "num_replicas": 2, "max_ongoing_requests": 0})
    text = str(e.value)
    assert "did you mean 'port'" in text and "autoscaling_config" in text and "max_ongoing_requests" in text
    with pytest.raises(ServeConfigError, match="adapters"):
        validate_serve_config({"model": "x", "quantization": "int8-dynamic", "adapters": {"a": "/tmp"}})


def test_shipped_serve_configs_validate(repo):
    from hone.config import load_serve_config

    for path in sorted(p for p in (repo / "serving").glob("*.yaml") if not p.name.startswith("prometheus")):
        cfg = load_serve_config(path)
        assert cfg.model
