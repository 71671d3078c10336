"""What ``data.mask_pii`` and ``redact_logs`` cost: tokenising the same rows with and without masking, in one run.

The built-in Rotten Tomatoes reviews (alpaca view, SmolLM2's chat template) with an e-mail address and a phone number
planted in every ``--every``-th row, tokenised in this process by hone's one encoder (``tokenize_split``: the code Ray
Data runs per batch), masked and not; and ``redact`` on typical log lines. Prints rows/s for both and their ratio, and
what the masker found against what was planted.

    python bench/pii_masking.py                # 2048 rows, a planted row in 10; ≈ 1 min on 2 cores
    python bench/pii_masking.py --rows 4096 --every 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from machine import cpu_flags  # bench/machine.py: python puts bench/ on the path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--every", type=int, default=10, help="plant an e-mail and a phone number in every N-th row")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import datasets

    from hone.config import validate_job
    from hone.data import load_splits, load_tokenizer, tokenize_split
    from hone.privacy import redact

    raw = {"name": "pii-bench", "model": {"name": "builtin:smollm2-135m-instruct"},
           "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 256}}
    plain = validate_job(raw)
    masked = validate_job({**raw, "data": {**raw["data"], "mask_pii": True}})
    tokenizer = load_tokenizer(plain)
    rows = load_splits(plain.data)["train"].select(range(args.rows)).to_list()
    planted = 0
    for i in range(0, len(rows), args.every):
        rows[i]["input"] += f" Questions: reviewer{i}@example.com or +1 (415) 555-{i % 10000:04d}."
        planted += 1
    ds = datasets.Dataset.from_list(rows)

    def timed(job):
        times, report = [], None
        for _ in range(args.reps):
            t0 = time.perf_counter()
            _, report = tokenize_split(ds, job, tokenizer, pack=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), report

    tokenize_split(ds.select(range(64)), masked, tokenizer, pack=False)  # warm-up: Presidio's engines, the tokenizer
    base_s, _ = timed(plain)
    mask_s, report = timed(masked)
    found = report.pii_masked
    print(f"CPU: {os.cpu_count()} cores, {cpu_flags()}")
    print(f"{len(rows)} rows, {planted} with an e-mail and a phone planted; found {found}")
    print(f"tokenise unmasked: {len(rows) / base_s:,.0f} rows/s; masked: {len(rows) / mask_s:,.0f} rows/s; "
          f"masked/unmasked time {mask_s / base_s:.2f}x (+{(mask_s - base_s) * 1000 / len(rows):.2f} ms/row)")

    lines = ['127.0.0.1 - "POST /v1/chat/completions HTTP/1.1" 200 41.2ms',
             "request failed: ValueError: cannot parse 'call me at +44 20 7946 0958 or jane@example.com'",
             "replica lost (ActorDiedError); attempt 2 of 3"]
    redact(lines[0])
    t0 = time.perf_counter()
    n = 300
    for _ in range(n):
        for line in lines:
            redact(line)
    print(f"redact_logs: {(time.perf_counter() - t0) * 1e6 / (n * len(lines)):.0f} µs per log line "
          f"({redact(lines[1])!r})")


if __name__ == "__main__":
    main()
