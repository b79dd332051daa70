"""ResNet-18 (He et al. 2016) with the report's layers: the outputs of torchvision's top-level modules.

``conv1`` is the output of the stem convolution itself (before batch norm and ReLU), ``layer1``..``layer4``
the outputs of the residual stages, exactly the module names the report uses.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nstlab.features.base import ExtractorSpec

_STRIDES = {
    "conv1": 2,
    "bn1": 2,
    "relu": 2,
    "maxpool": 4,
    "layer1": 4,
    "layer2": 8,
    "layer3": 16,
    "layer4": 32,
}


def resnet_layer_nodes(model: nn.Module) -> dict[str, str]:
    # Top-level children up to the classifier head, named as torchvision names them.
    return {name: name for name, _ in model.named_children() if name in _STRIDES}


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    model: nn.Module = resnet18(weights=None)
    return model


def _resnet18_weights() -> Any:
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1


RESNET18 = ExtractorSpec(
    name="resnet18",
    display="ResNet-18",
    build=_resnet18,
    weights_enum=_resnet18_weights,
    layer_nodes=resnet_layer_nodes,
    strides=_STRIDES.__getitem__,
    content_layers=("layer1",),
    style_layers=("conv1", "layer1", "layer2", "layer3"),
)
