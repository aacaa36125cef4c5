"""The Fisher task distance (fisher.py): the distance of two Fisher diagonals, the per-sample Fisher against a
loop over single images, and the rank agreement of two distance matrices."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import fisher


def test_fisher_distance_is_zero_to_itself_bounded_symmetric_and_trace_free():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=gen), torch.rand(50, generator=gen)
    assert fisher.fisher_distance(a, a) == 0
    assert fisher.fisher_distance(a, 7 * a) == pytest.approx(0, abs=1e-6)  # unit trace first
    d = fisher.fisher_distance(a, b)
    assert 0 < d < 1 and d == pytest.approx(fisher.fisher_distance(b, a))
    disjoint = torch.cat([torch.ones(5), torch.zeros(5)]), torch.cat([torch.zeros(5), torch.ones(5)])
    assert fisher.fisher_distance(*disjoint) == pytest.approx(1)  # the largest value


def test_chunked_vmap_fisher_equals_a_loop_over_single_images():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(2, 2, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(32, 3))
    model(torch.randn(16, 1, 8, 8))  # running statistics away from their defaults
    x, y = torch.randn(7, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    model.eval()
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for xi, yi in zip(x, y):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        for total, p in zip(expected, model.parameters()):
            total += p.grad.pow(2) / len(x)
    got = fisher.fisher_diagonal(model, x, y, chunk=3)  # the grouped conv by vmap, the rest in closed form
    torch.testing.assert_close(got, torch.cat([e.flatten() for e in expected]))
    last = fisher.fisher_diagonal(model, x, y, names={"5.weight", "5.bias"}, chunk=3)
    torch.testing.assert_close(last, torch.cat([expected[-2].flatten(), expected[-1]]))


def test_agreement_is_the_spearman_of_each_targets_sources_with_infeasible_ones_last():
    sources = ["a", "b", "c", "d"]
    fisher_matrix = pd.DataFrame({"t": [0.1, 0.2, 0.3, 0.4], "u": [0.4, 0.3, 0.2, 0.1]}, index=sources)
    transfer = pd.DataFrame({"t": [1.0, 2.0, np.nan, 3.0], "u": [5.0, 5.0, 5.0, 5.0]}, index=sources)
    table = fisher.agreement(transfer, fisher_matrix, k=2).set_index("target")
    # t: transfer ranks a, b, d, then the infeasible c last: ranks 1 2 4 3 against 1 2 3 4
    assert table.at["t", "spearman"] == pytest.approx(0.8)
    assert table.at["t", "closest_2_overlap"] == 2
    assert math.isnan(table.at["u", "spearman"])  # a distance that ties every source ranks nothing
