"""Feature extractors by name: ``get_spec("vgg19")``, ``build_extractor(spec, layers, weights)``."""

from __future__ import annotations

from nstlab.errors import choice_error
from nstlab.features.base import (
    RANDOM_WEIGHTS_SEED,
    ExtractorSpec,
    FeatureExtractor,
    WeightsInfo,
    build_extractor,
)
from nstlab.features.resnet import RESNET18
from nstlab.features.vgg import VGG16, VGG19

EXTRACTORS: dict[str, ExtractorSpec] = {spec.name: spec for spec in (VGG16, VGG19, RESNET18)}


def get_spec(name: str) -> ExtractorSpec:
    if name not in EXTRACTORS:
        raise choice_error("extractor", name, list(EXTRACTORS))
    return EXTRACTORS[name]


__all__ = [
    "EXTRACTORS",
    "RANDOM_WEIGHTS_SEED",
    "ExtractorSpec",
    "FeatureExtractor",
    "WeightsInfo",
    "build_extractor",
    "get_spec",
]
