"""A row's generation prompt and the answer expected for it, in every format: what evaluation, the smoke test and GRPO's
rewards send a model and score it against. Above both the plain formats (:mod:`hone.data.formats`) and the preference
ones (:mod:`hone.data.pairs`), so neither imports the other to dispatch."""

from __future__ import annotations

from typing import Any

from hone.config import DataConfig
from hone.data.formats import ALPACA_PROMPT, row_messages
from hone.data.pairs import preference_messages, preference_prompt
from hone.errors import DataError

__all__ = ["prompt_and_answer", "prompt_messages"]


def prompt_and_answer(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """The generation prompt for a row (formatted exactly as in training) and the expected answer.

    For chat formats the answer is the last assistant turn and the prompt everything before it.
    """
    c = cfg.columns
    if cfg.format in ("preference", "unpaired", "prompts"):
        return preference_prompt(row, cfg, tokenizer)
    if cfg.format == "alpaca" and cfg.prompt_template == "alpaca":
        extra = str(row.get(c.input) or "").strip()
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=str(row[c.instruction]).strip(),
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, str(row[c.output])
    messages, answer = prompt_messages(row, cfg)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), answer


def prompt_messages(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str]:
    """The chat messages a client sends for a row (every turn before the last assistant turn) and that turn's text."""
    if cfg.format in ("preference", "unpaired", "prompts"):
        return preference_messages(row, cfg)
    if cfg.format not in ("alpaca", "messages", "sharegpt"):
        raise DataError(f"data.format {cfg.format!r} has no prompt/answer to generate")
    messages = row_messages(row, cfg)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
