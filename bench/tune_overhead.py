"""Ray Tune overhead per trial: sweep wall time against the sum of the trials' own run times.

Runs jobs/sweep-tiny.yaml with the FIFO scheduler (every trial runs to the end) and compares
the Tuner's wall time with the sum of each trial's own ``TorchTrainer.fit`` time. The overhead
is what Tune adds around the trials: trial actors, data preparation per trial, scheduling,
result handling. Ray's own target for Tune is under 20%.

    python bench/tune_overhead.py [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HONE_MLFLOW", "0")  # registry writes are not part of Tune's overhead

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    from hone.config import load_job
    from hone.tune import sweep

    lrs = [1e-4 * (2**i) for i in range(args.trials)]
    job = load_job(REPO / "jobs" / "sweep-tiny.yaml", ["tune.scheduler=fifo", f"training.max_steps={args.steps}",
                                                        f"tune.search_space.training.lr={{grid: {lrs}}}"])
    with tempfile.TemporaryDirectory() as storage:
        result = sweep(job, storage_path=storage, register=False)
        summary = json.loads((result.sweep_dir / "sweep.json").read_text())
    wall, own = summary["wall_s"], summary["trials_run_s"]
    n = len(result.trials)
    print("| trials | sweep wall s | sum of trial run s | overhead | overhead per trial s |")
    print("|---|---|---|---|---|")
    print(f"| {n} | {wall:.1f} | {own:.1f} | {wall / own - 1:.1%} | {(wall - own) / n:.1f} |")
    print(json.dumps({"overhead": round(wall / own - 1, 3), "target": 0.20, "met": wall / own - 1 <= 0.20}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
