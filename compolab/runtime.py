"""Devices and precision: where and how fast the kit computes.

:class:`Runtime` is the one frozen value that says *how* to compute (never *what*: it is not part
of a run's config, and a CPU run with the defaults is bit-identical to one without it):

* ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:k`` (:func:`resolve_device`);
  under ``torchrun`` with CUDA, each rank takes ``cuda:$LOCAL_RANK``;
* ``precision``: ``fp32`` or ``bf16`` autocast (default bf16 on CUDA, fp32 on the CPU). Master
  weights, optimiser state, penalties and Fisher sums stay float32 (:func:`accumulation_dtype`);
* ``physical_batch``: images per forward; the optimiser still steps every
  ``batch_size × accumulate`` images with the same gradient (:func:`compolab.finetune.train_loop`);
* loader ``workers`` and pinned memory (CUDA only), optional ``torch.compile``.

Every function that trains or evaluates takes one ``runtime`` argument: a :class:`Runtime`, or a
device that means float32 there (:meth:`Runtime.of`). The ``torchrun`` side (ranks, process group,
sharded loaders, DDP) is :mod:`compolab.distributed`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from compolab.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "PEAK_BF16_TFLOPS",
    "Runtime",
    "resolve_device",
    "resolve_precision",
    "accumulation_dtype",
    "peak_flops",
]

PRECISIONS = ("fp32", "bf16")

#: Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, no sparsity) used for MFU; a GPU not
#: listed gets no MFU.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device of a ``--device`` value.

    ``auto`` (or None) is CUDA when present, else the CPU; under ``torchrun`` a bare ``cuda`` is
    ``cuda:$LOCAL_RANK``.

    Raises:
        ConfigError: For an unknown spelling, CUDA requested without CUDA, or a missing GPU index.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"unknown device {spec!r}; choose auto, cpu, cuda or cuda:K")
    if not torch.cuda.is_available():
        raise ConfigError(f"`device` {spec!r} asked for, but torch sees no CUDA GPU; use `device` cpu")
    k = int(index) if index else int(os.environ.get("LOCAL_RANK", 0))
    if k >= torch.cuda.device_count():
        raise ConfigError(f"device cuda:{k} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", k)


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``--precision`` value (None: plain float32, no autocast).

    Default: ``bf16`` on CUDA, ``fp32`` on the CPU (whose runs stay bit-identical). ``bf16`` on the
    CPU is allowed (slow; it lets the autocast path be tested without a GPU).

    Raises:
        ConfigError: For a precision other than ``fp32`` / ``bf16``, or bf16 on a GPU without it.
    """
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bf16; use `precision` fp32")
    return torch.bfloat16


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float32 for a half-precision tensor (sums of squares are kept in float32), else its own dtype."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def _launched_ranks() -> tuple[int, int]:
    """``(ranks, ranks on this machine)`` of this launch: the process group's size, else
    ``torchrun``'s environment; ``(1, 1)`` without torchrun.

    The whole view of a rank (its index, :func:`compolab.distributed.rank_local`) is
    :func:`compolab.distributed.current_world`; a runtime needs only the counts.
    """
    if dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
    else:
        size = int(os.environ.get("WORLD_SIZE", 1))
    return size, int(os.environ.get("LOCAL_WORLD_SIZE", size))


@dataclass(frozen=True)
class Runtime:
    """How to compute (not what): device, autocast, physical batch, loader workers, compile.

    Attributes:
        device: Where every tensor lives.
        autocast: Autocast dtype (``torch.bfloat16``) or None for plain float32.
        physical_batch: Images per forward pass in training; None = the whole optimiser step on CUDA,
            the config's micro-batch on the CPU (:func:`compolab.finetune.physical_batch`).
            Must be a multiple of the micro-batch that divides ``batch_size × accumulate``.
        workers: DataLoader worker processes of the training loaders.
        compile: ``torch.compile`` the training model (CUDA; the first steps compile).
    """

    device: torch.device = torch.device("cpu")
    autocast: torch.dtype | None = None
    physical_batch: int | None = None
    workers: int = 0
    compile: bool = False

    @classmethod
    def of(cls, runtime: Runtime | str | torch.device | None) -> Runtime:
        """The runtime of a ``runtime=`` argument: a :class:`Runtime` as it is, a device as float32
        on that device (``torch.device(runtime)``, no autocast), None as the CPU in float32.

        Examples:
            >>> Runtime.of(None) == Runtime() == Runtime.of("cpu")
            True
            >>> Runtime.of(torch.device("cpu")).precision
            'fp32'
            >>> rt = Runtime(physical_batch=32)
            >>> Runtime.of(rt) is rt
            True
        """
        if isinstance(runtime, Runtime):
            return runtime
        return cls() if runtime is None else cls(torch.device(runtime))

    @classmethod
    def resolve(
        cls,
        device: str | torch.device | None = "auto",
        precision: str | None = None,
        *,
        physical_batch: int | None = None,
        workers: int | None = None,
        compile: bool = False,
    ) -> Runtime:
        """A runtime from command-line values; every value is checked before any work.

        Defaults on CUDA: bf16 autocast, up to 8 loader workers per rank; on the CPU: float32, no
        worker (the CPU path is unchanged).

        Raises:
            ConfigError: For a bad device, precision, batch or worker count.
        """
        dev = resolve_device(device)
        if physical_batch is not None and physical_batch <= 0:
            raise ConfigError(f"physical batch must be > 0, got {physical_batch}")
        if workers is None:
            per_rank = (os.cpu_count() or 1) // max(1, _launched_ranks()[1])
            workers = min(8, max(per_rank - 1, 0)) if dev.type == "cuda" else 0
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        return cls(dev, resolve_precision(precision, dev), physical_batch, workers, compile)

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16``."""
        return "bf16" if self.autocast is torch.bfloat16 else "fp32"

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to :attr:`autocast` on this device, or a no-op for float32."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def on(self, device: str | torch.device) -> Runtime:
        """The same runtime on another device."""
        return replace(self, device=torch.device(device))

    def describe(self) -> dict:
        """JSON-ready summary (device name, precision, batch, workers, compile, world size)."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "physical_batch": self.physical_batch, "workers": self.workers, "compile": self.compile,
                "world_size": _launched_ranks()[0]}  # fmt: skip


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU in bf16 (:data:`PEAK_BF16_TFLOPS`); None on the CPU / unknown."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # the more specific names come first
        if key in name:
            return tflops * 1e12
    return None
