"""Torchvision reference CNNs adapted to 1x28x28 inputs."""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from .network import GlobalAvgPool

BASELINES: tuple[str, ...] = ("resnet18", "resnet34", "densenet161")


def _kaiming(conv: nn.Conv2d) -> None:
    # Match the init torchvision gives the convs it builds itself.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def build_baseline(name: str, num_classes: int = 2) -> nn.Module:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid names: {', '.join(BASELINES)}")
    if name.startswith("resnet"):
        net = getattr(tvm, name)(weights=None)
        # A 3x3 stride-1 stem without max-pool keeps 28x28 inputs from collapsing too early.
        net.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
        _kaiming(net.conv1)
        net.maxpool = nn.Identity()
        net.avgpool = GlobalAvgPool()  # deterministic on CUDA; torchvision's flatten then has nothing to do
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        return _channels_last(net)
    # memory_efficient recomputes each layer's concatenation in backward: half the peak memory
    # (8.4 -> 4.4 GB at batch 128 on 28x28) for no measurable time on this CPU
    net = tvm.densenet161(weights=None, memory_efficient=True)
    net.features.conv0 = nn.Conv2d(1, 96, 3, stride=1, padding=1, bias=False)
    _kaiming(net.features.conv0)
    net.features.pool0 = nn.Identity()
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return _channels_last(net)


def _channels_last(net: nn.Module) -> nn.Module:
    # oneDNN's convolutions run faster on NHWC activations (benchmarks/bench_step3.py --layouts); a 1-channel input
    # is already in that layout, so the weights' format carries it through the network
    return net.to(memory_format=torch.channels_last)
