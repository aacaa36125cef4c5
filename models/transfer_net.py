"""The fixed-size transfer network whose pruned size is the task distance."""
from torch import nn

from .base_cnn import FEATURE_DIM


class TransferNet(nn.Sequential):
    """Maps a source network's 1024 features onto a target network's 1024 features."""

    def __init__(self, features: int = FEATURE_DIM):
        super().__init__(
            nn.Linear(features, 2048),
            nn.ReLU(),
            nn.Linear(2048, 512),
            nn.ReLU(),
            nn.Linear(512, features),
        )

    def weight_layers(self):
        """The linear layers whose weight matrices are pruned (biases are kept)."""
        return [m for m in self if isinstance(m, nn.Linear)]
