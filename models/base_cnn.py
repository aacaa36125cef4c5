"""The paper's epsilon-representative network for a task."""
from torch import nn

FEATURE_DIM = 1024  # width of the encoder output: the "hidden features" the task distance compares


class BaseCNN(nn.Module):
    """Conv(1->32, 5x5) -> ReLU -> Linear(28*28*32 -> 1024) -> ReLU, then a linear head."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(28 * 28 * 32, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))
