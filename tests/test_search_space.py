import json
import random

import pytest
import torch

from models.baselines import BASELINES, build_baseline
from models.genotypes import (
    Genotype,
    edges,
    sample_distinct,
    sample_genotype,
    space_size,
    standard_space,
    task_aware_space,
)
from models.network import FuseMixture, build_network, count_parameters
from models.operations import OP_NAMES, OPS

GOLDEN_GENOTYPE = Genotype(ops=("sep_conv_3x3", "skip_connect", "max_pool_3x3"), nodes=3, C=64, N=3)
GOLDEN_PARAMS = 1_695_298


def _tiny(ops=("sep_conv_3x3", "skip_connect", "max_pool_3x3"), nodes=3):
    return Genotype(ops=tuple(ops), nodes=nodes, C=4, N=1)


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_preserves_shape(name):
    x = torch.randn(2, 8, 8, 8)
    assert OPS[name](8)(x).shape == x.shape


def test_op_registry_names():
    assert OP_NAMES == (
        "zero", "skip_connect", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3",
        "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7",
    )


def test_edge_order():
    assert edges(4) == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


def test_json_roundtrip_rebuilds_identical_network():
    g = _tiny(("dil_conv_3x3", "avg_pool_3x3", "sep_conv_3x3", "zero", "conv_7x1_1x7", "skip_connect"), 4)
    g2 = Genotype.from_json(json.loads(json.dumps(g.to_json())))
    assert g2 == g
    torch.manual_seed(0)
    a = build_network(g, 3).eval()
    torch.manual_seed(0)
    b = build_network(g2, 3).eval()
    assert count_parameters(a) == count_parameters(b)
    x = torch.randn(2, 1, 12, 12)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
    assert a.genotype == g


def test_golden_parameter_count():
    assert count_parameters(build_network(GOLDEN_GENOTYPE, 2)) == GOLDEN_PARAMS


def test_unknown_op_rejected_with_valid_names():
    with pytest.raises(ValueError) as err:
        _tiny(("sep_conv_3x3", "conv_9x9", "skip_connect"))
    for name in OP_NAMES:
        assert name in str(err.value)


def test_wrong_edge_count_rejected_with_expected_count():
    with pytest.raises(ValueError, match=r"\b6\b"):
        _tiny(("skip_connect",) * 5, nodes=4)


@pytest.mark.parametrize("ops,nodes,C,N", [((), 1, 4, 1), (("zero",) * 3, 3, 0, 1), (("zero",) * 3, 3, 4, 0)])
def test_bad_sizes_rejected(ops, nodes, C, N):
    with pytest.raises(ValueError):
        Genotype(ops=ops, nodes=nodes, C=C, N=N)


def test_task_aware_samples_stay_in_space():
    gs = [
        _tiny(("sep_conv_3x3", "skip_connect", "max_pool_3x3")),
        _tiny(("dil_conv_5x5", "skip_connect", "zero")),
    ]
    space = task_aware_space(gs)
    assert space == (("dil_conv_5x5", "sep_conv_3x3"), ("skip_connect",), ("max_pool_3x3", "zero"))
    assert space_size(space) == 4
    rng = random.Random(0)
    for _ in range(50):
        g = sample_genotype(space, rng, 3, 4, 1)
        assert all(op in allowed for op, allowed in zip(g.ops, space))


def test_task_aware_space_rejects_mixed_nodes():
    with pytest.raises(ValueError):
        task_aware_space([_tiny(), _tiny(("zero",) * 6, nodes=4)])


def test_sampling_is_seeded_by_rng_only():
    space = standard_space(4)
    assert space_size(space) == len(OP_NAMES) ** 6

    def draw(seed):
        rng = random.Random(seed)
        return [sample_genotype(space, rng, 4, 4, 1) for _ in range(5)]

    random.seed(123)
    first = draw(7)
    random.seed(456)
    assert draw(7) == first
    assert draw(8) != first
    assert sample_distinct(space, random.Random(3), 5, (), 4, 4, 1) == sample_distinct(
        space, random.Random(3), 5, (), 4, 4, 1
    )


def test_sample_distinct_unique_and_excludes():
    space = standard_space(3)
    rng = random.Random(1)
    excluded = sample_distinct(space, rng, 20, (), 3, 4, 1)
    got = sample_distinct(space, rng, 30, excluded, 3, 4, 1)
    assert len(got) == 30 and len(set(got)) == 30
    assert not set(got) & set(excluded)


def test_sample_distinct_stops_when_exhausted():
    space = (("skip_connect",), ("zero", "max_pool_3x3"), ("skip_connect",))
    assert space_size(space) == 2
    rng = random.Random(0)
    both = sample_distinct(space, rng, 5, (), 3, 4, 1)
    assert len(both) == 2 and len(set(both)) == 2
    one = _tiny(("skip_connect", "zero", "skip_connect"))
    assert sample_distinct(space, rng, 5, [one], 3, 4, 1) == [
        _tiny(("skip_connect", "max_pool_3x3", "skip_connect"))
    ]
    assert sample_distinct(space, rng, 5, both, 3, 4, 1) == []


def test_fuse_mixture_matches_hand_computed_softmax():
    torch.manual_seed(0)
    nets = [build_network(_tiny(ops), 2).eval() for ops in (
        ("sep_conv_3x3", "skip_connect", "max_pool_3x3"),
        ("dil_conv_3x3", "zero", "avg_pool_3x3"),
        ("conv_7x1_1x7", "skip_connect", "sep_conv_5x5"),
    )]
    mix = FuseMixture(nets).eval()
    assert "alpha" in mix.state_dict()
    with torch.no_grad():
        mix.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        w = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), 0)
        expected = sum(w[c] * nets[c](x) for c in range(3))
        torch.testing.assert_close(mix(x), expected)
    assert torch.allclose(mix.softmax_alpha().sum(), torch.tensor(1.0))
    assert not mix.softmax_alpha().requires_grad
    cand = {id(p) for p in mix.candidate_parameters()}
    assert id(mix.alpha) not in cand
    assert cand == {id(p) for n in nets for p in n.parameters()}


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_logits_shape(name):
    net = build_baseline(name, num_classes=2).eval()
    with torch.inference_mode():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 2)


def test_unknown_baseline_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_baseline("vgg16")
    for name in BASELINES:
        assert name in str(err.value)
