"""What the Slicer module relies on, tested without Slicer and without torch: the threshold
rule, the model summary, the worker's arguments, the dependency list against pyproject, the
Python version the README promises, and that nothing the module imports on load pulls torch."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from EmphysemaUADLib import modelinfo, process

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "EmphysemaUAD" / "EmphysemaUAD.py"
REQUIREMENTS = ROOT / "EmphysemaUAD" / "Resources" / "Requirements" / "requirements.txt"


# --- item 3: the threshold ----------------------------------------------------------------
def test_the_models_threshold_applies_unless_the_user_chose_one():
    config = {"threshold": 0.37}
    choice = modelinfo.threshold_choice(True, 0.5, config)
    assert choice.value is None  # the worker reads the checkpoint's own
    assert "0.37" in choice.text and "model" in choice.text
    mine = modelinfo.threshold_choice(False, 0.6, config)
    assert mine.value == 0.6
    assert "0.60" in mine.text and "chosen here" in mine.text and "0.37" in mine.text
    unknown = modelinfo.threshold_choice(True, 0.5, None)
    assert unknown.value is None and "model" in unknown.text


def test_detect_args_leave_the_threshold_to_the_model_when_none():
    assert "--threshold" not in process.detect_args("ct.nrrd", "out", threshold=None)
    args = process.detect_args("ct.nrrd", "out", threshold=0.42)
    assert args[args.index("--threshold") + 1] == "0.42"


def test_module_passes_the_threshold_choice_not_the_slider():
    text = MODULE_FILE.read_text()
    assert "p.threshold, p.device" not in text
    assert "thresholdChoice(p)" in text


# --- item 5: the model's summary ----------------------------------------------------------
def test_bundled_model_summary_comes_from_its_config_and_card():
    path = modelinfo.default_model_path()
    if not path.is_file():
        pytest.skip("no bundled model in this checkout")
    config = modelinfo.model_config(path)
    assert config is not None and modelinfo.model_threshold(config) is not None
    summary = modelinfo.model_summary(path)
    assert f"{config['training']['cases']} healthy CTs" in summary
    assert summary.endswith(modelinfo.NOT_A_DEVICE)
    assert len(summary) < 240  # one unobtrusive line


def test_summary_prefers_real_data_rows_of_the_card(tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    (tmp_path / "m.json").write_text(json.dumps({"threshold": 0.4, "training": {
        "cases": 12, "val_auroc": 0.99}}))
    assert "AUROC 0.990 on synthetic lesions" in modelinfo.model_summary(model)
    (tmp_path / "MODEL_CARD.md").write_text(
        "# card\n\n| | |\n| --- | --- |\n| training data | 12 CTs |\n"
        "| real-data Dice | 0.61 on 3 CTs |\n")
    summary = modelinfo.model_summary(model)
    assert "real-data Dice: 0.61 on 3 CTs" in summary and "AUROC" not in summary
    assert modelinfo.model_threshold(modelinfo.model_config(model)) == 0.4
    assert modelinfo.model_config(tmp_path / "none.pt") is None


# --- item 10: the worker's arguments --------------------------------------------------------
def test_train_args_and_outputs():
    args = process.train_args("data", "model", 5, 16, 4, "cpu", resume=True)
    assert args == ["train", "data", "--output", "model", "--epochs", "5", "--width", "16",
                    "--batch-size", "4", "--device", "cpu", "--resume"]
    assert "--resume" not in process.train_args("d", "m", 1, 4, 1)
    # fine-tuning the bundled model: its start is given once, a resumed run already holds it
    assert process.train_args("d", "m", 1, 4, 1, init_from="bundled")[-2:] == \
        ["--init-from", "bundled"]
    assert "--init-from" not in process.train_args("d", "m", 1, 4, 1, True, "bundled")
    last, best = process.training_outputs("model")
    assert (last.name, best.name) == ("last.pt", "best.pt")


def test_detect_case_dir_is_where_detect_writes():
    assert process.detect_case_dir("/tmp/x/ct.nrrd", "/tmp/x/out") == Path("/tmp/x/out/ct")
    assert process.detect_case_dir("a/case 1.nii.gz", "o") == Path("o/case 1")


def test_the_train_command_line_parses():
    from EmphysemaUADLib.cli import build_parser

    args = build_parser().parse_args(process.train_args("d", "m", 3, 8, 2, "cpu", True))
    assert (args.epochs, args.width, args.batch_size, args.device, args.resume) == \
        (3, 8, 2, "cpu", True)
    args = build_parser().parse_args(process.train_args("d", "m", 3, 8, 2, "cpu",
                                                        init_from="bundled"))
    assert args.init_from == "bundled"


def test_site_threshold_args_parse_and_leave_the_bundled_model_as_default():
    from EmphysemaUADLib.cli import build_parser

    out = Path("o") / process.SITE_MODEL_NAME
    args = build_parser().parse_args(process.site_threshold_args("d", out, None, "cpu"))
    assert (args.healthy, args.output, args.model, args.device) == (["d"], str(out), None,
                                                                   "cpu")
    assert args.correct_hu is None  # the default: corrected
    args = build_parser().parse_args(process.site_threshold_args("d", out, "m.pt",
                                                                  correct_hu=False))
    assert args.model == "m.pt" and args.correct_hu is False


def test_a_site_threshold_is_named_in_the_panel():
    config = {"threshold": 0.13, "site_threshold": {"scans": 14, "threshold": 0.13}}
    assert "0.13, the model's own, set from 14 healthy scans of this site" in \
        modelinfo.threshold_choice(True, 0.5, config).text


def test_the_panel_reads_scans_as_a_site_threshold_read_its_own():
    site = {"scans": 3, "threshold": 0.2}
    assert modelinfo.site_correct_hu({"threshold": 0.5}) is None  # no site threshold
    assert modelinfo.site_correct_hu({"site_threshold": site}) is True  # recorded before
    stored = {"threshold": 0.2, "site_threshold": {**site, "correct_hu": False}}
    assert modelinfo.site_correct_hu(stored) is False
    assert "of this site, HU scale as stored" in modelinfo.threshold_choice(True, 0.5, stored).text
    text = MODULE_FILE.read_text()  # the widget sets its checkbox from the record
    assert "p.correctHu = recorded" in text and "site_correct_hu(config)" in text


# --- item 7: one list of dependencies ------------------------------------------------------
def pyproject_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return [re.sub(r"\s+", "", d) for d in re.findall(r'"([^"]+)"', block)]


def test_slicer_requirements_are_pyprojects_less_torch():
    ours = [f"{n}>={v}" if v else n
            for n, v in process.parse_requirements(REQUIREMENTS.read_text())]
    theirs = [d for d in pyproject_dependencies() if not d.lower().startswith("torch")]
    assert ours == theirs, "keep EmphysemaUAD/Resources/Requirements/requirements.txt equal " \
                           "to pyproject's dependencies less torch"


def test_missing_requirements():
    assert process.missing_requirements("numpy>=1.0\n# comment\n\nSimpleITK") == []
    assert process.missing_requirements("numpy>=999") == ["numpy>=999"]
    assert process.missing_requirements("no-such-package-here") == ["no-such-package-here"]
    with pytest.raises(ValueError):
        process.parse_requirements("numpy<2")


def test_module_asks_once_and_installs_nothing_in_its_self_test():
    text = MODULE_FILE.read_text()
    assert text.count("confirmOkCancelDisplay(") == 1
    assert "askConfirmation=False" in text  # the one question covers torch too
    test_class = text[text.index("class EmphysemaUADTest"):]
    assert "ensureDependencies()" not in test_class
    assert "missingDependencies()" in test_class


# --- item 9: the Python that Slicer has ------------------------------------------------------
# Python of each Slicer release (Slicer's release notes; SuperBuild/External_python.cmake)
SLICER_PYTHON = {"5.2": (3, 9), "5.4": (3, 9), "5.6": (3, 9), "5.8": (3, 12), "5.10": (3, 12)}


def test_readme_names_a_slicer_whose_python_pyproject_accepts():
    readme = (ROOT / "README.md").read_text()
    slicer_section = readme[readme.index("## 3D Slicer"):readme.index("## Results")]
    claimed = re.search(r"3D Slicer (\d+\.\d+) or later", slicer_section).group(1)
    low = re.search(r'requires-python = ">=(\d+)\.(\d+)',
                    (ROOT / "pyproject.toml").read_text()).groups()
    minimum = tuple(int(x) for x in low)
    assert SLICER_PYTHON[claimed] >= minimum, f"Slicer {claimed} has Python " \
                                              f"{SLICER_PYTHON[claimed]}, pyproject needs {minimum}"
    earlier = [v for v, py in SLICER_PYTHON.items()
               if tuple(map(int, v.split("."))) < tuple(map(int, claimed.split(".")))]
    assert all(SLICER_PYTHON[v] < minimum for v in earlier), "an earlier Slicer would do"
    assert f"PYTHON_MINIMUM = {minimum}" in MODULE_FILE.read_text()


# --- item 6: no torch in Slicer's process on load -------------------------------------------
def module_level_library_imports() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text())
    return {node.module for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("EmphysemaUADLib")}


def test_what_the_module_imports_on_load_and_for_the_panel_imports_no_torch():
    modules = module_level_library_imports() | {
        "EmphysemaUADLib.devices", "EmphysemaUADLib.modelinfo", "EmphysemaUADLib.process",
        "EmphysemaUADLib.mrml", "EmphysemaUADLib.errors", "EmphysemaUADLib.phantom"}
    code = ("import sys\n" + "".join(f"import {m}\n" for m in sorted(modules))
            + "from EmphysemaUADLib import modelinfo\n"
            + "modelinfo.model_summary(modelinfo.default_model_path())\n"
            + "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_panel_paths_import_no_torch_module():
    """The functions enter, updateButtons and Detect's set-up reach import only torch-free
    library modules (detection is imported only by in-process detection)."""
    tree = ast.parse(MODULE_FILE.read_text())
    heavy = {"EmphysemaUADLib.detection", "EmphysemaUADLib.checkpoint",
             "EmphysemaUADLib.network", "EmphysemaUADLib.inference", "torch"}
    allowed_in = {"detect", "_tinyModel", "test_training_cancel_is_resumable",
                  "test_detection_flow"}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name not in allowed_in:
            for inner in ast.walk(node):
                names = ([inner.module] if isinstance(inner, ast.ImportFrom) else
                         [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
                assert not heavy & set(names), f"{node.name} imports {names}"
