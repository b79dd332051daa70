"""VGG-16 and VGG-19 (Simonyan & Zisserman 2015) with the report's layers, named as in the literature.

torchvision numbers the modules of ``vgg.features`` (0, 1, 2, ...); names like ``relu4_2`` ("the ReLU after
the 2nd conv of the 4th block") are read off the real module list rather than hard-coded, so that the map
cannot drift from torchvision's layout.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nstlab.features.base import ExtractorSpec


def vgg_layer_nodes(model: nn.Module) -> dict[str, str]:
    names: dict[str, str] = {}
    block, conv = 1, 0
    features: nn.Sequential = model.features  # type: ignore[assignment]
    for index, module in enumerate(features):
        node = f"features.{index}"
        if isinstance(module, nn.Conv2d):
            conv += 1
            names[f"conv{block}_{conv}"] = node
        elif isinstance(module, nn.ReLU):
            names[f"relu{block}_{conv}"] = node
        elif isinstance(module, nn.MaxPool2d):
            names[f"pool{block}"] = node
            block, conv = block + 1, 0
    return names


def vgg_stride(layer: str) -> int:
    # Block b sits after b-1 poolings; pool b itself halves once more.
    block = int(layer[4] if layer.startswith("pool") else layer.split("_")[0][-1])
    return 1 << (block if layer.startswith("pool") else block - 1)


def _vgg16() -> nn.Module:
    from torchvision.models import vgg16

    model: nn.Module = vgg16(weights=None)
    return model


def _vgg19() -> nn.Module:
    from torchvision.models import vgg19

    model: nn.Module = vgg19(weights=None)
    return model


def _vgg16_weights() -> Any:
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1


def _vgg19_weights() -> Any:
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1


VGG16 = ExtractorSpec(
    name="vgg16",
    display="VGG-16",
    build=_vgg16,
    weights_enum=_vgg16_weights,
    layer_nodes=vgg_layer_nodes,
    strides=vgg_stride,
    # The report's VGG-16 layers (Sec. "Implementation Details").
    content_layers=("relu2_2",),
    style_layers=("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
)

VGG19 = ExtractorSpec(
    name="vgg19",
    display="VGG-19",
    build=_vgg19,
    weights_enum=_vgg19_weights,
    layer_nodes=vgg_layer_nodes,
    strides=vgg_stride,
    content_layers=("relu4_2",),
    # Sic: the report lists relu4_2 among the style layers as well as the content layer (Gatys et al. use
    # relu1_1..relu5_1 without it). We keep the report's list so that its ablation is reproduced;
    # override with --style-layers for the original Gatys set.
    style_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"),
)
