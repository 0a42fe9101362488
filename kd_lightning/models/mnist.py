"""MNIST-sized nets: the reference CNN teacher, a small conv student and fully connected MLPs.

`feature_layers`: the module paths of a net's feature maps, in depth order, that feature-based distillation
methods (kd_lightning/methods: fitnet, at) pair between student and teacher by position."""

from collections.abc import Sequence

import torch
from torch import nn


class MnistCNN(nn.Module):
    """The PyTorch MNIST example net (reference teacher): 1,199,882 parameters, 11.99 M mult-adds
    (torch's FlopCounterMode, as the model card counts; the reference write-up gives 12.05 M)."""

    feature_layers = ("features.1", "features.3")  # after each conv's ReLU: 32 x 26 x 26, 64 x 24 x 24

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(9216, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MnistConvStudent(nn.Module):
    """A small conv student shaped like MnistCNN's feature extractor (same two 3x3 convs, so the same 26 x 26
    and 24 x 24 maps, with 4x fewer channels) and a thin head: 38,298 parameters with the defaults."""

    feature_layers = ("features.1", "features.3")  # 8 x 26 x 26, 16 x 24 x 24

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: Sequence[int] = (8, 16),
                 hidden: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(c2 * 12 * 12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected net on flattened images: in_features -> hidden... -> num_classes, ReLU between layers."""

    feature_layers = ()  # no feature maps; rkd still works (the input of the last Linear)

    def __init__(
        self,
        hidden: Sequence[int] = (16,),
        dropout: float = 0.0,
        in_features: int = 784,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
