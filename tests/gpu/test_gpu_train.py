"""GPU training paths: bf16 DeepSpeed ZeRO over NCCL, and QLoRA (bitsandbytes 4-bit)."""

from __future__ import annotations

import json

import pytest
import torch

from hone.config import validate_job
from hone.training import train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gpu_job(name: str, method: dict, stage: int) -> dict:
    return {
        "name": name,
        "model": {"name": "builtin:smollm2-135m-instruct"},
        "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 128,
                 "max_samples": 256, "max_eval_samples": 64},
        "method": method,
        "distributed": {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 2, "GPU": 1}, "deepspeed": {"stage": stage}},
        "training": {"lr": 2e-4, "max_steps": 10, "batch_size": 8, "log_every": 5},
    }


def test_bf16_zero2_lora_on_gpu(tmp_path):
    job = validate_job(gpu_job("gpu-bf16", {"type": "lora"}, 2))
    assert job.precision == "bf16"
    result = train(job, storage_path=str(tmp_path), quiet=True)
    m = result.metrics
    assert m["done"] and m["eval_loss"] < 10 and 0 < m["mfu"] < 1
    info = json.loads((result.export_dir / "hone.json").read_text())
    assert info["kind"] == "adapter"


def test_qlora_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    job = validate_job(gpu_job("gpu-qlora", {"type": "qlora", "qlora": {"bits": 4}}, 0))
    result = train(job, storage_path=str(tmp_path), quiet=True)
    assert result.export_dir is not None and (result.export_dir / "adapter_model.safetensors").exists()
    assert torch.cuda.is_available()
