"""The ``torchvision`` variant: the single-tower AlexNet of "One weird trick" (Krizhevsky 2014)
with parameter names identical to ``torchvision.models.alexnet``, so weights move between the two
freely. A module of its own so that only runs that build it import torchvision."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from alexnet.layers import CounterDropout
from alexnet.model import DROPOUT_STREAMS, FC_WIDTH, fc_width_fits


class TorchvisionAlexNet(torchvision.models.AlexNet):
    """`torchvision.models.alexnet` with the same parameter names and torchvision's own init;
    only its two dropout layers (no parameters) are made layout-independent. Another `fc_width`
    than torchvision's 4096 replaces fc6..fc8 by layers of that width (PyTorch's default init,
    as torchvision's)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, fc_width: int = FC_WIDTH) -> None:
        super().__init__(num_classes=num_classes, dropout=dropout)
        self.classifier[0] = CounterDropout(dropout, DROPOUT_STREAMS["fc6"])
        self.classifier[3] = CounterDropout(dropout, DROPOUT_STREAMS["fc7"])
        if not fc_width_fits("torchvision", fc_width):
            raise ValueError(f"fc_width must be >= 1, got {fc_width}")
        if fc_width != FC_WIDTH:
            self.classifier[1] = nn.Linear(self.classifier[1].in_features, fc_width)
            self.classifier[4] = nn.Linear(fc_width, fc_width)
            self.classifier[6] = nn.Linear(fc_width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward_head(self, z: Tensor) -> Tensor:
        return self.classifier(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
