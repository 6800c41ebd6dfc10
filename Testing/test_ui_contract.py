"""The .ui file and the module code agree, checked without Slicer: every `self.ui.X` the
module reaches exists with the class its role needs, every SlicerParameterName names a field
of the parameter node class (read with ast, not imported) with a widget that can show it, and
the field's annotations are what Slicer's parameterNodeWrapper needs for that widget (its
serializers and GUI connectors, Slicer 5.x: Base/Python/slicer/parameterNodeWrapper)."""
from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "EmphysemaUAD"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "EmphysemaUAD.ui"
MODULE_FILE = MODULE_DIR / "EmphysemaUAD.py"
PARAMETER_CLASS = "EmphysemaUADParameterNode"

# the widget class a name's role calls for, by the name's ending (longest ending first)
CLASS_BY_SUFFIX = {
    "CollapsibleButton": "ctkCollapsibleButton", "Button": "QPushButton",
    "Selector": "qMRMLNodeComboBox", "TableView": "qMRMLTableView",
    "ProgressBar": "QProgressBar", "Label": "QLabel", "PathLineEdit": "ctkPathLineEdit",
    "ComboBox": "QComboBox", "SpinBox": "QSpinBox", "Slider": "ctkSliderWidget",
    "CheckBox": "QCheckBox", "TextEdit": "QPlainTextEdit", "tabWidget": "QTabWidget",
}
# widget classes that parameter types bind to (Slicer's parameter node GUI connectors)
WIDGETS_FOR_TYPE = {
    "str": {"QComboBox", "QLineEdit"}, "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "int": {"QSpinBox"}, "bool": {"QCheckBox"}, "Path": {"ctkPathLineEdit"},
    "node": {"qMRMLNodeComboBox"},
}


def expected_class(name: str) -> str:
    for suffix in sorted(CLASS_BY_SUFFIX, key=len, reverse=True):
        if name.endswith(suffix):
            return CLASS_BY_SUFFIX[suffix]
    raise AssertionError(f"self.ui.{name}: its name says no widget role; name it ...Button, "
                         f"...Selector, ... ({', '.join(CLASS_BY_SUFFIX)})")


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def widgets(ui):
    return {w.get("name"): w for w in ui.iter("widget")}


@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_FILE.read_text())


def ui_names_used(tree) -> set[str]:
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"}


def parameter_fields(tree) -> dict[str, ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == PARAMETER_CLASS:
            decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")
                          for d in node.decorator_list}
            assert "parameterNodeWrapper" in decorators
            return {s.target.id: s.annotation for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError(f"{PARAMETER_CLASS} not found in {MODULE_FILE.name}")


def type_kind(annotation: ast.expr) -> tuple[str, list[str]]:
    """('node', node classes) for MRML node types, else (builtin name, [])."""
    text = ast.unparse(annotation)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        return type_kind(annotation.slice.elts[0])
    names = [n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)]
    nodes = [n for n in names if n.startswith("vtkMRML")]
    if nodes:
        return "node", nodes
    return text, []


def annotations_of(annotation: ast.expr) -> list[str]:
    """The Annotated[...] extras of a field, as source text (e.g. 'WithinRange(1, 100)')."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        return [ast.unparse(e) for e in annotation.slice.elts[1:]]
    return []


def number_property(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            node = prop.find("number")
            node = node if node is not None else prop.find("double")
            return None if node is None else float(node.text)
    return None


def string_property(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop.findtext("string")
    return None


def test_every_widget_the_module_reaches_exists_with_its_class(module_tree, widgets):
    used = ui_names_used(module_tree)
    assert len(used) > 10  # the ast walk finds the accesses
    for name in sorted(used):
        assert name in widgets, f"self.ui.{name} is not in {UI_FILE.name}"
        assert widgets[name].get("class") == expected_class(name), \
            f"{name}: is a {widgets[name].get('class')}, expected {expected_class(name)}"


def test_every_parameter_name_is_a_field_with_a_fitting_widget(module_tree, widgets):
    fields = parameter_fields(module_tree)
    bound = {}
    for name, widget in widgets.items():
        parameter = string_property(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in fields, f"{name}: SlicerParameterName {parameter!r} is not a " \
                                    f"field of {PARAMETER_CLASS}"
        assert parameter not in bound, f"{parameter} bound twice ({bound.get(parameter)}, {name})"
        bound[parameter] = name
        kind, node_classes = type_kind(fields[parameter])
        assert widget.get("class") in WIDGETS_FOR_TYPE[kind], \
            f"{name} ({widget.get('class')}) cannot show {parameter}: {kind}"
        if kind == "node":
            types = [s.text for s in widget.find("property[@name='nodeTypes']").iter("string")]
            assert sorted(types) == sorted(node_classes), f"{name}: nodeTypes {types} != " \
                                                          f"{node_classes}"
    # every field is on screen, so nothing is kept in the scene that the user cannot see
    assert set(bound) == set(fields), f"fields without a widget: {set(fields) - set(bound)}"


def test_mrml_widgets_get_the_scene(ui, widgets):
    assert widgets["EmphysemaUAD"].get("class") == "qMRMLWidget"
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    needing = {n for n, w in widgets.items() if w.get("class") in ("qMRMLNodeComboBox",
                                                                   "qMRMLTableView")}
    assert needing and needing <= receivers, f"not given the scene: {needing - receivers}"


def test_custom_widgets_are_declared(ui, widgets):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    custom = {c for c in used if c.startswith(("qMRML", "ctk"))}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"



def bound_fields(module_tree, widgets):
    fields = parameter_fields(module_tree)
    for name, widget in widgets.items():
        parameter = string_property(widget, "SlicerParameterName")
        if parameter is not None:
            yield parameter, fields[parameter], widget


def test_unions_of_nodes_include_none(module_tree, widgets):
    """The wrapper's UnionSerializer can store None only when None is one of the types: a
    selector with noneEnabled bound to Union[A, B] fails when the user picks "None"."""
    unions = 0
    for parameter, annotation, widget in bound_fields(module_tree, widgets):
        text = ast.unparse(annotation)
        if "Union[" in text and type_kind(annotation)[0] == "node":
            unions += 1
            assert "None" in text or text.startswith("Optional["), \
                f"{parameter}: {text} cannot hold None; write Optional[Union[...]]"
            assert widget.find("property[@name='noneEnabled']/bool").text == "true"
    assert unions >= 1  # the lobes selector


def test_numbers_have_the_range_of_their_widget(module_tree, widgets):
    """Slicer's spin box and slider connectors overwrite the .ui's minimum and maximum with
    the field's WithinRange (a slider without one is refused, a spin box becomes unbounded):
    every number field has one, equal to the range drawn in the .ui."""
    numbers = 0
    for parameter, annotation, widget in bound_fields(module_tree, widgets):
        if type_kind(annotation)[0] not in ("int", "float"):
            continue
        numbers += 1
        ranges = [a for a in annotations_of(annotation) if a.startswith("WithinRange(")]
        assert ranges, f"{parameter}: needs Annotated[..., WithinRange(min, max)]"
        low, high = (float(ast.literal_eval(v)) for v in
                     ast.parse(ranges[0]).body[0].value.args)
        ui_range = (number_property(widget, "minimum"), number_property(widget, "maximum"))
        assert ui_range == (low, high), f"{parameter}: .ui range {ui_range} != {(low, high)}"
    assert numbers >= 4  # threshold, epochs, width, batch size


def test_combo_boxes_have_their_choices(module_tree, widgets):
    """A QComboBox bound to a str needs Choice(...) (the connector fills the items from it)."""
    combos = 0
    for parameter, annotation, widget in bound_fields(module_tree, widgets):
        if widget.get("class") == "QComboBox":
            combos += 1
            assert any(a.startswith("Choice(") for a in annotations_of(annotation)), \
                f"{parameter}: a combo box needs Annotated[str, Choice([...])]"
    assert combos == 3  # model source, detection device, training device
