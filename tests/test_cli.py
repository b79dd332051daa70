"""The command line, end to end: outputs and records, bad input (exit 2, one line, no file), Ctrl-C, demo."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from nstlab.cli import main

TINY = ["--size", "64", "--iterations", "4", "--weights", "random", "--device", "cpu", "--quiet"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_stylize_writes_image_and_record(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "result.png"
    code, _, err = run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY], capsys)
    assert code == 0, err
    assert "RANDOM WEIGHTS" in err
    with Image.open(out) as img:
        assert img.size == (64, 48) and img.mode == "RGB" and img.format == "PNG"
        assert "RANDOM WEIGHTS" in img.text["nstlab:warning"]
    record = json.loads(out.with_suffix(".json").read_text())
    # Item 7 of the engine issue: resolved config, seed, device, versions, weights, trace, time, memory.
    assert record["config"]["extractor"] == "resnet18" and record["config"]["lr"] == 1.0
    assert record["config"]["content_layers"] == ["layer1"]
    assert record["seed"] == 0 and record["device"] == "cpu"
    assert {"torch", "torchvision", "nstlab", "python", "pillow", "numpy"} <= set(record["versions"])
    assert record["weights"]["source"] == "random" and record["weights"]["random"] is True
    assert record["random_weights"] is True and "RANDOM WEIGHTS" in record["warning"]
    assert len(record["trace"]) == 4
    assert set(record["trace"][0]) == {"content", "style", "tv", "range", "total"}
    run = record["run"]
    assert run["evaluations"] == 4 and run["optimizer_steps"] >= 1 and run["wall_time_s"] > 0
    assert run["peak_memory_bytes"] > 0 and run["stop_reason"] == "budget"
    assert record["inputs"]["content"]["sha256"] and record["inputs"]["content"]["used_size"] == [64, 48]
    assert record["output"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json", "result.png"]  # no temp files


def test_every_option(pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.png"
    args = [
        "stylize",
        str(pair[0]),
        str(pair[1]),
        "-o",
        str(out),
        "--extractor",
        "vgg19",
        "--optimizer",
        "adam",
        "--iterations",
        "3",
        "--init",
        "noise",
        "--losses",
        "content,style",
        "--size",
        "64",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--weights",
        "random",
        "--lr",
        "0.05",
        "--style-layers",
        "relu1_1,relu2_1",
        "--style-layer-weights",
        "0.5,2",
        "--content-layers",
        "relu3_1",
        "--content-weight",
        "2",
        "--style-weight",
        "1e5",
        "--tv-weight",
        "0",
        "--checkpoint",
        "on",
        "--lbfgs-history",
        "7",
        "--lbfgs-impl",
        "torch",
        "--no-compile",
        "--deterministic",
        "--quiet",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    cfg = json.loads(out.with_suffix(".json").read_text())["config"]
    assert cfg == {
        "extractor": "vgg19",
        "content_layers": ["relu3_1"],
        "style_layers": ["relu1_1", "relu2_1"],
        "style_layer_weights": [0.5, 2.0],
        "weights": "random",
        "optimizer": "adam",
        "lr": 0.05,
        "iterations": 3,
        "init": "noise",
        "losses": ["content", "style"],
        "content_weight": 2.0,
        "style_weight": 1e5,
        "tv_weight": 0.0,
        "size": 64,
        "seed": 3,
        "device": "cpu",
        "precision": "auto",
        "scales": [1.0],
        "scale_iterations": [],
        "checkpoint": "on",
        "lbfgs_history": 7,
        "lbfgs_impl": "torch",
        "compile": False,
        "deterministic": True,
    }
    run = json.loads(out.with_suffix(".json").read_text())["run"]
    assert run["checkpoint"] is True  # and on the CPU no cuDNN flags are recorded
    assert "cudnn_benchmark" not in run


def test_save_every(pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.png"
    code, _, err = run_cli(
        ["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, "--save-every", "2"], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r_steps").iterdir()) == ["00002.png", "00004.png"]
    # A rerun to the same output replaces the earlier run's step images (and only those).
    (tmp_path / "r_steps" / "notes.txt").write_text("mine")
    code, _, err = run_cli(
        ["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, "--save-every", "3"], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r_steps").iterdir()) == ["00003.png", "notes.txt"]


def _png_header_only(path: Path, width: int, height: int) -> None:
    # A valid PNG signature + IHDR claiming a huge size: what a decompression bomb looks like up front.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "a_dir").mkdir()
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "text.png").write_text("hello, not an image")
    data = good.read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    _png_header_only(tmp / "bomb.png", 20000, 20000)
    return {
        "missing": (tmp / "nope.png", "nope.png"),
        "directory": (tmp / "a_dir", "directory"),
        "zero-byte": (tmp / "empty.png", "empty"),
        "not an image": (tmp / "text.png", "text.png"),
        "truncated": (tmp / "truncated.png", "truncated"),
        "bomb": (tmp / "bomb.png", "pixels"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "zero-byte", "not an image", "truncated", "bomb"])
@pytest.mark.parametrize("which", ["content", "style"])
def test_bad_input_images(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, which: str
) -> None:
    (tmp_path / "in").mkdir()
    path, hint = _bad_inputs(tmp_path / "in", pair[0])[case]
    out = tmp_path / "out" / "o.png"
    images = [str(path), str(pair[1])] if which == "content" else [str(pair[0]), str(path)]
    code, _, err = run_cli(["stylize", *images, "-o", str(out), *TINY], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("nstlab: WARNING")]
    assert len(lines) == 1 and lines[0].startswith("nstlab: error:"), err
    assert hint.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_image_smaller_than_extractor_allows(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 9), "red").save(small)  # --size 64 makes it 64x14: below VGG-19's 16 px
    out = tmp_path / "o.png"
    code, _, err = run_cli(
        ["stylize", str(small), str(pair[1]), "-o", str(out), *TINY, "--extractor", "vgg19"], capsys
    )
    assert code == 2 and "at least 16 px" in err and "relu5_1" in err
    assert not out.exists()
    code, _, err = run_cli(
        ["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, "--size", "8"], capsys
    )
    assert code == 2 and "at least 16 px" in err and not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--optimizer", "sgd"], "invalid choice"),
        (["--iterations", "0"], "iterations must be an integer >= 1"),
        (["--losses", "content,stlye"], "Did you mean 'style'"),
        (["--style-layers", "relu1_1"], "unknown layer for resnet18 'relu1_1'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--weights", "/no/such/weights.pth"], "does not exist"),
        (["--save-every", "-1"], "--save-every must be >= 0"),
    ],
)
def test_bad_options(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    if "cuda" in extra:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "o.png"
    code, _, err = run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, *extra], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("name", "needle"), [("o.gif", "unsupported extension"), ("adir", "is a directory")])
def test_bad_output_paths(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, needle: str
) -> None:
    (tmp_path / "adir").mkdir()
    code, _, err = run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(tmp_path / name), *TINY], capsys)
    assert code == 2 and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "content.png", "style.png"]


@pytest.mark.parametrize("target", ["content", "style", "content record"])
def test_output_never_overwrites_an_input(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    import nstlab
    from nstlab.errors import ImageError

    before = {p: p.read_bytes() for p in pair}
    # The output itself, or its JSON record (same stem), would land on an input file.
    out = {"content": pair[0], "style": pair[1], "content record": pair[0].with_suffix(".jpg")}[target]
    if target == "content record":
        renamed = pair[0].with_suffix(".json")  # an input whose name the record would take
        pair[0].rename(renamed)
        pair = (renamed, pair[1])
        before = {p: p.read_bytes() for p in pair}
    code, _, err = run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY], capsys)
    assert code == 2 and "would overwrite the input" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in pair} == before
    # The API's Result.save refuses the same.
    result = nstlab.stylize(*pair, size=32, iterations=1, weights="random", device="cpu")
    with pytest.raises(ImageError, match="would overwrite the input"):
        result.save(out)
    assert {p: p.read_bytes() for p in pair} == before


def test_outputs_that_share_a_record_name_are_refused(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import nstlab
    from nstlab.errors import ImageError

    png, jpg = tmp_path / "out.png", tmp_path / "out.jpg"
    assert run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(png), *TINY], capsys)[0] == 0
    record = png.with_suffix(".json").read_bytes()
    # out.jpg's record would be out.json too, and replace the one that says how out.png was made.
    code, _, err = run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(jpg), *TINY], capsys)
    assert code == 2 and "is the record of" in err and "out_jpg.jpg" in err and err.count("\n") == 1
    assert not jpg.exists() and png.with_suffix(".json").read_bytes() == record
    result = nstlab.stylize(*pair, size=32, iterations=1, weights="random", device="cpu")
    with pytest.raises(ImageError, match="is the record of"):
        result.save(jpg)
    assert not jpg.exists() and png.with_suffix(".json").read_bytes() == record
    assert result.save(jpg, record=False) == jpg  # no record written, nothing to collide
    jpg.unlink()
    # Rewriting the same output is a rerun, not a collision; once out.png is gone its record is free.
    assert run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(png), *TINY], capsys)[0] == 0
    png.unlink()
    assert run_cli(["stylize", str(pair[0]), str(pair[1]), "-o", str(jpg), *TINY], capsys)[0] == 0
    assert json.loads(jpg.with_suffix(".json").read_text())["output"] == str(jpg)


def test_api_save_without_extension_and_into_a_directory(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import nstlab
    from nstlab.errors import ImageError

    result = nstlab.stylize(*pair, size=32, iterations=1, weights="random", device="cpu")
    written = result.save(tmp_path / "plain")  # no extension: PNG, and the return value says where
    assert written == tmp_path / "plain.png" and written.is_file()
    assert json.loads((tmp_path / "plain.json").read_text())["output"] == str(written)
    (tmp_path / "adir").mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        result.save(tmp_path / "adir")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adir",
        "content.png",
        "plain.json",
        "plain.png",
        "style.png",
    ]


def test_non_finite_loss_exit_code(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.png"
    code, _, err = run_cli(
        ["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, "--style-weight", "1e300"], capsys
    )
    assert code == 1 and "non-finite at iteration 1" in err
    assert not out.exists()  # no finite evaluation: nothing worth keeping


def test_demo_falls_back_to_random_weights_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: no pretrained weights here

    from urllib.error import URLError

    import torch.hub

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "demo.png"
    code, _, err = run_cli(["demo", "-o", str(out), "--iterations", "3", "--quiet"], capsys)
    assert code == 0, err
    assert "FALLING BACK to --weights random" in err
    assert json.loads(out.with_suffix(".json").read_text())["weights"]["random"] is True


def _default_sigint() -> None:
    # A suite started as a background job (`cmd &` without job control) hands its children SIGINT ignored,
    # and Python then keeps ignoring Ctrl-C; the child must see a terminal user's Ctrl-C either way.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "nstlab.cli", *args], env=env, preexec_fn=_default_sigint, **kwargs
    )


def test_ctrl_c_saves_image_and_record(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    args = [
        "stylize",
        str(pair[0]),
        str(pair[1]),
        "-o",
        str(out),
        "--size",
        "64",
        "--iterations",
        "100000",
        "--weights",
        "random",
        "--device",
        "cpu",
        "--save-every",
        "1",
    ]
    proc = _spawn(args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "o_steps").is_dir() or not any((tmp_path / "o_steps").iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 100000-iteration run behind
    assert proc.returncode == 130, err.decode()
    assert b"interrupted after" in err and b"Traceback" not in err
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["run"]["stop_reason"] == "interrupted" and record["run"]["evaluations"] >= 1
    with Image.open(out) as img:
        assert img.size == (64, 48)


def test_progress_bar_on_a_terminal_only(pair: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["stylize", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "a.png"), *TINY[:-1]]
    # Not a TTY: no bar.
    proc = _spawn(args, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"it/s" not in err and b"4/4" not in err
    # A TTY: a bar with the losses.
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a 160-column terminal
    proc = _spawn([*args[:4], str(tmp_path / "b.png"), *args[5:]], stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "4/4" in text and "total=" in text


def test_estimate_prints_and_writes_nothing(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.png"
    code, stdout, err = run_cli(
        ["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, "--estimate"], capsys
    )
    assert code == 0, err
    assert stdout.startswith("estimate: peak memory") and "s per iteration" in stdout
    assert not out.exists()


def test_preset_fills_unset_options(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.png"
    args = [
        "stylize",
        str(pair[0]),
        str(pair[1]),
        "-o",
        str(out),
        "--preset",
        "coarse-to-fine",
        "--scale-iterations",
        "2,2",
        "--size",
        "128",
        "--iterations",
        "3",
        "--weights",
        "random",
        "--quiet",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    cfg = json.loads(out.with_suffix(".json").read_text())["config"]
    assert cfg["scales"] == [0.25, 0.5, 1.0] and cfg["scale_iterations"] == [2, 2] and cfg["iterations"] == 3


def test_optimizer_state_that_cannot_fit_is_refused(
    pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nstlab import api

    monkeypatch.setattr(api, "total_bytes", lambda device: 2**20)  # a 1 MiB machine
    out = tmp_path / "big.png"
    code, _, err = run_cli(
        ["stylize", str(pair[0]), str(pair[1]), "-o", str(out), *TINY, "--iterations", "500"], capsys
    )
    assert code == 2 and not out.exists()
    lines = [line for line in err.splitlines() if line.startswith("nstlab: error:")]
    assert len(lines) == 1 and "--lbfgs-history" in lines[0] and "Traceback" not in err


def test_a_closed_pipe_ends_quietly() -> None:
    # `nstlab layers vgg19 | head -0`: the reader is gone before nstlab writes; no traceback, exit 141.
    proc = _spawn(["layers", "vgg19"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
