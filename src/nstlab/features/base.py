"""What every feature extractor shares: a spec of named layers, weights resolution and the module.

An extractor maps an RGB image in [0, 1] (N, 3, H, W) to ``dict[layer name, activation]``. It applies the
ImageNet normalisation itself, is frozen (no parameter needs a gradient: unfrozen weights cost 1.5-1.8x per
evaluation for gradients nobody reads) and holds only the modules up to the deepest requested layer.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nstlab.errors import WeightsError, choice_error
from nstlab.features.subpixel import SubPixelGradConv2d
from nstlab.network import ENV_VAR as OFFLINE_VAR
from nstlab.network import offline

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
    # layer name -> torch.fx node name, for every module of the model's top-level chain in execution order
    # (both families are a chain of modules whose outputs are the named layers; checkpointing relies on it)
    layer_nodes: Callable[[nn.Module], dict[str, str]]
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
        _no_inplace_after(model, nodes, self.layers)
        _faster_input_grads(model, nodes)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        # The graph module keeps only the submodules the requested nodes depend on: this is the truncation.
        self.body = create_feature_extractor(
            model,
            return_nodes={nodes[name]: name for name in self.layers},
            tracer_kwargs={"leaf_modules": [SubPixelGradConv2d]},  # traced as one call, like nn.Conv2d
        )
        # The same modules as a chain cut into segments that each end at a requested layer or a pooling,
        # for activation checkpointing (see forward).
        node_to_layer = {node: name for name, node in nodes.items() if name in self.layers}
        chain = list(nodes.values())
        chain = chain[: max(chain.index(nodes[name]) for name in self.layers) + 1]
        self._segments: list[tuple[_Segment, str | None]] = []
        current: list[nn.Module] = []
        for node in chain:
            # From the model, not the graph module: fx keeps leaf modules only (ResNet's layer1 would be an
            # empty container there); the leaves are the same objects, so weights and devices are shared.
            module = model.get_submodule(node)
            current.append(module)
            if node in node_to_layer or isinstance(module, nn.MaxPool2d):
                self._segments.append((_Segment(current), node_to_layer.get(node)))
                current = []
        self.requires_grad_(False)
        self.eval()

    def forward(
        self,
        x: Tensor,
        *,
        checkpoint_segments: bool = False,
        on_feature: Callable[[str, Tensor], None] | None = None,
        keep: bool = True,
    ) -> dict[str, Tensor]:
        """Activations of the requested layers.

        ``checkpoint_segments=True`` is activation checkpointing: the forward pass keeps only the outputs
        of the requested layers and poolings; backward recomputes each segment's inner activations. VGG's
        segments (3x3 convolutions, ReLUs, 2x2 poolings) are moreover computed in horizontal strips with a
        halo, in the forward pass and in the recomputation, so no full-resolution intermediate exists
        besides the segment outputs. The values and gradients are those of the plain pass (up to float
        rounding: a strip may use other convolution kernels) for about one extra forward pass of time;
        memory is a few full-resolution tensors instead of the whole network's activations, which is what
        lets a 4096 px VGG-19 stylisation run in 24 GiB on a CPU.

        ``on_feature(name, activation)`` is called as each requested layer is computed (checkpointed pass
        only; ``keep=False`` then returns nothing and holds no activation longer than needed). Losses
        built there are created between the segments, so backward consumes each layer's
        loss gradient just before that layer's segment instead of holding all of them at once.
        """
        x = self.normalize(x)
        if not checkpoint_segments:
            out: dict[str, Tensor] = self.body(x)
            return out
        feats: dict[str, Tensor] = {}
        for segment, name in self._segments:
            # Without gradients (the targets) this is just the strip-wise forward: still no full-size
            # intermediate, and with keep=False each activation is freed once the next segment has it.
            x = segment(x)
            if name is not None:
                if keep:
                    feats[name] = x
                if on_feature is not None:
                    on_feature(name, x)
        return {name: feats[name] for name in self.layers} if keep else {}


# Rows per strip are chosen so that one strip of the widest activation in a segment holds about this many
# bytes: small enough to be a rounding error next to the full-resolution tensors, large enough that the
# convolutions stay efficient and the halo rows (2 per convolution) are a small overhead.
STRIP_BYTES = 64 * 2**20


class _Segment:
    """A run of consecutive modules computed under activation checkpointing (see FeatureExtractor)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.strip_rows: int | None = None  # tests set a small value to force many strips
        # Strip tiling applies to chains of 3x3/stride 1/padding 1 convolutions and ReLUs, optionally
        # ending in one 2x2/stride 2 max-pooling: there each output row depends on a known band of input
        # rows, and zero padding happens only at the true image border.
        convs = [m for m in modules if isinstance(m, nn.Conv2d)]
        pool = modules[-1] if isinstance(modules[-1], nn.MaxPool2d) else None
        self.tileable = all(_is_same_conv(m) or isinstance(m, nn.ReLU) for m in modules[:-1]) and (
            _is_same_conv(modules[-1]) or isinstance(modules[-1], nn.ReLU) or _is_half_pool(modules[-1])
        )
        self.halo = len(convs)  # one row per 3x3 convolution on each side
        self.stride = 2 if pool is not None else 1
        self.channels = max([m.out_channels for m in convs] or [0])

    def __call__(self, x: Tensor) -> Tensor:
        if not self.tileable and not torch.is_grad_enabled():
            return self.run(x)
        if not self.tileable:
            # Non-reentrant checkpointing works with autocast and with inputs that need no gradient;
            # there is no RNG state to preserve (no dropout in a truncated extractor).
            out: Tensor = checkpoint(self.run, x, use_reentrant=False, preserve_rng_state=False)
            return out
        result: Tensor = _StripCheckpoint.apply(x, self)
        return result

    def run(self, x: Tensor) -> Tensor:
        for module in self.modules:
            x = module(x)
        return x

    def plan(self, x: Tensor) -> list[tuple[int, int, int, int]]:
        """(a, b, lo, hi): output rows [a, b) are computed from input rows [lo, hi)."""
        height, width = x.shape[-2], x.shape[-1]
        out_h = height // self.stride
        if self.strip_rows is not None:
            rows = self.strip_rows
        else:
            per_row = max(self.channels, x.shape[1]) * width * 4 * self.stride
            rows = max(8, STRIP_BYTES // max(per_row, 1))
        out = []
        for a in range(0, out_h, rows):
            b = min(out_h, a + rows)
            lo = max(0, a * self.stride - self.halo)
            hi = min(height, b * self.stride + self.halo)
            out.append((a, b, lo, hi))
        return out

    def strip(self, xs: Tensor, a: int, b: int, lo: int) -> Tensor:
        """Output rows [a, b) from the input band xs (rows lo.. of the input)."""
        y = xs
        for module in self.modules:
            if isinstance(module, nn.MaxPool2d):
                # Drop the halo rows (wrong at a cut, as if zero padded) before pooling; 2a is even, so
                # the pooling windows line up with those of the whole image.
                y = y[..., a * 2 - lo : b * 2 - lo, :]
            y = module(y)
        if self.stride == 1:
            y = y[..., a - lo : b - lo, :]
        return y


def _is_same_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.padding == (1, 1)
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
    )


def _is_half_pool(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.MaxPool2d)
        and m.kernel_size in (2, (2, 2))
        and m.stride in (2, (2, 2))
        and m.padding in (0, (0, 0))
        and m.dilation in (1, (1, 1))
        and not m.ceil_mode
    )


class _StripCheckpoint(torch.autograd.Function):
    """A tileable segment, computed strip by strip; backward recomputes one strip at a time and writes its
    input gradient into one preallocated buffer (slicing under autograd would allocate a full-size zero
    gradient per strip)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, segment: _Segment) -> Tensor:
        ctx.segment = segment
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x)
        out: Tensor | None = None
        for a, b, lo, hi in segment.plan(x):
            ys = segment.strip(x[..., lo:hi, :], a, b, lo)
            if out is None:
                out = ys.new_empty((*ys.shape[:-2], x.shape[-2] // segment.stride, ys.shape[-1]))
            out[..., a:b, :] = ys
        assert out is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        segment: _Segment = ctx.segment
        enabled, dtype = ctx.autocast
        grad_in = torch.zeros_like(x)
        for a, b, lo, hi in segment.plan(x):
            xs = x[..., lo:hi, :].detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                ys = segment.strip(xs, a, b, lo)
            (g,) = torch.autograd.grad(ys, xs, grad_out[..., a:b, :])
            grad_in[..., lo:hi, :] += g
        return grad_in, None


def _no_inplace_after(model: nn.Module, nodes: dict[str, str], layers: Sequence[str]) -> None:
    """An in-place ReLU right after a requested layer (e.g. VGG's conv4_2 -> relu4_2) would overwrite that
    layer's returned activation; make just those ReLUs out of place (the others keep saving memory)."""
    chain = list(nodes.values())
    wanted = {nodes[name] for name in layers}
    for node, following in zip(chain, chain[1:], strict=False):
        module = model.get_submodule(following)
        if node in wanted and isinstance(module, nn.ReLU) and module.inplace:
            module.inplace = False


def _faster_input_grads(model: nn.Module, nodes: dict[str, str]) -> None:
    """Swap ResNet's stem convolution for one computing the same input gradient faster on CPU (see
    ``subpixel.py``); parameters are shared: weights, state-dict keys and the forward pass are unchanged."""
    for node in nodes.values():
        module = model.get_submodule(node)
        if SubPixelGradConv2d.applies_to(module):
            assert isinstance(module, nn.Conv2d)
            model.set_submodule(node, SubPixelGradConv2d.replacing(module))


# --- weights -------------------------------------------------------------------------------------------


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _other_ways_out(cached: Path) -> str:
    """Ways out (2) and (3) of a missing torchvision checkpoint, after (1) getting it from the internet."""
    return (
        f"(2) copy {cached.name} into {cached.parent} or point to a weights file (--weights FILE; "
        'weights = "FILE" in a study\'s [base]); (3) random weights, for tests and smoke runs only '
        "(--weights random; study run --smoke)."
    )


def _load_torchvision(spec: ExtractorSpec) -> tuple[Mapping[str, Tensor], WeightsInfo]:
    enum = spec.weights_enum()
    url: str = enum.url
    cached = _hub_file(url)
    info = WeightsInfo("torchvision", False, f"{type(enum).__name__}.{enum.name}", url=url, path=str(cached))
    if cached.is_file():
        return _torch_load(cached), info
    if offline():
        raise WeightsError(
            f"{spec.display} ImageNet weights are not cached at {cached}, and {OFFLINE_VAR} is set, so no "
            f"download was tried. Ways out: (1) unset {OFFLINE_VAR} on a machine with internet; "
            + _other_ways_out(cached)
        )
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a closed network must fail, not hang
    # torch.hub.load_state_dict_from_url would print "Downloading: ..." before failing offline; its own
    # download_url_to_file prints nothing until connected (a progress bar on a terminal), checks the hash
    # prefix in the file name (as check_hash=True) and moves the file into place only when complete.
    found = torch.hub.HASH_REGEX.search(cached.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            url, str(cached), found.group(1) if found else None, progress=sys.stderr.isatty()
        )
    except (URLError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{spec.display} ImageNet weights are not cached at {cached} and could not be downloaded "
            f"from {url} ({reason}). Ways out: (1) connect to the internet once so torchvision can "
            f"download them; " + _other_ways_out(cached)
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return _torch_load(cached), info


def _torch_load(path: Path) -> Mapping[str, Tensor]:
    try:
        # weights_only: a state dict is data; never unpickle arbitrary objects from a file we were handed.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable state dict"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"cannot load weights from {path}: not a PyTorch state dict file saved with torch.save "
            f"({type(exc).__name__}: {msg[:200]})"
        ) from None
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
