"""The transformers engine behind a model replica: loading, batched decoding, adapters, classification.

Concurrent requests are decoded together: the scheduler (in the replica) hands the engine a
batch of requests for the same model or adapter; the engine runs one prefill over the
left-padded prompts and then one forward pass per step for the whole batch with a shared KV
cache, streaming each request's text as its tokens come. Finished rows leave the batch (their
cache rows are dropped), and requests that arrive meanwhile join it between steps (continuous
batching: they are prefilled on their own and their cache rows appended, left-padded).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hone.generation import Sampling
from hone.grammar import ConstraintError, Constraints, Matcher
from hone.serving.protocol import RequestError, require_task

if TYPE_CHECKING:
    from hone.serving.spec import ServeSpec

__all__ = ["GREEDY_BELOW", "Engine", "GenRequest", "check_length", "encode_prompt", "max_tokens_for"]

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily."""


def encode_prompt(tok: Any, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
    """Token ids of a completion prompt, or of chat messages through the tokenizer's chat template (both engines)."""
    if messages is not None:
        if not getattr(tok, "chat_template", None):
            raise RequestError("this model has no chat template: use /v1/completions", code="no_chat_template")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - template errors are the request's
            raise RequestError(f"messages do not fit the model's chat template: {e}", param="messages") from None
    else:
        text = prompt or ""
    try:
        return tok(text, add_special_tokens=messages is None)["input_ids"]
    except Exception as e:  # noqa: BLE001 - text the tokenizer cannot encode is the request's
        raise RequestError(f"the prompt could not be tokenized: {type(e).__name__}", param="messages" if messages else "prompt") from None


def check_length(prompt_ids: list[int], max_tokens: int, context_length: int) -> None:
    """400 for an empty prompt, or one that with ``max_tokens`` more does not fit the context window."""
    if not prompt_ids:
        raise RequestError("the prompt is empty", param="prompt")
    if len(prompt_ids) + max_tokens > context_length:
        raise RequestError(
            f"this model's maximum context length is {context_length} tokens; the prompt has {len(prompt_ids)} "
            f"and max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens",
            code="context_length_exceeded", param="max_tokens")


def max_tokens_for(prompt_ids: list[int], requested: int | None, default: int, context_length: int) -> int:
    """A request's ``max_tokens``, both engines' one rule: as asked, else the serve config's ``max_tokens_default``
    capped by what the context window leaves after the prompt; 400 when the prompt and that many more do not fit."""
    max_tokens = requested or min(default, max(1, context_length - len(prompt_ids)))
    check_length(prompt_ids, max_tokens, context_length)
    return max_tokens


@dataclass
class GenRequest:
    """One request in a decoding batch: its prompt, how to decode it (the :class:`hone.generation.Sampling` vLLM's
    replica and the offline generators take too; ``n``, ``logprobs`` and the penalties are vLLM's only), its adapter."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None
    grammar: Any = None
    """A compiled structured-output constraint (:mod:`hone.grammar`), or None."""
    cancelled: bool = False


class Engine:
    """One replica's model: generation for causal LMs, scores for classifiers."""

    def __init__(self, spec: ServeSpec):
        """``spec``: the resolved serving spec (:func:`hone.serving.spec.resolve`)."""
        import torch

        from hone.modeling import load_model

        self.spec = spec
        device = spec.device
        self.device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.model, self.tokenizer = load_model(spec.model, self.device, trust_remote_code=spec.trust_remote_code)
        self.task = spec.task
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or getattr(self.tokenizer, "model_max_length", 2048))
        eos = set()
        for source in (getattr(getattr(self.model, "generation_config", None), "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        self.eos_ids = eos
        self.labels = spec.labels or [config.id2label[i] for i in range(len(getattr(config, "id2label", {}) or {}))]
        self._adapters: OrderedDict[str, str] = OrderedDict()  # loaded adapter name → path (LRU order)
        self._adapter_paths: dict[str, str] = dict(spec.adapters)
        self._max_adapters = spec.max_loaded_adapters
        self._lock = threading.Lock()  # one batch at a time on the model
        # Prompts are encoded off the replica's event loop while the engine thread decodes: a tokenizer of their own
        # (a Rust tokenizer used from two threads at once can fail with "Already borrowed").
        self._encoder = copy.deepcopy(self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0]) if self.task == "causal_lm" else 0
        # its own tokenizer copy: constraints compile on a thread of their own, beside the encoding thread
        self._constraints = Constraints(copy.deepcopy(self.tokenizer), self.vocab_size)

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        """Token ids of a prompt or chat (one caller at a time: the replica's encoding thread)."""
        return encode_prompt(self._encoder, prompt, messages)

    def compile_constraint(self, constraint: dict[str, Any]) -> Any:
        """A structured-output constraint compiled for this tokenizer (the replica's encoding thread); 400 if it cannot be."""
        try:
            return self._constraints.compile(constraint)
        except ConstraintError as e:
            param = "response_format" if e.kind in ("json", "json_object") else "structured_outputs"
            raise RequestError(str(e), code="invalid_value" if e.kind else None, param=param) from None

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(ids) for ids in self._encoder(texts)["input_ids"])

    def max_tokens(self, prompt_ids: list[int], requested: int | None) -> int:
        """:func:`max_tokens_for` this model's context window and the serve config's default."""
        return max_tokens_for(prompt_ids, requested, self.spec.max_tokens_default, self.context_length)

    # ------------------------------------------------------------------ adapters

    def adapter_names(self) -> list[str]:
        return list(self._adapter_paths)

    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def _use_adapter(self, name: str | None) -> Any:
        """Activate ``name`` (loading it, evicting the least recently used), or the plain base for None."""
        import contextlib

        if name is None:
            if self._adapters:
                return self.model.disable_adapter()
            return contextlib.nullcontext()
        if name not in self._adapter_paths:
            raise RequestError(f"unknown adapter {name!r}", status=404, code="model_not_found", param="model")
        if name not in self._adapters:
            import peft

            path = self._adapter_paths[name]
            if not isinstance(self.model, peft.PeftModel):
                self.model = peft.PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
            self._adapters[name] = path
            while len(self._adapters) > self._max_adapters:
                evict, _ = self._adapters.popitem(last=False)
                if evict != name:
                    self.model.delete_adapter(evict)
        self._adapters.move_to_end(name)
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ generation

    def _sample(self, logits: Any, reqs: list[GenRequest], generators: list[Any], matchers: list[Matcher | None]) -> list[int | None]:
        """One token per row; None for a row whose sampling failed (that request ends with an error, its neighbours go on).
        A constrained row only gets tokens its grammar allows."""
        import torch

        out: list[int | None] = []
        greedy = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            matcher = matchers[i]
            row = matcher.mask(logits[i]) if matcher is not None else logits[i].float()
            s = req.sampling
            if s.temperature < GREEDY_BELOW:  # logits / 1e-30 overflow to inf and softmax to NaN: vLLM decodes greedily too
                tok: int | None = greedy[i] if matcher is None else int(row.argmax())
            else:
                try:
                    row = row / s.temperature
                    if s.top_p < 1.0:
                        sorted_logits, order = torch.sort(row, descending=True)
                        probs = torch.softmax(sorted_logits, -1)
                        cut = probs.cumsum(-1) - probs > s.top_p
                        sorted_logits[cut] = float("-inf")
                        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
                    probs = torch.softmax(row, -1)
                    tok = int(torch.multinomial(probs, 1, generator=generators[i]).item())
                except RuntimeError:  # non-finite probabilities: this request cannot be sampled
                    tok = None
            if matcher is not None and tok is not None and not matcher.accept(tok):
                tok = None
            out.append(tok)
        return out

    @staticmethod
    def _held_back(text: str, stops: list[str]) -> int:
        """Characters at the end of ``text`` that could begin a stop string (not streamed yet)."""
        hold = 1 if text.endswith("\ufffd") else 0
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def _prefill(self, reqs: list[GenRequest]) -> tuple[Any, Any, Any]:
        """One forward pass over the left-padded prompts: (cache, attention mask, last-position logits)."""
        import torch
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in reqs)
        input_ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        return cache, mask, logits

    @staticmethod
    def _mergeable(cache: Any) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    @staticmethod
    def _merge(cache: Any, mask: Any, other: Any, other_mask: Any) -> Any:
        """Append ``other``'s rows to ``cache`` (in place), left-padding the shorter one; returns the joint mask."""
        import torch
        import torch.nn.functional as F

        width = max(mask.shape[1], other_mask.shape[1])

        def left_pad(t: Any, w: int) -> Any:
            return F.pad(t, (0, 0, width - w, 0)) if w < width else t

        for mine, theirs in zip(cache.layers, other.layers):
            mine.keys = torch.cat([left_pad(mine.keys, mask.shape[1]), left_pad(theirs.keys, other_mask.shape[1])], 0)
            mine.values = torch.cat([left_pad(mine.values, mask.shape[1]), left_pad(theirs.values, other_mask.shape[1])], 0)
        return torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(other_mask, (width - other_mask.shape[1], 0))], 0)

    def generate_batch(self, reqs: list[GenRequest], emit: Callable[[int, str, str | None, int], None],
                       admit: Callable[[int], list[GenRequest]] | None = None, max_batch: int | None = None) -> None:
        """Decode ``reqs`` together (same adapter); ``emit(i, text, finish_reason, n_tokens)`` per new piece.

        Continuous batching: between decode steps ``admit(free_rows)`` may hand over requests that arrived
        meanwhile (same adapter); they are prefilled, their cache rows joined to the running batch, and
        decoded with it from the next step on (their index ``i`` continues after the ones before).
        """
        import torch

        reqs = list(reqs)
        limit = max_batch or len(reqs)
        with self._lock, torch.inference_mode(), self._use_adapter(reqs[0].adapter):
            generators: list[Any] = []
            matchers: list[Matcher | None] = []
            tokens: list[list[int]] = []
            sent: list[int] = []

            def start(new: list[GenRequest]) -> None:
                for r in new:
                    g = torch.Generator(device=self.device)
                    seed = r.sampling.seed
                    g.manual_seed(seed % 2**64 if seed is not None else int(time.time_ns() % 2**63))
                    generators.append(g)
                    matchers.append(Matcher(r.grammar, self.vocab_size) if r.grammar is not None else None)
                    tokens.append([])
                    sent.append(0)

            def advance(i: int, tok: int | None) -> bool:
                """Record request ``i``'s new token and emit its text; False once it has finished."""
                req = reqs[i]
                finish = None
                if tok is None:
                    emit(i, "", "error", len(tokens[i]))
                    return False
                if req.cancelled:
                    finish = "cancelled"
                elif tok in self.eos_ids:
                    finish = "stop"
                else:
                    tokens[i].append(tok)
                    if matchers[i] is not None and matchers[i].done:  # the constrained text is complete
                        finish = "stop"
                text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                if finish is None and req.sampling.stop:
                    hits = [text.find(s, max(0, sent[i] - len(s))) for s in req.sampling.stop]
                    hits = [h for h in hits if h >= 0]
                    if hits:
                        text, finish = text[: min(hits)], "stop"
                if finish is None and len(tokens[i]) >= req.sampling.max_tokens:
                    finish = "length"
                end = len(text) if finish else len(text) - self._held_back(text, req.sampling.stop)
                if end > sent[i] or finish:
                    emit(i, text[sent[i]:end] if end > sent[i] else "", finish, len(tokens[i]))
                    sent[i] = max(sent[i], end)
                return finish is None

            def step(rows: list[int], logits: Any) -> tuple[list[int], list[int]]:
                """Sample a token for each row; (kept row positions, their tokens)."""
                picked = self._sample(logits, [reqs[i] for i in rows], [generators[i] for i in rows], [matchers[i] for i in rows])
                keep = [k for k, (i, tok) in enumerate(zip(rows, picked)) if advance(i, tok)]
                return keep, [picked[k] for k in keep]

            start(reqs)
            cache, mask, logits = self._prefill(reqs)
            active = list(range(len(reqs)))
            while active:
                keep, next_tokens = step(active, logits)
                if len(keep) < len(active) and keep:
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask = mask[index]
                active = [active[k] for k in keep]
                if active and admit is not None and len(active) < limit and self._mergeable(cache):
                    new = admit(limit - len(active))
                    if new:
                        first = len(reqs)
                        reqs.extend(new)
                        start(new)
                        new_cache, new_mask, new_logits = self._prefill(new)
                        new_keep, new_tokens = step(list(range(first, first + len(new))), new_logits)
                        if new_keep:
                            if len(new_keep) < len(new):
                                index = torch.tensor(new_keep, device=self.device)
                                new_cache.batch_select_indices(index)
                                new_mask = new_mask[index]
                            mask = self._merge(cache, mask, new_cache, new_mask)
                            active += [first + k for k in new_keep]
                            next_tokens += new_tokens
                if not active:
                    break
                next_ids = torch.tensor([[t] for t in next_tokens], device=self.device)
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=self.device)], dim=1)
                positions = (mask.sum(-1, keepdim=True) - 1)
                logits = self.model(input_ids=next_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                    use_cache=True).logits[:, -1]

    # ------------------------------------------------------------------ classification

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        import torch

        require_task(self.task, "sequence_classification")
        with self._lock, torch.inference_mode():
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=min(self.context_length, 512)).to(self.device)
            probs = torch.softmax(self.model(**enc).logits.float(), -1).cpu()
        labels = self.labels or [str(i) for i in range(probs.shape[-1])]
        out = []
        for i, row in enumerate(probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"index": i, "label": labels[best], "score": row[best], "scores": dict(zip(labels, row))})
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.task, "context_length": self.context_length, "device": self.device,
                "adapters": self.adapter_names(), "loaded_adapters": self.loaded_adapters()}

