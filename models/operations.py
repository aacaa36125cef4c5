"""Shape-preserving DARTS-family operations used on the edges of a search cell.

Every constructor takes the channel count C and returns a module mapping
(B, C, H, W) -> (B, C, H, W); stride is always 1 so any op fits any edge.
"""
from typing import Callable

import torch
from torch import nn


class Zero(nn.Module):
    """The 'no edge' op; multiplying keeps shape, device and dtype of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


class SepConv(nn.Module):
    """DARTS separable conv: the depthwise-pointwise block applied twice."""

    def __init__(self, C: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, kernel_size, padding=pad, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.BatchNorm2d(C, affine=True),
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, kernel_size, padding=pad, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.BatchNorm2d(C, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """DARTS dilated depthwise-separable conv (dilation 2)."""

    def __init__(self, C: int, kernel_size: int, dilation: int = 2) -> None:
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, kernel_size, padding=pad, dilation=dilation, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.BatchNorm2d(C, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Conv7x1_1x7(nn.Module):
    """Factorised 7x7 receptive field at the cost of two 1-D convs."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 7), padding=(0, 3), bias=False),
            nn.Conv2d(C, C, (7, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(C, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


OPS: dict[str, Callable[[int], nn.Module]] = {
    "zero": lambda C: Zero(),
    "skip_connect": lambda C: nn.Identity(),
    "max_pool_3x3": lambda C: nn.MaxPool2d(3, stride=1, padding=1),
    "avg_pool_3x3": lambda C: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "sep_conv_3x3": lambda C: SepConv(C, 3),
    "sep_conv_5x5": lambda C: SepConv(C, 5),
    "dil_conv_3x3": lambda C: DilConv(C, 3),
    "dil_conv_5x5": lambda C: DilConv(C, 5),
    "conv_7x1_1x7": lambda C: Conv7x1_1x7(C),
}

OP_NAMES: tuple[str, ...] = tuple(OPS)
