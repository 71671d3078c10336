"""The Ray runtime every stage runs on: one way to start or join Ray, and the process hygiene around it.

:func:`ray_session` starts a local embedded Ray (shut down afterwards) or joins ``--address`` /
``RAY_ADDRESS``; train, tune, serve and pipeline all enter it. Workers get one environment
(:func:`worker_env`) and one logging set-up (:func:`quiet_libraries`, also Ray's worker set-up hook),
so library chatter stays off the driver's console everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hone import assets, storage
from hone.errors import ClusterError

if TYPE_CHECKING:
    from hone.config import JobConfig

__all__ = ["ClusterError", "vllm_python", "base_worker_env", "dashboard_url", "free_port", "is_remote", "job_cpus", "quiet_libraries",
           "ray_log_level", "port_in_use", "ray_session", "stop_event", "watch_session", "worker_env", "worker_setup_hook"]

# Loggers that print optional-kernel load failures, deprecation notes and per-request lines nobody acts on.
_NOISY = ("torchao", "torch.utils._pytree", "transformers", "httpx")


def quiet_libraries(*, console: bool = False, redact: bool = False) -> None:
    """Keep library chatter off the terminal (errors still show). ``console``: also the environment switches
    for the processes this one spawns (the ``hone`` command's own process). ``redact``: mask personal data in what this
    process logs (a serve config's ``redact_logs``)."""
    if redact:
        from hone.privacy import redact_logging

        redact_logging()
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-dataset progress lines, the "progress bars disabled" note
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if console:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars follow it
        # Deprecation notices from the libraries (here and in the processes hone spawns) are not the user's to act on.
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")


def worker_setup_hook() -> None:
    """Ray's ``worker_process_setup_hook`` for hone sessions: quiet libraries in every worker, and Ray Train's
    per-report INFO line (a logger named by its file path) and transformers' progress bars off."""
    quiet_libraries()
    try:
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def base_worker_env() -> dict[str, str]:
    """Environment every hone Ray worker gets: the hone cache, offline switches, quiet libraries."""
    env = {
        "HONE_HOME": str(assets.hone_home()),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers follows it (weight loading, shard writing)
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    }
    # settings only: a runtime_env is readable by anyone who can read the dashboard or the Jobs API, so secrets (HF_TOKEN,
    # the object store's keys, a tracking URI with a password in it) stay in this process. A local Ray's workers inherit
    # them from it; a cluster's nodes read them from their own environment (KubeRay: a Secret; an instance role).
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR", *storage.STORAGE_SETTINGS):
        if os.environ.get(key):
            env[key] = os.environ[key]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri and "@" not in uri.split("://", 1)[-1].split("/", 1)[0]:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def worker_env(job: JobConfig) -> dict[str, str]:
    """A training job's worker environment: torch threads per worker, DeepSpeed's CPU accelerator without GPUs."""
    env = {**base_worker_env(), "OMP_NUM_THREADS": str(max(1, int(job.distributed.resources_per_worker.get("CPU", 1))))}
    if not job.distributed.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def job_cpus(job: JobConfig) -> float:
    """The CPUs a job's run reserves: its workers, and GRPO's rollout engines (Ray actors beside them)."""
    need = job.distributed.max_workers * job.distributed.resources_per_worker.get("CPU", 1.0)
    if job.grpo is not None:
        need += job.grpo.rollout_engines * job.grpo.rollout_resources.get("CPU", 1.0)
    return need


def ray_log_level() -> str:
    """Ray's console log level in hone sessions (``HONE_RAY_LOG_LEVEL``, default WARNING)."""
    return os.environ.get("HONE_RAY_LOG_LEVEL", "WARNING")


def is_remote(address: str | None) -> bool:
    """Whether a session joins an existing cluster (``address`` or ``RAY_ADDRESS``) rather than starting Ray here."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def ray_session(job: JobConfig | None, address: str | None, extra_cpus: float = 0.0, *, env: dict[str, str] | None = None,
                metrics_export_port: int | None = None, loopback: bool = False) -> Iterator[None]:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local embedded Ray shut down afterwards.

    A local session gets at least the CPUs the job's workers reserve (plus ``extra_cpus``), so a
    2-worker job also starts on a 1-core laptop (logical CPUs, oversubscribed). Its GCS port is
    chosen here and passed to every worker as ``RAY_ADDRESS``: Ray's own helpers inside workers
    (Train's placement-group cleaner uses the state API) would otherwise auto-detect the cluster
    and fail when another Ray instance runs on the same machine.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # ray.train.report returns promptly
    # Inside a job submitted through the Jobs API, the job's runtime env already carries variables this session's also
    # sets (HF_TOKEN, MLFLOW_TRACKING_URI, ...): Ray refuses the same key twice unless told to combine the two.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # per-worker bars would flood the driver's console
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # (Ray Data configures its logger when imported)
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {**(worker_env(job) if job is not None else base_worker_env()), **(env or {})}
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "hone.runtime.worker_setup_hook"}
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level=ray_log_level())
    if ray.is_initialized():
        yield
        return
    watchdog = None  # a local session's (joining a cluster starts none)
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_config=logging_config)
        except Exception as e:  # re-raised with the address named
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {e}") from e
    else:
        before = _children(os.getpid())
        need = job_cpus(job) if job is not None else 0.0
        cpus = max(os.cpu_count() or 1, int(math.ceil(need + extra_cpus)))
        port = free_port()
        env_vars["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        extra: dict[str, Any] = {}
        if metrics_export_port:
            extra["_metrics_export_port"] = metrics_export_port
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            with _node_address_loopback(loopback):
                ray.init(address="local", num_cpus=cpus, runtime_env=runtime_env, log_to_driver=True,
                         logging_config=logging_config, **extra)
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous
        watchdog = _Watchdog({p: t for p, t in _children(os.getpid()).items() if p not in before})
    try:
        yield
    finally:
        ray.shutdown()
        if watchdog is not None:
            watchdog.close()


@contextlib.contextmanager
def _node_address_loopback(on: bool) -> Iterator[None]:
    """While ``on``: the node address a local Ray starts with is 127.0.0.1. Ray turns an explicit ``_node_ip_address`` of
    127.0.0.1 into the machine's routable address, and its dashboard agent binds the metrics export on every interface
    unless the node address is loopback; the single-machine mode Ray uses on macOS and Windows
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when Ray is imported) picks 127.0.0.1, so it is chosen here for
    this one ``ray.init``."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = before and not on
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class _Watchdog:
    """A process of its own that outlives this one: once this process ends (exits, or is killed with SIGKILL by the OOM
    killer) or the session closes, it ends whatever is left of the local Ray session this process started: the head
    processes Ray started here and everything below them (agents, workers, Serve's HAProxy), which would otherwise hold
    their ports (metrics, serve, dashboard agent) for a minute or more and block the next start."""

    def __init__(self, roots: dict[int, str]):
        import subprocess
        import sys

        read, self._write = os.pipe()
        argv = [sys.executable, "-c", "import sys; from hone.runtime import watch_session; watch_session(int(sys.argv[1]), sys.argv[2:])",
                str(read), *(f"{p}:{t}" for p, t in roots.items())]
        self._proc = subprocess.Popen(argv, pass_fds=(read,), start_new_session=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read)

    def close(self, wait_s: float = 10.0) -> None:
        """The session closed: what is still running of it is ended now (waited for, so its ports are free on return)."""
        import subprocess

        os.close(self._write)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=wait_s)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, start time) of every live process this machine's ``/proc`` lists (zombies, ended but not yet
    reaped by a parent, are left out)."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _children(pid: int) -> dict[int, str]:
    return {p: start for p, (parent, start) in _proc_table().items() if parent == pid}


def watch_session(fd: int, roots: list[str], every_s: float = 1.0) -> None:
    """The watchdog's loop (:class:`_Watchdog`): remember the session's processes (``roots`` as ``pid:start`` and all their
    descendants, however deep, reparented or not) until ``fd`` reads end-of-file, then SIGTERM those still running (the
    same pid with the same start time: never a reused pid), and SIGKILL them a second later."""
    import select
    import time

    seen = {int(p): t for p, t in (r.split(":") for r in roots)}
    while True:
        table = _proc_table()
        seen = {p: t for p, t in seen.items() if p in table and table[p][1] == t}
        grown = True
        while grown:
            grown = False
            for p, (parent, start) in table.items():
                if parent in seen and p not in seen and p != os.getpid():
                    seen[p], grown = start, True
        ready, _, _ = select.select([fd], [], [], every_s)
        if ready and not os.read(fd, 1):
            break
    for sig, pause in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
        table = _proc_table()
        alive = [p for p, t in seen.items() if p in table and table[p][1] == t]
        for p in alive:
            with contextlib.suppress(OSError):
                os.kill(p, sig)
        deadline = time.time() + pause
        while alive and time.time() < deadline:
            time.sleep(0.1)
            table = _proc_table()
            alive = [p for p in alive if p in table and table[p][1] == seen[p]]
        if not alive:
            return


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> str | None:
    """None when ``port`` can be bound on ``host`` (as the servers bind it: a port in TIME_WAIT is free); else who holds
    it, ``pid N (command)`` when this machine's ``/proc`` tells, for the error a user reads before anything starts."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port))
            return None
        except OSError:
            pass
    return _listener(port) or "another process"


def _listener(port: int) -> str | None:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    for proc in Path("/proc").iterdir() if inodes else ():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {proc.name} ({command[:100]})"
    return None


def stop_event() -> threading.Event:
    """An event that SIGINT/SIGTERM set, so a serving loop ends with a clean Serve and Ray shutdown.

    Install it after ``ray.init``: Ray installs a SIGTERM handler of its own that ends the process on the spot.
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def dashboard_url() -> str | None:
    """``host:port`` of the connected Ray's dashboard, if it runs."""
    try:
        import ray

        return ray._private.worker.global_worker.node.webui_url or None  # noqa: SLF001 - no public accessor
    except Exception:  # noqa: BLE001 - no dashboard, or not connected
        return None


def vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter of an environment with vLLM (whose processes run through Ray's runtime_env ``py_executable`` or as
    subprocesses), or None when this interpreter has vLLM. Looked up in order: ``explicit``, ``$HONE_VLLM_PYTHON``, the
    ``.venv-vllm`` beside this environment (``make setup`` builds it), this interpreter. RuntimeError when none has it."""
    import importlib.util
    import subprocess
    import sys

    here = Path(sys.prefix).absolute()
    for python in (explicit, os.environ.get("HONE_VLLM_PYTHON"), str(here.with_name(here.name + "-vllm") / "bin" / "python")):
        if not python:
            continue
        if not Path(python).is_file():
            if python == explicit:
                raise RuntimeError(f"vllm_python: no such interpreter {python}")
            continue
        if Path(python).absolute().parent.parent == here:  # this environment (a venv's python links to its base's)
            return None
        probe = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return python
        if python == explicit:
            raise RuntimeError(f"vllm_python {python} has no vLLM installed: run `make setup` (CPU) or pip install 'hone[vllm]'")
    if importlib.util.find_spec("vllm") is not None:
        return None
    raise RuntimeError("engine: vllm needs vLLM: `make setup` builds .venv-vllm with vLLM's CPU build (or set HONE_VLLM_PYTHON / "
                       "vllm_python to an environment with vLLM); on GPUs pip install 'hone[vllm]'")
