"""A small MLP on sklearn digits and its SGD fine-tuning: the toy pool of the soup and crash tests."""

from __future__ import annotations

import torch
from torch import nn

COMPS = {"fc1.w": ["0.weight"], "fc1.b": ["0.bias"], "fc2.w": ["2.weight"]}  # 2.bias uncovered


def mlp() -> nn.Module:
    """The 64-32-10 MLP, always from the same initial weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(model: nn.Module, x, y, seed: int, lr: float, steps: int) -> dict:
    """`steps` seeded SGD steps (batch 32, momentum 0.9); returns a copy of the state dict."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
