from .base_cnn import FEATURE_DIM, BaseCNN
from .transfer_net import TransferNet
from .operations import OPS, OP_NAMES
from .genotypes import (
    Genotype,
    edges,
    sample_distinct,
    sample_genotype,
    space_size,
    standard_space,
    task_aware_space,
)
from .network import FuseMixture, GenotypeNetwork, build_network, count_parameters

__all__ = ["FEATURE_DIM", "BaseCNN", "TransferNet", "OPS", "OP_NAMES", "Genotype", "edges", "sample_distinct",
           "sample_genotype", "space_size", "standard_space", "task_aware_space", "FuseMixture", "GenotypeNetwork",
           "build_network", "count_parameters"]
