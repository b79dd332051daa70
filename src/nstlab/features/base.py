"""What every feature extractor shares: a spec of named layers, weights resolution and the module.

An extractor maps an RGB image in [0, 1] (N, 3, H, W) to ``dict[layer name, activation]``. It applies the
ImageNet normalisation itself, is frozen (no parameter needs a gradient: unfrozen weights cost 1.5-1.8x per
evaluation for gradients nobody reads) and holds only the modules up to the deepest requested layer.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor, nn

from nstlab.errors import WeightsError, choice_error

# torchvision's ImageNet statistics, the ones its pretrained classifiers were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Random weights are always built from this seed, independent of the run's seed, so that two runs with
# different seeds still share one (random) network.
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class ExtractorSpec:
    """A feature-extractor family: how to build it and which named layers it offers."""

    name: str
    display: str
    build: Callable[[], nn.Module]  # the torchvision model with random init (weights=None)
    weights_enum: Callable[[], Any]  # the torchvision weights enum member used by default
    layer_nodes: Callable[[nn.Module], dict[str, str]]  # layer name -> torch.fx node name
    strides: Callable[[str], int]  # layer name -> total downsampling factor at that layer
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    notes: str = ""

    def layer_names(self) -> list[str]:
        return list(self.layer_nodes(_skeleton(self)).keys())

    def check_layers(self, layers: Sequence[str]) -> None:
        valid = self.layer_names()
        for layer in layers:
            if layer not in valid:
                raise choice_error(f"layer for {self.name}", layer, valid)

    def min_side(self, layers: Sequence[str]) -> int:
        """The smallest input side for which every requested layer still has at least one pixel."""
        return max(self.strides(layer) for layer in layers)


_SKELETONS: dict[str, nn.Module] = {}


def _skeleton(spec: ExtractorSpec) -> nn.Module:
    # Layer names are read off a real torchvision model; build it once (on the meta device: no memory,
    # no random init) and keep it.
    if spec.name not in _SKELETONS:
        with torch.device("meta"):
            _SKELETONS[spec.name] = spec.build()
    return _SKELETONS[spec.name]


@dataclass(frozen=True)
class WeightsInfo:
    """Where the extractor's weights came from; goes into every run record."""

    source: str  # "torchvision" | "file" | "random"
    random: bool
    identifier: str  # torchvision enum name, file path, or "random(seed=0)"
    url: str | None = None
    path: str | None = None
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "random": self.random,
            "identifier": self.identifier,
            "url": self.url,
            "path": self.path,
            "sha256": self.sha256,
        }


class Normalize(nn.Module):
    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class FeatureExtractor(nn.Module):
    """Normalisation + a torchvision feature-extraction graph truncated after the deepest needed layer."""

    def __init__(self, spec: ExtractorSpec, model: nn.Module, layers: Sequence[str], weights: WeightsInfo):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.spec = spec
        self.layers = tuple(
            dict.fromkeys(layers)
        )  # ordered, de-duplicated (VGG-19's relu4_2 is in both lists)
        self.weights = weights
        nodes = spec.layer_nodes(model)
        model.eval()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        # The graph module keeps only the submodules the requested nodes depend on: this is the truncation.
        self.body = create_feature_extractor(model, return_nodes={nodes[name]: name for name in self.layers})
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = self.body(self.normalize(x))
        return out


# --- weights -------------------------------------------------------------------------------------------


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_torchvision(spec: ExtractorSpec) -> tuple[Mapping[str, Tensor], WeightsInfo]:
    enum = spec.weights_enum()
    url: str = enum.url
    cached = _hub_file(url)
    info = WeightsInfo("torchvision", False, f"{type(enum).__name__}.{enum.name}", url=url, path=str(cached))
    if cached.is_file():
        return _torch_load(cached), info
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a closed network must fail, not hang
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except (URLError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{spec.display} ImageNet weights are not cached at {cached} and could not be downloaded "
            f"from {url} ({reason}). Ways out: (1) connect to the internet once so torchvision can "
            f"download them; (2) copy {cached.name} into {cached.parent} or pass --weights FILE; "
            f"(3) pass --weights random for tests and smoke runs (not real style transfer)."
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return state, info


def _torch_load(path: Path) -> Mapping[str, Tensor]:
    try:
        # weights_only: a state dict is data; never unpickle arbitrary objects from a file we were handed.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable state dict"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot load weights from {path}: {msg}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_state(model: nn.Module, state: Mapping[str, Tensor], needed: set[str], origin: str) -> None:
    """Load ``state`` into ``model``: every key must be an official one, every needed key must be present.

    A file may hold the whole torchvision model (classifier included) or only the part the extractor uses.
    """
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise WeightsError(
            f"{origin} has keys that {type(model).__name__} does not (e.g. {', '.join(unexpected[:3])}); "
            "expected torchvision's official key names such as " + ", ".join(list(own)[:2])
        )
    missing = sorted(needed - set(state))
    if missing:
        raise WeightsError(f"{origin} lacks {len(missing)} needed keys, e.g. {', '.join(missing[:3])}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightsError(
                f"{origin}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)


def build_extractor(
    spec: ExtractorSpec, layers: Sequence[str], weights: str = "torchvision"
) -> FeatureExtractor:
    """Build ``spec``'s extractor with ``weights``: "torchvision", "random", or a path to a state dict."""
    spec.check_layers(layers)
    if weights == "random":
        info = WeightsInfo("random", True, f"random(seed={RANDOM_WEIGHTS_SEED})")
        # Build on the meta device and initialise only the truncated graph: VGG's classifier alone would
        # cost ~100M random draws (seconds) for weights that are thrown away.
        extractor = FeatureExtractor(spec, _meta_copy(spec), layers, info)
        extractor.body.to_empty(device="cpu")
        # fork_rng: seeding for the random weights must not disturb the caller's RNG stream.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            for module in extractor.body.modules():
                if isinstance(module, nn.Conv2d):  # torchvision's own init for VGG and ResNet convs
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.BatchNorm2d):
                    module.reset_parameters()  # weight 1, bias 0, running mean 0, var 1
        return extractor

    with torch.device("meta"):
        model = spec.build()
    if weights == "torchvision":
        state, info = _load_torchvision(spec)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} does not exist; pass a torchvision state dict, 'torchvision' "
                "or 'random'"
            )
        state = _torch_load(path)
        info = WeightsInfo("file", False, str(path), path=str(path.resolve()), sha256=_sha256(path))
    model = model.to_empty(device="cpu")
    # Only the parameters the truncated graph uses must be present; find them from a throwaway extractor.
    probe = FeatureExtractor(spec, _meta_copy(spec), layers, info)
    # num_batches_tracked is absent from older official checkpoints; BatchNorm fills it in itself.
    needed = {
        k.removeprefix("body.")
        for k in probe.state_dict()
        if k.startswith("body.") and not k.endswith("num_batches_tracked")
    }
    _load_state(model, state, needed, str(info.path or info.identifier))
    _reset_buffers_not_in(model, state)
    return FeatureExtractor(spec, model, layers, info)


def _meta_copy(spec: ExtractorSpec) -> nn.Module:
    with torch.device("meta"):
        return spec.build()


def _reset_buffers_not_in(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    # to_empty() leaves uninitialised memory; anything the file did not provide must not stay garbage.
    # (Only buffers/params outside the truncated graph can be absent; zero them so they are deterministic.)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key not in state:
                tensor.zero_()
