"""The closing summary of a pipeline run: trials, gate figures, accuracy, latency/throughput, and where to look."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PipelineResult", "format_summary", "pct"]


@dataclass
class PipelineResult:
    name: str
    folder: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per stage: ``skipped`` (bool), ``seconds`` and the stage's own figures."""
    wall_s: float = 0.0
    endpoint: str | None = None
    dashboard: str | None = None
    metrics_url: str | None = None


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def format_summary(result: PipelineResult) -> str:
    """The closing summary: trials, gate figures, accuracy, latency/throughput, and where to look."""
    lines = [f"━━ hone pipeline {result.name}: done in {duration(result.wall_s)} ━━"]
    st = result.stages
    tr = st.get("train", {})
    if tr:
        again = " (reused: same inputs)" if tr.get("skipped") else f" ({duration(tr['seconds'])})"
        if tr.get("sweep"):
            trials = tr["trials"]
            stopped = sum(1 for t in trials if t["status"] != "completed")
            w = tr["winner"]
            params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in w["params"].items())
            lines.append(f"train     sweep of {len(trials)} trials, {stopped} stopped early{again}; winner {w['trial']}: {params}, "
                         f"{tr['metric']} {w['value']:.4g}")
            lines += ["          " + row for row in tr["table"].splitlines()]
        elif tr.get("given"):
            lines.append(f"train     none: took {tr['given']} = {tr['model']} ({tr['metric']} {tr['value']:.4g})")
        else:
            lines.append(f"train     one run{again}: {tr['metric']} {tr['value']:.4g}")
        if not tr.get("given"):
            lines.append(f"          registered {tr['model']} (@winner)")
    al = st.get("align")
    if al:
        again = " (reused: same inputs)" if al.get("skipped") else f" ({duration(al['seconds'])})"
        lines.append(f"align     {al['objective']} from {al['from']}{again}: {al['metric']} {al['value']:.4g}; "
                     f"registered {al['model']} (@winner)")
    pr = st.get("prune")
    if pr:
        again = " (reused: same inputs)" if pr.get("skipped") else f" ({duration(pr['seconds'])})"
        s = pr["stats"]
        recovered = f", then {pr['recover_steps']} recovery steps" if pr.get("recover_steps") else ""
        lines.append(f"prune     {pr['method']} {pr['sparsity']:g}{recovered}{again}: {s['params_before'] / 1e6:.1f} M → "
                     f"{s['params_after'] / 1e6:.1f} M parameters; gate {'PASSED' if pr['passed'] else 'FAILED'}")
        lines += ["          " + row for row in pr["table"].splitlines()[:-1]]
        lines.append(f"          {'served: ' + pr['model'] if pr['served'] else 'NOT served (the unpruned model instead)'}: {pr['why']}")
    q = st.get("quantize")
    if q:
        again = " (reused: same inputs)" if q.get("skipped") else f" ({duration(q['seconds'])})"
        lines.append(f"quantize  {q['method']}, quality gate {'PASSED' if q['passed'] else 'FAILED'}{again}: {q['rule']}")
        lines += ["          " + row for row in q["table"].splitlines()[:-1]]
        if "served" in q:
            lines.append(f"          {'served' if q['served'] else 'NOT served (full precision instead)'}: {q['why']}")
    elif tr:
        lines.append("quantize  (not in this pipeline: served in full precision)")
    sv = st.get("serve")
    if sv:
        lines.append(f"serve     {sv['served_name']} = {sv['model']} ({sv['quantization']}, engine {sv.get('engine', '?')}), "
                     f"{sv['replicas']} (ready in {duration(sv['seconds'])})")
        if sv.get("engine_reason"):
            lines.append(f"          engine: {sv['engine_reason']}")
    sm = st.get("smoke_test")
    if sm:
        lines.append(f"smoke     {sm['requests']} held-out {sm['split']} rows through the openai client, {sm['concurrency']} concurrent: "
                     f"{sm['ok']}/{sm['requests']} answered")
        if sm.get("accuracy") is not None:
            untuned = sm.get("untuned_accuracy")
            lines.append(f"          accuracy    untuned {pct(untuned)} → served {pct(sm['accuracy'])}" if untuned is not None
                         else f"          accuracy    served {pct(sm['accuracy'])}")
        lines.append(f"          latency     p50 {sm['latency_p50_s']:.2f} s, p95 {sm['latency_p95_s']:.2f} s"
                     + (f"; first token {sm['ttft_s']:.2f} s (streamed)" if sm.get("ttft_s") is not None else ""))
        lines.append(f"          throughput  {sm['requests_per_s']:.2f} requests/s, {sm['completion_tokens_per_s']:.1f} completion tokens/s"
                     + (f"; replicas seen {sm['replicas_seen']}" if sm.get("replicas_seen") else ""))
        if sm.get("examples"):
            for ex in sm["examples"]:
                mark = "" if ex.get("correct") is None else ("✓ " if ex["correct"] else "✗ ")
                lines.append(f"          {mark}expected {ex['expected']!r:12} answered {ex['answered']!r}")
    where = []
    if result.endpoint:
        where.append(f"endpoint  {result.endpoint}")
    if result.dashboard:
        where.append(f"dashboard {result.dashboard}")
    if result.metrics_url:
        where.append(f"metrics   {result.metrics_url}  (Prometheus; hone_* series appear as ray_hone_*)")
    if tr.get("sweep_dir"):
        where.append(f"plots     {tr['sweep_dir']}/metric_vs_step.png, params_vs_metric.png (trials.csv, trials.json)")
    where.append(f"state     {result.folder}/state.json, summary.json")
    lines += ["where     " + where[0], *("          " + w for w in where[1:])]
    return "\n".join(lines)
