"""The reference classifier: a small MNIST CNN that hook-based explainers can handle.

Use it from the command line as
``--model pipelines.reference_model:mnist_cnn --weights pipelines/demo_data/mnist_cnn.pt``.
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SIZE = 28


class MnistCNN(nn.Module):
    """Two conv blocks and a two-layer head for 28x28 grayscale digits.

    Input is a float tensor [B, 1, 28, 28] with values in [0, 1]; no normalisation
    happens inside, so explainer baselines of 0 mean "black image". Output is
    logits [B, 10].

    Every activation and pooling step is its own module instance (no reuse, no
    in-place ReLU, no functional calls): Captum's DeepLift and LRP attach hooks per
    module and give wrong answers or fail when a module is applied twice.
    """

    def __init__(self, conv_channels: tuple[int, int] = (32, 64), hidden: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        c1, c2 = conv_channels
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 28 -> 14
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 14 -> 7
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"MnistCNN expects input of shape [B, 1, 28, 28], got {list(x.shape)}")
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc2(x)


def mnist_cnn() -> MnistCNN:
    """Factory for the command line's ``--model pipelines.reference_model:mnist_cnn``.

    Returns an untrained model in eval mode; the pipeline loads ``--weights`` into it.
    """
    return MnistCNN().eval()
