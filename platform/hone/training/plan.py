"""What a run will do, decided before it starts: its steps, its data order and its random state.

The data order depends only on (seed, epoch): the global batch of step ``s`` is a fixed slice of a
seeded permutation, cut into a fixed number of micro-batches (``grad_accum`` × the most workers the run may have).
With ``w`` workers, worker ``r`` takes micro-batches ``r, r + w, …`` and accumulates ``micro_batches / w`` of them, so the
global batch, and the per-step loss, do not depend on how many workers there are (elastic runs). Each micro-batch gets
its own seeded random stream (dropout), whichever worker computes it: a resumed, restarted or resized run continues with
the same batches and the same losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hone.config import JobConfig
from hone.errors import TrainError

__all__ = ["Schedule", "TrainError", "load_rng_state", "rng_state", "save_rng_state", "schedule", "seed_all", "set_rng_state",
           "total_steps"]


@dataclass(frozen=True)
class Schedule:
    """Which rows each rank trains on at each step: a function of (seed, epoch) only."""

    n_rows: int
    micro_batch: int
    micro_batches: int
    """Micro-batches per optimizer step (over all workers): ``grad_accum`` × the largest worker count."""
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micro_batches

    @property
    def grad_accum(self) -> int:
        """Micro-batches each of this run's ``world_size`` workers accumulates per step."""
        return self.micro_batches // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.global_batch

    def _perm(self, epoch: int) -> Any:
        import numpy as np

        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def micro_index(self, micro: int, rank: int) -> int:
        """The global index (0 … micro_batches-1) of this rank's ``micro``-th micro-batch of a step."""
        return micro * self.world_size + rank

    def micro_rows(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._perm(epoch)
        start = k * self.global_batch + self.micro_index(micro, rank) * self.micro_batch
        return perm[start : start + self.micro_batch].tolist()

    def micro_seed(self, step: int, micro: int, rank: int) -> int:
        """The seed of the random stream (dropout) of one micro-batch: a function of the step and its global index."""
        import numpy as np

        return int(np.random.default_rng([self.seed, step, self.micro_index(micro, rank)]).integers(2**62))


def schedule(job: JobConfig, n_rows: int, world_size: int) -> Schedule:
    """The run's schedule with ``world_size`` workers (any count in ``distributed.num_workers``' range)."""
    t = job.training
    return Schedule(n_rows, t.batch_size, t.grad_accum * job.distributed.max_workers, world_size, t.seed)


def total_steps(job: JobConfig, n_rows: int) -> int:
    t = job.training
    sched = schedule(job, n_rows, job.distributed.max_workers)
    if sched.steps_per_epoch == 0:
        raise TrainError(
            f"{n_rows} training examples are fewer than one global batch ({t.batch_size} per worker × {t.grad_accum} accumulation × "
            f"{job.distributed.max_workers} workers = {sched.global_batch}); lower training.batch_size or add data"
        )
    return t.max_steps or max(1, int(round(t.epochs * sched.steps_per_epoch)))


def rng_state() -> dict[str, Any]:
    """This process's random state (Python, NumPy, torch, CUDA) as tensors and plain containers only: what a
    checkpoint stores, loadable with ``torch.load(weights_only=True)`` (nothing in a checkpoint is unpickled)."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(path: Path) -> None:
    import torch

    torch.save(rng_state(), path)


def load_rng_state(path: Path) -> None:
    """Restore the random state :func:`save_rng_state` wrote; a file holding anything but tensors and plain containers
    is refused (``weights_only=True``), never executed."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainError(f"{path} holds more than tensors and plain data (written before hone stored random state as data, "
                         f"or replaced by someone): it is not unpickled; resume from another checkpoint or start the run "
                         f"again ({str(e).splitlines()[0]})") from None
    set_rng_state(state)


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
