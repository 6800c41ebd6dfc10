"""The module's CMakeLists.txt lists every Python file and resource Slicer must install, and
nothing that does not exist: a file left out works from a source checkout but is missing
from the built extension."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "EmphysemaUAD"


def listed(variable: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", (MODULE_DIR / "CMakeLists.txt").read_text())
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set in EmphysemaUAD/CMakeLists.txt"
    return [item.replace("${MODULE_NAME}", "EmphysemaUAD") for item in match.group(1).split()]


def resolved(items: list[str]) -> set[Path]:
    return {(MODULE_DIR / item).resolve() for item in items}


def test_every_python_file_is_listed():
    scripts = resolved(listed("MODULE_PYTHON_SCRIPTS"))
    expected = {p.resolve() for folder in ("EmphysemaUAD", "EmphysemaUADLib")
                for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in expected - scripts)
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS: {missing}"


def test_every_resource_is_listed():
    resources = resolved(listed("MODULE_PYTHON_RESOURCES"))
    expected = {p.resolve() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    expected |= {p.resolve() for p in (ROOT / "Resources" / "Models").glob("*")
                 if p.is_file() and not p.name.startswith(".")}
    missing = sorted(str(p.relative_to(ROOT)) for p in expected - resources)
    assert not missing, f"add to MODULE_PYTHON_RESOURCES: {missing}"
    for name in ("edlnet_default.pt", "edlnet_default.json", "MODEL_CARD.md"):
        assert (ROOT / "Resources" / "Models" / name).resolve() in resources


def test_every_listed_file_exists():
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        absent = [item for item in listed(variable) if not (MODULE_DIR / item).is_file()]
        assert not absent, f"{variable} lists files that do not exist: {absent}"


def test_module_is_built_with_the_slicer_macro():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME\s+\$\{MODULE_NAME\}", text)
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in text
    assert "RESOURCES ${MODULE_PYTHON_RESOURCES}" in text
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(EmphysemaUAD)" in top
