"""Driver-side progress of a training run: metrics.jsonl and TensorBoard written by the Train controller,
followed and shown by the driver (a bar on a terminal, lines otherwise)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hone.artifacts import METRICS_FILE, MetricsFollower, append_metrics, sync_up

__all__ = ["ProgressPrinter", "format_metrics", "progress_callback"]


def progress_callback(run_dir: Path) -> Any:
    from ray.train import UserCallback

    class _Progress(UserCallback):
        """Runs in the Ray Train controller: metrics.jsonl + TensorBoard in the run directory."""

        def __init__(self, run_dir: str):
            self.run_dir = run_dir
            self._writer = None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = dict(metrics[0])
            m["time"] = time.time()
            if checkpoint is not None:
                m["checkpoint"] = checkpoint.path
            append_metrics(self.run_dir, m)
            sync_up(Path(self.run_dir), METRICS_FILE)  # a run in object storage: the history goes with it
            try:
                if self._writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
                for k, v in m.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time", "total_steps"):
                        self._writer.add_scalar(k, v, m["step"])
                self._writer.flush()
            except ImportError:  # tensorboard is optional at run time
                pass

    return _Progress(str(run_dir))


class ProgressPrinter:
    """Driver thread: follows metrics.jsonl and shows progress (a bar on a terminal, lines otherwise)."""

    def __init__(self, run_dir: Path, total: int, quiet: bool):
        self.metrics = MetricsFollower(run_dir)
        self.total = total
        self.quiet = quiet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressPrinter:
        if not self.quiet:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc="train", unit="step", file=sys.stderr)
        while True:
            stopping = self._stop.wait(0.5)
            for m in self.metrics.new():
                text = format_metrics(m)
                if bar is not None:
                    bar.n = m["step"]
                    bar.set_postfix_str(text, refresh=True)
                else:
                    print(f"[hone] step {m['step']}/{m.get('total_steps', self.total)} {text}", flush=True)
            if stopping:
                break
        if bar is not None:
            bar.close()


def format_metrics(m: dict[str, Any]) -> str:
    if m.get("diverged"):
        return f"diverged: {m.get('reason', 'non-finite values')} (loss {m.get('loss')}, grad {m.get('grad_norm')})"
    parts = [f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    if m.get("grad_norm") is not None:
        parts.append(f"grad {m['grad_norm']:.3f}")
    parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    if "reward_std" in m:
        parts.append(f"reward {m['reward']:.3f} ± {m['reward_std']:.3f}, rollout {m['rollout_time_s']:.2f} s sync {m['sync_time_s']:.2f} s")
    if "reward_accuracy" in m:
        parts.append(f"reward acc {m['reward_accuracy']:.2f} margin {m['reward_margin']:.4f}")
    for k in ("eval_loss", "eval_accuracy", "eval_f1", "eval_reward_accuracy", "eval_reward_margin", "eval_reward"):
        if k in m:
            parts.append(f"{k} {m[k]:.4f}")
    if "mfu" in m:
        parts.append(f"mfu {m['mfu']:.1%}")
    return ", ".join(parts)
