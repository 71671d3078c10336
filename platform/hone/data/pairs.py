"""Preference rows → token ids: (prompt, chosen, rejected) pairs, and unpaired completions with a desirable label (KTO);
and prompt rows (GRPO): the prompt's ids, with the row itself kept for the rewards.

A row's prompt and responses are tokenised apart (so the prompt/response boundary is exact) and the loss is on
response tokens only. Strings are used as they are (TRL's standard format; responses end with EOS); message lists
(TRL's conversational format, or LLaMA-Factory's ``{from, value}`` turns) and, with ``data.prompt_template: chat``, strings
are rendered with the tokenizer's chat template (the assistant turn's end marker is trained on). A pair too long for
``data.max_length`` loses the start of its prompt first (down to ``preference.max_prompt_length``), then the ends of its
responses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hone.config import DataConfig, JobConfig
from hone.data.formats import BAD_LABEL, BAD_PAIR, EMPTY, IGNORE_INDEX, OK, SHAREGPT_ROLES
from hone.data.sources import token_ids
from hone.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["encode_preference", "encode_prompts", "preference_columns", "preference_messages", "preference_prompt"]


def preference_columns(cfg: DataConfig) -> dict[str, str]:
    """The columns a preference format reads, by their ``data.columns`` key."""
    c = cfg.columns
    if cfg.format == "prompts":
        return {"prompt": c.prompt}
    if cfg.format == "unpaired":
        return {"prompt": c.prompt, "completion": c.completion, "label": c.label}
    return {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected}


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """A cell as chat messages: a string is one ``role`` turn; ``{role, content}`` and ``{from, value}`` dicts are read."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    out = []
    for m in value:
        if "role" in m:
            out.append({"role": str(m["role"]), "content": str(m.get("content") or "")})
        else:
            who = SHAREGPT_ROLES.get(str(m.get("from", "")).lower())
            if who is None:
                raise DataError(f"data: a preference message has neither role nor a known 'from' ({m!r})")
            out.append({"role": who, "content": str(m.get("value") or "")})
    return out


def _text(value: Any) -> str:
    """What a cell says, for emptiness and identity checks."""
    return "".join(m["content"] for m in _as_messages(value, "assistant")).strip()


def _chat(row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> bool:
    return cfg.prompt_template == "chat" or any(not isinstance(row.get(col), str) and row.get(col) is not None
                                                for col in names.values() if col != cfg.columns.label)


def preference_prompt(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """A preference row's prompt as the model sees it (the generation prompt for chat rows) and its preferred answer
    (the chosen response; an unpaired row's completion)."""
    names = preference_columns(cfg)
    answer = _answer(row, cfg, names)
    if not _chat(row, cfg, names):
        return str(row[names["prompt"]]), answer
    return tokenizer.apply_chat_template(_prompt_messages(row, cfg, names), tokenize=False, add_generation_prompt=True), answer


def preference_messages(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str]:
    """The chat messages a client sends for a preference row and the preferred answer."""
    names = preference_columns(cfg)
    return _prompt_messages(row, cfg, names), _answer(row, cfg, names)


def _answer(row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> str:
    if cfg.format == "prompts":
        return _text(row.get(cfg.columns.answer))
    return _text(row[names["chosen" if cfg.format == "preference" else "completion"]])


def _prompt_messages(row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> list[dict[str, str]]:
    messages = _as_messages(row[names["prompt"]], "user")
    system = (row.get(cfg.columns.system) if cfg.columns.system else None) or cfg.system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": str(system)}] + messages
    return messages


def _encode(row: dict[str, Any], job: JobConfig, tokenizer: Any, names: dict[str, str],
            responses: list[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [response ids]) of one row, before truncation."""
    if not _chat(row, job.data, names):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt = token_ids([str(row[names["prompt"]])], tokenizer, special=True)[0]
        return list(prompt), [list(ids) + eos for ids in token_ids([str(row[r]) for r in responses], tokenizer, special=False)]
    messages = _prompt_messages(row, job.data, names)
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if messages else ""
    tails = []
    for r in responses:
        full = tokenizer.apply_chat_template(messages + _as_messages(row[r], "assistant"), tokenize=False)
        if not full.startswith(head):
            raise DataError("data: this tokenizer's chat template renders the prompt differently once a response follows, so "
                            "the response cannot be located; give string rows without data.prompt_template: chat")
        tails.append(full[len(head):])
    prompt = token_ids([head], tokenizer, special=False)[0] if head else []
    return list(prompt), [list(ids) for ids in token_ids(tails, tokenizer, special=False)]


def _truncate(prompt: list[int], responses: list[list[int]], job: JobConfig) -> tuple[list[int], list[list[int]], bool]:
    limit = job.data.max_length
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= limit:
        return prompt, responses, False
    keep = min(len(prompt), max(job.preference.max_prompt_length or limit // 2, limit - longest))
    prompt = prompt[len(prompt) - keep:]
    return prompt, [r[: limit - len(prompt)] for r in responses], True


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def encode_preference(rows: list[dict[str, Any]], job: JobConfig, tokenizer: Any) -> pa.Table:
    """Preference rows → ``input_ids``/``labels`` (the chosen, or the unpaired completion, after the prompt) and, for
    pairs, ``rejected_ids``/``rejected_labels``; for unpaired rows ``desirable`` and ``prompt_len``. ``status`` marks
    empty rows (EMPTY), pairs whose responses are identical (BAD_PAIR) and non-boolean labels (BAD_LABEL)."""
    import pyarrow as pa

    names = preference_columns(job.data)
    paired = job.data.format == "preference"
    responses = [names["chosen"], names["rejected"]] if paired else [names["completion"]]
    cols: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", "rejected_ids", "rejected_labels", "desirable",
                                                   "prompt_len", "status", "truncated", "label_value")}

    def put(status: int, ids: list[list[int]] | None = None, prompt_len: int = 0, desirable: bool = False,
            truncated: bool = False, value: Any = None) -> None:
        ids = ids or [[], []]
        masked = [[IGNORE_INDEX] * prompt_len + seq[prompt_len:] for seq in ids]
        cols["input_ids"].append(ids[0])
        cols["labels"].append(masked[0])
        cols["rejected_ids"].append(ids[1] if len(ids) > 1 else [])
        cols["rejected_labels"].append(masked[1] if len(ids) > 1 else [])
        cols["desirable"].append(desirable)
        cols["prompt_len"].append(prompt_len)
        cols["status"].append(status)
        cols["truncated"].append(truncated)
        cols["label_value"].append(None if value is None else repr(value)[:120])

    for row in rows:
        if row.get(names["prompt"]) is None or any(not _text(row.get(r)) for r in responses):
            put(EMPTY)
            continue
        desirable = False
        if paired and _text(row[names["chosen"]]) == _text(row[names["rejected"]]):
            put(BAD_PAIR, value=row[names["chosen"]])
            continue
        if not paired:
            label = _label(row.get(names["label"]))
            if label is None:
                put(BAD_LABEL, value=row.get(names["label"]))
                continue
            desirable = label
        prompt, outs, truncated = _truncate(*_encode(row, job, tokenizer, names, responses), job)
        put(OK, [prompt + r for r in outs], len(prompt), desirable, truncated)

    ids = pa.list_(pa.int32())
    table = {k: pa.array(cols[k], ids) for k in ("input_ids", "labels")}
    if paired:
        table.update({k: pa.array(cols[k], ids) for k in ("rejected_ids", "rejected_labels")})
    else:
        table["desirable"] = pa.array(cols["desirable"], pa.bool_())
        table["prompt_len"] = pa.array(cols["prompt_len"], pa.int32())
    table.update(status=pa.array(cols["status"], pa.int8()), truncated=pa.array(cols["truncated"], pa.bool_()),
                 label_value=pa.array(cols["label_value"], pa.string()))
    return pa.table(table)


def encode_prompts(rows: list[dict[str, Any]], job: JobConfig, tokenizer: Any) -> pa.Table:
    """Prompt rows → ``input_ids`` (the prompt as the model sees it, its start cut to ``grpo.max_prompt_length``, then
    the row's reference answer when it has one), ``labels`` (the answer's tokens: the gate and ``hone eval`` measure
    its loss), ``prompt_len`` (what a rollout continues) and ``row`` (the row as JSON, for the rewards); ``status``
    marks rows without a prompt (EMPTY)."""
    import json

    import pyarrow as pa

    names = preference_columns(job.data)
    answer = job.data.columns.answer
    keep = job.grpo.max_prompt_length or job.data.max_length - job.grpo.max_new_tokens
    cols: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", "prompt_len", "row", "status", "truncated")}
    for row in rows:
        if not _text(row.get(names["prompt"])):
            prompt, tail = [], []
        else:
            has_answer = bool(_text(row.get(answer)))
            prompt, tails = _encode(row, job, tokenizer, names, [answer] if has_answer else [])
            tail = tails[0] if tails else []
        cut = prompt[-keep:]
        tail = tail[: job.data.max_length - len(cut)]
        cols["input_ids"].append(cut + tail)
        cols["labels"].append([IGNORE_INDEX] * len(cut) + tail)
        cols["prompt_len"].append(len(cut))
        cols["row"].append(json.dumps(row, default=str))
        cols["status"].append(OK if prompt else EMPTY)
        cols["truncated"].append(len(prompt) > keep)
    ids = pa.list_(pa.int32())
    return pa.table({"input_ids": pa.array(cols["input_ids"], ids), "labels": pa.array(cols["labels"], ids),
                     "prompt_len": pa.array(cols["prompt_len"], pa.int32()), "row": pa.array(cols["row"], pa.string()),
                     "status": pa.array(cols["status"], pa.int8()), "truncated": pa.array(cols["truncated"], pa.bool_()),
                     "label_value": pa.array([None] * len(rows), pa.string())})
