"""Several processes (``torchrun``): who this process is, and the few collectives training needs.

A distributed run is recognised from the environment torchrun (and SLURM, Kubernetes or Ray
launchers) set: ``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``. Every decision that ends or changes
the run goes through :meth:`Dist.any` or :meth:`Dist.sum`, so all ranks take it at the same step.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch

from charlm.config import DIST_BACKENDS as BACKENDS
from charlm.config import check_choice
from charlm.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over all ranks, as a new tensor (``tensor`` is left as it is: a sum reduced in place and
        reduced again later counts every rank's share twice), or ``tensor`` itself in one process."""
        if self.enabled:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def any(self, flags: list[bool], device) -> list[bool]:
        """Each flag true on every rank if it is true on any (one collective for all of them)."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return [bool(v) for v in t.tolist()]

    def agree(self, flags: list[bool], value: int, device) -> tuple[list[bool], int]:
        """:meth:`any` of ``flags`` and rank 0's ``value`` (an int >= -1), in one collective."""
        if not self.enabled:
            return [bool(f) for f in flags], value
        t = torch.tensor([int(bool(f)) for f in flags] + [value + 1 if self.is_main else 0], device=device,
                         dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        values = t.tolist()
        return [bool(v) for v in values[:-1]], values[-1] - 1

    def broadcast_int(self, value: int, device) -> int:
        """Rank 0's ``value`` on every rank (a decision rank 0 took from its own clock)."""
        if not self.enabled:
            return value
        t = torch.tensor([value if self.is_main else 0], device=device, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return int(t.item())

    def gather_rows(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's rows of a state, in rank order: the state one process would hold."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def rows(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous share of a whole state's rows (the inverse of :meth:`gather_rows`)."""
        if not self.enabled:
            return tensor
        share = tensor.shape[dim] // self.world_size
        return tensor.narrow(dim, self.rank * share, share).contiguous()  # kernels (oneDNN's LSTM) want dense states


def from_env() -> Dist:
    """This process's place in a launched run (one process when nothing was launched)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({exc})") from None
    return Dist(rank=rank, world_size=world, local_rank=local)


def init(backend: str, timeout_s: float, device: torch.device) -> Dist:
    """Join the process group of a launched run (nothing to do in one process)."""
    d = from_env()
    if not d.enabled or torch.distributed.is_initialized():
        return d
    check_choice("distributed backend", backend, BACKENDS)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--dist-backend nccl needs CUDA devices; use gloo on CPUs")
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return d


def collective_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective: a peer that closed its connection or did not answer in
    time. torch raises ``DistError`` subclasses for some of these and a bare ``RuntimeError`` carrying
    gloo's or NCCL's message for others (gloo's receive timeout among them)."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "Gloo", "NCCL", "ProcessGroup"))


def failure_line(exc: BaseException) -> str:
    """The first line of a collective's error, without the source location gloo puts in front of it."""
    lines = str(exc).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(exc).__name__)


def close(barrier: bool = True) -> None:
    """Leave the process group; every rank waits for the others first (gloo aborted the process now
    and then when one rank tore its connections down while another was still leaving). After a
    failed collective there is no one to wait for: ``barrier=False``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import gc

        gc.collect()  # DDP's reducer goes before its process group, not at interpreter exit
        if barrier:
            try:
                torch.distributed.barrier()
            except RuntimeError:  # a rank that died: nothing to wait for
                pass
        torch.distributed.destroy_process_group()
