"""``torchrun`` data parallelism: which rank computes what, and the tensors the ranks share.

Under ``torchrun`` (``WORLD_SIZE > 1``), :func:`init_distributed` joins the process group (NCCL on
CUDA, gloo on the CPU); :func:`current_world` tells a rank who it is. One module trains data-parallel
(:class:`~torch.nn.parallel.DistributedDataParallel` over :class:`ShardedBatchSampler` shards whose
averaged gradient is the full batch's), and rank 0 alone writes files. Nothing here launches
processes: ``torchrun`` does. Devices and precision (:class:`~compolab.runtime.Runtime`) are
:mod:`compolab.runtime`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from compolab.errors import ConfigError
from compolab.runtime import Runtime

__all__ = [
    "World",
    "current_world",
    "init_distributed",
    "barrier",
    "rank_local",
    "broadcast_tensors",
    "owner_of",
    "ShardedBatchSampler",
    "train_loader",
    "shard_weight",
    "wrap_data_parallel",
    "all_gather_rows",
]

# --------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class World:
    """This process's place among the ``torchrun`` ranks (size 1 without torchrun).

    Attributes:
        rank: Global rank.
        size: Number of ranks.
        local_rank: Rank on this machine (its GPU index).
        local_size: Ranks on this machine.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank, with the process group up."""
        return self.size > 1 and dist.is_available() and dist.is_initialized()


#: Set inside :func:`rank_local`: this rank computes alone (no collective), whatever the world.
_RANK_LOCAL: ContextVar[bool] = ContextVar("compolab_rank_local", default=False)


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """Within it, this rank trains on its own (no DDP, no sharding): :func:`current_world` is size 1.

    For work that the ranks split among themselves (ITA's independent modules).
    """
    token = _RANK_LOCAL.set(True)
    try:
        yield
    finally:
        _RANK_LOCAL.reset(token)


def current_world() -> World:
    """The world of this process, from the process group or ``torchrun``'s environment (size 1
    inside :func:`rank_local`)."""
    if _RANK_LOCAL.get():
        return World()
    if dist.is_available() and dist.is_initialized():
        size, rank = dist.get_world_size(), dist.get_rank()
    else:
        size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return World(rank, size, local, local_size)


def init_distributed(device: torch.device) -> World:
    """Join ``torchrun``'s process group (NCCL on CUDA, gloo on the CPU) when ``WORLD_SIZE > 1``.

    A no-op for a single process or when the group is already up.

    Raises:
        ConfigError: If the ranks of one machine would share one GPU.
    """
    world = current_world()
    if world.size <= 1 or dist.is_initialized():
        return current_world()
    if device.type == "cuda":
        if device.index is not None and device.index != world.local_rank:
            raise ConfigError(f"under torchrun rank {world.rank} must use cuda:{world.local_rank}, "
                              f"not {device}; pass `device` cuda or auto")  # fmt: skip
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return current_world()


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if current_world().active:
        dist.barrier()


def owner_of(index: int, world: World | None = None) -> int:
    """The rank that computes item ``index`` of a list split round-robin over the ranks."""
    world = world or current_world()
    return index % world.size


def broadcast_tensors(tensors: Mapping[str, Tensor], src: int) -> dict[str, Tensor]:
    """Every rank gets ``src``'s values of ``tensors`` (same keys, shapes and dtypes on every rank).

    Tensors travel through the process group (no pickling); on one process they are returned as
    they are.
    """
    world = current_world()
    if not world.active:
        return dict(tensors)
    out = {}
    for name in sorted(tensors):  # the same order on every rank
        t = tensors[name]
        moved = t.detach().to(_collective_device()).contiguous().clone()
        dist.broadcast(moved, src)
        out[name] = moved.to(t.device)
    return out


def _collective_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(rows: Tensor, owners: Sequence[int]) -> Tensor:
    """Rows computed on different ranks, gathered on every rank.

    Args:
        rows: ``(N, ...)``, where row ``i`` is valid on rank ``owners[i]`` (zeros elsewhere).
        owners: The rank of each row.

    Returns:
        The ``(N, ...)`` tensor of valid rows, identical on every rank.
    """
    world = current_world()
    if not world.active:
        return rows
    mine = torch.tensor([o == world.rank for o in owners], device=rows.device)
    mask = mine.view(-1, *([1] * (rows.ndim - 1)))
    summed = torch.where(mask, rows, torch.zeros_like(rows)).to(_collective_device())
    dist.all_reduce(summed)  # every row is non-zero on its owner only: the sum is that row
    return summed.to(rows.device)


# --------------------------------------------------------------------------- data


class ShardedBatchSampler(Sampler[list[int]]):
    """The batches of a seeded shuffled DataLoader, each cut into one contiguous shard per rank.

    Batch ``i`` holds the same images as batch ``i`` of ``make_loader(dataset, batch_size,
    shuffle=shuffle, seed=seed)`` (same permutation), so a data-parallel run sees the single-process
    batches. Rank ``r`` gets the ``r``-th of ``size`` near-equal contiguous slices; a rank whose
    slice is empty (a last batch smaller than the world) gets one image with weight 0.
    :attr:`weights` gives each shard's loss weight ``n_r · size / n``, so that the ranks' averaged
    gradient of ``weight × mean loss`` is the gradient of the whole batch's mean loss.

    Args:
        length: Number of images.
        batch_size: Images per global batch.
        shuffle: Shuffle as ``DataLoader(shuffle=True)`` with a generator seeded ``seed``.
        seed: Seed of the shuffle.
        world: The ranks (default: :func:`current_world`).
    """

    def __init__(self, length: int, batch_size: int, *, shuffle: bool, seed: int, world: World | None = None):
        if length <= 0 or batch_size <= 0:
            raise ConfigError(f"need images and batch_size > 0, got {length} and {batch_size}")
        self.length, self.batch_size = length, batch_size
        self.world = world or current_world()
        # the single-process loader's index batches, drawn exactly as it draws them (same generator use)
        gen = torch.Generator().manual_seed(seed)
        self.batches = DataLoader(range(length), batch_size=batch_size, shuffle=shuffle, generator=gen)
        self.sizes = [min(batch_size, length - s) for s in range(0, length, batch_size)]
        self.weights = [len(range(*self._bounds(n))) * self.world.size / n for n in self.sizes]

    def _bounds(self, n: int) -> tuple[int, int]:
        r, k = self.world.rank, self.world.size
        return (r * n) // k, ((r + 1) * n) // k

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            batch = batch.tolist()
            lo, hi = self._bounds(len(batch))
            yield batch[lo:hi] if hi > lo else batch[:1]


def train_loader(
    dataset: Dataset, batch_size: int, *, seed: int, runtime: Runtime | None = None
) -> DataLoader:
    """The shuffled training loader of one task on ``runtime``: sharded over the ranks under torchrun,
    with worker processes and pinned memory on CUDA.

    On one process and the CPU it is :func:`compolab.data.make_loader` (the same batches, bit for bit).
    """
    runtime = runtime or Runtime()
    world = current_world()
    pin = runtime.device.type == "cuda"
    extra = {"num_workers": runtime.workers, "pin_memory": pin,
             "persistent_workers": runtime.workers > 0}  # fmt: skip
    if not world.active:  # compolab.data.make_loader's loader, plus workers / pinning on CUDA
        gen = torch.Generator().manual_seed(seed)
        if runtime.workers == 0 and not pin:
            return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, num_workers=0)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, **extra)
    sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle=True, seed=seed, world=world)
    return DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed), **extra)


def shard_weight(loader: object, index: int, local_n: int) -> tuple[float, int]:
    """``(loss weight, images in the whole batch)`` of batch ``index`` of ``loader``.

    ``(1.0, local_n)`` unless the loader is sharded over ranks (:class:`ShardedBatchSampler`).
    """
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, ShardedBatchSampler):
        return sampler.weights[index], sampler.sizes[index]
    return 1.0, local_n


def wrap_data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel when several ranks run, else ``model`` itself.

    Only parameters that require grad are synchronised; frozen buffers (θ0's) are not broadcast at
    every forward (they are identical on every rank: the same checkpoint).
    """
    if not current_world().active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # newer torch renames the flag; the behaviour wanted is the same
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
