"""Turns a Genotype into a trainable network, and mixes candidate networks."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from .genotypes import Genotype, edges
from .operations import OPS


class Cell(nn.Module):
    """Node 0 is the input; node j sums op_(i,j)(node_i) over i < j; output is the last node."""

    def __init__(self, genotype: Genotype, C: int) -> None:
        super().__init__()
        self.edges = edges(genotype.nodes)
        self.nodes = genotype.nodes
        self.ops = nn.ModuleList(OPS[name](C) for name in genotype.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Edges are grouped by destination, so node i is complete before any edge reads it.
        states: list[torch.Tensor | None] = [x] + [None] * (self.nodes - 1)
        for (i, j), op in zip(self.edges, self.ops):
            out = op(states[i])
            states[j] = out if states[j] is None else states[j] + out
        return states[-1]


class ReductionBlock(nn.Module):
    """NAS-Bench-201 residual block that halves resolution and doubles channels."""

    def __init__(self, C_in: int, C_out: int) -> None:
        super().__init__()
        self.conv_a = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C_out),
        )
        self.conv_b = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_out, C_out, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(C_out),
        )
        # ceil_mode keeps the shortcut the same size as the strided conv on odd inputs (e.g. 7x7).
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, stride=2, ceil_mode=True),
            nn.Conv2d(C_in, C_out, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x)) + self.shortcut(x)


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C); a plain mean, whose CUDA backward (unlike AdaptiveAvgPool2d's) is deterministic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GenotypeNetwork(nn.Module):
    """The fixed network a genotype describes: stem, 3 stages of N cells with 2 reductions, pooling, classifier."""

    def __init__(self, genotype: Genotype, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.genotype = genotype
        C, N = genotype.C, genotype.N
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C, 3, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        layers: list[nn.Module] = []
        for stage, width in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                layers.append(ReductionBlock(width // 2, width))
            layers.extend(Cell(genotype, width) for _ in range(N))
        self.cells = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.ReLU(inplace=False), GlobalAvgPool())
        self.classifier = nn.Linear(4 * C, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.cells(self.stem(x))))


def build_network(genotype: Genotype, num_classes: int, in_channels: int = 1) -> GenotypeNetwork:
    return GenotypeNetwork(genotype, num_classes, in_channels)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class FuseMixture(nn.Module):
    """Softmax(alpha)-weighted sum of the candidates' logits."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(networks) == 0:
            raise ValueError("FuseMixture needs at least one candidate network")
        self.candidates = nn.ModuleList(networks)
        self.alpha = nn.Parameter(torch.zeros(len(self.candidates)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(torch.stack([net(x) for net in self.candidates], dim=0))

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Mix stacked candidate logits (C, B, classes); lets α train on logits computed once."""
        w = torch.softmax(self.alpha, dim=0).to(logits.dtype)
        return torch.einsum("c,c...->...", w, logits)

    def softmax_alpha(self) -> torch.Tensor:
        """The candidates' mixing weights softmax(α), detached."""
        return torch.softmax(self.alpha, dim=0).detach()

    def candidate_parameters(self) -> Iterator[nn.Parameter]:
        return self.candidates.parameters()
