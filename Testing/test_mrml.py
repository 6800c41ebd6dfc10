"""MRML glue on real MRML (PyPI `slicer-core`, no Qt): geometry in and out, result nodes,
export files. Skips where slicer-core is not installed."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

vtk = pytest.importorskip("vtk", reason="vtk is not installed: pip install slicer-core vtk")

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML without Qt) is not "
                                              "installed: pip install slicer-core vtk")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the `slicer` module found is not slicer-core", allow_module_level=True)
from vtk.util import numpy_support  # noqa: E402

from EmphysemaUADLib import mrml  # noqa: E402
from EmphysemaUADLib.errors import InputError  # noqa: E402
from EmphysemaUADLib.regions import LOBES  # noqa: E402
from EmphysemaUADLib.volume_io import Geometry, Volume  # noqa: E402

# oblique direction, LPS, anisotropic spacing: every sign and axis swap would show
_c, _s = np.cos(0.3), np.sin(0.3)
OBLIQUE = Geometry((0.7, 0.8, 2.5), (-120.5, 33.0, -310.25),
                   tuple(np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]).ravel()))


class HeadlessSlicer:
    """A scene with the application logic and the module logics the glue relies on, set
    up as Slicer's application does at start."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        colors = self.app_logic.GetColorLogic()
        colors.SetMRMLScene(self.scene)
        colors.AddDefaultColorNodes()
        self.logics = {}
        for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                          ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
            logic = cls()
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic


@pytest.fixture
def app():
    return HeadlessSlicer()


def terminology_of(segment) -> str:
    value = vtk.reference("")
    assert segment.GetTag(mrml.TERMINOLOGY_TAG, value)
    return str(value)


def segmentation_from_labels(app, ct_node, labels: np.ndarray, names: dict[int, str]):
    """A segmentation node with one segment per label value, on the CT's grid."""
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lobes")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    for label, name in names.items():
        mask = (labels == label).astype(np.uint8)
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
        image.SetImageToWorldMatrix(m)
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, name, (1, 0, 0))
    return segmentation


def chest_like(shape=(24, 40, 48), geometry=OBLIQUE, seed=0) -> Volume:
    """Body (40 HU) around two lungs (-860 HU), air outside: passes the HU check."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000.0, np.float32)
    ct[:, 4:-4, 4:-4] = 40.0
    ct[2:-2, 8:-8, 8:22] = -860.0
    ct[2:-2, 8:-8, 26:-8] = -860.0
    return Volume(ct + rng.normal(0, 5, shape).astype(np.float32), geometry, "chest")


def fake_result(ct: Volume, seed=1):
    """A CaseResult with a non-trivial label map (what detection would produce)."""
    from EmphysemaUADLib.detection import CaseResult
    from EmphysemaUADLib.measurements import Measurements

    rng = np.random.default_rng(seed)
    lungs = (ct.array < -500).astype(np.uint8) * (ct.array > -950)
    anomaly = (rng.random(ct.shape, dtype=np.float32) * lungs).astype(np.float32)
    emphysema = ((anomaly > 0.7) & (lungs > 0)).astype(np.uint8)
    rows = [{"region": name, "volume_ml": 100.0 + i, "emphysema_index_percent": 3.0 * i,
             "laa950_percent": 1.5 * i, "perc15_hu": -900.0 - i, "mean_anomaly": 0.1 * i,
             "stage": stage, "stage_probabilities": {"None": 0.1, "Mild": 0.2,
                                                     "Moderate": 0.3, "Severe": 0.4}}
            for i, (name, stage) in enumerate((("whole lung", "Mild"), ("right lung", "None"),
                                               ("left lung", "Moderate")))]
    return CaseResult(ct, lungs, lungs.copy(), {1: "right upper zone"}, "zones", anomaly,
                      emphysema, Measurements.from_dicts(rows))


def load_segmentation(path, scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", Path(path).name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node


def test_geometry_matrix_round_trip():
    again = mrml.geometry_of_matrix(mrml.ijk_to_ras(OBLIQUE))
    np.testing.assert_allclose(again.spacing, OBLIQUE.spacing, atol=1e-9)
    np.testing.assert_allclose(again.origin, OBLIQUE.origin, atol=1e-9)
    np.testing.assert_allclose(again.direction, OBLIQUE.direction, atol=1e-9)


def test_volume_node_matches_what_slicer_writes(app, tmp_path):
    """The geometry read from a node equals the one SimpleITK reads from the file Slicer's own
    storage node writes: RAS <-> LPS is converted the way Slicer does."""
    ct = chest_like()
    node = mrml.volume_to_node(ct, app.scene, "CT")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert storage.WriteData(node)
    image = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    back = mrml.volume_from_node(node)
    np.testing.assert_allclose(back.geometry.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.geometry.direction, image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(back.array, sitk.GetArrayFromImage(image))
    np.testing.assert_array_equal(back.array, ct.array)


def test_parent_transform_moves_the_geometry(app):
    node = mrml.volume_to_node(chest_like(), app.scene, "CT")
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.0)  # RAS
    transform.SetMatrixTransformToParent(mrml._numpy_to_matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.volume_from_node(node).geometry
    np.testing.assert_allclose(np.subtract(moved.origin, OBLIQUE.origin), (-10.0, 5.0, 2.0),
                               atol=1e-9)


def test_bad_volumes_are_refused(app):
    with pytest.raises(InputError, match="no input CT"):
        mrml.volume_from_node(None)
    mr = Volume(np.random.default_rng(0).random((8, 16, 16)).astype(np.float32) * 500, OBLIQUE)
    with pytest.raises(InputError, match="Hounsfield"):
        mrml.volume_from_node(mrml.volume_to_node(mr, app.scene, "MR"))
    with pytest.raises(InputError, match="no image data"):
        mrml.volume_from_node(app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


def test_result_nodes_overlay_the_input(app, tmp_path):
    ct = chest_like()
    ct_node = mrml.volume_to_node(ct, app.scene, "CT")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    sh.CreateItem(study, ct_node)

    result = fake_result(mrml.volume_from_node(ct_node))
    assert result.emphysema.sum() > 100
    out = mrml.result_to_nodes(result, ct_node)

    ref = mrml.ijk_to_ras(OBLIQUE)
    m_out = vtk.vtkMatrix4x4()
    out.anomaly.GetIJKToRASMatrix(m_out)
    np.testing.assert_allclose(mrml._matrix_to_numpy(m_out), ref, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.anomaly), result.anomaly)
    display = out.anomaly.GetDisplayNode()
    assert display.GetColorNodeID() == mrml.HEAT_COLOR_NODE_ID
    assert app.scene.GetNodeByID(mrml.HEAT_COLOR_NODE_ID) is not None  # a real colour table
    assert (display.GetWindow(), display.GetLevel()) == (1.0, 0.5)
    # low anomaly is transparent in the overlay: the CT shows through
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == pytest.approx(mrml.ANOMALY_DISPLAY_FLOOR)

    # the segment, exported on the CT grid, is the label map voxel for voxel
    np.testing.assert_array_equal(mrml.segment_array(out.segmentation, ct_node),
                                  result.emphysema)
    segment = out.segmentation.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Emphysema"
    assert "~SCT^87433001^Pulmonary emphysema~" in terminology_of(segment)
    # the tag Slicer 5.6 and later read, and that parses as a terminology entry
    assert slicer.vtkSegment.GetTerminologyEntryTagName() == mrml.TERMINOLOGY_TAG
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
        terminology_of(segment), entry)
    assert (entry.GetTypeObject().GetCodingSchemeDesignator(),
            entry.GetTypeObject().GetCodeValue(), entry.GetTypeObject().GetCodeMeaning()) \
        == ("SCT", "87433001", "Pulmonary emphysema")
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"
    reference = out.segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert reference  # reference geometry taken from the input

    # the table: every region and stage
    table = out.table.GetTable()
    regions = [table.GetValueByName(r, "region").ToString() for r in range(table.GetNumberOfRows())]
    stages = [table.GetValueByName(r, "stage").ToString() for r in range(table.GetNumberOfRows())]
    assert regions == [row.region for row in result.measurements]
    assert stages == [row.stage for row in result.measurements]
    assert table.GetValueByName(2, "p_severe").ToDouble() == pytest.approx(0.4)

    for node in (out.segmentation, out.anomaly, out.table):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study

    # outputs given back in are reused, not duplicated
    again = mrml.result_to_nodes(result, ct_node, out.segmentation, out.anomaly, out.table)
    assert (again.segmentation, again.anomaly, again.table) == \
        (out.segmentation, out.anomaly, out.table)
    assert out.segmentation.GetSegmentation().GetNumberOfSegments() == 2  # emphysema, lung


def test_the_lungs_measured_are_outlined_segments(app):
    """Beside "Emphysema", one segment per lung as measured, coded Lung with its side,
    drawn as an outline in the slice views and hidden in 3D."""
    ct_node = mrml.volume_to_node(chest_like(), app.scene, "CT")
    result = fake_result(mrml.volume_from_node(ct_node))
    lungs = result.lungs.copy()
    lungs[:, :, lungs.shape[2] // 2:] *= 2  # the image's left half: the left lung
    result.lungs = lungs
    out = mrml.result_to_nodes(result, ct_node)
    segmentation = out.segmentation.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Emphysema", "Right lung", "Left lung"]
    display = out.segmentation.GetDisplayNode()
    for label, name, side in ((1, "Right lung", "24028007^Right"),
                              (2, "Left lung", "7771000^Left")):
        np.testing.assert_array_equal(mrml.segment_array(out.segmentation, ct_node, name),
                                      lungs == label)
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        entry = slicer.vtkSlicerTerminologyEntry()
        tag = terminology_of(segmentation.GetSegment(segment_id))
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(tag, entry)
        assert entry.GetTypeObject().GetCodeValue() == "39607008"  # Lung
        assert f"~SCT^{side}~" in tag
        assert not display.GetSegmentVisibility2DFill(segment_id)
        assert display.GetSegmentVisibility2DOutline(segment_id)
        assert not display.GetSegmentVisibility3D(segment_id)
    emphysema_id = segmentation.GetSegmentIdBySegmentName("Emphysema")
    assert display.GetSegmentVisibility2DFill(emphysema_id)


def test_exports_reload_identical(app, tmp_path):
    ct_node = mrml.volume_to_node(chest_like(), app.scene, "CT")
    result = fake_result(mrml.volume_from_node(ct_node))
    out = mrml.result_to_nodes(result, ct_node)

    path = mrml.save_segmentation(out.segmentation, tmp_path / "emphysema.seg.nrrd")
    reloaded = load_segmentation(path, app.scene)
    np.testing.assert_array_equal(mrml.segment_array(reloaded, ct_node), result.emphysema)
    assert terminology_of(reloaded.GetSegmentation().GetNthSegment(0)) == \
        mrml.EMPHYSEMA_TERMINOLOGY

    nifti = mrml.save_label_map(out.segmentation, ct_node, tmp_path / "emphysema.nii.gz")
    image = sitk.ReadImage(str(nifti))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), result.emphysema)
    np.testing.assert_allclose(image.GetOrigin(), OBLIQUE.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), OBLIQUE.direction, atol=1e-5)

    rows = list(csv.DictReader(open(mrml.save_table_csv(out.table, tmp_path / "t.csv"))))
    assert [r["region"] for r in rows] == [m.region for m in result.measurements]
    assert [r["stage"] for r in rows] == [m.stage for m in result.measurements]
    assert float(rows[1]["emphysema_index_percent"]) == pytest.approx(3.0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_lobes_from_a_segmentation_node(app):
    ct = chest_like(geometry=Geometry((1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    ct_node = mrml.volume_to_node(ct, app.scene, "CT")
    truth = np.zeros(ct.shape, np.uint8)
    truth[2:12, 8:-8, 8:22] = 3   # right lower lobe (label 3), named "RLL"
    truth[12:-2, 8:-8, 26:-8] = 4  # left upper lobe (label 4), named "Left upper lobe"
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lobes")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    for label, name in ((3, "RLL"), (4, "Left upper lobe"), (9, "trachea")):
        mask = np.zeros(ct.shape, np.uint8)
        mask[truth == label] = 1
        if label == 9:
            mask[0, 0:3, 0:3] = 1
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(ct.shape[2], ct.shape[1], ct.shape[0])
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
        m = vtk.vtkMatrix4x4()
        ct_node.GetIJKToRASMatrix(m)
        image.SetImageToWorldMatrix(m)
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, name, (1, 0, 0))
    regions, legend = mrml.regions_from_node(segmentation, ct_node)
    np.testing.assert_array_equal(regions, truth)
    assert legend == {3: LOBES[3], 4: LOBES[4]}

    unnamed = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    unnamed.GetSegmentation().AddEmptySegment("", "tumour")
    with pytest.raises(InputError, match="no segment is named after a lobe"):
        mrml.regions_from_node(unnamed, ct_node)


def test_lobes_from_a_label_map_node(app):
    ct = chest_like()
    ct_node = mrml.volume_to_node(ct, app.scene, "CT")
    lobes = np.zeros(ct.shape, np.int16)
    lobes[2:12, 8:-8, 8:22] = 14    # TotalSegmentator: right lower lobe
    lobes[12:-2, 8:-8, 26:-8] = 10  # TotalSegmentator: left upper lobe
    label_node = mrml.volume_to_node(Volume(lobes, OBLIQUE), app.scene, "ts",
                                     "vtkMRMLLabelMapVolumeNode")
    regions, legend = mrml.regions_from_node(label_node, ct_node)
    assert set(legend) == {3, 4}
    np.testing.assert_array_equal(regions == 3, lobes == 14)
    np.testing.assert_array_equal(regions == 4, lobes == 10)


def test_detection_on_a_phantom_node_comes_back_on_its_grid(app, tmp_path):
    """End to end: phantom -> volume node -> detect_case (tiny untrained model) -> nodes."""
    from EmphysemaUADLib.checkpoint import save_checkpoint
    from EmphysemaUADLib.detection import Detector, detect_case
    from EmphysemaUADLib.network import EDLNet
    from EmphysemaUADLib.phantom import make_phantom

    phantom = make_phantom(5, shape=(20, 64, 64), spacing=(5.0, 5.0, 5.0), emphysema="severe")
    ct_node = mrml.volume_to_node(phantom.ct, app.scene, "phantom")
    model = EDLNet(width=4)
    save_checkpoint(tmp_path / "tiny.pt", model.state_dict(),
                    {"model": model.config, "input_size": 64,
                     "intensity_window": [-1000, 400], "training": {}})
    ct = mrml.volume_from_node(ct_node)
    np.testing.assert_allclose(ct.geometry.origin, phantom.ct.geometry.origin, atol=1e-9)
    np.testing.assert_allclose(ct.geometry.direction, phantom.ct.geometry.direction, atol=1e-9)
    detector = Detector.load(tmp_path / "tiny.pt", "cpu", threshold=0.5)
    result = detect_case(ct, detector)
    out = mrml.result_to_nodes(result, ct_node)

    np.testing.assert_array_equal(mrml.segment_array(out.segmentation, ct_node),
                                  result.emphysema)
    m = vtk.vtkMatrix4x4()
    out.anomaly.GetIJKToRASMatrix(m)
    np.testing.assert_allclose(mrml._matrix_to_numpy(m), mrml.ijk_to_ras(phantom.ct.geometry),
                               atol=1e-9)
    table = out.table.GetTable()
    assert table.GetNumberOfRows() == len(result.measurements) == 3 + len(result.legend)
    assert [table.GetValueByName(r, "stage").ToString() for r in range(table.GetNumberOfRows())] \
        == ["" if row.stage is None else row.stage for row in result.measurements]


def _tiny_model(path):
    from EmphysemaUADLib.checkpoint import save_checkpoint
    from EmphysemaUADLib.network import EDLNet

    model = EDLNet(width=4)
    save_checkpoint(path, model.state_dict(), {"model": model.config, "input_size": 64,
                                               "intensity_window": [-1000, 400],
                                               "training": {}})
    return path


@pytest.mark.slow  # a real `detect` process: about 15 s on 2 cores
def test_background_detection_nodes_equal_the_cli_files(app, tmp_path):
    """What the widget does with "Run in a background process": the CT node and a lobe
    segmentation node go to files, a real `python -m EmphysemaUADLib detect` process runs on
    them, its files come back as nodes. The segment equals the CLI's label map voxel for
    voxel, and the in-process result; the table holds every lobe and stage of its report."""
    import json

    from EmphysemaUADLib.detection import Detector, detect_case
    from EmphysemaUADLib.phantom import make_phantom
    from EmphysemaUADLib.process import BackgroundProcess, detect_args
    from EmphysemaUADLib.volume_io import read_labels

    phantom = make_phantom(5, shape=(20, 64, 64), spacing=(5.0, 5.0, 5.0), emphysema="severe")
    ct_node = mrml.volume_to_node(phantom.ct, app.scene, "phantom")
    # lobes from the phantom's zones: upper/middle/lower right, upper and the rest left
    lobe_names = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "left lower lobe"}
    lobes = np.minimum(phantom.zones, 5).astype(np.uint8)
    lobes_node = segmentation_from_labels(app, ct_node, lobes, lobe_names)
    model = _tiny_model(tmp_path / "tiny.pt")

    ct_path, lobes_path = mrml.write_detection_inputs(ct_node, tmp_path / "in", lobes_node)
    process = BackgroundProcess.cli(detect_args(ct_path, tmp_path / "out", lobes_path, model,
                                                0.5, "cpu")).start()
    events = []
    while not process.finished:
        events += process.poll()
        time.sleep(0.05)
    events += process.poll()
    assert process.returncode == 0, list(process.stderr_tail)[-10:]
    assert any(e["event"] == "step" for e in events)  # JSON progress came through

    case = tmp_path / "out" / "ct"
    out = mrml.detection_outputs_to_nodes(case, ct_node)
    cli_labels = read_labels(case / "emphysema.nii.gz").array
    np.testing.assert_array_equal(mrml.segment_array(out.segmentation, ct_node), cli_labels)
    cli_lungs = read_labels(case / "lungs.nii.gz").array
    for label, name in ((1, "Right lung"), (2, "Left lung")):
        np.testing.assert_array_equal(mrml.segment_array(out.segmentation, ct_node, name),
                                      cli_lungs == label)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.anomaly),
                                  sitk.GetArrayFromImage(sitk.ReadImage(
                                      str(case / "anomaly_map.nii.gz"))))

    # the same detection in this process (the panel's other mode) gives the same labels
    detector = Detector.load(model, "cpu", threshold=0.5)
    result = detect_case(mrml.volume_from_node(ct_node), detector,
                         lobes=mrml.write_lobes(lobes_node, ct_node, tmp_path / "again"))
    np.testing.assert_array_equal(result.emphysema, cli_labels)

    report = json.loads((case / "report.json").read_text())
    assert report["region_kind"] == "lobes"
    table = out.table.GetTable()
    rows = [(table.GetValueByName(r, "region").ToString(),
             table.GetValueByName(r, "stage").ToString()) for r in range(table.GetNumberOfRows())]
    assert rows == [(row["region"], row["stage"] or "") for row in report["regions"]]
    assert {name for name, _ in rows} >= {"whole lung", "right upper lobe", "left lower lobe"}
    assert out.table.GetAttribute("EmphysemaUAD.RegionKind") == "lobes"
    # the case's notes (the panel's status line) come back as the in-process result has them
    from EmphysemaUADLib.report import case_notes

    assert report["notes"] == case_notes(result, detector)
    assert out.table.GetAttribute(mrml.NOTES_ATTRIBUTE) == "\n".join(report["notes"])


def test_table_columns_have_titles_units_and_descriptions(app):
    """The table shows "Emphysema index" with its unit, not the key; the keys stay the
    column names (CSV export, report.json) and every header comes from measurements.COLUMNS."""
    from EmphysemaUADLib.measurements import COLUMNS
    from EmphysemaUADLib.staging import STAGES

    ct_node = mrml.volume_to_node(chest_like(), app.scene, "CT")
    nodes = mrml.result_to_nodes(fake_result(mrml.volume_from_node(ct_node)), ct_node)
    table = nodes.table
    names = [table.GetTable().GetColumnName(c)
             for c in range(table.GetTable().GetNumberOfColumns())]
    assert names == [c.key for c in COLUMNS] + [f"p_{s.lower()}" for s in STAGES]
    for column in COLUMNS:
        assert table.GetColumnTitle(column.key) == column.title
        assert table.GetColumnUnitLabel(column.key) == column.unit
        assert table.GetColumnDescription(column.key) == column.description
    assert table.GetColumnTitle("emphysema_index_percent") == "Emphysema index"
    assert table.GetColumnUnitLabel("perc15_hu") == "HU"
    assert table.GetColumnTitle("p_mild") == "P(Mild)"
    assert "Mild" in table.GetColumnDescription("p_mild")
    assert table.GetUseColumnTitleAsColumnHeader()


def test_segment_terminology_names_the_shipped_terminology_file(app):
    import json

    term = json.loads((Path(__file__).resolve().parents[1] / "EmphysemaUAD" / "Resources"
                       / "Terminology" / "EmphysemaUAD.term.json").read_text())
    assert term["SegmentationCategoryTypeContextName"] == mrml.TERMINOLOGY_CONTEXT
    category = term["SegmentationCodes"]["Category"][0]
    kind = category["Type"][0]
    fields = mrml.EMPHYSEMA_TERMINOLOGY.split("~")
    assert fields[0] == mrml.TERMINOLOGY_CONTEXT
    assert fields[1] == f"SCT^{category['CodeValue']}^{category['CodeMeaning']}"
    assert fields[2] == f"SCT^{kind['CodeValue']}^{kind['CodeMeaning']}" \
        == "SCT^87433001^Pulmonary emphysema"
    assert tuple(round(c / 255, 2) for c in kind["recommendedDisplayRGBValue"]) == \
        mrml.EMPHYSEMA_COLOR


class StandInTotalSegmentator:
    """What the TotalSegmentator extension's logic does to the output segmentation (segments
    named by its terminology, e.g. "left upper lobe of lung"), without the network."""

    NAMES = {"lung_upper_lobe_left": "upper lobe of left lung",
             "lung_lower_lobe_left": "lower lobe of left lung",
             "lung_upper_lobe_right": "upper lobe of right lung",
             "lung_middle_lobe_right": "middle lobe of right lung",
             "lung_lower_lobe_right": "lower lobe of right lung"}

    def __init__(self, labels, skip=()):
        self.labels, self.skip, self.calls = labels, set(skip), []

    def process(self, inputVolume, outputSegmentation, fast=True, cpu=False, task=None,
                subset=None):
        self.calls.append({"fast": fast, "cpu": cpu, "task": task, "subset": subset})
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        m = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(m)
        for value, name in enumerate(subset, start=1):
            if name in self.skip:
                continue
            mask = (self.labels == value).astype(np.uint8)
            image = slicer.vtkOrientedImageData()
            image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
            image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
            image.SetImageToWorldMatrix(m)
            outputSegmentation.AddSegmentFromBinaryLabelmapRepresentation(
                image, self.NAMES[name], (1, 0, 0))


def _five_lobes(shape):
    labels = np.zeros(shape, np.uint8)
    labels[2:-2, 8:-8, 26:-8] = 1  # left upper (image x: left lung on the right side)
    labels[12:-2, 8:-8, 26:-8] = 2
    labels[2:8, 8:-8, 8:22] = 3
    labels[8:14, 8:-8, 8:22] = 4
    labels[14:-2, 8:-8, 8:22] = 5
    return labels


def test_lobes_with_totalsegmentator_feed_the_lobes_selector(app):
    ct_node = mrml.volume_to_node(chest_like(), app.scene, "CT")
    logic = StandInTotalSegmentator(_five_lobes(chest_like().shape))
    segmentation = mrml.lobes_with_totalsegmentator(logic, ct_node)
    assert logic.calls == [{"fast": False, "cpu": False, "task": "total",
                            "subset": list(mrml.TOTALSEGMENTATOR_LOBES)}]
    regions, legend = mrml.regions_from_node(segmentation, ct_node)
    assert sorted(legend.values()) == sorted(LOBES.values())
    assert regions.shape == chest_like().shape
    assert segmentation.GetName() == "CT lobes"


def test_lobes_with_totalsegmentator_missing_a_lobe_is_explained(app):
    ct_node = mrml.volume_to_node(chest_like(), app.scene, "CT")
    logic = StandInTotalSegmentator(_five_lobes(chest_like().shape),
                                    skip={"lung_middle_lobe_right"})
    before = app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="right middle lobe"):
        mrml.lobes_with_totalsegmentator(logic, ct_node)
    # the segmentation made for the failed run is not left behind
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
