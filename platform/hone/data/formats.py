"""Row formats: how text, alpaca, sharegpt and messages rows become a prompt, an answer and trained-on tokens."""

from __future__ import annotations

from typing import Any

from hone.config import DataConfig
from hone.errors import DataError

__all__ = [
    "ALPACA_PROMPT", "BAD_LABEL", "BAD_PAIR", "EMPTY", "IGNORE_INDEX", "NO_TARGET", "OK", "SHAREGPT_ROLES",
    "causal_example", "causal_texts", "check_chat_template", "check_columns", "plain_template", "row_messages",
]

IGNORE_INDEX = -100

# Row outcomes of encoding (the ``status`` column of :func:`hone.data.tokenize.encode_rows`).
OK, EMPTY, NO_TARGET, BAD_LABEL, BAD_PAIR = 0, 1, 2, 3, 4

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}



# --------------------------------------------------------------------------- formatting


def _required_columns(cfg: DataConfig) -> dict[str, str]:
    c = cfg.columns
    return {
        "text": {"text": c.text},
        "alpaca": {"instruction": c.instruction, "output": c.output},
        "sharegpt": {"conversations": c.conversations},
        "messages": {"messages": c.messages},
        "classification": {"text": c.text, "label": c.label, **({"text_pair": c.text_pair} if c.text_pair else {})},
        "preference": {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected},
        "unpaired": {"prompt": c.prompt, "completion": c.completion, "label": c.label},
        "prompts": {"prompt": c.prompt},
    }[cfg.format]


def check_columns(columns: list[str], cfg: DataConfig, split: str) -> None:
    for key, column in _required_columns(cfg).items():
        if column not in columns:
            raise DataError(
                f"data.columns.{key}: the {split} data has no column {column!r} (format {cfg.format}); "
                f"its columns are {list(columns)}. Set data.columns.{key} to the right column."
            )


def check_chat_template(tokenizer: Any, cfg: DataConfig) -> None:
    chat = cfg.format in ("sharegpt", "messages") or (cfg.format in ("alpaca", "preference", "unpaired", "prompts")
                                                      and cfg.prompt_template == "chat")
    if chat and not getattr(tokenizer, "chat_template", None):
        what = f"format {cfg.format}" + (" with prompt_template: chat" if cfg.format not in ("sharegpt", "messages") else "")
        raise DataError(
            f"data.format: {what} renders conversations with the tokenizer's chat template, but this tokenizer has none; "
            "use a chat/instruct model, or format: alpaca with prompt_template: alpaca, or format: text"
        )


def _alpaca_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    c = cfg.columns
    user = str(row[c.instruction]).strip()
    extra = str(row.get(c.input) or "").strip()
    if extra:
        user += "\n\n" + extra
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(row[c.output])}]


def row_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    c = cfg.columns
    if cfg.format == "alpaca":
        messages = _alpaca_messages(row, cfg)
    elif cfg.format == "messages":
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[c.messages]]
    else:
        messages = []
        for turn in row[c.conversations]:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise DataError(f"data: sharegpt turn with unknown 'from' {turn.get('from')!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": str(turn.get("value", ""))})
    system = row.get(c.system) if c.system else None
    system = system or cfg.system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": str(system)}] + messages
    return messages


def _chat_example(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it belongs to an assistant turn.

    Assistant spans are found by rendering prefixes of the conversation: the text between
    the generation prompt before turn k and the render through turn k is turn k's answer
    (its end-of-turn marker included, so the model learns to stop).
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                "data: this tokenizer's chat template renders conversations differently by length, so "
                "assistant turns cannot be located; set data.train_on_inputs: true"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    target = [any(s < end and start < e for s, e in spans) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), target


def causal_texts(row: dict[str, Any], cfg: DataConfig) -> tuple[str | None, str] | None:
    """For ``text`` rows and Alpaca-template rows: (prompt, answer) as text, tokenised as ``prompt`` with special tokens
    and ``answer`` without (text rows have no prompt: the text is the answer, with special tokens); None for an empty
    row. Batched tokenisation of these gives what :func:`causal_example` gives row by row."""
    c = cfg.columns
    if cfg.format == "text":
        text = row[c.text]
        return None if text is None or not str(text).strip() else (None, str(text))
    instruction, output = row[c.instruction], row[c.output]
    if not instruction or output is None or not str(output).strip():
        return None
    extra = str(row.get(c.input) or "").strip()
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if extra else "",
        instruction=str(instruction).strip(),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    return prompt, str(output)


def plain_template(cfg: DataConfig) -> bool:
    """Whether rows of this format are (prompt, answer) texts (:func:`causal_texts`) rather than chat conversations."""
    return cfg.format == "text" or (cfg.format == "alpaca" and cfg.prompt_template == "alpaca")


def causal_example(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[list[int], list[bool]] | None:
    """(ids, is_target) for one row, before truncation; None for an empty row."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if plain_template(cfg):
        texts = causal_texts(row, cfg)
        if texts is None:
            return None
        prompt, answer = texts
        if prompt is None:
            ids = tokenizer(answer, add_special_tokens=True)["input_ids"] + eos
            return ids, [True] * len(ids)
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        return p + r, [False] * len(p) + [True] * len(r)
    messages = row_messages(row, cfg)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None
    return _chat_example(messages, tokenizer)
