"""The one model loader (hone.modeling.load_model): what an artifact says never decides whether code runs.

Fast: the tiny Llama, on CPU, no Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import make_job

EVIL = '''import os
from pathlib import Path

from transformers import LlamaForCausalLM

Path(os.environ["HONE_TEST_REMOTE_CODE_MARKER"]).write_text("ran")


class EvilLlama(LlamaForCausalLM):
    pass
'''


def test_trust_remote_code_comes_from_the_operator_never_from_the_export(tmp_path, monkeypatch):
    """An adapter export whose hone.json says ``trust_remote_code: true`` over a base that ships Python code: loading it
    runs none of that code unless the caller (the serve or job YAML) sets the flag itself."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets
    from hone.artifacts import EXPORT_INFO, resolve_ref
    from hone.modeling import load_model

    tiny = Path(assets.resolve_model("builtin:tiny-llama"))
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.EvilLlama"}}))
    (base / "evil.py").write_text(EVIL)
    marker = tmp_path / "marker"
    monkeypatch.setenv("HONE_TEST_REMOTE_CODE_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))

    export = tmp_path / "export"
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(export)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(export)
    job = make_job(model={"name": str(base), "trust_remote_code": True})
    (export / EXPORT_INFO).write_text(json.dumps({"kind": "adapter", "task": "causal_lm", "job": job.to_dict()}))

    spec = resolve_ref(str(export))
    assert spec.job.model.trust_remote_code is False  # the export's flag is not read
    model, _ = load_model(spec)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    model, _ = load_model(spec, trust_remote_code=True)  # the operator's flag: the base's own code runs
    assert type(model).__name__ == "EvilLlama" and marker.read_text() == "ran"
