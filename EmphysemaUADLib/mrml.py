"""MRML glue: Slicer volume nodes in, detection results out as segmentation, volume and table
nodes. The only library file that imports `slicer` and `vtk`; it needs no Qt and no
`slicer.app`, so it runs in 3D Slicer and, for tests, on the `slicer-core` package.

Slicer places voxels in RAS, ITK (and so `Geometry`) in LPS: the two differ by the sign of
the first two axes, of both the origin and the direction rows.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError
from .atomic import atomic_path
from .lungs import LEFT, LUNG_NAMES, RIGHT, ROI, lung_legend
from .measurements import COLUMN, COLUMNS, Measurements
from .regions import LOBES, lobe_from_name, lobe_mapping, relabel
from .render import OUTLINE_COLORS
from .staging import STAGES
from .volume_io import Geometry, Volume, looks_like_hu, write_volume

if TYPE_CHECKING:  # detection imports torch; the glue itself does not need it
    from .detection import CaseResult

EMPHYSEMA_SEGMENT = "Emphysema"
EMPHYSEMA_COLOR = (0.93, 0.33, 0.11)
HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"  # built into every Slicer scene
# anomaly probabilities below this are transparent in the foreground overlay, so the CT
# shows through wherever the network sees nothing
ANOMALY_DISPLAY_FLOOR = 0.1
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
TABLE_COLUMNS = tuple(c.key for c in COLUMNS)


# --- geometry ----------------------------------------------------------------------------
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(geometry: Geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a (LPS) Geometry."""
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = _LPS_RAS @ direction @ np.diag(geometry.spacing)
    m[:3, 3] = _LPS_RAS @ np.asarray(geometry.origin, float)
    return m


def geometry_of_matrix(m: np.ndarray) -> Geometry:
    """(LPS) Geometry of a 4x4 IJK-to-RAS matrix."""
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = _LPS_RAS @ m[:3, :3] / spacing
    origin = _LPS_RAS @ m[:3, 3]
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(d) for d in direction.ravel()))


def _world_ijk_to_ras(node) -> np.ndarray:
    """The node's IJK-to-RAS matrix with its (linear) parent transforms applied."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    matrix = _matrix_to_numpy(m)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{node.GetName()}: lies under a non-linear transform; harden "
                             "the transform (Data module, right-click) and run again.")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = _matrix_to_numpy(to_world) @ matrix
    return matrix


def _array_of(node) -> np.ndarray:
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"{node.GetName()}: the volume holds no image data.")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(f"{node.GetName()}: has {scalars.GetNumberOfComponents()} components "
                         "per voxel (colour or vector volume); a CT volume has one.")
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]).copy()


def volume_from_node(node) -> Volume:
    """A scalar volume node as a validated CT Volume in HU, with its exact (world) geometry."""
    if node is None:
        raise InputError("no input CT selected; choose a CT volume.")
    array = _array_of(node).astype(np.float32, copy=False)
    if not np.isfinite(array).all() or float(array.min()) == float(array.max()):
        raise InputError(f"{node.GetName()}: holds no usable image (constant, NaN or "
                         "infinite values).")
    if not looks_like_hu(array):
        raise InputError(f"{node.GetName()}: does not look like CT in Hounsfield units (no air "
                         "near -1000 HU and soft tissue near 0 HU).")
    return Volume(array, geometry_of_matrix(_world_ijk_to_ras(node)), node.GetName())


def _set_array(node, array: np.ndarray, reference=None, geometry: Geometry | None = None):
    """Fill a volume node with a (z, y, x) array placed like `reference` (node: its own
    matrix and parent transform) or at `geometry`."""
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    data = np.ascontiguousarray(array).ravel()
    scalars = numpy_support.numpy_to_vtk(data, deep=True,
                                         array_type=numpy_support.get_vtk_array_type(data.dtype))
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    if reference is not None:
        m = vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(m)
        node.SetIJKToRASMatrix(m)
        parent = reference.GetParentTransformNode()
        node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
    else:
        node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras(geometry)))
    return node


def volume_to_node(volume: Volume, scene, name: str, node_class="vtkMRMLScalarVolumeNode"):
    """A new volume node holding `volume` at its geometry (e.g. a CT read from a file)."""
    node = scene.AddNewNodeByClass(node_class, name)
    _set_array(node, volume.array, geometry=volume.geometry)
    node.CreateDefaultDisplayNodes()
    return node


# --- lobes from Slicer nodes --------------------------------------------------------------
def regions_from_node(node, ct_node) -> tuple[np.ndarray, dict[int, str]]:
    """Lobe regions on the CT's grid from a segmentation node (segment names say the lobe)
    or a label map volume node (its colour names say the lobe, or TotalSegmentator 10-14 /
    lungmask LTRCLobes 1-5 values). Labels and names are those of `regions.LOBES`."""
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        ids, labels = vtk.vtkStringArray(), []
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            label = lobe_from_name(segment.GetName())
            if label is not None:
                ids.InsertNextValue(segmentation.GetNthSegmentID(i))
                labels.append(label)
        if not labels:
            names = [segmentation.GetNthSegment(i).GetName()
                     for i in range(segmentation.GetNumberOfSegments())]
            raise InputError(f"{node.GetName()}: no segment is named after a lobe ({names}); "
                             "name them e.g. 'right upper lobe' or 'RUL'.")
        labelmap = node.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    node, ids, labelmap, ct_node):
                raise InputError(f"{node.GetName()}: its segments could not be exported onto "
                                 "the CT's grid.")
            exported = _array_of(labelmap)
        finally:
            node.GetScene().RemoveNode(labelmap)
        mapping = {i + 1: label for i, label in enumerate(labels)}  # export numbers 1..n
    elif node.IsA("vtkMRMLLabelMapVolumeNode"):
        exported = _resampled_labels(node, ct_node)
        mapping = _labelmap_lobes(node, set(np.unique(exported).tolist()) - {0})
    else:
        raise InputError(f"{node.GetName()}: lobes must be a segmentation or a label map.")
    regions = relabel(exported, mapping)
    present = set(np.unique(regions).tolist()) - {0}
    return regions, {k: v for k, v in LOBES.items() if k in present}


def _labelmap_lobes(node, values: set[int]) -> dict[int, int]:
    colors = node.GetDisplayNode().GetColorNode() if node.GetDisplayNode() else None
    names = {v: colors.GetColorName(v) for v in values} if colors else None
    return lobe_mapping(values, names, node.GetName())[0]


def _resampled_labels(node, ct_node) -> np.ndarray:
    """A label map's values on the CT's grid (nearest neighbour where the grids differ)."""
    import SimpleITK as sitk

    from .volume_io import to_image

    labels = _array_of(node)
    geometry = geometry_of_matrix(_world_ijk_to_ras(node))
    ct_geometry = geometry_of_matrix(_world_ijk_to_ras(ct_node))
    ct_shape = ct_node.GetImageData().GetDimensions()[::-1]
    if labels.shape == tuple(ct_shape) and np.allclose(
            ijk_to_ras(geometry), ijk_to_ras(ct_geometry), atol=1e-4):
        return labels
    resampled = sitk.Resample(to_image(labels, geometry),
                              to_image(np.zeros(ct_shape, np.uint8), ct_geometry),
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)


# --- files for a detection in another process --------------------------------------------
DETECTION_CASE_FILE = "ct.nrrd"  # `detect` names the case folder after the file: "ct"


def write_lobes(lobes_node, ct_node, folder) -> Path:
    """Lobes from a Slicer node as `lobes.nrrd` + `lobes.json` (its legend) on the CT's grid,
    the form `detect --lobes` reads."""
    import json

    regions, legend = regions_from_node(lobes_node, ct_node)
    ct = volume_from_node(ct_node)
    path = write_volume(regions, ct.geometry, Path(folder) / "lobes.nrrd")
    (Path(folder) / "lobes.json").write_text(json.dumps({str(k): v for k, v in legend.items()}))
    return path


def write_detection_inputs(ct_node, folder, lobes_node=None) -> tuple[Path, Path | None]:
    """The CT (world geometry, HU) as `ct.nrrd` and the lobes, if any, for `detect`;
    returns (ct path, lobes path or None)."""
    folder = Path(folder)
    ct = volume_from_node(ct_node)
    ct_path = write_volume(ct.array, ct.geometry, folder / DETECTION_CASE_FILE)
    lobes = write_lobes(lobes_node, ct_node, folder) if lobes_node is not None else None
    return ct_path, lobes


def detection_outputs_to_nodes(case_dir, ct_node, segmentation=None, anomaly=None,
                               table=None) -> OutputNodes:
    """Nodes from the files `detect` wrote for one case (emphysema.nii.gz, lungs.nii.gz,
    anomaly_map.nii.gz, report.json); the arrays are placed on the CT node's own grid (see
    `arrays_to_nodes`)."""
    import json

    import SimpleITK as sitk

    from .volume_io import read_labels

    case_dir = Path(case_dir)
    report_path = case_dir / "report.json"
    if not report_path.is_file():
        raise InputError(f"{case_dir}: holds no detection result (report.json).")
    report = json.loads(report_path.read_text())
    emphysema, lungs = (read_labels(case_dir / name).array.astype(np.uint8)
                        for name in ("emphysema.nii.gz", "lungs.nii.gz"))
    anomaly_map = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "anomaly_map.nii.gz")))
    return arrays_to_nodes(ct_node, emphysema, lungs, anomaly_map,
                           Measurements.from_dicts(report["regions"]), report["region_kind"],
                           segmentation, anomaly, table, report.get("notes", ()))


# --- results onto nodes -------------------------------------------------------------------
NOTES_ATTRIBUTE = "EmphysemaUAD.Notes"  # the table node's: the case's notes, one per line


@dataclass
class OutputNodes:
    segmentation: object
    anomaly: object
    table: object


# Serialised terminology entry, the form Slicer stores in a segment's "TerminologyEntry" tag
# since 4.8 (context~category~type~type modifier~region context~region~region modifier; each
# code as scheme^value^meaning). Written as a string with SetTag, not through
# vtkSlicerTerminologyEntry setters or vtkSegment.SetTerminology: Slicer 5.6 has neither
# SetRegionContextName nor SetTerminology (later versions renamed and added them), while the
# string and the tag are read the same way by every Slicer 5.x and by its DICOM SEG export.
# The context is that of the module's own terminology file
# (EmphysemaUAD/Resources/Terminology/EmphysemaUAD.term.json, loaded at Slicer's start): the
# DICOM master list that Slicer ships does not hold 87433001.
TERMINOLOGY_CONTEXT = "Segmentation category and type - Emphysema UAD"
EMPHYSEMA_TERMINOLOGY = (
    TERMINOLOGY_CONTEXT +
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^87433001^Pulmonary emphysema"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~SCT^39607008^Lung"
    "~^^")
TERMINOLOGY_TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName()
# The lungs as measured, from Slicer's own DICOM master list: type Lung, modifier the side
_LUNG_TERMINOLOGY = ("Segmentation category and type - DICOM master list"
                     "~SCT^123037004^Anatomical Structure~SCT^39607008^Lung~{}"
                     "~Anatomic codes - DICOM master list~^^~^^")
LUNG_TERMINOLOGY = {RIGHT: _LUNG_TERMINOLOGY.format("SCT^24028007^Right"),
                    LEFT: _LUNG_TERMINOLOGY.format("SCT^7771000^Left"),
                    ROI: _LUNG_TERMINOLOGY.format("^^")}


def _check_grid(array: np.ndarray, ct_node) -> None:
    dims = ct_node.GetImageData().GetDimensions()[::-1] if ct_node.GetImageData() else None
    if dims != array.shape:
        raise ValueError(f"result of shape {array.shape} does not belong to "
                         f"{ct_node.GetName()} (shape {dims})")


def _add_segment(node, mask: np.ndarray, ct_node, name: str, color, terminology: str) -> str:
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    data = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    labelmap.SetImageToWorldMatrix(m)
    segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(labelmap, name, color)
    node.GetSegmentation().GetSegment(segment_id).SetTag(TERMINOLOGY_TAG, terminology)
    return segment_id


def lung_segment_name(label: int) -> str:
    name = LUNG_NAMES[label]
    return name[0].upper() + name[1:]


def _fill_segmentation(node, emphysema: np.ndarray, lungs: np.ndarray, ct_node) -> None:
    """The "Emphysema" segment, then one segment per lung as measured, shown as outlines in
    the slice views and hidden in 3D so that they frame the emphysema without covering it."""
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    parent = ct_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
    node.GetSegmentation().RemoveAllSegments()
    _add_segment(node, emphysema, ct_node, EMPHYSEMA_SEGMENT, EMPHYSEMA_COLOR,
                 EMPHYSEMA_TERMINOLOGY)
    lung_ids = [_add_segment(node, lungs == label, ct_node, lung_segment_name(label),
                             tuple(c / 255.0 for c in OUTLINE_COLORS[label]),
                             LUNG_TERMINOLOGY[label])
                for label in lung_legend(lungs)]
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    for segment_id in lung_ids:
        display.SetSegmentVisibility2DFill(segment_id, False)
        display.SetSegmentVisibility3D(segment_id, False)


def column_header(name: str) -> tuple[str, str, str]:
    """(title, unit, description) of a table column: measurements.COLUMNS, or a stage's
    probability (p_<stage>)."""
    if name in COLUMN:
        column = COLUMN[name]
        return column.title, column.unit, column.description
    for stage in STAGES:
        if name == f"p_{stage.lower()}":
            return (f"P({stage})", "",
                    f"Probability that the region's stage is {stage}, 0 to 1.")
    raise KeyError(name)


def _fill_table(node, measurements: Measurements, region_kind: str) -> None:
    table = node.GetTable()
    table.Initialize()
    columns = [(name, lambda row, name=name: getattr(row, name)) for name in TABLE_COLUMNS]
    columns += [(f"p_{stage.lower()}",
                 lambda row, stage=stage: (row.stage_probabilities or {}).get(stage))
                for stage in STAGES]
    for name, value_of in columns:
        array = vtk.vtkStringArray() if name in ("region", "stage", "coverage") \
            else vtk.vtkDoubleArray()
        array.SetName(name)
        for row in measurements:
            value = value_of(row)
            if isinstance(array, vtk.vtkStringArray):
                array.InsertNextValue("" if value is None else str(value))
            else:
                array.InsertNextValue(np.nan if value is None else float(value))
        table.AddColumn(array)
        title, unit, description = column_header(name)
        node.SetColumnTitle(name, title)
        node.SetColumnUnitLabel(name, unit)
        node.SetColumnDescription(name, description)
    node.SetAttribute("EmphysemaUAD.RegionKind", region_kind)
    node.SetUseColumnTitleAsColumnHeader(True)
    node.Modified()


def result_to_nodes(result: "CaseResult", ct_node, segmentation=None, anomaly=None,
                    table=None, notes=()) -> OutputNodes:
    """Write a detection result into nodes; see `arrays_to_nodes`."""
    return arrays_to_nodes(ct_node, result.emphysema, result.lungs, result.anomaly,
                           result.measurements, result.region_kind, segmentation, anomaly,
                           table, notes)


def arrays_to_nodes(ct_node, emphysema: np.ndarray, lungs: np.ndarray, anomaly_map: np.ndarray,
                    measurements: Measurements, region_kind: str, segmentation=None,
                    anomaly=None, table=None, notes=()) -> OutputNodes:
    """Detection outputs on the CT's grid into nodes (given ones are reused, missing ones
    created): an "Emphysema" segment and the lungs' segments (`lungs`: lung labels), the
    anomaly map with a heat colour table, the measurement table (with the case's `notes`,
    report.case_notes, in its NOTES_ATTRIBUTE, one per line). Volumes share the input's
    IJK-to-RAS matrix and parent transform; all are put under the input's study in the
    subject hierarchy."""
    for array in (emphysema, lungs, anomaly_map):
        _check_grid(array, ct_node)
    scene = ct_node.GetScene()
    base = ct_node.GetName()
    if segmentation is None:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                               scene.GenerateUniqueName(f"{base} emphysema"))
    if anomaly is None:
        anomaly = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                          scene.GenerateUniqueName(f"{base} anomaly map"))
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                        scene.GenerateUniqueName(f"{base} emphysema table"))
    _fill_segmentation(segmentation, emphysema, lungs, ct_node)
    _set_array(anomaly, anomaly_map.astype(np.float32), reference=ct_node)
    if anomaly.GetDisplayNode() is None:
        anomaly.CreateDefaultDisplayNodes()
    display = anomaly.GetDisplayNode()
    display.SetAndObserveColorNodeID(HEAT_COLOR_NODE_ID)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(False)
    display.SetLowerThreshold(ANOMALY_DISPLAY_FLOOR)
    display.SetUpperThreshold(1.0)
    display.SetApplyThreshold(True)
    _fill_table(table, measurements, region_kind)
    table.SetAttribute(NOTES_ATTRIBUTE, "\n".join(notes))
    place_under_study([segmentation, anomaly, table], ct_node)
    return OutputNodes(segmentation, anomaly, table)


def place_under_study(nodes, ct_node) -> None:
    """Put nodes under the parent (study) of the input in the subject hierarchy. Slicer's Qt
    plugins give every node an item; without them (slicer-core) missing items are made."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ct_node.GetScene())
    if sh is None:
        return
    ct_item = sh.GetItemByDataNode(ct_node)
    study = (sh.GetItemParent(ct_item) if ct_item else 0) or sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, study)
        else:
            sh.CreateItem(study, node)


def came_from_dicom(node) -> bool:
    """True when the volume was loaded from DICOM (it then has instance UIDs)."""
    return bool(node is not None and node.GetAttribute("DICOM.instanceUIDs"))


# --- export -------------------------------------------------------------------------------
def segment_array(segmentation_node, ct_node, name: str = EMPHYSEMA_SEGMENT) -> np.ndarray:
    """A segment as a uint8 (z, y, x) mask on the CT's grid."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    if not segment_id:
        raise InputError(f"{segmentation_node.GetName()}: has no segment named {name!r}.")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    scene = ct_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, ct_node)
        return (_array_of(labelmap) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def _storage_write(storage, node, path: Path) -> Path:
    """Write through a storage node to a temporary name, then rename into place."""
    with atomic_path(path) as partial:
        storage.SetFileName(str(partial))
        if hasattr(storage, "SetUseCompression"):
            storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise OSError(f"{path}: could not be written.")
    return path


def save_segmentation(node, path) -> Path:
    """The segmentation as a .seg.nrrd file."""
    return _storage_write(slicer.vtkMRMLSegmentationStorageNode(), node, Path(path))


def save_label_map(segmentation_node, ct_node, path) -> Path:
    """The emphysema segment as a label map (1 = emphysema) on the CT's grid, e.g. NIfTI."""
    mask = segment_array(segmentation_node, ct_node)
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)  # the node's own placement, as Slicer saves volumes
    return write_volume(mask, geometry_of_matrix(_matrix_to_numpy(m)), path)


def save_table_csv(table_node, path) -> Path:
    table = table_node.GetTable()
    path = Path(path)
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    with atomic_path(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for r in range(table.GetNumberOfRows()):
            writer.writerow([_cell(table.GetValue(r, c)) for c in range(len(names))])
    return path


def _cell(variant) -> str:
    text = variant.ToString()
    return "" if text.lower() == "nan" else text


# --- lobes from the TotalSegmentator extension ---------------------------------------------
# TotalSegmentator's class names of the five lobes (task "total")
TOTALSEGMENTATOR_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left",
                          "lung_upper_lobe_right", "lung_middle_lobe_right",
                          "lung_lower_lobe_right")


def lobes_with_totalsegmentator(logic, ct_node, segmentation=None, fast: bool = False,
                                cpu: bool = False):
    """Lobes of the CT from the TotalSegmentator extension's logic (its `process(inputVolume,
    outputSegmentation, fast, cpu, task, subset)`), into `segmentation` (made when None);
    checked to hold the five lobes by name, as the Lobes selector reads them. Returns the
    segmentation node."""
    scene = ct_node.GetScene()
    made = segmentation is None
    if made:
        segmentation = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{ct_node.GetName()} lobes"))
    try:
        logic.process(ct_node, segmentation, fast=fast, cpu=cpu, task="total",
                      subset=list(TOTALSEGMENTATOR_LOBES))
        legend = regions_from_node(segmentation, ct_node)[1]
        if len(legend) < len(LOBES):
            missing = sorted(set(LOBES.values()) - set(legend.values()))
            raise InputError(f"TotalSegmentator found no {', '.join(missing)} in "
                             f"{ct_node.GetName()}; check that the CT covers both lungs.")
    except Exception:
        if made:
            scene.RemoveNode(segmentation)
        raise
    place_under_study([segmentation], ct_node)
    return segmentation
