"""``engine: vllm``: hand the model to Ray Serve LLM (vLLM) on GPUs. Optional extra, guarded.

Ray Serve LLM brings its own OpenAI-compatible ingress, batching (vLLM's continuous batching)
and metrics; hone contributes the model resolution (registry, exports) and the serve YAML's
Ray Serve settings.
"""

from __future__ import annotations

from typing import Any

from hone.config import ServeConfig

__all__ = ["build_vllm_app"]


def build_vllm_app(cfg: ServeConfig, spec: dict[str, Any]) -> Any:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("engine: vllm needs a CUDA GPU; use engine: transformers on CPU")
    try:
        import vllm  # noqa: F401
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise RuntimeError("engine: vllm needs vLLM: pip install 'hone[vllm]'") from e
    if spec["kind"] == "quantized":
        raise RuntimeError("engine: vllm serves full-precision exports (vLLM quantises with its own kernels)")
    from hone import assets

    path = spec["path"] if spec["kind"] == "export" else assets.resolve_model(spec["path"])
    deployment: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests}
    if cfg.autoscaling_config is not None:
        deployment["autoscaling_config"] = dict(cfg.autoscaling_config)
    else:
        deployment["num_replicas"] = cfg.num_replicas or 1
    lora = None
    if cfg.adapters:
        lora = {"dynamic_lora_loading_path": None, "max_num_adapters_per_replica": cfg.max_loaded_adapters}
    llm = LLMConfig(
        model_loading_config={"model_id": spec["served_name"], "model_source": path},
        deployment_config=deployment,
        engine_kwargs={"dtype": "bfloat16", "enable_lora": bool(cfg.adapters)},
        lora_config=lora,
    )
    return build_openai_app({"llm_configs": [llm]})
