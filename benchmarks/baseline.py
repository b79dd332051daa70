"""A reference implementation in the style of the PyTorch neural-style tutorial, to benchmark nstlab against.

Written for these benchmarks (not copied from the tutorial); it follows the tutorial's *approach*:

* a ``Normalization`` module first, then the feature network's modules copied one by one into a fresh
  ``nn.Sequential``, with ``ContentLoss`` / ``StyleLoss`` modules inserted right after the chosen layers;
  each loss module stores its loss as a side effect of ``forward`` and passes its input through;
* the chain is cut after the last loss module;
* Gram matrix normalised by a*b*c*d, MSE content and style losses, lambda_c = 1, lambda_s = 1e6 and (when
  nstlab's default content+style+tv setting is compared) nstlab's squared TV term with its lambda_tv;
* the image itself is the optimised tensor, ``torch.optim.LBFGS([img])`` with torch's defaults (lr 1,
  max_iter 20, history 100, no line search -- the same settings nstlab uses), and the closure clamps
  ``img.data`` into [0, 1] in place before every evaluation;
* the network's weights are NOT frozen, as in the tutorial's original code: every parameter keeps
  ``requires_grad=True``, so each backward pass also computes (and accumulates, because the optimiser only
  zeroes the image's gradient) weight gradients that nobody reads. ``freeze=True`` turns this off to
  measure what it costs.

VGG: the modules of ``vgg.features`` (ReLUs made out-of-place, as the tutorial does, so that the activations
the loss modules keep are not overwritten). ResNet-18: the same idea applied to resnet's top-level children
``conv1, bn1, relu, maxpool, layer1, layer2, layer3`` -- the layers nstlab names for ResNet are exactly the
outputs of these children. Layer lists come from ``nstlab.features.get_spec(name)``, so both
implementations use the same layers. The weights are copied from an nstlab extractor so that both use the
very same (random, here) network; the module runs in eval mode (BatchNorm uses its running statistics) like
nstlab's extractor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nstlab.features import FeatureExtractor, build_extractor, get_spec
from nstlab.features.base import IMAGENET_MEAN, IMAGENET_STD

CONTENT_WEIGHT = 1.0
STYLE_WEIGHT = 1e6
RESNET_CHAIN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class Normalization(nn.Module):
    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # (C, 1, 1) so that it broadcasts over (N, C, H, W) images.
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, img: Tensor) -> Tensor:
        return (img - self.mean) / self.std


def gram_matrix(x: Tensor) -> Tensor:
    a, b, c, d = x.size()  # batch, channels, height, width
    feats = x.reshape(a * b, c * d)
    return torch.mm(feats, feats.t()).div(a * b * c * d)


class ContentLoss(nn.Module):
    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.target = target.detach()
        self.loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.loss = F.mse_loss(x, self.target)
        return x


class StyleLoss(nn.Module):
    def __init__(self, target_feature: Tensor) -> None:
        super().__init__()
        self.target = gram_matrix(target_feature).detach()
        self.loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.loss = F.mse_loss(gram_matrix(x), self.target)
        return x


def tv_loss(img: Tensor) -> Tensor:
    """The same squared TV as nstlab's (mean of squared vertical plus horizontal neighbour differences)."""
    dy = img[..., 1:, :] - img[..., :-1, :]
    dx = img[..., :, 1:] - img[..., :, :-1]
    return (dy**2).mean() + (dx**2).mean()


class _BudgetSpent(Exception):
    pass


def _source_chain(
    extractor_name: str, extractor: FeatureExtractor, layers: Sequence[str]
) -> list[tuple[str, str, nn.Module]]:
    """[(nstlab layer name or "", module name, module with the extractor's weights)] up to the deepest of
    ``layers``."""
    spec = get_spec(extractor_name)
    with torch.device("meta"):
        model = spec.build()
    model = model.to_empty(device="cpu")
    # Copy the extractor's weights (it holds the truncated graph, whose keys are torchvision's names).
    state = {k.removeprefix("body."): v for k, v in extractor.state_dict().items() if k.startswith("body.")}
    model.load_state_dict(state, strict=False)
    node_to_layer = {node: name for name, node in spec.layer_nodes(model).items()}
    chain: list[tuple[str, str, nn.Module]] = []
    if extractor_name.startswith("vgg"):
        features: nn.Sequential = model.features  # type: ignore[assignment]
        names = [(f"features.{i}", m) for i, m in enumerate(features)]
    else:
        names = [(name, getattr(model, name)) for name in RESNET_CHAIN]
    for name, module in names:
        if isinstance(module, nn.ReLU):
            module = nn.ReLU(inplace=False)  # the loss modules keep references to these outputs
        chain.append((node_to_layer.get(name, ""), name, module))
    order = [c[0] for c in chain]
    chain = chain[: max(order.index(layer) for layer in layers) + 1]
    for _, name, module in chain:  # every tensor the cut chain uses must come from the extractor
        for key in module.state_dict():
            if f"{name}.{key}" not in state and not key.endswith("num_batches_tracked"):
                raise RuntimeError(f"the extractor has no weights for {name}.{key}")
    return chain


class BaselineNST:
    """Tutorial-style Gatys et al. style transfer for one (content, style) pair with nstlab's layers.

    ``evaluate(img)`` is one objective evaluation (clamp, forward, backward) at ``img``; ``run(n)`` optimises
    from the content image for exactly ``n`` evaluations with L-BFGS and returns (image, loss of that image).
    """

    def __init__(
        self,
        extractor_name: str,
        content: Tensor,
        style: Tensor,
        tv_weight: float = 0.0,
        *,
        source: FeatureExtractor | None = None,
        content_layers: Sequence[str] | None = None,
        style_layers: Sequence[str] | None = None,
        freeze: bool = False,
    ) -> None:
        spec = get_spec(extractor_name)
        self.content_layers = tuple(content_layers or spec.content_layers)
        self.style_layers = tuple(style_layers or spec.style_layers)
        self.tv_weight = tv_weight
        self.content = content
        if source is None:
            # nstlab's random weights are deterministic (seed 0), so this gives the same network nstlab uses.
            source = build_extractor(spec, self.content_layers + self.style_layers, "random")
        chain = _source_chain(extractor_name, source, self.content_layers + self.style_layers)

        model = nn.Sequential(Normalization(IMAGENET_MEAN, IMAGENET_STD))
        self.content_losses: list[ContentLoss] = []
        self.style_losses: list[StyleLoss] = []
        model.eval()
        # Targets: the content and style images pushed through the chain built so far. (The tutorial runs
        # the partial model itself, loss modules included, which needs equal image sizes; here the two
        # activations are carried along beside it, so a style image of another aspect ratio works.)
        with torch.no_grad():
            c_act, s_act = model(content), model(style)
            for layer, name, module in chain:
                module.eval()
                model.add_module(name.replace(".", "_"), module)
                c_act, s_act = module(c_act), module(s_act)
                if layer in self.content_layers:
                    cl = ContentLoss(c_act)
                    model.add_module(f"content_loss_{layer}", cl)
                    self.content_losses.append(cl)
                if layer in self.style_layers:
                    sl = StyleLoss(s_act)
                    model.add_module(f"style_loss_{layer}", sl)
                    self.style_losses.append(sl)
        self.model = model.eval()
        if freeze:
            self.model.requires_grad_(False)
        else:
            self.model.requires_grad_(True)  # the tutorial's original code: weights are never frozen
        self.img = content.clone().requires_grad_(True)
        self.optimizer = torch.optim.LBFGS([self.img])
        self.last_run_seconds = 0.0

    # -- the objective ------------------------------------------------------------------------------------

    def _loss(self) -> Tensor:
        self.model(self.img)
        style_score = sum((sl.loss for sl in self.style_losses), torch.zeros(()))
        content_score = sum((cl.loss for cl in self.content_losses), torch.zeros(()))
        loss = STYLE_WEIGHT * style_score + CONTENT_WEIGHT * content_score
        if self.tv_weight:
            loss = loss + self.tv_weight * tv_loss(self.img)
        return loss

    def _closure(self, optimizer: torch.optim.Optimizer) -> Tensor:
        self.img.data.clamp_(0, 1)
        optimizer.zero_grad()  # only the image's gradient: the (unfrozen) weights' gradients accumulate
        loss = self._loss()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    def evaluate(self, img: Tensor | None = None) -> float:
        """One evaluation (forward + backward) at ``img`` (default: the current image); returns the loss."""
        if img is not None:
            with torch.no_grad():
                self.img.copy_(img)
        return float(self._closure(self.optimizer))

    def loss_at(self, img: Tensor) -> float:
        """The loss of ``img`` clamped to [0, 1], without a backward pass (not part of any timing)."""
        with torch.no_grad():
            self.img.copy_(img.clamp(0, 1))
            return float(self._loss())

    # -- the optimisation ---------------------------------------------------------------------------------

    def run(self, iterations: int, trace: list[tuple[float, float]] | None = None) -> tuple[Tensor, float]:
        """Optimise from the content image for exactly ``iterations`` evaluations.

        ``trace`` (if given) receives (seconds since start, loss) per evaluation. Returns the final image
        (clamped, as the tutorial does after its loop) and its loss (one extra forward, not timed).
        """
        with torch.no_grad():
            self.img.copy_(self.content)
        optimizer = torch.optim.LBFGS([self.img])
        count = 0
        start = time.perf_counter()

        def closure() -> Tensor:
            nonlocal count
            if count >= iterations:
                raise _BudgetSpent
            loss = self._closure(optimizer)
            count += 1
            if trace is not None:
                trace.append((time.perf_counter() - start, float(loss)))
            return loss

        while count < iterations:
            try:
                optimizer.step(closure)  # type: ignore[no-untyped-call]
            except _BudgetSpent:
                break
        self.img.data.clamp_(0, 1)
        self.last_run_seconds = time.perf_counter() - start
        image = self.img.detach().clone()
        return image, self.loss_at(image)

    def parameters_requiring_grad(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
