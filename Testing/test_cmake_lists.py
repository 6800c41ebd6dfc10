"""The module's CMakeLists.txt lists every Python file and resource Slicer must install, and
nothing that does not exist, and places them where the module looks for them: a file left
out works from a source checkout but is missing from the built extension.

Where files land follows from Slicer's macros (slicerMacroBuildScriptedModule, which hands the
lists to CTK's ctkMacroCompilePythonScript): a relative script or resource X is copied to
qt-scripted-modules/X, an absolute script inside the module's binary folder to its path
relative to that folder, and only qt-scripted-modules/ is installed. So an entry starting
with "../" would land outside the installed folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "EmphysemaUAD"
LIBRARY_DIR = ROOT / "EmphysemaUADLib"
MODELS_DIR = ROOT / "Resources" / "Models"
BINARY_LIBRARY = "${CMAKE_CURRENT_BINARY_DIR}/EmphysemaUADLib/"


def cmake_text() -> str:
    return re.sub(r"#[^\n]*", "", (MODULE_DIR / "CMakeLists.txt").read_text())


def listed(variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", cmake_text(), re.S)
    assert match, f"{variable} is not set in EmphysemaUAD/CMakeLists.txt"
    return [item.replace("${MODULE_NAME}", "EmphysemaUAD") for item in match.group(1).split()]


def test_every_library_file_is_listed_and_exists():
    scripts = listed("LIBRARY_PYTHON_SCRIPTS")
    assert len(scripts) == len(set(scripts)), "LIBRARY_PYTHON_SCRIPTS lists a file twice"
    on_disk = sorted(p.relative_to(LIBRARY_DIR).as_posix() for p in LIBRARY_DIR.rglob("*.py")
                     if "__pycache__" not in p.parts)
    missing = sorted(set(on_disk) - set(scripts))
    assert not missing, f"add to LIBRARY_PYTHON_SCRIPTS: {missing}"
    absent = sorted(set(scripts) - set(on_disk))
    assert not absent, f"LIBRARY_PYTHON_SCRIPTS lists files that do not exist: {absent}"
    assert {"__init__.py", "__main__.py", "mrml.py", "process.py"} <= set(scripts)


def test_every_module_file_and_resource_is_listed_and_exists():
    scripts = listed("MODULE_PYTHON_SCRIPTS")
    module_py = sorted(p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
                       if "__pycache__" not in p.parts)
    assert sorted(scripts) == module_py, "MODULE_PYTHON_SCRIPTS must list the module's .py"
    resources = listed("MODULE_PYTHON_RESOURCES")
    on_disk = sorted(p.relative_to(MODULE_DIR).as_posix()
                     for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == on_disk
    assert "Resources/UI/EmphysemaUAD.ui" in resources
    assert "Resources/Icons/EmphysemaUAD.png" in resources


def test_nothing_is_listed_outside_the_module_folder():
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES",
                     "LIBRARY_PYTHON_SCRIPTS", "BUNDLED_MODEL_FILES"):
        outside = [item for item in listed(variable) if ".." in Path(item).parts]
        assert not outside, f"{variable}: {outside} would be copied outside " \
                            "qt-scripted-modules and never installed"


def test_library_is_copied_beside_the_module_and_compiled_with_it():
    text = cmake_text()
    # each library file is copied into the module's binary folder...
    assert re.search(r"foreach\(\s*script\s+IN\s+LISTS\s+LIBRARY_PYTHON_SCRIPTS\s*\)", text)
    assert re.search(r"configure_file\(\s*\$\{EXTENSION_SOURCE_DIR\}/EmphysemaUADLib/\$\{script\}"
                     r"\s+\$\{CMAKE_CURRENT_BINARY_DIR\}/EmphysemaUADLib/\$\{script\}\s+COPYONLY",
                     text)
    # ...and handed to the Slicer macro with that absolute path (it lands in
    # qt-scripted-modules/EmphysemaUADLib/)
    assert re.search(r"list\(\s*APPEND\s+MODULE_PYTHON_SCRIPTS\s+"
                     + re.escape(BINARY_LIBRARY) + r"\$\{script\}\s*\)", text)
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME\s+\$\{MODULE_NAME\}", text)
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in text
    assert "RESOURCES ${MODULE_PYTHON_RESOURCES}" in text
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(EmphysemaUAD)" in top


def test_bundled_model_goes_where_the_library_looks_for_it():
    from EmphysemaUADLib.detection import DEFAULT_MODEL_NAME, default_model_path

    files = listed("BUNDLED_MODEL_FILES")
    assert {DEFAULT_MODEL_NAME, "edlnet_default.json", "MODEL_CARD.md"} <= set(files)
    text = cmake_text()
    # build tree and install tree: qt-scripted-modules/Resources/Models, i.e. Resources/Models
    # beside EmphysemaUADLib, as in a source checkout
    assert "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/Models" in text
    assert re.search(r"DESTINATION\s+\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}"
                     r"/Resources/Models", text)
    assert "${EXTENSION_SOURCE_DIR}/Resources/Models/${file}" in text
    if (MODELS_DIR / DEFAULT_MODEL_NAME).is_file():
        assert default_model_path() == MODELS_DIR / DEFAULT_MODEL_NAME


def test_bundled_model_files_exist():
    if not (MODELS_DIR / "edlnet_default.pt").is_file():
        pytest.skip("the default model is not in this checkout yet "
                    "(scripts/train_default_model.sh writes Resources/Models)")
    absent = [f for f in listed("BUNDLED_MODEL_FILES") if not (MODELS_DIR / f).is_file()]
    assert not absent, f"BUNDLED_MODEL_FILES lists files missing in Resources/Models: {absent}"
    extra = sorted(p.name for p in MODELS_DIR.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.name not in listed("BUNDLED_MODEL_FILES"))
    assert not extra, f"add to BUNDLED_MODEL_FILES (or remove): {extra}"


def test_extension_metadata():
    top = (ROOT / "CMakeLists.txt").read_text()
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                 "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({name}\s+"[^"]+"\)', top), f"{name} is not set"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', top)
    assert "find_package(Slicer REQUIRED)" in top
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in top
    assert "include(${Slicer_EXTENSION_CPACK})" in top
    icon = MODULE_DIR / "Resources" / "Icons" / "EmphysemaUAD.png"
    header = icon.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) \
        == (128, 128)


# The Extensions Index's description checks (Slicer/ExtensionsIndex,
# scripts/check_description_files.py: ACCEPTED_EXTENSION_CATEGORIES, check_category,
# check_scm_url_syntax, check_git_repository_name, check_cmakelists_content,
# check_license_file), as of 2025. Update from there when the Index adds categories.
ACCEPTED_EXTENSION_CATEGORIES = (
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform",
    "Conda", "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples",
    "Exporter", "FTV Segmentation", "Filtering", "Filtering.Morphology",
    "Filtering.Vesselness", "Holographic Display", "IGT", "Informatics", "Netstim",
    "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences",
    "Shape Analysis", "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF",
    "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound",
    "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
)


def top_setting(name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text())
    assert match, f"{name} is not set in CMakeLists.txt"
    return match.group(1)


def module_categories() -> list:
    import ast

    tree = ast.parse((MODULE_DIR / "EmphysemaUAD.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == \
                "self.parent.categories":
            return ast.literal_eval(node.value)
    raise AssertionError("parent.categories is not set in EmphysemaUAD.py")


def test_category_is_one_the_index_accepts_in_cmake_and_module():
    category = top_setting("EXTENSION_CATEGORY")
    assert category in ACCEPTED_EXTENSION_CATEGORIES, category
    assert module_categories() == [category]


def test_index_description_checks():
    text = (ROOT / "CMakeLists.txt").read_text()
    # check_cmakelists_content: the project name is the extension's name
    assert re.findall(r"project\s*\(\s*([^\s\)]+)", text, re.I)[0] == "EmphysemaUAD"
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert all(url.startswith("https://") for url in top_setting(name).split())
    # check_scm_url_syntax and check_git_repository_name (the homepage is the repository)
    homepage = top_setting("EXTENSION_HOMEPAGE")
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", homepage)
    assert "slicer" in homepage.rsplit("/", 1)[1].lower()
    # check_license_file
    assert (ROOT / "LICENSE").is_file()
    # contributors in the Index's "Name (Organisation)" form, comma separated
    for contributor in top_setting("EXTENSION_CONTRIBUTORS").split(","):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor.strip()), contributor


def test_self_test_is_registered_for_index_builds():
    text = cmake_text()
    assert re.search(r"if\(\s*BUILD_TESTING\s*\)\s*slicer_add_python_unittest\(\s*SCRIPT\s+"
                     r"\$\{MODULE_NAME\}\.py\s*\)\s*endif\(\)", text)
    assert "class EmphysemaUADTest(ScriptedLoadableModuleTest)" in \
        (MODULE_DIR / "EmphysemaUAD.py").read_text()
