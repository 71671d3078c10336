"""Greedy decode time of a model folder on vLLM, for the quality gate of formats vLLM serves (``w8a8-int8``).

Run with the interpreter of vLLM's environment (:func:`hone.runtime.vllm_python`), which has hone without its
dependencies: ``python -m hone.quantize.vllm_speed FOLDER DTYPE`` prints ``{"decode_ms_per_token": ...}`` as its last line.
"""

from __future__ import annotations

import json
import sys
import time

__all__ = ["main"]

PROMPT = "The movie was"
NEW_TOKENS = 32


def main() -> None:
    from vllm import LLM, SamplingParams

    folder, dtype = sys.argv[1], sys.argv[2]
    llm = LLM(model=folder, dtype=dtype, max_model_len=512, enforce_eager=True, disable_log_stats=True)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(3):
        started = time.perf_counter()
        llm.generate([PROMPT], params, use_tqdm=False)
        times.append((time.perf_counter() - started) * 1000 / NEW_TOKENS)
    print(json.dumps({"decode_ms_per_token": sorted(times)[1]}), flush=True)


if __name__ == "__main__":  # vLLM's engine process is spawned: the module must not run on import
    main()
