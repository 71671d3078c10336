"""Data at scale: the old in-driver path against tokenising on Ray Data, in the same run.

For each size (synthetic alpaca rows of about 60 tokens, written as jsonl):

* old: ``prepare_data`` (the whole dataset tokenised in the driver with ``datasets``) + ``to_ray_datasets`` (copied from
  the driver into the object store) + a worker's old view (every row of the split materialised in a list);
* new, 1 CPU and 2 CPUs: ``prepare_cached`` (read, ordered, split, tokenised in Ray Data tasks; streamed by the driver
  into the cache) + a worker opening the cache memory-mapped and building its first micro-batch;
* cache hit: ``prepare_cached`` again with the entry in place.

Each measurement runs in its own process: "driver MB" is that process's peak RSS once the data is ready (Ray's workers
and object store are other processes); "worker MB" what a training worker's view of the split then adds (old: the
list of rows; new: the memory-mapped cache and its first micro-batch). Prints one table, and the ratios.

    python bench/data_scale.py --rows 20000 200000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, resource, sys, tempfile, time
mode, src, cpus, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
import ray
from hone.config import validate_job
from hone.data import CachedSplit, collate, load_tokenizer, local_entry, prepare_cached, prepare_data, to_ray_datasets, tokenizer_digest
from hone.runtime import quiet_libraries
quiet_libraries(console=True)

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

job = validate_job({"name": "bench", "model": {"name": "builtin:tiny-llama"}, "method": {"type": "lora"},
                    "data": {"source": src, "format": "alpaca", "max_length": 128, "validation": 0.01},
                    "distributed": {"num_workers": 1}, "training": {"max_steps": 1, "batch_size": 8}})
tokenizer = load_tokenizer(job)
ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
         _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"), object_store_memory=2 * 2**30)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
start = time.perf_counter()
if mode == "old":
    prepared = prepare_data(job, tokenizer)
    n = len(prepared.train)
    tokenised = time.perf_counter() - start
    ds = to_ray_datasets(prepared)["train"]
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = rss_mb()
    rows = [dict(r) for r in ds.iter_rows()]  # what each worker did: its whole split in a list
    rows.sort(key=lambda r: r["row_id"])
    batch = collate(rows[:8], tokenizer.pad_token_id)
else:
    data = prepare_cached(job, tokenizer, tokenizer_digest(tokenizer), cache)
    n = data.rows["train"]
    tokenised = time.perf_counter() - start
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = rss_mb()
    split = CachedSplit(local_entry(data.location, data.key), "train")
    batch = collate(split.take(list(range(8))), tokenizer.pad_token_id)
first = time.perf_counter() - start
worker = rss_mb() - before
ray.shutdown()
print("RESULT " + json.dumps({"rows": n, "tokenise_s": tokenised, "first_batch_s": first, "driver_peak_mb": driver,
                              "worker_mb": worker}))
"""


def _write(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    words = "the a film movie plot actor scene great bad slow funny dull bright long short story ending music".split()
    with open(path, "w") as fh:
        for i in range(n):
            review = " ".join(rng.choice(words) for _ in range(rng.randint(12, 30)))
            fh.write(json.dumps({"instruction": "Is this review positive or negative?", "input": f"{i}: {review}",
                                 "output": rng.choice(["positive", "negative"])}) + "\n")


def _run(mode: str, src: Path, cpus: int, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(cpus), cache], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--skip-old-above", type=int, default=10**9, help="run the old path only up to this many rows")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hone-bench-data-"))
    print(f"{'rows':>9} {'path':<14} {'tokenise s':>10} {'rows/s':>8} {'1st batch s':>11} {'driver MB':>9} {'worker MB':>9}",
          flush=True)
    for n in args.rows:
        src = work / f"alpaca-{n}.jsonl"
        _write(src, n)
        res = {}
        if n <= args.skip_old_above:
            res["old (driver)"] = _run("old", src, 2, "")
        for cpus in (1, 2):
            cache = str(work / f"cache-{n}-{cpus}")
            res[f"new {cpus} CPU"] = _run("new", src, cpus, cache)
            if cpus == 2:
                res["new cache hit"] = _run("new", src, 2, cache)
        for name, r in res.items():
            print(f"{n:>9} {name:<14} {r['tokenise_s']:>10.1f} {r['rows'] / r['tokenise_s']:>8.0f} {r['first_batch_s']:>11.1f} "
                  f"{r['driver_peak_mb']:>9.0f} {r['worker_mb']:>9.0f}", flush=True)
        one, two = res["new 1 CPU"], res["new 2 CPU"]
        line = f"{n:>9} ratios: 2 CPUs / 1 CPU throughput {one['tokenise_s'] / two['tokenise_s']:.2f}x"
        if "old (driver)" in res:
            old = res["old (driver)"]
            line += (f"; driver RSS new/old {two['driver_peak_mb'] / old['driver_peak_mb']:.2f}; first batch old/new "
                     f"{old['first_batch_s'] / two['first_batch_s']:.2f}x; cache hit {res['new cache hit']['first_batch_s']:.1f} s")
        print(line, flush=True)
        src.unlink()


if __name__ == "__main__":
    main()
