"""``nstlab reference`` and ``nstlab evaluate`` end to end through ``nstlab.cli.main``, on the CPU, with the
offline Magenta maker."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tests.conftest import write_pair

import nstlab
from nstlab import metrics
from nstlab.cli import main
from nstlab.errors import WeightsError
from nstlab.reference import magenta

OFFLINE_VGG = (
    "VGG-19 ImageNet weights are not cached at /nowhere/vgg19-dcbb9e9d.pth and could not be downloaded "
    "(offline). Ways out: (1) connect to the internet; (2) pass --weights FILE; (3) pass --weights random."
)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(path: Path) -> Any:
    """Parse JSON that must be standard: NaN / Infinity tokens are an error."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds the non-standard JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real cache, and the judge behaves as offline (no torchvision VGG-19 weights) unless random."""
    monkeypatch.setenv("NSTLAB_CACHE", str(tmp_path / "nstlab-cache"))
    real = metrics.make_judge

    def offline_judge(weights: str = "torchvision") -> metrics.Judge:
        if weights == "random":
            return real(weights)
        raise WeightsError(OFFLINE_VGG)

    monkeypatch.setattr(metrics, "make_judge", offline_judge)


@pytest.fixture(scope="module")
def stylized_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("stylized")
    pair = write_pair(folder)
    out = folder / "result.png"
    nstlab.stylize(*pair, weights="random", size=64, iterations=2, device="cpu").save(out)
    return out, pair


@pytest.fixture
def stylized(stylized_once: tuple[Path, tuple[Path, Path]], pair: tuple[Path, Path], tmp_path: Path) -> Path:
    """A real (tiny, random-weight) nstlab output with its run record beside it, in this test's folder.

    Its record names the content/style of the fixture ``pair`` (same pixels as the module's pair).
    """
    made, _ = stylized_once
    out = tmp_path / "out" / "result.png"
    out.parent.mkdir()
    shutil.copyfile(made, out)
    record = json.loads(made.with_suffix(".json").read_text())
    record["output"] = str(out)
    record["inputs"]["content"]["source"] = str(pair[0])
    record["inputs"]["style"]["source"] = str(pair[1])
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return out


# --- nstlab reference ----------------------------------------------------------------------------------


def test_reference_magenta_writes_image_and_record(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = tmp_path / "refs" / "ref.png"
    code, out, err = run_cli(["reference", *map(str, pair), "-o", str(ref), "--maker", "magenta"], capsys)
    assert code == 0, err
    assert out.count("\n") == 1 and out.startswith(f"saved {ref} (magenta, 96×72)")
    assert "reference maker: magenta (requested)" in err
    with Image.open(ref) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (96, 72)
    record = strict_json(ref.with_suffix(".json"))
    assert record["maker"] == "magenta" and record["requested"] == "magenta" and record["image"] == str(ref)
    assert record["label"].startswith("magenta (Ghiasi et al. 2017")
    assert record["inputs"]["content"]["source"] == str(pair[0])
    assert record["cached"] is False and record["cache_file"]
    assert "auto" not in record
    assert sorted(p.name for p in ref.parent.iterdir()) == ["ref.json", "ref.png"]  # no temp files

    # Run again: the same pixels, now from the cache, and the record says so.
    code, out, err = run_cli(["reference", *map(str, pair), "-o", str(ref), "--maker", "magenta"], capsys)
    assert code == 0 and "cached" in out and "from the cache" in err
    assert strict_json(ref.with_suffix(".json"))["cached"] is True


def test_reference_auto_without_adain_weights_picks_magenta_and_says_why(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = tmp_path / "ref.png"
    code, _, err = run_cli(["reference", *map(str, pair), "-o", str(ref)], capsys)  # --maker auto
    assert code == 0, err
    record = strict_json(ref.with_suffix(".json"))
    assert record["maker"] == "magenta" and record["requested"] == "auto"
    where = tmp_path / "nstlab-cache" / "weights" / "adain"
    why = (
        f"auto → magenta (AdaIN weights not found at {where}: missing vgg_normalised.pth, decoder.pth; "
        "NSTLAB_OFFLINE is set: no download tried)"  # the suite runs offline (conftest)
    )
    assert record["auto"] == why
    assert why in err  # never "auto" silently


# --- nstlab evaluate -----------------------------------------------------------------------------------


def test_evaluate_identical_images_psnr_inf_as_null(
    stylized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = tmp_path / "copy.png"
    shutil.copyfile(stylized, same)  # an image file without a record
    report = tmp_path / "eval" / "identical.json"
    code, out, err = run_cli(["evaluate", str(stylized), str(same), "--json", str(report)], capsys)
    assert code == 0, err
    data = strict_json(report)
    m = data["metrics"]
    assert m["psnr"] is None and data["psnr_infinite"] is True
    assert m["mse"] == 0.0 and m["rmse"] == 0.0 and m["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert "PSNR (dB) ↑" in out and "inf" in out.split("PSNR (dB) ↑")[1].splitlines()[0]
    ref = data["reference"]
    assert ref["kind"] == "file" and ref["path"] == str(same) and ref["aligned_from"] is None
    assert ref["size"] == ref["aligned_to"] == [64, 48] and ref["cached"] is None
    assert data["convention"] == "standard" and data["report_compat"] is False
    assert data["output"] == {
        "path": str(stylized),
        "sha256": data["output"]["sha256"],
        "size": [64, 48],
        "record": str(stylized.with_suffix(".json")),
        "random_weights": True,
    }
    assert {"nstlab", "torch", "python"} <= set(data["versions"])
    assert data["sizes"]["output"] == [64, 48]
    # The record's inputs were found, but the (offline) judge has no weights: skipped with one notice.
    assert data["inputs"]["content"]["from"] == "record" and data["judge"] is None
    assert data["distances_skipped"] and "content_distance" not in m
    assert sum("skipping content/style distances" in line for line in err.splitlines()) == 1


def test_evaluate_with_maker_uses_record_inputs_and_cache(
    stylized: Path,
    pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real_render = magenta.render

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(magenta, "render", counting)
    first, second = tmp_path / "e1.json", tmp_path / "e2.json"
    code, out1, err1 = run_cli(["evaluate", str(stylized), "magenta", "--json", str(first)], capsys)
    assert code == 0, err1
    code, out2, err2 = run_cli(["evaluate", str(stylized), "magenta", "--json", str(second)], capsys)
    assert code == 0, err2
    assert len(calls) == 1  # the second evaluation did not run the network
    a, b = strict_json(first), strict_json(second)
    assert a["reference"]["cached"] is False and b["reference"]["cached"] is True
    assert "computed and cached" in err1 and "from the cache" in err2 and "cached reference" in out2
    assert a["metrics"] == b["metrics"]
    ref = b["reference"]
    assert ref["kind"] == "maker" and ref["maker"] == "magenta" and ref["requested"] == "magenta"
    assert ref["info"]["inputs"]["content"]["source"] == str(pair[0])  # made from the record's inputs
    assert ref["size"] == [96, 72] and ref["aligned_from"] == [96, 72] and ref["aligned_to"] == [64, 48]
    assert "resized from 96×72 to the output's 64×48" in err2
    assert b["inputs"]["style"]["path"] == str(pair[1]) and b["inputs"]["style"]["from"] == "record"
    m = b["metrics"]
    assert 0 < m["rmse"] < 1 and m["psnr"] > 0 and b["psnr_infinite"] is False and -1 < m["ssim"] < 1
    assert "RANDOM weights" in err2  # the output's record says it was made with random weights


def test_evaluate_random_judge_marks_output(
    stylized: Path, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = tmp_path / "ref.png"
    assert run_cli(["reference", *map(str, pair), "-o", str(ref), "--maker", "magenta"], capsys)[0] == 0
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(stylized), str(ref), "--content", str(pair[0]), "--style", str(pair[1])]
    code, out, err = run_cli([*argv, "--judge-weights", "random", "--json", str(report)], capsys)
    assert code == 0, err
    data = strict_json(report)
    assert data["judge_random_weights"] is True and data["judge"]["weights"]["source"] == "random"
    assert "judge has RANDOM weights" in err and "judge has random weights" in out
    m = data["metrics"]
    assert math.isfinite(m["content_distance"]) and m["content_distance"] >= 0
    assert math.isfinite(m["style_distance"]) and m["style_distance"] >= 0
    assert data["inputs"]["content"]["from"] == "option" and data["inputs"]["content"]["resized_to"] == [
        64,
        48,
    ]
    # The reference file's own record (written by `nstlab reference`) is picked up.
    assert data["reference"]["maker"] == "magenta" and data["reference"]["info"]["requested"] == "magenta"
    assert data["reference"]["aligned_from"] == [96, 72]


def test_report_compat_convention(stylized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = tmp_path / "other.png"
    Image.open(stylized).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(ref)
    rows = {}
    for convention in ("standard", "report-compat"):
        report = tmp_path / f"{convention}.json"
        argv = ["evaluate", str(stylized), str(ref), "--convention", convention, "--json", str(report)]
        code, out, err = run_cli(argv, capsys)
        assert code == 0, err
        rows[convention] = strict_json(report)
    std, compat = rows["standard"]["metrics"], rows["report-compat"]["metrics"]
    mse = std["mse"]
    assert 0 < mse < 1 and compat["mse"] == mse and compat["ssim"] == std["ssim"]
    assert std["rmse"] == pytest.approx(math.sqrt(mse)) and compat["rmse"] == pytest.approx(
        mse
    )  # "RMSE" = MSE
    assert std["psnr"] == pytest.approx(10 * math.log10(1 / mse))
    assert compat["psnr"] == pytest.approx(20 * math.log10(1 / mse)) == pytest.approx(2 * std["psnr"])
    assert (
        rows["report-compat"]["report_compat"] is True
        and rows["report-compat"]["convention"] == "report-compat"
    )
    assert "report-compat" in out  # format_table's note


def test_shared_pair_against_magenta(
    shared_pairs: list[tuple[str, Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, content, style = shared_pairs[0]
    out = tmp_path / f"{name}.png"
    nstlab.stylize(content, style, weights="random", size=128, iterations=3, device="cpu").save(out)
    report = tmp_path / f"{name}-eval.json"
    argv = ["evaluate", str(out), "magenta", "--judge-weights", "random", "--json", str(report)]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    data = strict_json(report)
    m = data["metrics"]
    assert all(math.isfinite(v) for v in m.values())
    assert 0 < m["ssim"] < 1 and 0 < m["rmse"] < 1 and 0 < m["psnr"] < 60 and m["mse"] > 0
    assert m["content_distance"] >= 0 and m["style_distance"] >= 0
    assert data["reference"]["maker"] == "magenta"
    assert data["reference"]["aligned_to"] == data["sizes"]["output"] == list(Image.open(out).size)
    assert data["reference"]["info"]["inputs"]["content"]["source"] == str(content)


# --- errors: exit 2, one line, nothing written ---------------------------------------------------------


def _assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nstlab: error: "), err
    assert out == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _error_cases(tmp: Path, out: Path, pair: tuple[Path, Path]) -> dict[str, tuple[list[str], list[str]]]:
    rgb = Image.open(out).convert("RGB")
    rgb.convert("RGBA").save(tmp / "rgba.png")
    rgb.convert("L").save(tmp / "grey.png")
    rgb.save(tmp / "plain.png")
    (tmp / "text.png").write_text("not an image\n")
    bare = tmp / "bare.png"
    rgb.save(bare)  # no run record beside it
    o, c = str(out), str(pair[0])
    return {
        "missing output": (["evaluate", str(tmp / "nope.png"), "magenta"], ["image not found", "nope.png"]),
        "missing reference": (["evaluate", o, str(tmp / "nope.png")], ["image not found", "nope.png"]),
        "not an image": (["evaluate", o, str(tmp / "text.png")], ["not an image"]),
        "alpha channel": (["evaluate", o, str(tmp / "rgba.png")], ["3 channels", "4", "RGBA"]),
        "grey reference": (["evaluate", o, str(tmp / "grey.png")], ["3 channels", "has 1", "mode L"]),
        "unknown maker": (["evaluate", o, "magneta"], ["unknown reference maker", "Did you mean 'magenta'?"]),
        "unknown convention": (
            ["evaluate", o, str(tmp / "plain.png"), "--convention", "report"],
            ["standard, report-compat", "Did you mean 'report-compat'?"],
        ),
        "no record for maker": (["evaluate", str(bare), "magenta"], ["bare.json", "--content and --style"]),
        "explicit content, no judge": (
            ["evaluate", o, str(tmp / "plain.png"), "--content", c],
            ["judge", "VGG-19", "--judge-weights FILE"],
        ),
        "lpips weights": (
            ["evaluate", o, str(tmp / "plain.png"), "--lpips", "alex"],
            ["LPIPS (alex)", "missing"],
        ),
        "unknown lpips": (["evaluate", o, str(tmp / "plain.png"), "--lpips", "squeeze"], ["alex, vgg"]),
        "maker option with a file": (["evaluate", o, str(tmp / "plain.png"), "--alpha", "0.5"], ["--alpha"]),
        "json over the run record": (
            ["evaluate", o, str(tmp / "plain.png"), "--json", str(out.with_suffix(".json"))],
            ["run record"],
        ),
        "bad alpha": (["evaluate", o, "magenta", "--alpha", "2"], ["alpha", "[0, 1]"]),
    }


ERROR_IDS = [
    "missing output",
    "missing reference",
    "not an image",
    "alpha channel",
    "grey reference",
    "unknown maker",
    "unknown convention",
    "no record for maker",
    "explicit content, no judge",
    "lpips weights",
    "unknown lpips",
    "maker option with a file",
    "json over the run record",
    "bad alpha",
]


@pytest.mark.parametrize("case", ERROR_IDS)
def test_evaluate_errors(
    case: str,
    stylized: Path,
    pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "lpips_weights_path", lambda net="alex": tmp_path / f"no-{net}.pth")
    folder = tmp_path / "cases"
    folder.mkdir()
    argv, needles = _error_cases(folder, stylized, pair)[case]
    record = stylized.with_suffix(".json")
    before = record.read_bytes()
    report = tmp_path / "should-not-exist.json"
    if "--json" not in argv:
        argv = [*argv, "--json", str(report)]
    code, out, err = run_cli(argv, capsys)
    _assert_one_line_error(code, out, err, *needles)
    assert not report.exists() and record.read_bytes() == before
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--maker", "adian"], ["unknown reference maker", "Did you mean 'adain'?"]),
        (["--maker", "folder", "--reference-dir", "{tmp}/empty"], ["reference folder not found"]),
        (["--content-size", "8"], ["content_size", "at least 16"]),
    ],
)
def test_reference_errors(
    extra: list[str],
    needles: list[str],
    pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = tmp_path / "refs" / "ref.png"
    argv = ["reference", *map(str, pair), "-o", str(ref), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    code, out, err = run_cli(argv, capsys)
    _assert_one_line_error(code, out, err, *needles)
    assert not ref.exists() and not ref.with_suffix(".json").exists()


def test_reference_bad_output_and_missing_input(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["reference", *map(str, pair), "-o", str(tmp_path / "ref.gif")], capsys)
    _assert_one_line_error(code, out, err, "unsupported extension")
    code, out, err = run_cli(["reference", *map(str, pair), "-o", str(pair[0])], capsys)
    _assert_one_line_error(code, out, err, "is the content image")
    missing = tmp_path / "missing.jpg"
    code, out, err = run_cli(["reference", str(missing), str(pair[1]), "-o", str(tmp_path / "r.png")], capsys)
    _assert_one_line_error(code, out, err, "image not found", "missing.jpg")
    assert not (tmp_path / "ref.gif").exists() and not (tmp_path / "r.png").exists()
    assert not list(tmp_path.glob("*.json"))


def test_a_record_of_another_image_is_not_used(
    stylized: Path, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # out.webp beside out.png's record: out.json describes out.png, not out.webp.
    other = stylized.with_suffix(".webp")
    Image.open(stylized).save(other, lossless=True)
    code, out, err = run_cli(["evaluate", str(other), "magenta"], capsys)
    _assert_one_line_error(code, out, err, "is the record of result.png, not of result.webp", "--content")
    code, out, err = run_cli(["evaluate", str(stylized), "magenta"], capsys)  # its own record: used
    assert code == 0, err
    # `nstlab reference -o out.jpg` would replace the record of out.png: refused, nothing written.
    ref = stylized.with_suffix(".jpg")
    code, out, err = run_cli(["reference", *map(str, pair), "-o", str(ref), "--maker", "magenta"], capsys)
    _assert_one_line_error(code, out, err, "is the record of", "result.png")
    assert not ref.exists() and json.loads(stylized.with_suffix(".json").read_text())["output"] == str(
        stylized
    )


def test_evaluate_warns_when_an_image_of_another_shape_is_stretched(
    stylized: Path, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_img = Image.open(stylized).convert("RGB")  # 64×48
    same_shape, square = tmp_path / "ref_96x72.png", tmp_path / "ref_64x64.png"
    out_img.resize((96, 72)).save(same_shape)
    out_img.resize((64, 64)).save(square)
    code, _, err = run_cli(["evaluate", str(stylized), str(same_shape)], capsys)
    assert code == 0, err
    assert "resized from 96×72" in err and "stretched" not in err  # same aspect ratio: only resized
    code, _, err = run_cli(["evaluate", str(stylized), str(square)], capsys)
    assert code == 0, err
    assert f"the reference {square} (64×64) has another aspect ratio than the output (64×48, -25%)" in err
    # A --content of another shape (the wrong file?) for the content distance: the same warning.
    argv = ["evaluate", str(stylized), str(same_shape), "--content", str(square), "--judge-weights", "random"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"the content image {square} (64×64) has another aspect ratio" in err and "stretched" in err
