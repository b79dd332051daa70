"""Extractors: the named layers are the right torchvision modules; truncation, freezing, weights loading."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn

from nstlab.errors import ConfigError, WeightsError
from nstlab.features import EXTRACTORS, build_extractor, get_spec
from nstlab.features import subpixel as subpixel_module
from nstlab.features.base import IMAGENET_MEAN, IMAGENET_STD
from nstlab.features.subpixel import SubPixelGradConv2d, subpixel_input_grad


@pytest.mark.parametrize(
    ("extractor", "layer", "index", "kind", "channels"),
    [
        ("vgg16", "relu1_2", 3, nn.ReLU, 64),
        ("vgg16", "relu2_2", 8, nn.ReLU, 128),
        ("vgg16", "relu3_3", 15, nn.ReLU, 256),
        ("vgg16", "relu4_3", 22, nn.ReLU, 512),
        ("vgg19", "relu1_1", 1, nn.ReLU, 64),
        ("vgg19", "relu2_1", 6, nn.ReLU, 128),
        ("vgg19", "relu3_1", 11, nn.ReLU, 256),
        ("vgg19", "relu4_1", 20, nn.ReLU, 512),
        ("vgg19", "relu4_2", 22, nn.ReLU, 512),
        ("vgg19", "relu5_1", 29, nn.ReLU, 512),
        ("vgg19", "conv4_2", 21, nn.Conv2d, 512),
    ],
)
def test_vgg_layer_names_resolve_to_torchvision_modules(
    extractor: str, layer: str, index: int, kind: type, channels: int
) -> None:
    # Indices from torchvision's VGG layout (and the literature's naming): e.g. VGG-19 relu4_2 is features.22.
    spec = get_spec(extractor)
    with torch.device("meta"):
        model = spec.build()
    node = spec.layer_nodes(model)[layer]
    assert node == f"features.{index}"
    module = model.features[index]
    assert isinstance(module, kind)
    # The conv that feeds this ReLU (or the conv itself) has the block's channel count.
    conv = module if isinstance(module, nn.Conv2d) else model.features[index - 1]
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == channels


def test_resnet_layer_names_are_torchvision_children() -> None:
    spec = get_spec("resnet18")
    with torch.device("meta"):
        model = spec.build()
    nodes = spec.layer_nodes(model)
    for layer in ("conv1", "layer1", "layer2", "layer3"):
        assert nodes[layer] == layer
        assert getattr(model, layer) is dict(model.named_children())[layer]
    assert "fc" not in nodes and "avgpool" not in nodes


def test_report_layers() -> None:
    assert get_spec("vgg16").content_layers == ("relu2_2",)
    assert get_spec("vgg16").style_layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
    assert get_spec("vgg19").content_layers == ("relu4_2",)
    assert get_spec("vgg19").style_layers == (
        "relu1_1",
        "relu2_1",
        "relu3_1",
        "relu4_1",
        "relu4_2",
        "relu5_1",
    )
    assert get_spec("resnet18").content_layers == ("layer1",)
    assert get_spec("resnet18").style_layers == ("conv1", "layer1", "layer2", "layer3")


@pytest.mark.parametrize("name", list(EXTRACTORS))
def test_extractor_outputs_frozen_truncated(name: str) -> None:
    spec = get_spec(name)
    layers = spec.content_layers + spec.style_layers
    ext = build_extractor(spec, layers, "random")
    x = torch.rand(1, 3, 64, 48)
    out = ext(x)
    assert set(out) == set(layers)
    assert not any(p.requires_grad for p in ext.parameters())
    assert not ext.training
    # Each output's spatial size matches the spec's declared stride (64 and 48 divide evenly here).
    for layer, t in out.items():
        assert tuple(t.shape[-2:]) == (64 // spec.strides(layer), 48 // spec.strides(layer)), layer
    # Truncation: no module deeper than the deepest requested layer is kept.
    names = {n for n, _ in ext.body.named_modules()}
    if name == "vgg19":
        assert "features.29" in names and "features.30" not in names  # relu5_1 is the deepest
    if name == "vgg16":
        assert "features.22" in names and "features.23" not in names
    if name == "resnet18":
        assert "layer3" in names and "layer4" not in names and "fc" not in names


@pytest.mark.parametrize("name", list(EXTRACTORS))
def test_freezing_and_truncation_do_not_change_the_image_gradient(name: str) -> None:
    # The two optimisations every evaluation relies on: frozen weights (no weight gradients) and the
    # truncated graph give the very image gradient of the full, trainable torchvision model (float64).
    spec = get_spec(name)
    layers = list(dict.fromkeys(spec.content_layers + spec.style_layers))
    ext = build_extractor(spec, layers, "random").double()
    full = spec.build().double().eval()
    full.load_state_dict(
        {k.removeprefix("body."): v for k, v in ext.state_dict().items() if k.startswith("body.")},
        strict=False,
    )
    nodes = spec.layer_nodes(full)
    from torchvision.models.feature_extraction import create_feature_extractor

    trainable = create_feature_extractor(full, {nodes[k]: k for k in layers})
    assert all(p.requires_grad for p in trainable.parameters())
    x0 = torch.rand(1, 3, 40, 56, dtype=torch.float64)
    grads = []
    for model, prep in ((ext, lambda t: t), (trainable, ext.normalize)):
        x = x0.clone().requires_grad_(True)
        feats = model(prep(x))
        sum((feats[k] ** 2).mean() for k in layers).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_extractor_gradients_reach_the_image() -> None:
    spec = get_spec("resnet18")
    ext = build_extractor(spec, spec.style_layers, "random")
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    sum(t.sum() for t in ext(x).values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_imagenet_normalisation_is_applied() -> None:
    ext = build_extractor(get_spec("resnet18"), ("layer1",), "random")
    x = torch.rand(1, 3, 8, 8)
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(ext.normalize(x), expected)


def test_random_weights_are_seeded_and_do_not_touch_global_rng() -> None:
    spec = get_spec("resnet18")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_extractor(spec, ("layer1",), "random")
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_extractor(spec, ("layer1",), "random")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert a.weights.random and a.weights.source == "random"


def test_unknown_layer_and_extractor_suggest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'relu4_2'"):
        get_spec("vgg19").check_layers(["relu4_22"])
    with pytest.raises(ConfigError, match="Did you mean 'vgg19'"):
        get_spec("vgg91")


# --- weights from a file, with torchvision's official key names ---------------------------------------


def test_full_official_state_dict_loads(tmp_path: Path) -> None:
    spec = get_spec("resnet18")
    torch.manual_seed(7)
    reference = spec.build()  # every official key, classifier included (45 MB)
    with torch.no_grad():  # non-trivial BN statistics, so that loading them is visible
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    ext = build_extractor(spec, spec.style_layers, str(path))
    assert ext.weights.source == "file" and not ext.weights.random and ext.weights.sha256
    assert torch.equal(ext.body.conv1.weight, reference.conv1.weight)
    assert torch.equal(
        ext.body.get_submodule("layer3.1.bn2").running_var, reference.layer3[1].bn2.running_var
    )
    # Same activations as torchvision's own model truncated by hand.
    reference.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        h = reference.conv1(ext.normalize(x))
        expected = reference.layer1(reference.maxpool(reference.relu(reference.bn1(h))))
        assert torch.allclose(ext(x)["layer1"], expected, atol=1e-5)


def test_partial_official_state_dict_loads(tmp_path: Path) -> None:
    # VGG-16 up to relu2_2 needs only features.0..7: a file with just those keys (official names) is enough.
    spec = get_spec("vgg16")
    with torch.device("meta"):
        meta = spec.build()
    keep = {f"features.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")}
    state = {k: torch.randn(v.shape) for k, v in meta.state_dict().items() if k in keep}
    assert set(state) == {f"features.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")}
    path = tmp_path / "vgg16_part.pth"
    torch.save(state, path)
    ext = build_extractor(spec, ("relu1_2", "relu2_2"), str(path))
    assert torch.equal(ext.body.get_submodule("features.5").weight, state["features.5.weight"])


def test_state_dict_with_wrong_keys_is_rejected(tmp_path: Path) -> None:
    spec = get_spec("resnet18")
    state = {("module." + k): v for k, v in spec.build().state_dict().items()}  # DataParallel-style prefix
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="official key names"):
        build_extractor(spec, ("layer1",), str(path))


def test_state_dict_missing_needed_keys_is_rejected(tmp_path: Path) -> None:
    spec = get_spec("resnet18")
    state = {k: v for k, v in spec.build().state_dict().items() if not k.startswith("layer2")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    build_extractor(spec, ("layer1",), str(path))  # layer2 not needed: fine
    with pytest.raises(WeightsError, match="lacks .* needed keys, e.g. layer2"):
        build_extractor(spec, ("layer2",), str(path))


def test_state_dict_with_wrong_shape_is_rejected(tmp_path: Path) -> None:
    spec = get_spec("resnet18")
    state = spec.build().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(
        WeightsError, match=r"conv1.weight has shape \(64, 3, 3, 3\), expected \(64, 3, 7, 7\)"
    ):
        build_extractor(spec, ("conv1",), str(path))


def test_non_state_dict_files_are_rejected(tmp_path: Path) -> None:
    spec = get_spec("resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot load weights"):
        build_extractor(spec, ("layer1",), str(junk))
    with pytest.raises(WeightsError, match="does not exist"):
        build_extractor(spec, ("layer1",), str(tmp_path / "missing.pth"))
    # A pickled module (not plain tensors) is refused by weights_only loading.
    pickled = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(WeightsError):
        build_extractor(spec, ("layer1",), str(pickled))


def test_torchvision_weights_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty torch hub cache and a network that refuses: the error names the file and the three ways out.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("NSTLAB_OFFLINE")  # the suite's own switch; this test is about the network failing

    def refuse(*args: object, **kwargs: object) -> None:
        raise URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(WeightsError) as info:
        build_extractor(get_spec("vgg19"), ("relu4_2",), "torchvision")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in msg
    assert "(1)" in msg and "(2)" in msg and "--weights FILE" in msg and "--weights random" in msg
    assert "could not be downloaded" in msg
    # With NSTLAB_OFFLINE set no download is tried at all, and the message says why.
    monkeypatch.setenv("NSTLAB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="NSTLAB_OFFLINE is set, so no download was tried") as info:
        build_extractor(get_spec("vgg19"), ("relu4_2",), "torchvision")
    assert "--weights random" in str(info.value) and "\n" not in str(info.value)


def test_torchvision_weights_download_checks_hash_and_prints_nothing_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("NSTLAB_OFFLINE")  # the transfer itself is replaced below
    spec = get_spec("resnet18")
    model = spec.build()
    calls: list[tuple[str, str, object]] = []

    def download(url: str, dst: str, hash_prefix: object = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))
        torch.save(model.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    ext = build_extractor(spec, ("layer1",), "torchvision")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", str(cached), "f37072fd")]
    assert torch.equal(ext.body.conv1.weight, model.conv1.weight) and ext.weights.path == str(cached)

    def refuse(*args: object, **kwargs: object) -> None:
        raise URLError("network unreachable")

    cached.unlink()
    capsys.readouterr()
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(WeightsError):
        build_extractor(spec, ("layer1",), "torchvision")
    assert capsys.readouterr() == ("", "")  # the error is the only line the user sees, no "Downloading: ..."


def test_torchvision_weights_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file already in the torch hub cache is used without any download.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = get_spec("resnet18")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    model = spec.build()
    torch.save(model.state_dict(), cached)
    ext = build_extractor(spec, ("layer1",), "torchvision")
    assert ext.weights.source == "torchvision" and ext.weights.identifier == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(ext.body.conv1.weight, model.conv1.weight)


def test_conv_layer_before_an_inplace_relu_keeps_its_negative_values() -> None:
    # torchvision's VGG ReLUs are in place: without care the returned conv1_1 is overwritten by relu1_1.
    extractor = build_extractor(get_spec("vgg19"), ["conv1_1", "relu1_1", "conv4_2"], "random")
    feats = extractor(torch.rand(1, 3, 48, 48))
    assert float(feats["conv1_1"].min()) < 0 and float(feats["conv4_2"].min()) < 0
    assert torch.equal(feats["relu1_1"], feats["conv1_1"].clamp_min(0))


@pytest.mark.parametrize("name", list(EXTRACTORS))
@pytest.mark.parametrize("strip_rows", [None, 3])
def test_checkpointed_pass_equals_plain_pass(name: str, strip_rows: int | None) -> None:
    # Activation checkpointing (and, for VGG, strips of 3 output rows with their halos) computes exactly
    # what the plain pass computes. In float64 to show it: in float32 the strips' other kernels round
    # differently and, where two values in a max-pooling window are within rounding of each other, the
    # gradient may go to the other one (rel. norm difference 2e-4 measured; test_engine covers float32).
    spec = get_spec(name)
    extra = ("conv1_1", "conv3_2", "pool2") if name != "resnet18" else ("bn1", "maxpool")
    extractor = build_extractor(spec, [*spec.content_layers, *spec.style_layers, *extra], "random").double()
    for segment, _ in extractor._segments:
        segment.strip_rows = strip_rows
    assert any(s.tileable for s, _ in extractor._segments) == (name != "resnet18")
    image = torch.rand(1, 3, 61, 70, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = []
    for checkpoint in (False, True):
        x = image.clone().requires_grad_(True)
        feats = extractor(x, checkpoint_segments=checkpoint)
        loss = sum((k + 1) * (feats[layer] ** 2).mean() for k, layer in enumerate(sorted(feats)))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        assert x.grad is not None
        out.append(({k: v.detach() for k, v in feats.items()}, x.grad))
    (plain, g_plain), (ckpt, g_ckpt) = out
    assert plain.keys() == ckpt.keys()
    for layer in plain:
        torch.testing.assert_close(ckpt[layer], plain[layer], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-10, atol=1e-10 * float(g_plain.abs().max()))


def test_segmented_forward_without_gradients_streams_layers() -> None:
    # The targets' pass: strip-wise without gradients, each layer handed to on_feature as it is made;
    # keep=False returns nothing (so no activation outlives its use).
    extractor = build_extractor(get_spec("vgg16"), ["relu1_2", "relu2_2"], "random").double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        plain = extractor(x)
        assert extractor(x, checkpoint_segments=True, on_feature=seen.__setitem__, keep=False) == {}
    assert list(seen) == ["relu1_2", "relu2_2"]
    for layer in seen:
        torch.testing.assert_close(seen[layer], plain[layer], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    # the stem; odd and even kernels; stride > kernel; padding >= kernel (no tap above: d_max < 0);
    # stride 1 (VGG's first layer, through correlate_gemm): same, none, wider and "full" padding
    [(7, 2, 3), (3, 2, 1), (4, 2, 1), (5, 3, 2), (1, 2, 0), (6, 4, 1), (1, 2, 1), (3, 2, 4), (2, 3, 3)]
    + [(3, 1, 1), (3, 1, 0), (5, 1, 4), (4, 1, 2), (1, 1, 0), (2, 1, 3)],
)
@pytest.mark.parametrize("hw", [(32, 48), (33, 47), (7, 9)])
def test_subpixel_input_grad_equals_the_convolutions_own(
    kernel: int, stride: int, padding: int, hw: tuple[int, int]
) -> None:
    # The sub-pixel form of a strided convolution's input gradient (one stride-1 convolution + pixel
    # shuffle) against autograd's, in float64: odd sizes, kernels wider and narrower than the stride.
    gen = torch.Generator().manual_seed(kernel * 100 + stride * 10 + padding)
    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, 3, kernel, kernel, dtype=torch.float64, generator=gen)
    y = nn.functional.conv2d(x, w, stride=stride, padding=padding)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    (expected,) = torch.autograd.grad(y, x, g)
    got = subpixel_input_grad(g, w, hw, stride, padding)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_correlate_gemm_equals_conv2d(monkeypatch: pytest.MonkeyPatch) -> None:
    # One matrix product + K*K shifted adds against F.conv2d, float64: batch 2, odd sizes, paddings
    # smaller than, equal to and larger than the kernel, non-square padding.
    gen = torch.Generator().manual_seed(5)
    for in_c, out_c, k, pad_h, pad_w, h, w in [
        (64, 3, 3, 1, 1, 17, 23),
        (16, 3, 3, 2, 2, 5, 4),
        (5, 7, 5, 0, 4, 11, 6),
        (4, 2, 2, 3, 0, 3, 9),
    ]:
        g = torch.randn(2, in_c, h, w, dtype=torch.float64, generator=gen)
        weight = torch.randn(out_c, in_c, k, k, dtype=torch.float64, generator=gen)
        expected = nn.functional.conv2d(g, weight, padding=(pad_h, pad_w))
        torch.testing.assert_close(
            subpixel_module.correlate_gemm(g, weight, pad_h, pad_w), expected, rtol=1e-10, atol=1e-12
        )
    # Above the memory budget the stride-1 gradient falls back to F.conv2d: the same numbers.
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=gen)
    y = nn.functional.conv2d(x, weight, padding=1)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    (expected,) = torch.autograd.grad(y, x, g)
    monkeypatch.setattr(subpixel_module, "GEMM_MAX_BYTES", 0)
    monkeypatch.setattr(subpixel_module, "correlate_gemm", None)  # would raise if called
    torch.testing.assert_close(
        subpixel_input_grad(g, weight, (9, 11), 1, 1), expected, rtol=1e-10, atol=1e-12
    )


def test_resnet_stem_uses_the_subpixel_gradient_only_where_it_is_the_same_computation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = get_spec("resnet18")
    ext = build_extractor(spec, spec.style_layers, "random")
    stem = ext.body.conv1
    assert isinstance(stem, SubPixelGradConv2d)  # same keys: body.conv1.weight
    assert "body.conv1.weight" in ext.state_dict() and "body.conv1.weight" in dict(ext.named_parameters())
    # VGG's first convolution (3 input channels, stride 1) gets the same treatment, same keys.
    vgg = build_extractor(get_spec("vgg19"), ["relu2_1"], "random")
    swapped = [n for n, m in vgg.named_modules() if isinstance(m, SubPixelGradConv2d)]
    assert swapped == ["body.features.0"] and "body.features.0.weight" in vgg.state_dict()

    calls: list[int] = []
    original = subpixel_module.subpixel_input_grad

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    x0 = torch.rand(1, 3, 45, 61, generator=torch.Generator().manual_seed(3))

    def image_grad(*, subpixel: bool = True, autocast: bool = False) -> torch.Tensor:
        stem.subpixel_grad = subpixel
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            feats = ext(x)
        sum((f.float() ** 2).mean() for f in feats.values()).backward()  # type: ignore[union-attr]
        assert x.grad is not None
        return x.grad

    monkeypatch.setattr(subpixel_module, "subpixel_input_grad", counting)
    fast = image_grad()
    assert calls == [1]
    plain = image_grad(subpixel=False)
    image_grad(autocast=True)  # reduced precision: the plain convolution
    with torch.no_grad():
        ext(x0)  # the targets' pass: no gradient, nothing to do
    assert calls == [1]
    stem.subpixel_grad = True
    # float32: the two forms sum in another order (float64 equality: the test above and
    # test_freezing_and_truncation_do_not_change_the_image_gradient, which runs the subpixel path).
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))
    # Trainable weights (not nstlab's case) get their gradients from the plain path.
    ext.requires_grad_(True)
    x = x0.clone().requires_grad_(True)
    ext(x)["conv1"].sum().backward()
    assert stem.weight.grad is not None and x.grad is not None
