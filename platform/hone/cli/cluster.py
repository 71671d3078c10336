"""``hone submit`` and ``jobs``: jobs on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def _cmd_submit(args: argparse.Namespace) -> int:
    """Validate locally, then submit through the Ray Jobs API."""
    from hone.submit import follow_logs, submit

    command = "tune" if args.tune else "serve" if args.serve else "train"
    sub = submit(args.file, args.overrides, address=args.address, command=command, upload=args.upload,
                 shared_paths=args.shared_path or (), storage_path=args.storage_path, submission_id=args.id)
    print(f"[hone] submitted {sub.id} to {sub.address}: {sub.entrypoint}")
    print(f"[hone] follow it: hone jobs logs {sub.id} --follow   (or: ray job logs {sub.id} --address {sub.address} --follow)")
    if args.follow:
        status = follow_logs(args.address, sub.id)
        print(f"[hone] {sub.id}: {status}")
        return 0 if status.endswith("SUCCEEDED") else 1
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    """list | status | logs | stop, over the Ray Jobs API."""
    from hone.submit import follow_logs, job_client

    client = job_client(args.address)
    if args.jobs_command == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'submission id':32} {'status':10} {'hone':6} entrypoint")
        for j in jobs:
            print(f"{(j.submission_id or j.job_id or ''):32} {str(j.status).split('.')[-1]:10} {(j.metadata or {}).get('hone', ''):6} "
                  f"{j.entrypoint}")
        return 0
    if args.jobs_command == "status":
        info = client.get_job_info(args.id)
        print(f"{args.id}: {str(info.status).split('.')[-1]}" + (f" — {info.message}" if info.message else ""))
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            status = follow_logs(args.address, args.id)
            return 0 if status.endswith("SUCCEEDED") else 1
        print(client.get_job_logs(args.id), end="")
        return 0
    stopped = client.stop_job(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'not running'}")
    return 0


def add_commands(sub: Any) -> None:
    """The subcommands for jobs on a Ray cluster, and what ships built in."""
    p = sub.add_parser("submit", help="validate a job here, then submit it to a Ray cluster through the Jobs API")
    p.add_argument("file", help="job YAML (train / --tune) or serve YAML (--serve)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--address", help="Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--tune", action="store_true", help="submit `hone tune` (a sweep) instead of `hone train`")
    kind.add_argument("--serve", action="store_true", help="submit `hone serve` (a long-running service)")
    p.add_argument("--upload", action="store_true", help="send local data/model files with the job (small files only)")
    p.add_argument("--shared-path", action="append", metavar="PREFIX",
                   help="local paths under PREFIX are on storage every node mounts (repeatable; also $HONE_SHARED_PATHS)")
    p.add_argument("--storage-path", help="where the run is written on the cluster (shared storage for multi-node runs)")
    p.add_argument("--id", help="submission id (default: Ray's raysubmit_...)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit with its result")
    p.set_defaults(fn=_cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop submitted jobs (Ray Jobs API)")
    jobs_sub = p.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    for name, text in (("list", "submitted jobs"), ("status", "one job's status"), ("logs", "one job's logs"), ("stop", "stop a job")):
        q = jobs_sub.add_parser(name, help=text)
        if name != "list":
            q.add_argument("id", help="submission id")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.add_argument("--address", help="Jobs API address (default: $RAY_ADDRESS)")
        q.set_defaults(fn=_cmd_jobs)
