"""The module's .ui loaded by a real Qt (PySide6 from PyPI, offscreen platform), without Slicer,
with stand-ins for the CTK and MRML widgets. Each stand-in is a plain class on the real class's Qt
base that declares, as Qt properties, exactly the Q_PROPERTY lines of the real header (copied
below with the header's repository, path and commit). Checked: every `self.ui.<name>` the module
reaches is in the loaded form with the class its role needs; every property the .ui sets on a
CTK/MRML widget is one the real class (or its Qt base) declares, so a typo in the .ui fails; the
values reach the widgets (flag values such as ctkPathLineEdit::Files are resolved by Qt itself).

The loading runs in a child process (this file run as a script), so a crash inside Qt fails a
test instead of killing pytest. Skips with the reason when PySide6 is not installed or Qt cannot
start (e.g. a missing system library)."""
from __future__ import annotations

import ast
import enum
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script, or collected from elsewhere
    sys.path.insert(0, str(HERE))
from test_ui_contract import MODULE_FILE, UI_FILE, expected_class, ui_names_used  # noqa: E402

STARTED = "QT-STARTED"
# a property the .ui may set on any widget without the class declaring it (stdset="0")
DYNAMIC_OK = {"SlicerParameterName"}

# --- the headers ------------------------------------------------------------------------------
# The Q_PROPERTY lines of each real class, verbatim, with its Qt base class.
HEADERS = {
    "qMRMLWidget": ("QWidget", "Slicer/Slicer Libs/MRML/Widgets/qMRMLWidget.h @ 11ac5870", ""),
    "qMRMLNodeComboBox": ("QWidget", "Slicer/Slicer Libs/MRML/Widgets/qMRMLNodeComboBox.h "
                                     "@ 06536db4", """
  Q_PROPERTY(QString currentNodeID READ currentNodeID WRITE setCurrentNodeID NOTIFY currentNodeIDChanged DESIGNABLE false)
  Q_PROPERTY(QString currentNodeId READ currentNodeId WRITE setCurrentNode DESIGNABLE false) // \\deprecated
  Q_PROPERTY(QStringList nodeTypes READ nodeTypes WRITE setNodeTypes)
  Q_PROPERTY(bool showHidden READ showHidden WRITE setShowHidden)
  Q_PROPERTY(bool showChildNodeTypes READ showChildNodeTypes WRITE setShowChildNodeTypes)
  Q_PROPERTY(QStringList hideChildNodeTypes READ hideChildNodeTypes WRITE setHideChildNodeTypes)
  Q_PROPERTY(QString baseName READ baseName WRITE setBaseName)
  Q_PROPERTY(bool noneEnabled READ noneEnabled WRITE setNoneEnabled)
  Q_PROPERTY(bool addEnabled READ addEnabled WRITE setAddEnabled)
  Q_PROPERTY(bool removeEnabled READ removeEnabled WRITE setRemoveEnabled)
  Q_PROPERTY(bool editEnabled READ editEnabled WRITE setEditEnabled)
  Q_PROPERTY(bool renameEnabled READ renameEnabled WRITE setRenameEnabled)
  Q_PROPERTY(QString interactionNodeSingletonTag READ interactionNodeSingletonTag WRITE setInteractionNodeSingletonTag)
  Q_PROPERTY(bool selectNodeUponCreation READ selectNodeUponCreation WRITE setSelectNodeUponCreation)
  Q_PROPERTY(QString noneDisplay READ noneDisplay WRITE setNoneDisplay)
  Q_PROPERTY(QComboBox::SizeAdjustPolicy sizeAdjustPolicy READ sizeAdjustPolicy WRITE setSizeAdjustPolicy)
"""),
    "qMRMLTableView": ("QTableView", "Slicer/Slicer Libs/MRML/Widgets/qMRMLTableView.h "
                                     "@ 11a1fae3", """
  Q_PROPERTY(bool transposed READ transposed WRITE setTransposed)
  Q_PROPERTY(bool firstRowLocked READ firstRowLocked WRITE setFirstRowLocked)
  Q_PROPERTY(bool firstColumnLocked READ firstColumnLocked WRITE setFirstColumnLocked)
"""),
    "ctkCollapsibleButton": ("QAbstractButton", "commontk/CTK Libs/Widgets/ctkCollapsibleButton.h "
                                                "@ 4ce14f71", """
  Q_PROPERTY(bool collapsed READ collapsed WRITE setCollapsed NOTIFY contentsCollapsed)
  Q_PROPERTY(int collapsedHeight READ collapsedHeight WRITE setCollapsedHeight)
  Q_PROPERTY(bool flat READ isFlat WRITE setFlat)
  Q_PROPERTY(QFrame::Shape contentsFrameShape READ contentsFrameShape WRITE setContentsFrameShape)
  Q_PROPERTY(QFrame::Shadow contentsFrameShadow READ contentsFrameShadow WRITE setContentsFrameShadow)
  Q_PROPERTY(int contentsLineWidth READ contentsLineWidth WRITE setContentsLineWidth)
  Q_PROPERTY(int contentsMidLineWidth READ contentsMidLineWidth WRITE setContentsMidLineWidth)
  Q_PROPERTY(Qt::Alignment buttonTextAlignment READ buttonTextAlignment WRITE setButtonTextAlignment)
  Q_PROPERTY(Qt::Alignment indicatorAlignment READ indicatorAlignment WRITE setIndicatorAlignment)
"""),
    "ctkSliderWidget": ("QWidget", "commontk/CTK Libs/Widgets/ctkSliderWidget.h @ daaf705c", """
  Q_PROPERTY(int decimals READ decimals WRITE setDecimals NOTIFY decimalsChanged)
  Q_PROPERTY(double singleStep READ singleStep WRITE setSingleStep)
  Q_PROPERTY(double pageStep READ pageStep WRITE setPageStep)
  Q_PROPERTY(double minimum READ minimum WRITE setMinimum)
  Q_PROPERTY(double maximum READ maximum WRITE setMaximum)
  Q_PROPERTY(double value READ value WRITE setValue)
  Q_PROPERTY(QString prefix READ prefix WRITE setPrefix)
  Q_PROPERTY(QString suffix READ suffix WRITE setSuffix)
  Q_PROPERTY(double tickInterval READ tickInterval WRITE setTickInterval)
  Q_PROPERTY(QSlider::TickPosition tickPosition READ tickPosition WRITE setTickPosition)
  Q_PROPERTY(SynchronizeSiblings synchronizeSiblings READ synchronizeSiblings WRITE setSynchronizeSiblings)
  Q_PROPERTY(Qt::Alignment spinBoxAlignment READ spinBoxAlignment WRITE setSpinBoxAlignment)
  Q_PROPERTY(bool tracking READ hasTracking WRITE setTracking)
  Q_PROPERTY(bool spinBoxVisible READ isSpinBoxVisible WRITE setSpinBoxVisible);
  Q_PROPERTY(bool popupSlider READ hasPopupSlider WRITE setPopupSlider);
  Q_PROPERTY(bool invertedAppearance READ invertedAppearance WRITE setInvertedAppearance)
  Q_PROPERTY(bool invertedControls READ invertedControls WRITE setInvertedControls)
"""),
    "ctkPathLineEdit": ("QWidget", "commontk/CTK Libs/Widgets/ctkPathLineEdit.h @ 03bf8478", """
  Q_PROPERTY ( QString label READ label WRITE setLabel )
  Q_PROPERTY ( Filters filters READ filters WRITE setFilters)
  Q_PROPERTY ( QString currentPath READ currentPath WRITE setCurrentPath USER true )
  Q_PROPERTY(Options options READ options WRITE setOptions)
  Q_PROPERTY(QString settingKey READ settingKey WRITE setSettingKey )
  Q_PROPERTY(bool showBrowseButton READ showBrowseButton WRITE setShowBrowseButton)
  Q_PROPERTY(bool showHistoryButton READ showHistoryButton WRITE setShowHistoryButton)
  Q_PROPERTY(SizeAdjustPolicy sizeAdjustPolicy READ sizeAdjustPolicy WRITE setSizeAdjustPolicy)
  Q_PROPERTY(int minimumContentsLength READ minimumContentsLength WRITE setMinimumContentsLength)
  Q_PROPERTY(QStringList nameFilters READ nameFilters WRITE setNameFilters)
"""),
}


# C++ type -> PySide6 Property type. Qt's own enums (QFrame::Shape, Qt::Alignment, ...) cannot
# be a Python-declared property's type in PySide6, so those are ints: their names are checked,
# a value the .ui would give them is not (the .ui sets none of them today). The headers' own
# enums are declared in the stand-ins (their values copied from the header) and registered with
# Qt, so the loader resolves a .ui's <set>/<enum> value against the real keys.
SIMPLE_TYPES = {"bool": (bool, False), "int": (int, 0), "double": (float, 0.0),
                "QString": (str, ""), "QStringList": ("QStringList", [])}
OWN_ENUMS = {("ctkPathLineEdit", "Filters"): "Filter", ("ctkPathLineEdit", "Options"): "Option",
             ("ctkPathLineEdit", "SizeAdjustPolicy"): "SizeAdjustPolicy",
             ("ctkSliderWidget", "SynchronizeSiblings"): "SynchronizeSibling"}


def header_properties(cls: str) -> dict[str, str]:
    """{property name: C++ type} from the header's Q_PROPERTY lines."""
    return {name: ctype for ctype, name in
            re.findall(r"Q_PROPERTY\s*\(\s*([\w:]+)\s+(\w+)\s+READ", HEADERS[cls][2])}


# --- the child process: load with real Qt -----------------------------------------------------
def declared(Property, cls: str) -> dict:
    """The header's properties as PySide6 Properties, for the class namespace of a stand-in (Qt
    builds its meta-object when the class is created)."""
    namespace = {}
    for name, ctype in header_properties(cls).items():
        if ctype in SIMPLE_TYPES:
            ptype, default = SIMPLE_TYPES[ctype]
        elif (cls, ctype) in OWN_ENUMS:
            ptype, default = f"{cls}::{OWN_ENUMS[(cls, ctype)]}", None
        else:  # a Qt enum, see SIMPLE_TYPES
            ptype, default = int, 0
        attribute = f"_standin_{name}"
        namespace[name] = Property(ptype, lambda self, a=attribute, d=default: getattr(self, a, d),
                                   lambda self, value, a=attribute: setattr(self, a, value))
    return namespace


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)


def load(ui_file: Path, classes) -> dict:
    from PySide6 import QtCore, QtUiTools, QtWidgets

    messages = []
    QtCore.qInstallMessageHandler(lambda kind, context, text: messages.append(text))
    loader = QtUiTools.QUiLoader()
    for cls in classes:
        loader.registerCustomWidget(cls)
    file = QtCore.QFile(str(ui_file))
    if not file.open(QtCore.QIODevice.OpenModeFlag.ReadOnly):
        raise SystemExit(f"cannot open {ui_file}")
    form = loader.load(file)
    file.close()
    QtCore.qInstallMessageHandler(None)
    if form is None:
        return {"error": loader.errorString() or "load returned None", "messages": messages}
    set_in_ui = {w.get("name"): [p.get("name") for p in w.findall("property")]
                 for w in ET.parse(ui_file).getroot().iter("widget")}
    widgets = {}
    for widget in [form, *form.findChildren(QtWidgets.QWidget)]:
        name, cls = widget.objectName(), widget.metaObject().className()
        if name not in set_in_ui:
            continue  # a Qt-internal child (scroll bars, tab bar, ...)
        widgets[name] = {"class": cls, "dynamic": sorted(
            bytes(p).decode() for p in widget.dynamicPropertyNames()
            if not bytes(p).startswith(b"_q_"))}
        if cls in HEADERS:
            widgets[name]["values"] = {p: _jsonable(widget.property(p)) for p in set_in_ui[name]}
    meta = {}
    for cls in classes:
        mo = cls.staticMetaObject
        meta[cls.__name__] = {
            "own": [mo.property(i).name() for i in range(mo.propertyOffset(), mo.propertyCount())],
            "all": [mo.property(i).name() for i in range(mo.propertyCount())]}
    form.deleteLater()
    return {"error": "", "messages": messages, "widgets": widgets, "classes": meta}


if __name__ == "__main__":
    # The stand-ins are plain class statements at module level: PySide6's QUiLoader crashed with
    # classes made by type(), and PySide6 names a class's Qt meta-object (and its enums' scope)
    # after its __qualname__, which must be the CTK/MRML class name.
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    try:
        from PySide6 import QtWidgets
        from PySide6.QtCore import Property, QEnum, QFlag
    except ImportError as exc:
        print(f"PySide6 cannot be imported: {exc}", file=sys.stderr)
        raise SystemExit(3)
    app = QtWidgets.QApplication([])  # a platform plugin that cannot load aborts here
    print(STARTED, flush=True)

    class qMRMLWidget(QtWidgets.QWidget):
        locals().update(declared(Property, "qMRMLWidget"))

    class qMRMLNodeComboBox(QtWidgets.QWidget):
        locals().update(declared(Property, "qMRMLNodeComboBox"))

    class qMRMLTableView(QtWidgets.QTableView):
        locals().update(declared(Property, "qMRMLTableView"))

    class ctkCollapsibleButton(QtWidgets.QAbstractButton):
        locals().update(declared(Property, "ctkCollapsibleButton"))

        def paintEvent(self, event):  # abstract in QAbstractButton
            pass

    class ctkSliderWidget(QtWidgets.QWidget):
        class SynchronizeSibling(enum.Flag):  # Q_DECLARE_FLAGS(SynchronizeSiblings, ...)
            NoSynchronize = 0x000
            SynchronizeWidth = 0x001
            SynchronizeDecimals = 0x002
        QFlag(SynchronizeSibling)
        locals().update(declared(Property, "ctkSliderWidget"))

    class ctkPathLineEdit(QtWidgets.QWidget):
        class Filter(enum.Flag):  # Q_DECLARE_FLAGS(Filters, Filter)
            Dirs = 0x001
            Files = 0x002
            Drives = 0x004
            NoSymLinks = 0x008
            AllEntries = 0x007
            TypeMask = 0x00f
            Readable = 0x010
            Writable = 0x020
            Executable = 0x040
            PermissionMask = 0x070
            Modified = 0x080
            Hidden = 0x100
            System = 0x200
            AccessMask = 0x3F0
            AllDirs = 0x400
            CaseSensitive = 0x800
            NoDotAndDotDot = 0x1000
            NoDot = 0x2000
            NoDotDot = 0x4000
        QFlag(Filter)

        class Option(enum.Flag):  # Q_DECLARE_FLAGS(Options, Option)
            ShowDirsOnly = 0x01
            DontResolveSymlinks = 0x02
            DontConfirmOverwrite = 0x04
            DontUseSheet = 0x08
            DontUseNativeDialog = 0x10
            ReadOnly = 0x20
            HideNameFilterDetails = 0x40
        QFlag(Option)

        class SizeAdjustPolicy(enum.Enum):
            AdjustToContents = 0
            AdjustToContentsOnFirstShow = 1
            AdjustToMinimumContentsLength = 2
        QEnum(SizeAdjustPolicy)
        locals().update(declared(Property, "ctkPathLineEdit"))

    classes = [qMRMLWidget, qMRMLNodeComboBox, qMRMLTableView, ctkCollapsibleButton,
               ctkSliderWidget, ctkPathLineEdit]
    assert [c.__name__ for c in classes] == list(HEADERS)
    print(json.dumps({path: load(Path(path), classes) for path in sys.argv[1:]}), flush=True)
    app.processEvents()
    raise SystemExit(0)


# --- the tests (pytest process) ---------------------------------------------------------------
import pytest  # noqa: E402

# typos put into a copy of the .ui; each must be reported
TYPOS = [("<property name=\"noneEnabled\">", "<property name=\"noneEnabeld\">",
          "inputVolumeSelector: qMRMLNodeComboBox declares no property 'noneEnabeld'"),
         ("<property name=\"collapsed\">", "<property name=\"colapsed\">",
          "inputsCollapsibleButton: ctkCollapsibleButton declares no property 'colapsed'"),
         ("ctkPathLineEdit::Files|ctkPathLineEdit::Readable",
          "ctkPathLineEdit::Files|ctkPathLineEdit::Readible",
          "Qt: Designer: The value \"ctkPathLineEdit::Files|ctkPathLineEdit::Readible\" of the set-type "
          "property filters could not be read.")]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    try:
        import PySide6  # noqa: F401 (Qt itself is imported in the child)
    except ImportError as exc:
        pytest.skip(f"PySide6 cannot be imported ({exc}); pip install PySide6-Essentials "
                    f"(in the test extra)")
    text = UI_FILE.read_text()
    for old, new, _ in TYPOS:
        assert old in text, f"the typo test needs {old!r} in the .ui"
        text = text.replace(old, new, 1)
    typo_file = tmp_path_factory.mktemp("ui") / "typos.ui"
    typo_file.write_text(text)
    run = subprocess.run([sys.executable, __file__, str(UI_FILE), str(typo_file)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    tail = (run.stderr or "").strip()[-2000:]
    if STARTED not in run.stdout:
        pytest.skip(f"Qt cannot start here (exit status {run.returncode}): {tail}")
    assert run.returncode == 0, f"loading the .ui crashed or failed (exit status " \
                                f"{run.returncode}, negative = killed by that signal): {tail}"
    result = json.loads(run.stdout.splitlines()[-1])
    return result[str(UI_FILE)], result[str(typo_file)], typo_file


def stand_in_properties(ui_file: Path):
    """(widget, class, property) the .ui sets on a CTK/MRML widget, less dynamic ones."""
    for widget in ET.parse(ui_file).getroot().iter("widget"):
        if widget.get("class") in HEADERS:
            for prop in widget.findall("property"):
                if prop.get("stdset") != "0":
                    yield widget.get("name"), widget.get("class"), prop.get("name")


def scene_connection(message: str) -> bool:
    """Qt's complaint about the .ui's mrmlSceneChanged(vtkMRMLScene*) -> setMRMLScene
    connections: a stand-in cannot declare a signal of a VTK type (test_ui_contract checks
    those connections)."""
    return message.startswith("QObject::connect:") and (
        "(vtkMRMLScene*)" in message or "(sender name:" in message
        or "(receiver name:" in message)


def problems(ui_file: Path, result: dict) -> list[str]:
    assert not result["error"], result["error"]
    found = []
    for name, cls, prop in stand_in_properties(ui_file):
        if prop not in result["classes"][cls]["all"]:
            found.append(f"{name}: {cls} declares no property {prop!r}")
    for name, widget in result["widgets"].items():
        if widget["class"] in HEADERS:  # what the loader could not set as a declared property
            for prop in set(widget["dynamic"]) - DYNAMIC_OK:
                found.append(f"{name}: {widget['class']} declares no property {prop!r}")
    found += [f"Qt: {m}" for m in result["messages"] if not scene_connection(m)]
    return sorted(set(found))


def test_every_widget_the_module_uses_is_loaded_with_its_class(loaded):
    real, _, _ = loaded
    used = ui_names_used(ast.parse(MODULE_FILE.read_text()))
    assert len(used) > 10
    for name in sorted(used):
        assert name in real["widgets"], f"self.ui.{name} is not in the loaded .ui"
        assert real["widgets"][name]["class"] == expected_class(name), \
            f"self.ui.{name} loaded as {real['widgets'][name]['class']}, " \
            f"expected {expected_class(name)}"


def test_every_ctk_and_mrml_widget_is_loaded_as_its_stand_in(loaded):
    real, _, _ = loaded
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert declared <= set(HEADERS), f"add a stand-in (with its header's properties) for " \
                                     f"{declared - set(HEADERS)}"
    for widget in root.iter("widget"):
        if widget.get("class") in HEADERS:
            assert real["widgets"][widget.get("name")]["class"] == widget.get("class")


def test_the_stand_ins_declare_exactly_their_headers_properties(loaded):
    """PySide6 only warns when it cannot add a property: check that each one is there."""
    real, _, _ = loaded
    for cls in HEADERS:
        assert real["classes"][cls]["own"] == list(header_properties(cls)), cls
    assert len(header_properties("qMRMLNodeComboBox")) == 16
    assert "text" in real["classes"]["ctkCollapsibleButton"]["all"]  # from QAbstractButton


def test_every_property_the_ui_sets_on_ctk_and_mrml_widgets_is_declared(loaded):
    real, _, _ = loaded
    assert len(list(stand_in_properties(UI_FILE))) > 40
    assert problems(UI_FILE, real) == []


def test_a_typo_in_the_ui_fails(loaded):
    _, typos, typo_file = loaded
    assert problems(typo_file, typos) == sorted(message for _, _, message in TYPOS)


def test_the_values_reach_the_stand_ins(loaded):
    real, _, _ = loaded
    checked = 0
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        if widget.get("class") not in HEADERS:
            continue
        values = real["widgets"][widget.get("name")]["values"]
        for prop in widget.findall("property"):
            element = list(prop)[0]
            expected = {"bool": lambda t: t == "true", "number": int, "double": float,
                        "string": lambda t: t or ""}.get(element.tag)
            if element.tag == "stringlist":
                assert values[prop.get("name")] == [s.text for s in element.iter("string")]
            elif expected is not None:
                assert values[prop.get("name")] == expected(element.text), \
                    f"{widget.get('name')}.{prop.get('name')}"
            else:
                continue
            checked += 1
    assert checked > 40
    path = real["widgets"]["modelPathLineEdit"]["values"]
    # ctkPathLineEdit::Files|Readable and Dirs|Readable, resolved by Qt from the header's keys
    assert path["filters"] == 0x002 | 0x010
    assert real["widgets"]["trainDataPathLineEdit"]["values"]["filters"] == 0x001 | 0x010
