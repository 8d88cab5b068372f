"""Plain (central) supervised training: used for null models, attacks and baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from securemark import checks


def train_epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
    optimizer: str = "adam",
    lr: float = 1e-3,
    batch_size: int = 128,
    parameters=None,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy; images float [N, 1, 28, 28]."""
    params = list(parameters if parameters is not None else model.parameters())
    checks.choice("training", "optimizer", optimizer, ("adam", "sgd"))
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()
