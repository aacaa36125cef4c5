"""Metrics: error, balanced error and AUROC, checked by hand."""
import numpy as np
import pytest
import torch

import training


def test_classification_metrics_by_hand():
    y = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])  # one negative wrong
    m = training.classification_metrics(logits, y)
    assert m["error"] == pytest.approx(25.0)
    assert m["balanced_error"] == pytest.approx(100 * (1 / 3) / 2)  # miss rates 1/3 and 0
    assert m["auroc"] == pytest.approx(5 / 6)  # 2.5 of 3 negative/positive pairs ordered (a tie)


def test_auroc_extremes():
    labels = np.array([0, 0, 1, 1, 1])
    assert training.auroc([0.1, 0.2, 0.7, 0.8, 0.9], labels) == 1.0
    assert training.auroc([0.9, 0.8, 0.3, 0.2, 0.1], labels) == 0.0
    assert training.auroc([0.5] * 5, labels) == 0.5
    assert np.isnan(training.auroc([0.1, 0.2], [1, 1]))
    perfect = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0], [0.0, 3.0]])
    assert training.classification_metrics(perfect, torch.tensor(labels))["auroc"] == 1.0
    assert training.classification_metrics(-perfect, torch.tensor(labels))["auroc"] == 0.0


def test_auroc_comes_from_logits_not_saturated_probabilities():
    # float32 softmax gives 1.0 to both of the first two images: their order would be lost (0.833)
    logits = torch.tensor([[0.0, 30.0], [0.0, 20.0], [0.0, -5.0], [0.0, -6.0]])
    assert training.classification_metrics(logits, torch.tensor([1, 0, 0, 0]))["auroc"] == 1.0
    three = torch.tensor([[0.0, 0.0, 40.0], [0.0, 0.0, 30.0], [5.0, 0.0, 0.0]])
    # one-vs-rest log-odds: class 2 and class 1 ranked first among 3; class 0's image between the others
    assert training.classification_metrics(three, torch.tensor([2, 0, 1]))["auroc"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_multiclass_metrics():
    y = torch.tensor([0, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    m = training.classification_metrics(logits, y)
    assert m["error"] == pytest.approx(25.0)
    assert m["balanced_error"] == pytest.approx(100 * 0.5 / 3)
    assert 0.5 < m["auroc"] <= 1.0
