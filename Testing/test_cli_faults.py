"""Bad inputs and faults through the command line, as a user meets them (issue 14).

Every case drives `main(argv)` and checks the exit-code rule (2: bad input or usage, nothing
done; 1: a runtime failure or some cases of a batch failed; 0: success), one error line on
stderr without a traceback, no output left behind, and the JSON "error" event under
`--progress json`. A few run the installed command in a subprocess, exactly as a user does.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA
from EmphysemaUADLib.cli import build_parser, main
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.volume_io import Geometry, write_volume

ROOT = Path(__file__).resolve().parents[1]
MR = SHARED_DATA / "totalsegmentator-example" / "example_mr_sm.nii.gz"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny inputs, each bad in one way, and one good CT."""
    d = tmp_path_factory.mktemp("inputs")
    good = make_phantom(seed=1, shape=(12, 64, 64), spacing=(10.0, 5.6, 5.6))
    write_volume(good.ct.array, good.ct.geometry, d / "good.nii.gz")
    g = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (d / "empty.nii.gz").write_bytes(b"")
    data = (d / "good.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 3), np.uint8), isVector=True),
                    str(d / "picture.png"))
    (d / "notes.nii.gz").write_text("not an image")
    write_volume(np.full((4, 16, 16), 40, np.int16), g, d / "constant.nii.gz")
    nan = np.full((4, 16, 16), -1000.0, np.float32)
    nan[1, 2, 3] = np.nan
    write_volume(nan, g, d / "nan.nii.gz")
    write_volume(np.random.default_rng(0).integers(0, 4095, (6, 24, 24)).astype(np.int16), g,
                 d / "raw.nii.gz")
    body = np.full((6, 32, 32), -1000, np.int16)
    body[:, 4:28, 4:28] = 40  # soft tissue in air: CT in HU, but no lung
    write_volume(body, g, d / "nolung.nii.gz")
    (d / "empty_folder").mkdir()
    (d / "a_file").write_text("x")
    (d / "model_folder").mkdir()
    (d / "not_a_model.pt").write_text("not a checkpoint")
    # a lobe map on a grid far from the CT: it covers none of its lungs
    far = Geometry((5.6, 5.6, 10.0), (900.0, 900.0, 900.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(np.full(good.ct.shape, 12, np.uint8), far, d / "far_lobes.nii.gz")
    # a DICOM series with its fourth slice missing
    from test_volume_io import ct_like, write_dicom_series
    write_dicom_series(d / "gap", ct_like(shape=(8, 40, 48)))
    next(p for p in sorted((d / "gap").iterdir()) if p.name.endswith("-003.dcm")).unlink()
    return d


def _detect(*inputs, extra=()):
    return lambda d, out: ["detect", *[str(d / i) for i in inputs], "-o", str(out),
                           "--device", "cpu", *extra]


def _lungs(name):
    return lambda d, out: ["lungs", str(d / name), "-o", str(out / "lungs.nii.gz")]


# (id, argv(data folder, output), expected code, words the error line holds)
BAD_INPUT = [
    ("detect-missing", _detect("missing.nii.gz"), 2, "no such file"),
    ("detect-empty-file", _detect("empty.nii.gz"), 2, "empty (0 bytes)"),
    ("detect-truncated", _detect("truncated.nii.gz"), 2, "truncated"),
    ("detect-png", _detect("picture.png"), 2, "components"),
    ("detect-text-as-nifti", _detect("notes.nii.gz"), 2, "not a supported"),
    ("detect-constant", _detect("constant.nii.gz"), 2, "same value"),
    ("detect-nan", _detect("nan.nii.gz"), 2, "NaN"),
    ("detect-raw-values", _detect("raw.nii.gz"), 2, "Hounsfield"),
    ("detect-no-lung", _detect("nolung.nii.gz"), 2, "no lung"),
    ("detect-empty-folder", _detect("empty_folder"), 2, "holds no CT"),
    ("detect-dicom-gap", _detect("gap"), 2, "slice missing"),
    ("detect-model-folder", _detect("good.nii.gz", extra=["--model", "{d}/model_folder"]), 2,
     "best.pt"),
    ("detect-model-missing", _detect("good.nii.gz", extra=["--model", "{d}/none.pt"]), 2,
     "not found"),
    ("detect-model-not-checkpoint",
     _detect("good.nii.gz", extra=["--model", "{d}/not_a_model.pt"]), 2, "not an"),
    ("detect-threshold", _detect("good.nii.gz", extra=["--threshold", "1.5"]), 2,
     "--threshold"),
    ("detect-batch-size", _detect("good.nii.gz", extra=["--batch-size", "0"]), 2,
     "--batch-size"),
    ("detect-staging-missing", _detect("good.nii.gz", extra=["--staging", "{d}/none.json"]),
     2, "none.json"),
    ("detect-lobes-two-cases",
     _detect("good.nii.gz", "raw.nii.gz", extra=["--lobes", "{d}/far_lobes.nii.gz"]), 2,
     "one case"),
    ("detect-lobes-wrong-grid", _detect("good.nii.gz", extra=["--lobes",
                                                               "{d}/far_lobes.nii.gz"]),
     2, "origin (900"),
    ("detect-output-is-file", lambda d, out: ["detect", str(d / "good.nii.gz"), "-o",
                                              str(d / "a_file")], 2, "is a file"),
    ("detect-output-in-proc", lambda d, out: ["detect", str(d / "good.nii.gz"), "-o",
                                              "/proc/emphysema-uad-out"], 2, "cannot write"),
    ("detect-output-under-file", lambda d, out: ["detect", str(d / "good.nii.gz"), "-o",
                                                 str(d / "a_file" / "sub")], 2, "is a file"),
    ("lungs-missing", _lungs("missing.nii.gz"), 2, "no such file"),
    ("lungs-empty-file", _lungs("empty.nii.gz"), 2, "empty (0 bytes)"),
    ("lungs-png", _lungs("picture.png"), 2, "components"),
    ("lungs-raw-values", _lungs("raw.nii.gz"), 2, "Hounsfield"),
    ("lungs-no-lung", _lungs("nolung.nii.gz"), 2, "no lung"),
    ("lungs-empty-folder", _lungs("empty_folder"), 2, "DICOM"),
    ("lungs-output-in-proc", lambda d, out: ["lungs", str(d / "good.nii.gz"), "-o",
                                             "/proc/x/lungs.nii.gz"], 2, "cannot write"),
    ("lungs-output-is-folder", lambda d, out: ["lungs", str(d / "good.nii.gz"), "-o",
                                               str(d / "empty_folder")], 2, "is a folder"),
    ("phantom-output-in-proc", lambda d, out: ["phantom", "-o", "/proc/x/ct.nii.gz"], 2,
     "cannot write"),
    ("phantom-bad-shape", lambda d, out: ["phantom", "-o", str(out / "ct.nii.gz"), "--shape",
                                          "8", "4", "48"], 2, "shape"),
    ("calibrate-output-is-folder", lambda d, out: ["calibrate", str(d), "-o",
                                                   str(d / "empty_folder")], 2, "is a folder"),
    ("calibrate-no-cases", lambda d, out: ["calibrate", str(d / "empty_folder"), "-o",
                                           str(out / "staging.json")], 2, ""),
    ("train-output-is-file", lambda d, out: ["train", str(d), "-o", str(d / "a_file")], 2,
     "is a file"),
    ("train-epochs-zero", lambda d, out: ["train", str(d), "-o", str(out / "m"), "--epochs",
                                          "0"], 2, "--epochs"),
    ("evaluate-matrix", lambda d, out: ["evaluate", "-o", str(out / "e"), "--matrix", "8"], 2,
     "--matrix"),
    ("benchmark-output-in-proc", lambda d, out: ["benchmark", "-o", "/proc/x"], 2,
     "cannot write"),
]
if MR.is_file():
    BAD_INPUT.append(("detect-mr", lambda d, out: ["detect", str(MR), "-o", str(out)], 2,
                      "Hounsfield"))


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error" in ln.lower()]


def _left_behind(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else []


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
@pytest.mark.parametrize("progress", ["none", "json"])
def test_bad_input_is_one_line_and_leaves_nothing(case, progress, data, tmp_path, capsys):
    _, argv_of, expected, words = case
    out = tmp_path / "out"
    argv = [a.replace("{d}", str(data)) for a in argv_of(data, out)]
    accepts_progress = any(a.option_strings == ["--progress"] for a in
                           build_parser()._subparsers._group_actions[0]
                           .choices[argv[0]]._actions)
    if not accepts_progress and progress == "json":
        pytest.skip(f"{argv[0]} has no --progress")
    if accepts_progress:
        argv += ["--progress", progress]
    before = _left_behind(data)
    code, stdout, err = _run(argv, capsys)
    assert code == expected, err
    assert "Traceback" not in err + stdout
    errors = _error_lines(err)
    assert errors, f"no error on stderr: {err!r}"
    assert any(words.lower() in line.lower() for line in errors), errors
    assert all(line.startswith("emphysema-uad: error:") for line in errors), errors
    assert _left_behind(out) == []  # nothing written, not even a folder
    assert _left_behind(data) == before  # no temporary file beside the inputs
    if progress == "json":
        events = [json.loads(line) for line in stdout.splitlines()]  # every line is JSON
        assert any(e["event"] == "error" and e.get("message") for e in events), events


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", "x.nii.gz", "-o", "out", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_disk_full_while_writing_is_one_line_and_stops(data, tmp_path, capsys, monkeypatch):
    """ITK's "wrote only 0 of N bytes" becomes "no space left"; the case folder is not left
    half-written and the network does not run for the next cases."""
    import shutil
    from collections import namedtuple

    calls = []

    def full(*args, **kwargs):
        calls.append(args[1])
        raise RuntimeError("ImageFileWriter: wrote only 0 of 1234 bytes")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sitk, "WriteImage", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    out = tmp_path / "out"
    code, stdout, err = _run(["detect", data / "good.nii.gz", data / "good.nii.gz", "-o", out,
                              "--device", "cpu", "--progress", "json"], capsys)
    assert code == 1
    assert "Traceback" not in err and "wrote only" not in err + stdout
    assert _error_lines(err) == [ln for ln in err.splitlines() if "no space left" in ln]
    assert len(calls) == 1  # stopped at the first failed write
    assert [e for e in map(json.loads, stdout.splitlines()) if e["event"] == "error"]
    assert [p.name for p in out.iterdir()] == [] if out.exists() else True


def test_a_batch_with_a_bad_case_exits_1_and_lists_it(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(["detect", data / "good.nii.gz", data / "empty.nii.gz", "-o", out,
                              "--device", "cpu", "--progress", "none"], capsys)
    assert code == 1
    assert [ln for ln in err.splitlines() if "empty (0 bytes)" in ln]  # errors reach stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["case"] for r in rows] == ["good", "empty"] and "empty" in rows[1]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["good", "summary.csv"]


def test_every_option_has_help_and_every_command_names_its_output_alike():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert all(a.help for a in options), (name, [a.dest for a in options if not a.help])
        assert any({"-o", "--output"} <= set(a.option_strings) for a in options), name
        text = sub.format_help()
        for action in options:
            if action.default not in (None, False, True) and action.help:
                assert "default" in action.help or "(default: " in text, (name, action.dest)


def test_installed_command_fails_in_one_line(tmp_path):
    """The real console script, as a user runs it: no traceback, exit 2, one line."""
    done = subprocess.run([sys.executable, "-m", "EmphysemaUADLib", "detect",
                           str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out"),
                           "--progress", "none"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such file" in done.stderr
    assert not (tmp_path / "out").exists()


def test_progress_bar_writes_no_carriage_returns_into_a_log(tmp_path):
    import io

    from EmphysemaUADLib.progress import Progress

    stream = io.StringIO()
    progress = Progress("bar", stream=stream)
    for step in range(1, 51):
        progress.step(step, 50)
    assert "\r" not in stream.getvalue()
    assert 1 <= len(stream.getvalue().splitlines()) <= 3
