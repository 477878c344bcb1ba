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


# Transformer-era counterparts of MnistCNN for 28x28 grayscale digits, as Hugging Face builds them
# (`transformers` needed), wrapped to forward(x) -> logits; both learn MNIST to about 92% in seconds
# (train_classifier's "vit" and "convnext" recipes). ViT: patches of 7 px, a 4x4 grid plus the class
# token, four pre-norm blocks. Patches of 4 px (a 7x7 grid) cost twice as much per digit and reached
# 80% in the time the 7 px ones took to 91%: the model was still underfitting.
VIT_CONFIG = {"image_size": IMAGE_SIZE, "patch_size": 7, "num_channels": 1, "hidden_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128, "num_labels": NUM_CLASSES}
# ConvNeXt: a 2 px patchify stem, two stages of one block (32 channels on a 14x14 grid, 64 on 7x7), as
# ConvNeXt-T's last two stages are laid out at 224 px. A 4 px stem (7x7, then 3x3) learned as well,
# but its first 7x7 depthwise kernel spanned the whole grid, so no position stood for its own region
# (RISE found a planted patch on 6% of images). Layer scale starts at 1: at ConvNeXt's 1e-6 (made
# for 18-36 blocks) the blocks barely took part in a short run.
CONVNEXT_CONFIG = {"num_channels": 1, "patch_size": 2, "num_stages": 2, "hidden_sizes": [32, 64], "depths": [1, 1],
                   "layer_scale_init_value": 1.0, "num_labels": NUM_CLASSES}


class Standardised(nn.Module):
    """``model((x - mean) / std)``, one mean and std for all pixels, set from the training images
    by train_classifier (``fit``): standardising inside the model keeps its input in [0, 1], as
    MnistCNN's, so that 0 is black for every reference model (baselines, the deletion substrate).
    The transformers need centred input: the LayerNorm right after a ConvNeXt's stem discards a
    patch's overall brightness, and trained on raw noise images in [0, 0.5] (tests/planted.py)
    it stayed at chance where centred ones took it to 95%."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "Standardised":
        self.mean.fill_(images.mean())
        self.std.fill_(images.std())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def mnist_vit() -> nn.Module:
    """Factory for ``--model saliency_audit.pipelines.training.reference_model:mnist_vit``: an untrained
    ViT (eager attention) in eval mode, its linear and convolution layers at PyTorch's default
    initialisation: HF's (normal, std 0.02) suits long ImageNet schedules, and on a few thousand
    digits it left the model at 76% where PyTorch's reached 91% in the same three epochs."""
    import transformers

    from saliency_audit.transforms.model.hf import LogitsOnly
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT_CONFIG))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()
    return Standardised(LogitsOnly(model)).eval()


def mnist_convnext() -> nn.Module:
    """Factory for ``--model saliency_audit.pipelines.training.reference_model:mnist_convnext``: an
    untrained ConvNeXt at HF's own initialisation, in eval mode."""
    import transformers

    from saliency_audit.transforms.model.hf import LogitsOnly
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**CONVNEXT_CONFIG))
    return Standardised(LogitsOnly(model)).eval()


ARCHITECTURES = {"cnn": mnist_cnn, "vit": mnist_vit, "convnext": mnist_convnext}
