"""Frozen features and linear probes: how good is a backbone's representation?

Used to check that pre-training matters (``compolab world --probe``) and, later, for the head
pre-tuning ("task pre-consolidation") of ITA / IEL.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from compolab.data import make_loader
from compolab.errors import ConfigError

__all__ = ["extract_features", "fit_linear_probe", "probe_accuracy"]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool | None = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (the backbone's output, the CLS token for the kit's ViTs) and labels of a dataset.

    Returns:
        ``(features, labels)`` of shapes ``(N, D)`` and ``(N,)``, on the CPU.
    """
    if len(dataset) == 0:
        raise ConfigError("cannot extract features of an empty dataset")
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    loader = make_loader(dataset, batch_size)
    for x, y in tqdm(loader, desc="features", disable=not progress, leave=False):
        feats.append(backbone(x.to(device)).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS (deterministic).

    The returned layer includes the standardisation, so it applies to raw features.
    """
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = ((features - mean) / std).double()
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, labels) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight.copy_((w / std.double()).float())
        head.bias.copy_((b - (w * (mean / std).double()).sum(1)).float())
    return head


def probe_accuracy(
    backbone: nn.Module,
    train: Dataset,
    test: Dataset,
    num_classes: int,
    *,
    progress: bool | None = False,
) -> float:
    """Test accuracy (in percent) of a linear probe fitted on frozen ``backbone`` features."""
    ftr, ytr = extract_features(backbone, train, progress=progress)
    fte, yte = extract_features(backbone, test, progress=progress)
    head = fit_linear_probe(ftr, ytr, num_classes)
    with torch.no_grad():
        return 100.0 * (head(fte).argmax(1) == yte).float().mean().item()
