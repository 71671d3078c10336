"""The gate's measures of vLLM's formats on vLLM itself: greedy decode time, and the accuracy of greedy answers.

Run with the interpreter of vLLM's environment (:func:`hone.runtime.vllm_python`), which has hone without its
dependencies: ``python -m hone.quantize.vllm_speed [--answers FILE] FOLDER DTYPE [FOLDER DTYPE ...]`` measures each
model in turn in this one process (vLLM imported once, its engine in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
and prints ``[{"decode_ms_per_token": ..., "answer_accuracy": ...}, ...]`` as its last line, in the order given.
``FILE``: JSON rows ``{"ids": [prompt token ids], "expected": "answer"}`` (the held-out prompts, formatted and
tokenised by the caller as training formats them); without it only decoding is timed.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

__all__ = ["folder_measures", "main"]


def folder_measures(folder: str, dtype: str, answers: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """The median of three greedy decodes of 32 tokens after a warm-up, in ms per token
    (:func:`hone.generation.decode_ms_per_token`), and the accuracy of greedy answers to ``answers`` (scored as
    :func:`hone.generation.answer_accuracy` scores them), as vLLM serves the model."""
    from vllm import LLM

    from hone.generation import Sampling, VLLMGenerator, answer_matches, decode_ms_per_token

    llm = LLM(model=folder, dtype=dtype, max_model_len=512, enforce_eager=True, disable_log_stats=True)
    try:
        generator = VLLMGenerator(llm)
        out = {"decode_ms_per_token": decode_ms_per_token(generator, repeats=3)}
        if answers:
            texts = [group[0].text for group in generator.generate([a["ids"] for a in answers], Sampling(max_tokens=12))]
            right = answer_matches(texts, [a["expected"] for a in answers])
            out["answer_accuracy"] = sum(right) / len(right)
        return out
    finally:
        del llm
        gc.collect()


def main() -> None:
    args = sys.argv[1:]
    answers = None
    if args[:1] == ["--answers"]:
        with open(args[1]) as fh:
            answers = json.load(fh)
        args = args[2:]
    if not args or len(args) % 2:
        raise SystemExit("usage: python -m hone.quantize.vllm_speed [--answers FILE] FOLDER DTYPE [FOLDER DTYPE ...]")
    out = [folder_measures(folder, dtype, answers) for folder, dtype in zip(args[::2], args[1::2])]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # a module run as a script: nothing runs on import
    main()
