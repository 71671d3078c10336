"""The ``grpo:`` section of a job: online reinforcement learning (GRPO and its relatives) with rollouts on vLLM actors.

A job with this section reads ``data.format: prompts`` rows (a prompt, and whatever columns its rewards compare
with), samples ``k`` completions per prompt on rollout engines (Ray actors running vLLM, placed apart from the Ray
Train workers), scores them with the rewards declared here, and trains on group-normalised advantages through the
same Ray Train + DeepSpeed loop, checkpoints, sweeps, registry, gate and serving as every other objective.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hone.config.base import Problem, Section

__all__ = ["GRPO_METRICS", "GRPOConfig", "RewardConfig", "grpo_problems", "reward_names"]

# Metrics a GRPO run can be judged by (each training-step metric also exists; eval_ on the held-out prompts, greedy).
GRPO_METRICS = ("reward", "eval_reward")


class RewardConfig(Section):
    """One reward term (the terms are summed with their weights).

    Built-ins score a completion against the row: ``exact_match`` (the completion, trimmed and
    case-folded, equals the ``column``'s value), ``choice`` (the completion is one of ``labels`` and, with a
    ``column``, the right one: 1 right, ``partial`` for another label, 0 otherwise), ``json_schema`` (the completion
    parses as JSON and, with a ``json_schema``, validates against it), ``regex`` (``pattern`` matches the completion; with a
    ``column``, its first group must equal the column's value). ``function``: a user function
    ``module.path:name`` called as ``fn(prompts=[...], completions=[...], rows=[{...}]) -> [float | None]`` in Ray
    tasks; None, or an exception, marks the sample (counted in ``reward_errors``, scored 0), never ends the run."""

    type: Literal["exact_match", "choice", "json_schema", "regex", "function"]
    weight: float = 1.0
    """Weight of this term in the summed reward."""
    name: str | None = None
    """Name in the metrics (``reward_<name>``). Default: the type (the function's name for functions)."""
    column: str | None = None
    """Column holding the expected answer (exact_match: default ``data.columns.answer``; choice, regex: optional)."""
    labels: list[str] | None = None
    """choice: the allowed answers."""
    partial: float = Field(default=0.0, ge=0.0, le=1.0)
    """choice: the score of an allowed but wrong label."""
    json_schema: dict[str, Any] | None = None
    """json_schema: the JSON Schema a completion must satisfy (any JSON value passes without one)."""
    pattern: str | None = None
    """regex: the pattern searched for in the completion."""
    function: str | None = None
    """function: ``module.path:name`` of a reward function importable on every node."""

    @model_validator(mode="after")
    def _fields(self) -> RewardConfig:
        need = {"choice": "labels", "regex": "pattern", "function": "function"}.get(self.type)
        if need and not getattr(self, need):
            raise ValueError(f"a {self.type} reward needs `{need}`")
        if self.type == "regex":
            try:
                compiled = re.compile(self.pattern or "")
            except re.error as e:
                raise ValueError(f"regex reward: {self.pattern!r} is not a regular expression ({e})") from None
            if self.column and compiled.groups < 1:
                raise ValueError("regex reward with a column compares the pattern's first group: add a (group)")
        if self.type == "function" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function or ""):
            raise ValueError(f"reward function {self.function!r}: give it as module.path:name")
        if self.type == "json_schema" and self.json_schema is not None:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(self.json_schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"json_schema reward: the schema is not valid JSON Schema ({e.message})") from None
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.function.rsplit(":", 1)[1] if self.type == "function" and self.function else self.type


def reward_names(rewards: list[RewardConfig]) -> list[str]:
    """Each reward's metric name, made unique (``choice``, ``choice_2``, …)."""
    seen: dict[str, int] = {}
    out = []
    for r in rewards:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(r.label if seen[r.label] == 1 else f"{r.label}_{seen[r.label]}")
    return out


class GRPOConfig(Section):
    """Group Relative Policy Optimisation (Shao et al.) and its relatives, following TRL's definitions.

    Each optimiser step, every Ray Train worker takes its prompts (``training.batch_size`` per micro-batch, one rollout
    batch per micro-batch: ``training.grad_accum`` rollout batches per step), the rollout engines sample ``k``
    completions of each, the rewards score them, and each completion's advantage is its reward minus its group's
    mean (divided by the group's spread with ``scale_rewards``). The loss is the clipped policy ratio times the
    advantage per token, plus ``beta`` × the k3 KL estimate to the reference (the base with the adapter disabled, or
    a frozen copy for full fine-tuning). Every ``sync_every`` steps the trainer's weights (the adapter, merged on the
    engines) go to every rollout engine, and the engines' log-probs of a fixed prompt are checked against the trainer's.
    """

    k: int = Field(default=4, ge=2)
    """Completions sampled per prompt (a group; advantages compare within it)."""
    max_new_tokens: int = Field(default=32, ge=1)
    """Longest completion."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature (the trainer's log-probs use the same)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a completion (the EOS token always does)."""
    structured_outputs: dict[str, Any] | None = None
    """Constrain the rollouts (and evaluation) with vLLM's structured outputs: ``{choice: [a, b]}``, ``{regex: …}``,
    ``{json: schema}`` or ``{grammar: …}``. The trainer's log-probs are those of the same constrained distribution
    (the grammar's token mask applied to its logits, as vLLM applies it to the engines'), so the policy ratio compares
    like with like."""
    rewards: list[RewardConfig] = Field(min_length=1)
    """The reward terms, summed with their weights."""
    reward_timeout_s: float = Field(default=300.0, gt=0)
    """Longest a reward function's Ray task may take for one rollout batch; its samples are marked past it."""
    beta: float = Field(default=0.0, ge=0)
    """Weight of the KL to the reference model (0: no reference pass)."""
    epsilon: float = Field(default=0.2, gt=0, lt=1)
    """Clipping range of the policy ratio, below 1."""
    epsilon_high: float | None = Field(default=None, gt=0)
    """Clipping range above 1 (DAPO's clip-higher); default ``epsilon``."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    """``grpo``: per-sequence token means, averaged; ``bnpo``: tokens averaged over the micro-batch; ``dr_grpo``:
    token sums over ``completions × max_new_tokens`` (no length bias, Dr. GRPO)."""
    scale_rewards: bool = True
    """Divide advantages by the group's standard deviation (Dr. GRPO turns this off)."""
    dynamic_sampling: bool = False
    """Leave groups whose rewards all tie out of the step's loss (DAPO's dynamic sampling, as a filter: nothing is
    resampled). They teach nothing (every advantage is 0); without them the trainer computes fewer rows and the loss is
    normalised over the groups that carry signal. A step in which every group ties applies no update either way."""
    mask_truncated_completions: bool = False
    """Leave completions cut at ``max_new_tokens`` (no EOS or stop string) out of the loss (DAPO's overlong filtering):
    their reward scored an unfinished answer. They still count in their group's advantages."""
    num_iterations: int = Field(default=1, ge=1)
    """Optimiser updates per batch of rollouts (TRL's ``num_iterations``, PPO's epochs): each pass over the step's
    micro-batches is one update, the ratio's old policy is the trainer's log-probs before the first (then the clipping
    matters), and the learning-rate schedule counts updates (``training.max_steps`` × this). The rollouts, their
    rewards and the weight sync are paid once a step."""
    sync_every: int = Field(default=1, ge=1)
    """Optimiser steps between weight syncs to the rollout engines (>1: rollouts are off-policy, and the ratio uses the
    engines' log-probs of the sampled tokens as the old policy)."""
    sync_tolerance: float | None = Field(default=None, gt=0)
    """Largest difference allowed between the engines' and the trainer's log-probs of the check prompt after a sync
    (a larger one is retried, then fails the run). Default: 2e-3 at fp32, 0.1 at bf16/fp16."""
    sync_retries: int = Field(default=2, ge=0)
    """Retries of a weight sync that failed or did not take, before the run fails."""
    sync_timeout_s: float = Field(default=300.0, gt=0)
    """Longest a weight sync may take on one engine."""
    rollout_engines: int = Field(default=1, ge=1)
    """Rollout engines (Ray actors running vLLM), placed apart from the Ray Train workers."""
    rollout_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    """Resources of each rollout engine actor (``{"GPU": 1}`` on a GPU cluster)."""
    rollout_timeout_s: float = Field(default=600.0, gt=0)
    """Longest one rollout batch may take before its engine is replaced and the batch retried."""
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict)
    """Extra ``vllm.LLM`` arguments (e.g. ``gpu_memory_utilization``, ``max_model_len``)."""
    vllm_cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    """KV cache of each engine on CPU (``VLLM_CPU_KVCACHE_SPACE``)."""
    vllm_python: str | None = None
    """Interpreter of the environment with vLLM (default ``$HONE_VLLM_PYTHON``, else this one)."""
    max_prompt_length: int | None = Field(default=None, ge=1)
    """Prompt tokens kept (its start is cut). Default: ``data.max_length − max_new_tokens``."""

    @model_validator(mode="after")
    def _fields(self) -> GRPOConfig:
        so = self.structured_outputs
        if so is not None and (len(so) != 1 or next(iter(so)) not in ("choice", "regex", "json", "grammar")):
            raise ValueError("grpo.structured_outputs takes one of choice, regex, json or grammar")
        if so is not None and self.sync_every > 1:
            raise ValueError("grpo.structured_outputs needs sync_every: 1 (off-policy ratios would use constrained log-probs)")
        names = reward_names(self.rewards)
        if len(set(names)) != len(names):
            raise ValueError("grpo.rewards: two rewards have the same name")
        if not any(r.weight for r in self.rewards):
            raise ValueError("grpo.rewards: every weight is 0, so every advantage would be 0")
        return self

    def tolerance(self, precision: str) -> float:
        """The sync check's tolerance at a training precision."""
        return self.sync_tolerance if self.sync_tolerance is not None else (2e-3 if precision == "fp32" else 0.1)


def grpo_problems(grpo: GRPOConfig | None, pref: Any, task: Any, data: Any, method: Any) -> list[Problem]:
    """A ``grpo:`` section reads prompt rows on a causal LM; its rewards' columns and functions must exist."""
    out: list[Problem] = []
    prompts = data is not None and data.format == "prompts"
    if grpo is None:
        if prompts:
            out.append(Problem("data.format", "format prompts rows train online RL, which needs a grpo: section",
                               "add `grpo: {rewards: [{type: exact_match}]}`"))
        return out
    if pref is not None:
        out.append(Problem("grpo", "a job has one objective: preference and grpo exclude each other", "remove one of them"))
    if task is not None and task.type != "causal_lm":
        out.append(Problem("grpo", "GRPO trains a causal LM", "set task: causal_lm"))
    if data is not None:
        if not prompts:
            out.append(Problem("data.format", f"grpo samples completions of prompts: it reads format prompts rows, not {data.format!r}",
                               "set data.format: prompts (a prompt column, and the columns the rewards compare with)"))
        if data.packing:
            out.append(Problem("data.packing", "GRPO's prompts are not packed", "set data.packing: false"))
        if grpo.max_new_tokens >= data.max_length:
            out.append(Problem("grpo.max_new_tokens", f"{grpo.max_new_tokens} leaves no room for a prompt within data.max_length "
                               f"{data.max_length}", "lower grpo.max_new_tokens or raise data.max_length"))
    if method is not None and method.type not in ("full", "lora"):
        out.append(Problem("method.type", f"rollout engines receive full weights or a LoRA adapter, not {method.type}",
                           "use method.type: lora or full"))
    for i, r in enumerate(grpo.rewards):
        if r.type == "function":
            problem = _importable(r.function or "")
            if problem:
                out.append(Problem(f"grpo.rewards.{i}.function", problem,
                                   "give module.path:name of a function importable where hone runs (install its package)"))
    return out


def _importable(path: str) -> str | None:
    """Why ``module.path:name`` cannot be found here, or None. Nothing of the module runs: it is located on ``sys.path``
    without importing it (or its parent packages) and its source is read for ``name``; the reward is imported only where
    it runs (the Ray tasks that score samples)."""
    import ast
    import importlib.machinery
    import importlib.util
    import sys

    module, _, name = path.partition(":")
    if module in sys.modules:  # imported already (the standard library's os.path, say): nothing more runs
        return None if callable(getattr(sys.modules[module], name, None)) else f"{module!r} has no function {name!r}"
    parts = module.split(".")
    spec, search = None, None
    for i in range(len(parts)):
        try:  # the top level through every finder (editable installs too), submodules in their package's folders
            spec = importlib.util.find_spec(parts[0]) if i == 0 else importlib.machinery.PathFinder.find_spec(parts[i], search)
        except (ImportError, ValueError) as e:
            return f"cannot find {module!r} ({type(e).__name__}: {e})"
        if spec is None:
            return f"cannot import {module!r}: no module {'.'.join(parts[: i + 1])!r} on this Python's path"
        search = spec.submodule_search_locations
    if not (spec.origin and spec.origin.endswith(".py")):
        return None  # a compiled or namespace module: checked where the reward runs
    try:
        tree = ast.parse(Path(spec.origin).read_text())
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        return f"cannot read {module!r} ({type(e).__name__}: {e})"
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return None  # names it re-exports: checked where the reward runs
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    if name not in defined:
        return f"{module!r} has no function {name!r}"
    return None
