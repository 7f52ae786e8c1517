"""The ``torchvision`` variant: the single-tower AlexNet of "One weird trick" (Krizhevsky 2014)
with parameter names identical to ``torchvision.models.alexnet``, so weights move between the two
freely. A module of its own so that only runs that build it import torchvision."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from alexnet.layers import CounterDropout
from alexnet.model import DROPOUT_STREAMS


class TorchvisionAlexNet(torchvision.models.AlexNet):
    """`torchvision.models.alexnet` with the same parameter names and torchvision's own init;
    only its two dropout layers (no parameters) are made layout-independent."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__(num_classes=num_classes, dropout=dropout)
        self.classifier[0] = CounterDropout(dropout, DROPOUT_STREAMS["fc6"])
        self.classifier[3] = CounterDropout(dropout, DROPOUT_STREAMS["fc7"])

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward_head(self, z: Tensor) -> Tensor:
        return self.classifier(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
