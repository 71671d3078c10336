"""Structured outputs on hone's own engine: xgrammar (the library vLLM uses) masks each row's logits to the
tokens its grammar allows, so a constrained request can only produce text of its schema, regex or choice.

A constraint is the dict both engines take (``hone.serving.protocol``): exactly one of ``json`` (a JSON schema),
``json_object``, ``regex``, ``choice`` (fixed strings) or ``grammar`` (EBNF).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from hone.serving.protocol import RequestError

__all__ = ["Constraints", "Matcher"]


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
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def compile(self, constraint: dict[str, Any]) -> Any:
        """The compiled grammar of ``constraint``; 400 for one that cannot be compiled."""
        compiler = self.compiler()
        try:
            # JSON without free whitespace between tokens: a small model can otherwise emit whitespace until max_tokens
            # (what vLLM's disable_any_whitespace is for); the text is compact JSON.
            if "json" in constraint:
                schema = constraint["json"]
                return compiler.compile_json_schema(schema if isinstance(schema, str) else json.dumps(schema), any_whitespace=False)
            if constraint.get("json_object"):
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if "regex" in constraint:
                return compiler.compile_regex(constraint["regex"])
            if "choice" in constraint:  # an EBNF alternation of JSON-escaped string literals
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in constraint["choice"]))
            if "grammar" in constraint:
                return compiler.compile_grammar(constraint["grammar"])
        except Exception as e:  # noqa: BLE001 - xgrammar's own message says what is wrong with the schema
            kind = next(iter(constraint))
            raise RequestError(f"the {kind} constraint could not be compiled: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               code="invalid_value", param="response_format" if kind in ("json", "json_object") else "structured_outputs") \
                from None
        raise RequestError("structured outputs take one of json, json_object, regex, choice, grammar", param="structured_outputs")


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
