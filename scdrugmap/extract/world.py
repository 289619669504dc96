"""Several extraction processes under ``torchrun``: one store, disjoint chunks, one commit.

``torchrun --nproc-per-node N --no-python scdrugmap extract ...`` starts N copies of the
same command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set (multi-node as well, with
``--nnodes``). Each process loads the model on its own GPU (``cuda:LOCAL_RANK``) and embeds a
contiguous share of every dataset's Zarr chunks, so no two processes write the same file.
Rank 0 alone creates the staging array, and alone finishes it and writes the index, after
a barrier that waits for every share. Without those variables this is a world of one and
nothing changes.

The barrier uses ``torch.distributed`` with the gloo backend: it only synchronises, no
tensors travel, so it works the same on CPUs and GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

from ..errors import UserError

# A rank may wait at a barrier while rank 0 fits a model or commits a large dataset.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer: run under torchrun "
                        "or unset it") from None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        world = cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
        if world.size < 1 or not 0 <= world.rank < world.size:
            raise UserError(f"RANK={world.rank} does not fit WORLD_SIZE={world.size}: start the processes "
                            "with torchrun")
        return world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n_chunks: int) -> range:
        """This rank's contiguous part of ``range(n_chunks)``; the parts of all ranks tile it."""
        return range(self.rank * n_chunks // self.size, (self.rank + 1) * n_chunks // self.size)

    def device(self, device: str) -> str:
        """``cuda`` means this process's own GPU when several processes share a node."""
        if self.size > 1 and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def joined(self):
        """Join the process group for the duration of one extraction (no-op in a world of one)."""
        if self.size == 1:
            yield self
            return
        try:
            import torch.distributed as dist
        except ImportError:
            raise UserError(f"WORLD_SIZE={self.size} needs torch.distributed: pip install 'scdrugmap[extract]'"
                            ) from None
        if dist.is_initialized():
            yield self
            return
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UserError(f"WORLD_SIZE={self.size} but {name} is not set: start the processes with torchrun")
        dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=BARRIER_TIMEOUT)
        try:
            yield self
        finally:
            dist.destroy_process_group()
