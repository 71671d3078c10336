"""Structured outputs wherever hone decodes or scores itself: xgrammar (the library vLLM's default backend uses) masks
logits to the tokens a grammar allows, so constrained text can only be of its schema, regex or choice.

A constraint is the dict every path takes (the serving API's ``hone.serving.protocol``, GRPO's ``structured_outputs``,
:class:`hone.generation.Sampling`): exactly one of ``json`` (a JSON schema), ``json_object``, ``regex``, ``choice``
(fixed strings) or ``grammar`` (EBNF). hone's serving engine and :class:`hone.generation.TransformersGenerator` decode
through :class:`Matcher`; GRPO's trainer scores the engines' constrained samples with :func:`token_bitmask`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

__all__ = ["CACHE_LIMIT_BYTES", "MAX_CONSTRAINT_BYTES", "ConstraintError", "Constraints", "Matcher", "token_bitmask"]

MAX_CONSTRAINT_BYTES = 16_384
"""The largest constraint (as JSON) a server compiles: a schema, regex or grammar past it is refused before compiling."""
CACHE_LIMIT_BYTES = 64 * 2**20
"""xgrammar's compiled-grammar cache per tokenizer: a stream of distinct schemas evicts, it does not grow to an OOM."""


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (``kind``: which of json, regex, … it was; None: none of them)."""

    def __init__(self, message: str, kind: str | None):
        super().__init__(message)
        self.kind = kind


class Constraints:
    """Compiles constraints for one tokenizer (xgrammar caches compiled grammars)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def compile(self, constraint: dict[str, Any], *, any_whitespace: bool = False) -> Any:
        """The compiled grammar of ``constraint``; :class:`ConstraintError` for one that cannot be compiled.

        JSON comes without free whitespace between tokens unless ``any_whitespace`` (a small model can otherwise emit
        whitespace until max_tokens: what vLLM's ``disable_any_whitespace`` is for); scoring vLLM's own samples needs
        vLLM's default, ``any_whitespace=True``."""
        compiler = self.compiler()
        try:
            if "json" in constraint:
                schema = constraint["json"]
                return compiler.compile_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                    any_whitespace=any_whitespace)
            if constraint.get("json_object"):
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if "regex" in constraint:
                return compiler.compile_regex(constraint["regex"])
            if "choice" in constraint:  # an EBNF alternation of JSON-escaped string literals
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(str(c)) for c in constraint["choice"]))
            if "grammar" in constraint:
                return compiler.compile_grammar(constraint["grammar"])
        except Exception as e:  # noqa: BLE001 - xgrammar's own message says what is wrong with the schema
            kind = next(iter(constraint))
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConstraintError(f"the {kind} constraint could not be compiled: {why}", kind) from None
        raise ConstraintError("structured outputs take one of json, json_object, regex, choice, grammar", None)


class Matcher:
    """One request's position in its grammar: masks its logits row, advances with each sampled token."""

    def __init__(self, grammar: Any, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, row: Any) -> Any:
        """``row`` (1-D logits) with the tokens the grammar does not allow next set to -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        device = row.device
        row = row.float().unsqueeze(0).cpu()  # the bitmask lives on the CPU; one row is small
        self._xgr.apply_token_bitmask_inplace(row, self.bitmask)
        return row[0].to(device)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar does not allow it (it always does after :meth:`mask`)."""
        return bool(self.matcher.accept_token(token))

    @property
    def done(self) -> bool:
        """The text so far is complete and nothing more may follow (the request finishes)."""
        return bool(self.matcher.is_terminated())


def token_bitmask(grammar: Any, spans: list[tuple[int, list[int]]], rows: int, length: int, vocab_size: int) -> Any:
    """Allowed tokens at each position of ``rows`` sequences of ``length`` − 1 predictions: every token where nothing
    is constrained; at completion ``(prompt_len, tokens)`` positions, what ``grammar`` allows after the tokens before."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(rows * length, vocab_size)
    for b, (p, tokens) in enumerate(spans):
        matcher = xgr.GrammarMatcher(grammar)
        for j, token in enumerate(tokens):
            matcher.fill_next_token_bitmask(bitmask, b * length + p - 1 + j)
            if not matcher.accept_token(token):
                break
    return bitmask
