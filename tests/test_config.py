"""Config validation: every bad value gets a typed one-line error naming the field and the choices."""

from __future__ import annotations

import pytest

from nstlab.config import DEFAULT_LR, StylizeConfig
from nstlab.errors import ConfigError


def test_defaults_are_the_reports_best_setting() -> None:
    cfg = StylizeConfig()
    assert (cfg.extractor, cfg.optimizer, cfg.init, cfg.iterations) == ("resnet18", "lbfgs", "content", 1000)
    assert cfg.losses == ("content", "style", "tv")
    assert (cfg.content_weight, cfg.style_weight) == (1.0, 1e6)


def test_resolved_fills_layers_weights_and_lr() -> None:
    r = StylizeConfig(extractor="vgg19", optimizer="adamw").resolved()
    assert r.content_layers == ("relu4_2",)
    assert r.style_layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
    assert r.style_layer_weights == (1.0,) * 6
    assert r.lr == DEFAULT_LR["adamw"] == 0.01
    assert StylizeConfig(optimizer="adam").resolved().lr == 0.1


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"extractor": "vgg17"}, "unknown extractor 'vgg17'.*Did you mean 'vgg1[69]'"),
        ({"optimizer": "adma"}, "unknown optimizer 'adma'.*Did you mean 'adam'"),
        ({"init": "contnet"}, "Did you mean 'content'"),
        ({"losses": ("content", "stlye")}, "unknown loss term 'stlye'.*Did you mean 'style'"),
        ({"losses": ()}, "at least one"),
        ({"losses": ("style", "style")}, "twice"),
        ({"style_layers": ("layer9",)}, "unknown layer for resnet18 'layer9'"),
        ({"content_layers": ()}, "must not be empty"),
        ({"style_layer_weights": (1.0, 2.0)}, "2 values but there are 4 style layers"),
        ({"style_layer_weights": (1.0, -1.0, 1.0, 1.0)}, "finite number >= 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be"),
        ({"style_weight": -1.0}, "style_weight must be"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"iterations": 2.5}, "iterations must be an integer"),
        ({"size": True}, "size must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 2**64}, "seed must be an integer <= 9223372036854775807"),
        ({"losses": "content,style"}, "losses must be a list .*got the string 'content,style'"),
        ({"style_layers": ("layer1", "layer1")}, "style_layers lists a layer twice"),
        ({"lbfgs_impl": "compat"}, "unknown lbfgs_impl 'compat'.*Did you mean 'compact'"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
    ],
)
def test_invalid_values(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        StylizeConfig.from_dict(changes)
    assert "\n" not in str(info.value)


def test_unknown_field_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="unknown config field 'iteration'.*Did you mean 'iterations'"):
        StylizeConfig.from_dict({"iteration": 5})
    # The constructor itself, as API users call it: the same typed error, not the dataclass's TypeError.
    with pytest.raises(ConfigError, match="unknown config field 'extracter'.*Did you mean 'extractor'"):
        StylizeConfig(extracter="vgg19")  # type: ignore[call-arg]


def test_round_trip_through_dict() -> None:
    cfg = StylizeConfig(extractor="vgg16", style_layers=("relu1_2", "relu2_2"), losses=("style",), lr=0.5)
    assert StylizeConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(seed=9).seed == 9 and cfg.replace(seed=9).extractor == "vgg16"
