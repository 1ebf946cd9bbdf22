"""Class-incremental evaluation: per-task accuracy of a (composed) model and the final average.

Predictions are class-IL: the argmax runs over every class of the included heads, without task
identity. The final average accuracy (FA, the paper's tables) is the mean over tasks of the
test accuracy after the last task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compolab.data import Benchmark, make_loader
from compolab.errors import ConfigError
from compolab.heads import IncrementalHead

__all__ = ["evaluate_tasks", "final_average"]


@torch.no_grad()
def evaluate_tasks(
    backbone: nn.Module,
    head: IncrementalHead,
    bench: Benchmark,
    tasks: Sequence[int] | None = None,
    *,
    split: str = "test",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool | None = False,
) -> dict[int, float]:
    """Accuracy (%) on each task's ``split``, predicting over every class of ``head``.

    Args:
        backbone: Maps images to features (a merged model or a functional composed forward).
        head: The heads of the composed tasks.
        bench: The benchmark the tasks come from.
        tasks: Tasks to evaluate on (default: the head's tasks).
        split: ``train``, ``val`` or ``test``.
        batch_size: Evaluation batch size.
        device: Device of the backbone.
        progress: Show a progress bar.

    Returns:
        ``{task: accuracy in percent}``.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    tasks = head.tasks if tasks is None else tuple(tasks)
    bad = [t for t in tasks if not 0 <= t < bench.num_tasks]
    if bad:
        raise ConfigError(f"unknown task id(s) {bad}; the benchmark has tasks 0..{bench.num_tasks - 1}")
    was_training = backbone.training
    backbone.eval()
    out = {}
    for t in tqdm(tasks, desc=f"eval {split}", disable=not progress, leave=False):
        correct = total = 0
        for x, y in make_loader(getattr(bench.tasks[t], split), batch_size):
            pred = head.predict(backbone(x.to(device)))
            correct += (pred.cpu() == y).sum().item()
            total += len(y)
        out[t] = 100.0 * correct / max(total, 1)
    backbone.train(was_training)
    return out


def final_average(per_task: dict[int, float]) -> float:
    """Mean of the per-task accuracies (FA when taken after the last task)."""
    if not per_task:
        raise ConfigError("no task to average")
    return sum(per_task.values()) / len(per_task)
