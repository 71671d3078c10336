"""Greedy decode time of model folders on vLLM, for the quality gate of formats vLLM serves (``w8a8-int8``).

Run with the interpreter of vLLM's environment (:func:`hone.runtime.vllm_python`), which has hone without its
dependencies: ``python -m hone.quantize.vllm_speed FOLDER DTYPE [FOLDER DTYPE ...]`` times each model in turn in this one
process (vLLM imported once, its engine in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and prints
``[{"decode_ms_per_token": ...}, ...]`` as its last line, in the order given.
"""

from __future__ import annotations

import gc
import json
import sys

__all__ = ["folder_decode_ms", "main"]


def folder_decode_ms(folder: str, dtype: str) -> float:
    """The median of three greedy decodes of 32 tokens after a warm-up, in ms per token
    (:func:`hone.generation.decode_ms_per_token`)."""
    from vllm import LLM

    from hone.generation import VLLMGenerator, decode_ms_per_token

    llm = LLM(model=folder, dtype=dtype, max_model_len=512, enforce_eager=True, disable_log_stats=True)
    try:
        return decode_ms_per_token(VLLMGenerator(llm), repeats=3)
    finally:
        del llm
        gc.collect()


def main() -> None:
    args = sys.argv[1:]
    if not args or len(args) % 2:
        raise SystemExit("usage: python -m hone.quantize.vllm_speed FOLDER DTYPE [FOLDER DTYPE ...]")
    out = [{"decode_ms_per_token": folder_decode_ms(folder, dtype)} for folder, dtype in zip(args[::2], args[1::2])]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # a module run as a script: nothing runs on import
    main()
