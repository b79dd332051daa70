"""Tests for nstlab.reference: AdaIN (random weights with the official key names), Magenta (the embedded
ONNX models), the folder maker, the auto rule and the on-disk cache. No network, no real AdaIN weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nstlab import reference as reference_module
from nstlab.errors import ConfigError, ImageError, InputError, NstlabError, WeightsError
from nstlab.images import file_sha256
from nstlab.reference import (
    Reference,
    ReferenceOptions,
    adain,
    align_to_output,
    cache,
    magenta,
    make_reference,
)

# --- the official architecture, written out by hand (naoto0804/pytorch-AdaIN, net.py) -------------------

# vgg: index → (out, in, k) of every conv. Module 0 is the 1×1 preprocessing conv; then (pad, conv, relu)
# triples with a max-pool after relu1_2 (7), relu2_2 (14), relu3_4 (27) and relu4_4 (40).
OFFICIAL_VGG_CONVS = {
    0: (3, 3, 1),
    2: (64, 3, 3),
    5: (64, 64, 3),
    9: (128, 64, 3),
    12: (128, 128, 3),
    16: (256, 128, 3),
    19: (256, 256, 3),
    22: (256, 256, 3),
    25: (256, 256, 3),
    29: (512, 256, 3),
    32: (512, 512, 3),
    35: (512, 512, 3),
    38: (512, 512, 3),
    42: (512, 512, 3),
    45: (512, 512, 3),
    48: (512, 512, 3),
    51: (512, 512, 3),
}
OFFICIAL_VGG_POOLS = (7, 14, 27, 40)
# decoder: (pad, conv, relu) triples with nearest ×2 upsampling at 3, 16 and 23; the last conv has no ReLU.
OFFICIAL_DECODER_CONVS = {
    1: (256, 512, 3),
    5: (256, 256, 3),
    8: (256, 256, 3),
    11: (256, 256, 3),
    14: (128, 256, 3),
    18: (128, 128, 3),
    21: (64, 128, 3),
    25: (64, 64, 3),
    28: (3, 64, 3),
}
OFFICIAL_DECODER_UPSAMPLES = (3, 16, 23)


def official_keys(convs: dict[int, tuple[int, int, int]]) -> list[str]:
    return [f"{i}.{p}" for i in sorted(convs) for p in ("weight", "bias")]


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never touch ~/.cache or the network: the cache root goes to tmp, downloads to a file:// that is absent.
    monkeypatch.setenv("NSTLAB_CACHE", str(tmp_path / "nstlab-cache"))
    missing = (tmp_path / "no-such-release").as_uri()
    monkeypatch.setattr(adain, "ADAIN_URLS", {n: f"{missing}/{n}" for n in adain.ADAIN_FILES})
    monkeypatch.setattr(adain, "ADAIN_SHA256", None)
    # Downloads here only ever read file:// URLs, so this module lifts the suite's NSTLAB_OFFLINE, and each
    # test starts without the process's memory of an earlier failed fetch.
    monkeypatch.delenv("NSTLAB_OFFLINE", raising=False)
    monkeypatch.setattr(reference_module, "_ADAIN_FETCH_FAILED", {})


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vgg_normalised.pth and decoder.pth with the official keys and shapes but random (seeded) values."""
    d = tmp_path_factory.mktemp("adain-weights")
    torch.manual_seed(0)
    vgg, decoder = adain.build_vgg(), adain.build_decoder()
    for m in [*vgg, *decoder]:
        if isinstance(m, nn.Conv2d):
            # He init keeps the activations' scale through 20+ layers; PyTorch's default init shrinks them
            # until every output is the same colour, which would make the alpha test vacuous.
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            assert m.bias is not None
            nn.init.zeros_(m.bias)
    torch.save(vgg.state_dict(), d / "vgg_normalised.pth")
    torch.save(decoder.state_dict(), d / "decoder.pth")
    return d


@pytest.fixture(scope="module")
def net(weights_dir: Path) -> adain.AdaINNet:
    return adain.load_adain({n: weights_dir / n for n in adain.ADAIN_FILES})


def smooth(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


# --- AdaIN: architecture and weights ---------------------------------------------------------------------


def test_vgg_matches_official_keys_shapes_and_modules() -> None:
    vgg = adain.build_vgg()
    state = vgg.state_dict()
    assert list(state) == official_keys(OFFICIAL_VGG_CONVS)
    assert len(state) == 34  # 16 conv layers + the 1×1 conv, weight and bias each
    for i, (cout, cin, k) in OFFICIAL_VGG_CONVS.items():
        assert tuple(state[f"{i}.weight"].shape) == (cout, cin, k, k)
        assert tuple(state[f"{i}.bias"].shape) == (cout,)
    assert tuple(state["0.weight"].shape) == (3, 3, 1, 1)
    assert len(vgg) == 53  # up to relu5_4
    for i, m in enumerate(vgg):
        if i in OFFICIAL_VGG_POOLS:
            assert isinstance(m, nn.MaxPool2d) and m.ceil_mode and m.kernel_size == (2, 2)
        elif i in OFFICIAL_VGG_CONVS:
            assert isinstance(m, nn.Conv2d) and m.padding == (0, 0)
            if i > 0:
                assert isinstance(vgg[i - 1], nn.ReflectionPad2d) and isinstance(vgg[i + 1], nn.ReLU)
    # The encoder is vgg[:31], ending at relu4_1 (512 channels).
    assert isinstance(vgg[30], nn.ReLU) and vgg[29].out_channels == 512


def test_decoder_matches_official_keys_and_shapes() -> None:
    dec = adain.build_decoder()
    state = dec.state_dict()
    assert list(state) == official_keys(OFFICIAL_DECODER_CONVS)
    for i, (cout, cin, k) in OFFICIAL_DECODER_CONVS.items():
        assert tuple(state[f"{i}.weight"].shape) == (cout, cin, k, k)
    assert len(dec) == 29
    for i in OFFICIAL_DECODER_UPSAMPLES:
        assert isinstance(dec[i], nn.Upsample) and dec[i].scale_factor == 2 and dec[i].mode == "nearest"
    assert isinstance(dec[28], nn.Conv2d) and (dec[28].in_channels, dec[28].out_channels) == (64, 3)
    assert not any(isinstance(m, nn.ReLU) for m in list(dec)[27:])  # no ReLU after the last conv


def test_strict_loading_and_encoder_slice(weights_dir: Path, net: adain.AdaINNet) -> None:
    saved = torch.load(weights_dir / "vgg_normalised.pth", weights_only=True)
    assert len(net.encoder) == 31
    conv4_1 = net.encoder[29]
    assert isinstance(conv4_1, nn.Conv2d)
    assert torch.equal(conv4_1.weight, saved["29.weight"])  # relu4_1's conv came from the file
    assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("which", ["vgg_normalised.pth", "decoder.pth"])
def test_renamed_key_or_wrong_shape_is_rejected(weights_dir: Path, tmp_path: Path, which: str) -> None:
    state = torch.load(weights_dir / which, weights_only=True)
    first = next(iter(state))
    files = {n: weights_dir / n for n in adain.ADAIN_FILES}
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    files[which] = bad_dir / which

    renamed = dict(state)
    renamed["features." + first] = renamed.pop(first)
    torch.save(renamed, files[which])
    with pytest.raises(WeightsError) as err:
        adain.load_adain(files)
    msg = one_line(err.value)
    assert f"missing keys {first}" in msg and f"unexpected keys features.{first}" in msg

    wrong = dict(state)
    wrong[first] = torch.zeros(*wrong[first].shape[:-1], wrong[first].shape[-1] + 1)
    torch.save(wrong, files[which])
    with pytest.raises(WeightsError) as err:
        adain.load_adain(files)
    assert "wrong shapes" in one_line(err.value) and first in str(err.value)

    files[which].write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as err:
        adain.load_adain(files)
    assert "cannot load AdaIN weights" in one_line(err.value)


def test_missing_weights_message_names_files_dir_and_ways_out(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError) as err:
        adain.ensure_weights(ReferenceOptions(adain_weights=empty), tmp_path)
    msg = one_line(err.value)
    for part in ("vgg_normalised.pth", "decoder.pth", str(empty), "--adain-weights", "--reference magenta"):
        assert part in msg
    assert adain.ADAIN_URLS["decoder.pth"] in msg and adain.ADAIN_URLS["vgg_normalised.pth"] in msg
    assert adain.ADAIN_RELEASE == "https://github.com/naoto0804/pytorch-AdaIN/releases/download/v0.0.0/"


def test_download_failure_is_one_line_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        adain.ensure_weights(ReferenceOptions(), tmp_path)
    msg = one_line(err.value)
    assert "download failed" in msg and str(adain.default_weights_dir(tmp_path)) in msg


def test_download_and_sha256_verification(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # file:// URLs exercise the real download code path without a network.
    monkeypatch.setattr(adain, "ADAIN_URLS", {n: (weights_dir / n).as_uri() for n in adain.ADAIN_FILES})
    real = {n: file_sha256(weights_dir / n) for n in adain.ADAIN_FILES}

    monkeypatch.setattr(adain, "ADAIN_SHA256", {**real, "decoder.pth": "0" * 64})  # a fake expected digest
    root = tmp_path / "root"
    with pytest.raises(WeightsError) as err:
        adain.ensure_weights(ReferenceOptions(), root)
    assert "decoder.pth" in one_line(err.value) and "0" * 64 in str(err.value)
    target = adain.default_weights_dir(root)
    assert not (target / "decoder.pth").exists()
    assert not [p for p in target.iterdir() if p.name.endswith(".part")]  # no partial file left behind

    monkeypatch.setattr(adain, "ADAIN_SHA256", real)
    files = adain.ensure_weights(ReferenceOptions(), root)
    assert {n: file_sha256(p) for n, p in files.items()} == real
    record = adain.weights_record(files)
    assert all(rec["verified"] is True for rec in record.values())

    # A file already on disk that does not match the expected digest is refused too.
    monkeypatch.setattr(adain, "ADAIN_SHA256", {**real, "vgg_normalised.pth": "f" * 64})
    with pytest.raises(WeightsError):
        adain.weights_record(files)

    monkeypatch.setattr(adain, "ADAIN_SHA256", None)  # the shipped state: recorded, not verified
    record = adain.weights_record(files)
    assert all(rec["verified"] is False and rec["sha256"] == real[n] for n, rec in record.items())


def test_a_short_or_non_checkpoint_download_is_discarded(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No digest is published for the release files, so the length the server announced and "is it a
    # checkpoint at all" are what stand between a dropped connection or a proxy's error page and a cache
    # that breaks every later reference.
    import http.server
    import threading

    monkeypatch.delenv("NSTLAB_OFFLINE", raising=False)
    good = (weights_dir / "vgg_normalised.pth").read_bytes()
    bodies = {
        "/short": (good[:10], len(good)),
        "/html": (b"<html>blocked</html>", 20),
        "/good": (good, len(good)),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, length = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for path, why in (
            ("/short", "incomplete download of vgg_normalised.pth: 10 of"),
            ("/html", "not a PyTorch"),
        ):
            monkeypatch.setattr(adain, "ADAIN_URLS", {n: base + path for n in adain.ADAIN_FILES})
            with pytest.raises(adain.DownloadError, match=why) as err:
                adain.ensure_weights(ReferenceOptions(), tmp_path)
            assert why in err.value.reason  # "auto" falls back to Magenta with this reason
            target = adain.default_weights_dir(tmp_path)
            assert not [p for p in target.iterdir()]  # nothing kept, no partial file
        monkeypatch.setattr(adain, "ADAIN_URLS", {n: base + "/good" for n in adain.ADAIN_FILES})
        files = adain.ensure_weights(ReferenceOptions(), tmp_path)
        assert files["vgg_normalised.pth"].read_bytes() == good
    finally:
        server.shutdown()
        server.server_close()


# --- AdaIN: the operation and the network ----------------------------------------------------------------


def test_adain_op_matches_hand_computation() -> None:
    # Channel 0: content 1..4 (mean 2.5, unbiased var 5/3), style 0,0,2,2 (mean 1, unbiased var 4/3).
    # Channel 1: flat content 5 (var 0, so σ = sqrt(eps)); style 1,3,5,7 (mean 4) → output is 4 everywhere.
    content = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    style = torch.tensor([[[[0.0, 0.0], [2.0, 2.0]], [[1.0, 3.0], [5.0, 7.0]]]])
    eps = 1e-5
    scale = math.sqrt(4 / 3 + eps) / math.sqrt(5 / 3 + eps)
    expected0 = [[(v - 2.5) * scale + 1.0 for v in row] for row in ([1.0, 2.0], [3.0, 4.0])]
    out = adain.adain(content, style, eps=eps)
    assert out.shape == content.shape
    assert torch.allclose(out[0, 0], torch.tensor(expected0), atol=1e-6)
    assert torch.allclose(out[0, 1], torch.full((2, 2), 4.0), atol=1e-6)
    mean, std = adain.calc_mean_std(style, eps)
    assert torch.allclose(std.flatten(), torch.tensor([math.sqrt(4 / 3 + eps), math.sqrt(20 / 3 + eps)]))
    assert torch.allclose(mean.flatten(), torch.tensor([1.0, 4.0]))


def test_adain_op_rejects_bad_shapes() -> None:
    with pytest.raises(InputError) as err:
        adain.adain(torch.zeros(1, 4, 3, 3), torch.zeros(1, 3, 3, 3))
    one_line(err.value)
    with pytest.raises(InputError):
        adain.adain(torch.zeros(4, 3, 3), torch.zeros(4, 3, 3))
    with pytest.raises(InputError):  # 1×1 features: the unbiased variance is undefined
        adain.adain(torch.zeros(1, 3, 1, 1), torch.zeros(1, 3, 2, 2))


def test_alpha_zero_decodes_the_content_features(net: adain.AdaINNet) -> None:
    torch.manual_seed(1)
    c, s = torch.rand(1, 3, 32, 40), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        fc, fs = net.encode(c), net.encode(s)
        zero = net(c, s, 0.0)
        assert zero.std() > 0.1  # the random network does not collapse to a constant
        assert torch.allclose(zero, net.decode(fc), rtol=1e-5, atol=1e-5)
        half = net.decode(0.5 * adain.adain(fc, fs) + 0.5 * fc)
        assert torch.allclose(net(c, s, 0.5), half, rtol=1e-5, atol=1e-5)
        assert (net(c, s, 1.0) - zero).abs().max() > 0.05


def test_network_rejects_four_channels_and_bad_alpha(net: adain.AdaINNet) -> None:
    with pytest.raises(ImageError) as err:
        net(torch.rand(1, 4, 32, 32), torch.rand(1, 3, 32, 32))
    assert "4 channels" in one_line(err.value)
    with pytest.raises(ConfigError):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), 1.5)


def test_output_size_for_100x70_at_64(weights_dir: Path) -> None:
    # Shorter side 70 → 64, longer int(64·100/70) = 91; ceil-mode pooling 91 → 46 → 23 → 12, 64 → 32 → 16 → 8;
    # the decoder upsamples ×8: 96 × 64.
    assert adain.resized_size((100, 70), 64) == (91, 64)
    assert adain.output_size((100, 70), 64) == (96, 64)
    opts = ReferenceOptions(content_size=64, style_size=64, adain_weights=weights_dir)
    files = adain.ensure_weights(opts, Path("unused"))
    img, info = adain.render(smooth(3, (100, 70)), smooth(4, (50, 80)), opts, files)
    assert img.size == (96, 64) and img.mode == "RGB"
    assert img.size[0] % 8 == 0 and img.size[1] % 8 == 0
    assert info["content_input_size"] == [91, 64] and info["style_input_size"] == [64, 102]


# --- make_reference: auto, adain, options, errors --------------------------------------------------------


def test_auto_uses_adain_when_weights_are_present(weights_dir: Path, pair: tuple[Path, Path]) -> None:
    opts = ReferenceOptions(content_size=32, style_size=32, adain_weights=weights_dir)
    ref = make_reference(*pair, options=opts)
    assert isinstance(ref, Reference) and ref.maker == "adain" and ref.info["maker"] == "adain"
    assert ref.info["auto"].startswith("auto → adain")
    assert set(ref.info["weights"]) == {"vgg_normalised.pth", "decoder.pth"}
    assert ref.info["weights"]["decoder.pth"]["sha256"] == file_sha256(weights_dir / "decoder.pth")
    assert ref.info["weights"]["decoder.pth"]["verified"] is False
    assert ref.info["inputs"]["content"]["sha256"] == file_sha256(pair[0])
    assert ref.image.size == (48, 32)  # 96×72 → 42×32 → 6×4 features → 48×32
    json.dumps(ref.info)  # the record is JSON-serialisable


def test_auto_falls_back_to_magenta_and_says_why(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = make_reference(*pair, cache_dir=tmp_path / "refs")
    assert ref.maker == "magenta"
    where = adain.default_weights_dir(cache.cache_root())
    assert ref.info["auto"].startswith(
        f"auto → magenta (AdaIN weights not found at {where}: missing vgg_normalised.pth, decoder.pth; "
        "the download failed: <urlopen error"
    )
    assert str(tmp_path / "nstlab-cache") in ref.info["auto"]  # NSTLAB_CACHE moves the default place
    empty = tmp_path / "empty"
    empty.mkdir()
    ref = make_reference(*pair, options=ReferenceOptions(adain_weights=empty), cache_dir=tmp_path / "refs")
    assert ref.maker == "magenta" and f"not found at {empty}" in ref.info["auto"]
    assert "download" not in ref.info["auto"]  # an explicit --adain-weights folder is never downloaded into
    assert ref.info["cached"] is True  # same key as above: adain_weights does not matter to Magenta


def test_auto_downloads_adain_once_and_falls_back_when_it_cannot(
    weights_dir: Path, tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The report's reference is AdaIN: "auto" fetches its weights as maker="adain" would.
    calls: list[str] = []
    real_download = adain._download

    def counting(url: str, dest: Path, name: str) -> None:
        calls.append(name)
        real_download(url, dest, name)

    monkeypatch.setattr(adain, "_download", counting)
    # Where fetching fails (here: the release URL is absent), Magenta, and no second try in this process.
    opts = ReferenceOptions(content_size=32, style_size=32)
    for _ in range(2):
        ref = make_reference(*pair, options=opts, cache_dir=tmp_path / "refs")
        assert ref.maker == "magenta" and "the download failed" in ref.info["auto"]
    assert calls == ["vgg_normalised.pth"]
    # Online (the release reachable), a fresh process downloads and uses AdaIN.
    monkeypatch.setattr(reference_module, "_ADAIN_FETCH_FAILED", {})
    monkeypatch.setattr(adain, "ADAIN_URLS", {n: (weights_dir / n).as_uri() for n in adain.ADAIN_FILES})
    ref = make_reference(*pair, options=opts, cache_dir=tmp_path / "refs")
    target = adain.default_weights_dir(cache.cache_root())
    assert ref.maker == "adain" and ref.info["auto"] == f"auto → adain (weights downloaded into {target})"
    assert sorted(p.name for p in target.iterdir()) == ["decoder.pth", "vgg_normalised.pth"]


def test_nstlab_offline_never_downloads(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NSTLAB_OFFLINE", "1")

    def refuse(*args: object) -> None:
        raise AssertionError("downloaded although NSTLAB_OFFLINE is set")

    monkeypatch.setattr(adain, "_download", refuse)
    ref = make_reference(*pair, cache_dir=tmp_path / "refs")
    assert ref.maker == "magenta" and ref.info["auto"].endswith("; NSTLAB_OFFLINE is set: no download tried)")
    with pytest.raises(WeightsError, match="NSTLAB_OFFLINE is set: no download tried"):
        adain.ensure_weights(ReferenceOptions(), tmp_path)
    monkeypatch.setenv("NSTLAB_OFFLINE", "0")  # "0", "false", "no" and "" mean online
    with pytest.raises(AssertionError, match="downloaded although"):
        adain.ensure_weights(ReferenceOptions(), tmp_path)


def test_auto_finds_weights_in_default_cache_dir(weights_dir: Path, pair: tuple[Path, Path]) -> None:
    target = adain.default_weights_dir(cache.cache_root())
    target.mkdir(parents=True)
    for n in adain.ADAIN_FILES:
        (target / n).write_bytes((weights_dir / n).read_bytes())
    ref = make_reference(*pair, options=ReferenceOptions(content_size=32, style_size=32))
    assert ref.maker == "adain" and str(target) in ref.info["auto"]


def test_unknown_maker_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as err:
        make_reference("a.png", "b.png", "adian")
    msg = one_line(err.value)
    assert "Did you mean 'adain'?" in msg and "magenta" in msg and "folder" in msg


@pytest.mark.parametrize(
    "changes",
    [
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"alpha": float("nan")},
        {"alpha": True},
        {"content_size": 7},
        {"style_size": 4},
        {"content_size": 64.0},
        {"device": ""},
    ],
)
def test_bad_options_are_config_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        ReferenceOptions(**changes)
    one_line(err.value)


def test_missing_input_file_is_image_error(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    with pytest.raises(ImageError) as err:
        make_reference(tmp_path / "nope.jpg", pair[1], "magenta")
    assert "nope.jpg" in one_line(err.value)


def test_adain_explicit_without_weights_is_one_line_error(pair: tuple[Path, Path]) -> None:
    with pytest.raises(WeightsError) as err:
        make_reference(*pair, "adain")  # default dir empty, download impossible (file:// to nowhere)
    msg = one_line(err.value)
    assert "vgg_normalised.pth" in msg and "decoder.pth" in msg and "--reference magenta" in msg


def test_bad_device_is_typed_error(weights_dir: Path, pair: tuple[Path, Path]) -> None:
    opts = ReferenceOptions(content_size=32, style_size=32, adain_weights=weights_dir, device="tpu:x")
    with pytest.raises(NstlabError) as err:
        make_reference(*pair, "adain", options=opts)
    one_line(err.value)


# --- caching ---------------------------------------------------------------------------------------------


def test_second_call_comes_from_the_cache(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = magenta.render

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(magenta, "render", counting)
    refs = tmp_path / "refs"
    first = make_reference(*pair, "magenta", cache_dir=refs)
    assert first.info["cached"] is False and len(calls) == 1
    assert Path(first.info["cache_file"]).is_file()
    assert Path(first.info["cache_file"]).with_suffix(".json").is_file()

    second = make_reference(*pair, "magenta", cache_dir=refs)
    assert second.info["cached"] is True and len(calls) == 1  # the network did not run again
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert second.info["cache_key"] == first.info["cache_key"]
    assert second.info["weights"] == first.info["weights"]

    # An in-memory image with the same pixels has its own (pixel-hash) key, stable across calls.
    pil = Image.open(pair[0]).convert("RGB")
    make_reference(pil, pair[1], "magenta", cache_dir=refs)
    again = make_reference(pil.copy(), pair[1], "magenta", cache_dir=refs)
    assert again.info["cached"] is True and again.info["inputs"]["content"]["hash_of"] == "pixels"
    assert len(calls) == 2

    # An option that matters makes a new entry; use_cache=False always runs.
    other = make_reference(*pair, "magenta", cache_dir=refs, options=ReferenceOptions(alpha=0.5))
    assert other.info["cached"] is False and len(calls) == 3
    make_reference(*pair, "magenta", cache_dir=refs, use_cache=False)
    assert len(calls) == 4


def test_cache_default_location_follows_env_and_survives_damage(
    tmp_path: Path, weights_dir: Path, pair: tuple[Path, Path]
) -> None:
    opts = ReferenceOptions(content_size=32, style_size=32, adain_weights=weights_dir)
    first = make_reference(*pair, "adain", options=opts)
    png = Path(first.info["cache_file"])
    assert png.parent == tmp_path / "nstlab-cache" / "references" and png.name.startswith("adain-")
    assert make_reference(*pair, "adain", options=opts).info["cached"] is True
    png.write_bytes(b"damaged")
    redone = make_reference(*pair, "adain", options=opts)
    assert redone.info["cached"] is False
    assert np.array_equal(np.asarray(redone.image), np.asarray(first.image))
    stored = json.loads(png.with_suffix(".json").read_text())
    assert stored["maker"] == "adain" and "cached" not in stored


# --- Magenta ---------------------------------------------------------------------------------------------


def test_magenta_synthetic_pair(pair: tuple[Path, Path]) -> None:
    content = Image.open(pair[0]).convert("RGB")
    img, info = magenta.render(content, Image.open(pair[1]).convert("RGB"), ReferenceOptions())
    assert img.mode == "RGB" and img.size == content.size == (96, 72)  # small content keeps its size
    diff = np.abs(np.asarray(img, dtype=np.float32) - np.asarray(content, dtype=np.float32)).mean()
    assert diff > 5.0
    assert info["network_content_size"] == [384, 288]
    models = magenta.models_record()
    assert set(models) == {"arbitrary_predict.onnx", "arbitrary_transform.onnx"}
    assert all(rec["verified"] for rec in models.values())  # against the wheel's RECORD


def test_magenta_alpha_and_small_content(pair: tuple[Path, Path]) -> None:
    content, style = Image.open(pair[0]).convert("RGB"), Image.open(pair[1]).convert("RGB")
    full, _ = magenta.render(content, style, ReferenceOptions(alpha=1.0))
    none, _ = magenta.render(content, style, ReferenceOptions(alpha=0.0))
    assert not np.array_equal(np.asarray(full), np.asarray(none))
    with pytest.raises(ImageError) as err:
        magenta.render(content.resize((20, 20)), style, ReferenceOptions())
    one_line(err.value)


def test_magenta_shared_pair(shared_pairs: list[tuple[str, Path, Path]], tmp_path: Path) -> None:
    name, content_path, style_path = shared_pairs[0]
    ref = make_reference(content_path, style_path, "magenta", cache_dir=tmp_path / "refs", use_cache=False)
    content = Image.open(content_path).convert("RGB")
    assert ref.image.mode == "RGB"
    assert max(ref.image.size) == min(384, max(content.size)) and min(ref.image.size) >= 100
    expected = magenta.output_size(content.size)
    assert ref.image.size == expected
    again = make_reference(content_path, style_path, "magenta", use_cache=False)
    assert np.array_equal(np.asarray(ref.image), np.asarray(again.image))  # deterministic
    small = np.asarray(content.resize(ref.image.size, Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(ref.image, dtype=np.float32) - small).mean() > 10.0
    assert ref.info["label"].startswith("magenta") and ref.info["inputs"]["style"]["source"] == str(
        style_path
    )


# --- folder ----------------------------------------------------------------------------------------------


def test_folder_matches_pair_name_or_stems(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    refs = tmp_path / "precomputed"
    refs.mkdir()
    smooth(7, (64, 48)).save(refs / "pair-1.png")
    smooth(8, (40, 40)).save(refs / "content__style.JPG")
    opts = ReferenceOptions(reference_dir=refs)
    with pytest.raises(ImageError) as err:  # both patterns match: ambiguous, never a silent choice
        make_reference(*pair, "folder", options=opts, pair_name="pair-1")
    assert "ambiguous" in one_line(err.value)
    (refs / "content__style.JPG").rename(tmp_path / "content__style.JPG")
    by_name = make_reference(*pair, "folder", options=opts, pair_name="pair-1")
    assert by_name.maker == "folder" and by_name.image.size == (64, 48)
    assert by_name.info["settings"]["pattern"] == "{pair}" and by_name.info["pair"] == "pair-1"
    assert by_name.info["settings"]["sha256"] == file_sha256(refs / "pair-1.png")
    assert by_name.info["cached"] is False
    (refs / "pair-1.png").unlink()
    (tmp_path / "content__style.JPG").rename(refs / "content__style.JPG")
    by_stems = make_reference(*pair, "folder", options=opts, pair_name="pair-1")
    assert by_stems.image.size == (40, 40)
    assert by_stems.info["settings"]["pattern"] == "{content_stem}__{style_stem}"
    assert make_reference(*pair, "folder", options=opts).image.size == (40, 40)  # stems alone suffice


def test_folder_missing_and_ambiguous(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    refs = tmp_path / "precomputed"
    refs.mkdir()
    opts = ReferenceOptions(reference_dir=refs)
    with pytest.raises(ImageError) as err:
        make_reference(*pair, "folder", options=opts, pair_name="pair-9")
    msg = one_line(err.value)
    assert "pair-9.png" in msg and "content__style.jpg" in msg and str(refs) in msg

    smooth(1, (32, 32)).save(refs / "pair-9.png")
    smooth(1, (32, 32)).save(refs / "pair-9.jpg")
    with pytest.raises(ImageError) as err:
        make_reference(*pair, "folder", options=opts, pair_name="pair-9")
    assert "ambiguous" in one_line(err.value) and "pair-9.jpg" in str(err.value)

    with pytest.raises(ConfigError):  # no folder given
        make_reference(*pair, "folder", pair_name="pair-9")
    pil = Image.open(pair[0])
    with pytest.raises(ConfigError):  # nothing to match by
        make_reference(pil, pil, "folder", options=opts)
    with pytest.raises(ImageError):
        make_reference(*pair, "folder", options=ReferenceOptions(reference_dir=tmp_path / "absent"))


# --- alignment -------------------------------------------------------------------------------------------


def test_align_to_output() -> None:
    ref = smooth(5, (96, 64))
    out = align_to_output(ref, (91, 64))
    assert out.size == (91, 64) and out.mode == "RGB"
    assert align_to_output(ref.convert("L"), (10, 12)).mode == "RGB"
    bad_sizes: list[Any] = [(0, 10), (10,), "big", None]
    for bad in bad_sizes:
        with pytest.raises(ConfigError):
            align_to_output(ref, bad)
