"""The reference classifier: a small MNIST CNN that hook-based explainers can handle.

Use it from the command line as
``--model saliency_audit.pipelines.training.reference_model:mnist_cnn --weights pipelines/demo_data/mnist_cnn.pt``.
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
    """Factory for the command line's ``--model saliency_audit.pipelines.training.reference_model:mnist_cnn``.

    Returns an untrained model in eval mode; the pipeline loads ``--weights`` into it.
    """
    return MnistCNN().eval()


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn, a shortcut, an in-place add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # applied twice, as in torchvision
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18's layout as torchvision builds it: a 7x7 stride-2 stem with max pooling,
    four stages of two BasicBlocks (widths w, 2w, 4w, 8w), global average pooling, a
    linear head.  width=64 is torchvision's; smaller widths keep tests fast.  Any input
    size of 32x32 or more works (the global pool absorbs the rest)."""

    def __init__(self, width: int = 64, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 64, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> ResNet18:
    """Factory for ``--model saliency_audit.pipelines.training.reference_model:resnet18`` (untrained, eval mode)."""
    return ResNet18(width, num_classes, in_channels).eval()
