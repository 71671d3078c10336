"""One generation path: prompts in; texts, token ids, log-probs and timings out; greedy or sampled; on transformers
(a model loaded in this process) or vLLM (its offline ``LLM``, in vLLM's environment).

:class:`Sampling` is the one description of how to decode, whoever decodes: the quality gate (answer accuracy and
decode timing, :mod:`hone.quantize`), ``hone eval`` (:mod:`hone.evaluation`), the pipeline's smoke-test baseline, GRPO's
rollouts and evaluation (:mod:`hone.training.rollout`, the same :class:`Sampling` and :class:`Generation`), and vLLM's
serving replica (:func:`vllm_sampling`). hone's own serving engine keeps its continuous-batching internals
(:mod:`hone.serving.engine`) and vLLM's replica its streaming; both take their settings from the same fields.

Structured outputs (``Sampling.structured``: ``json``/``json_object``/``regex``/``choice``/``grammar``, vLLM's
``StructuredOutputsParams`` keywords) run on both generators and both serving engines: vLLM compiles them itself,
hone's paths through :mod:`hone.grammar`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hone.config import JobConfig

__all__ = ["Generation", "Generator", "Sampling", "TransformersGenerator", "VLLMGenerator", "answer_accuracy", "answer_matches",
           "decode_ms_per_token", "vllm_sampling"]

TIMING_PROMPT = "The movie was"


@dataclass(frozen=True)
class Sampling:
    """How to decode. ``temperature`` 0 is greedy; ``min_tokens`` = ``max_tokens`` decodes exactly that many (timing)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """Log-probs of the sampled tokens (0) or of the top ``logprobs`` too (vLLM's meaning); None: none."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    structured: dict[str, Any] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """One completion: its text, token ids, each sampled token's log-prob (when asked) and why it ended."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None


class Generator(Protocol):
    def generate(self, prompts: Sequence[str | list[int]], sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[list[Generation]]:
        """``sampling.n`` completions of each prompt (text, or token ids), in order; ``seeds`` one per prompt."""
        ...


# --------------------------------------------------------------------------- transformers


@dataclass
class TransformersGenerator:
    """``model.generate`` in batches of left-padded prompts (a text prompt is used as is: no special tokens added)."""

    model: Any
    tokenizer: Any
    batch_size: int = 16
    _eos: set[int] = field(default_factory=set, init=False)
    _constraints: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None) or self.tokenizer.eos_token_id
        self._eos = {eos} if isinstance(eos, int) else set(eos or [])

    def generate(self, prompts: Sequence[str | list[int]], sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[i : i + self.batch_size])
            seed = seeds[i] if seeds else sampling.seed
            out += self._batch(chunk, sampling, seed)
        return out

    def _batch(self, prompts: list[str | list[int]], s: Sampling, seed: int | None) -> list[list[Generation]]:
        import torch

        from hone.modeling import model_device

        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            if isinstance(prompts[0], str):
                enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            else:
                enc = tok.pad({"input_ids": prompts}, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        enc = enc.to(model_device(self.model))
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, "min_new_tokens": s.min_tokens or None,
                                  "num_return_sequences": s.n, "pad_token_id": tok.pad_token_id,
                                  "output_scores": s.logprobs is not None, "return_dict_in_generate": True}
        if s.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
            if seed is not None:
                torch.manual_seed(seed)
        if s.structured:
            kwargs["logits_processor"] = [_GrammarMask(self._grammar(s.structured), len(prompts) * s.n, self._eos)]
        with torch.no_grad():
            res = self.model.generate(**enc, **kwargs)
        new = res.sequences[:, enc["input_ids"].shape[1] :]
        logps = torch.stack(res.scores, 1).float().log_softmax(-1) if s.logprobs is not None else None
        flat = [self._one(new[j].tolist(), None if logps is None else logps[j], s) for j in range(new.shape[0])]
        return [flat[k * s.n : (k + 1) * s.n] for k in range(len(prompts))]

    def _grammar(self, constraint: dict[str, Any]) -> Any:
        from hone.grammar import Constraints

        if self._constraints is None:
            self._constraints = Constraints(self.tokenizer, int(self.model.get_output_embeddings().weight.shape[0]))
        return self._constraints.compile(constraint)

    def _one(self, ids: list[int], logps: Any, s: Sampling) -> Generation:
        end = next((k for k, t in enumerate(ids) if t in self._eos), None)
        finish = "length"
        if end is not None:
            ids, finish = ids[:end], "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(x) for x in s.stop if x in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        lps = [float(logps[k, t]) for k, t in enumerate(ids)] if logps is not None else None
        return Generation(text, ids, lps, finish)


class _GrammarMask:
    """A ``generate`` logits processor: each row's logits masked to what its constraint allows next (the end token
    alone once its text is complete)."""

    def __init__(self, grammar: Any, rows: int, eos: set[int]):
        self.matchers: list[Any] = []
        self.grammar, self.rows, self.eos = grammar, rows, sorted(eos)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if not self.matchers:  # the vocabulary's size is the logits' (it can exceed the tokenizer's)
            from hone.grammar import Matcher

            self.matchers = [Matcher(self.grammar, scores.shape[-1]) for _ in range(self.rows)]
        else:
            for b, m in enumerate(self.matchers):
                if not m.done:
                    m.accept(int(input_ids[b, -1]))
        for b, m in enumerate(self.matchers):
            if m.done:
                row = scores[b].new_full(scores[b].shape, float("-inf"))
                row[self.eos] = 0.0
                scores[b] = row
            else:
                scores[b] = m.mask(scores[b])
        return scores


# --------------------------------------------------------------------------- vLLM


def vllm_sampling(s: Sampling, seed: int | None = None, **extra: Any) -> Any:
    """vLLM's ``SamplingParams`` for :class:`Sampling` (``extra``: vLLM-only keywords, e.g. a streaming output kind)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs: dict[str, Any] = {"n": s.n, "max_tokens": s.max_tokens, "min_tokens": s.min_tokens, "temperature": s.temperature,
                              "top_p": s.top_p, "stop": list(s.stop) or None, "seed": s.seed if seed is None else seed,
                              "logprobs": s.logprobs, "presence_penalty": s.presence_penalty,
                              "frequency_penalty": s.frequency_penalty, **extra}
    if s.structured:
        kwargs["structured_outputs"] = StructuredOutputsParams(**s.structured)
    return SamplingParams(**kwargs)


@dataclass
class VLLMGenerator:
    """vLLM's offline ``LLM``, given text or token-id prompts."""

    llm: Any

    def generate(self, prompts: Sequence[str | list[int]], sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[list[Generation]]:
        from vllm.inputs import TokensPrompt

        params = [vllm_sampling(sampling, seed) for seed in seeds] if seeds else vllm_sampling(sampling)
        inputs = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [[Generation(o.text, list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]
                            if o.logprobs is not None else None, o.finish_reason) for o in out.outputs] for out in outs]


# --------------------------------------------------------------------------- what the stages measure


def _normalise(text: str) -> str:
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def answer_matches(generated: Sequence[str], expected: Sequence[str]) -> list[bool]:
    """Which generated answers are right.

    When the expected answers form a small label set (classification-style instruction data), the
    prediction is the first label the text mentions, which gives an untuned chatty model a fair
    chance; otherwise an answer counts when it starts with the expected text.
    """
    labels = sorted({_normalise(a) for a in expected})
    out = []
    for text, answer in zip(generated, expected):
        said = _normalise(text)
        if len(labels) <= 20:
            hits = [(said.find(label), label) for label in labels if f" {label} " in f" {said} "]
            out.append((min(hits)[1] if hits else "") == _normalise(answer))
        else:
            out.append(said.startswith(_normalise(answer)))
    return out


def answer_accuracy(generator: Generator, rows: Sequence[dict[str, Any]], job: JobConfig, tokenizer: Any, *,
                    max_tokens: int = 12) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy of greedy answers to held-out rows (prompts formatted exactly as in training), with each answer."""
    from hone.data import prompt_and_answer

    pairs = [prompt_and_answer(r, job.data, tokenizer) for r in rows]
    outs = generator.generate([p for p, _ in pairs], Sampling(max_tokens=max_tokens)) if pairs else []
    texts = [group[0].text for group in outs]
    expected = [a for _, a in pairs]
    results = [{"expected": a, "generated": t, "correct": c} for a, t, c in zip(expected, texts, answer_matches(texts, expected))]
    return sum(r["correct"] for r in results) / max(len(results), 1), results


def decode_ms_per_token(generator: Generator, *, new_tokens: int = 32, repeats: int = 1, prompt: str = TIMING_PROMPT) -> float:
    """Greedy decode time of exactly ``new_tokens`` tokens after a short warm-up, in ms per token (the median of
    ``repeats`` timings): how the gate compares a quantised model's speed with its original's."""
    exact = Sampling(max_tokens=new_tokens, min_tokens=new_tokens)
    generator.generate([prompt], replace(exact, max_tokens=4, min_tokens=4))  # warm-up: kernels, caches, allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generator.generate([prompt], exact)
        times.append((time.perf_counter() - started) * 1000 / new_tokens)
    return statistics.median(times)
