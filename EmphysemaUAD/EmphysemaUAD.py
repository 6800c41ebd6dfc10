"""3D Slicer module: detect and stage emphysema on a CT volume; train a model on healthy CTs.

Kept thin: the work is done by the EmphysemaUADLib package (no Qt), which this module finds
beside itself (built extension) or one folder up (source checkout). Training, and detection
when asked, run as a separate `PythonSlicer -m EmphysemaUADLib ... --progress json` process
that a timer polls, so the application never freezes.

torch is never imported in Slicer's own process on load, on enter or for the panel (it costs
seconds and memory there, and an imported torch cannot be reinstalled by the PyTorch
extension): the device line asks a worker Python, the model's threshold and summary are read
from the JSON beside the checkpoint. Only detection unticked from the background imports it.
"""
import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _libraryParent() -> Optional[Path]:
    """The folder holding EmphysemaUADLib: beside this file in a built or installed extension
    (lib/Slicer-X.Y/qt-scripted-modules, which Slicer puts on sys.path), or the repository
    root, one level up, in a source checkout used through "Additional module paths"."""
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent):
        if (folder / "EmphysemaUADLib" / "__init__.py").is_file():
            return folder
    return None


_LIBRARY_PARENT = _libraryParent()
if _LIBRARY_PARENT is not None and str(_LIBRARY_PARENT) not in sys.path:
    sys.path.insert(0, str(_LIBRARY_PARENT))

from EmphysemaUADLib.devices import DEVICE_CHOICES  # noqa: E402 (needs the path above)
from EmphysemaUADLib.process import SITE_MODEL_NAME  # noqa: E402

MODEL_SOURCES = ["Bundled model", "Checkpoint file"]
DEVICES = list(DEVICE_CHOICES)
POLL_INTERVAL_MS = 250
DETECT_CANCEL_GRACE_S = 5  # detection has nothing to save: stop it quickly
TORCH_MINIMUM = "2.1"
DICOM_SEG_PLUGIN = "DICOMSegmentationPlugin"
MODULE_DIR = Path(__file__).resolve().parent
# what the library needs in Slicer's Python besides torch (pyproject's dependencies less
# torch, which comes from the PyTorch extension; a test keeps the two equal)
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "Requirements" / "requirements.txt"
TERMINOLOGY_FILE = MODULE_DIR / "Resources" / "Terminology" / "EmphysemaUAD.term.json"
SAMPLE_CATEGORY = "Emphysema UAD"
SAMPLE_NAME = "EmphysemaUADPhantom"
SAMPLE_NODE_NAME = "Emphysema phantom CT"
TOTALSEGMENTATOR_MODULE = "TotalSegmentator"
PYTHON_MINIMUM = (3, 10)  # pyproject's requires-python; Slicer 5.8 and later have 3.12


class EmphysemaUAD(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Emphysema UAD"
        self.parent.categories = ["Chest Imaging Platform"]
        self.parent.dependencies = []
        self.parent.contributors = ["EmphysemaUAD developers (EmphysemaUAD project)"]
        self.parent.helpText = (
            "Detects emphysema on chest CT with a network trained only on healthy lungs, and "
            "stages it per lobe (with a lobe segmentation) or per lung zone. The Training tab "
            "trains a model on a folder of healthy CTs in a separate process. Research use "
            "only; not a medical device.")
        self.parent.acknowledgementText = (
            "Unsupervised anomaly detection after the EDLNet method; PyTorch through the "
            "PyTorch extension.")
        slicer.app.connect("startupCompleted()", registerTerminologyAndSampleData)


def registerTerminologyAndSampleData():
    """At Slicer's start: the terminology holding the emphysema code (87433001 is not in the
    DICOM master list Slicer ships), and the synthetic phantom in Sample Data."""
    try:
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    except Exception as exc:  # an old Slicer or a missing module must not stop the start
        logging.warning(f"Emphysema UAD: terminology not loaded: {exc}")
    try:
        import SampleData
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY, sampleName=SAMPLE_NAME, nodeNames=[SAMPLE_NODE_NAME],
            thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "EmphysemaUAD.png"),
            customDownloader=loadSamplePhantom)
    except Exception as exc:
        logging.warning(f"Emphysema UAD: sample data not registered: {exc}")


def loadSamplePhantom(source=None):
    """A synthetic chest CT with moderate emphysema, made here (nothing is downloaded): a new
    user can press Detect on it in the first minute."""
    from EmphysemaUADLib import mrml
    from EmphysemaUADLib.phantom import make_phantom

    with slicer.util.tryWithErrorDisplay("Could not make the phantom CT.", waitCursor=True):
        phantom = make_phantom(7, emphysema="moderate")
        node = mrml.volume_to_node(phantom.ct, slicer.mrmlScene,
                                   slicer.mrmlScene.GenerateUniqueName(SAMPLE_NODE_NAME))
        slicer.util.setSliceViewerLayers(background=node, fit=True)
        return node


# Ranges are given for every number: Slicer's spin box and slider connectors replace the
# .ui's minimum and maximum with the field's WithinRange (with none, a spin box is unbounded).
@parameterNodeWrapper
class EmphysemaUADParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    # a Union of node types must include None, or "None" chosen in the selector cannot be
    # stored (the wrapper's UnionSerializer finds no type for it)
    lobes: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    modelSource: Annotated[str, Choice(MODEL_SOURCES)] = MODEL_SOURCES[0]
    modelPath: Path = Path()
    # the model's own threshold (set from healthy CTs, stored in its checkpoint) unless the
    # user unticks it and chooses one
    useModelThreshold: bool = True
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: Annotated[str, Choice(DEVICES)] = "auto"
    runInBackground: bool = True
    # take a shifted HU scale's shift off (air and fat both off by the same amount)
    correctHu: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    outputAnomaly: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode
    trainData: Path = Path()
    trainOutput: Path = Path()
    epochs: Annotated[int, WithinRange(1, 10000)] = 100
    width: Annotated[int, WithinRange(4, 128)] = 64
    batchSize: Annotated[int, WithinRange(1, 512)] = 32
    trainDevice: Annotated[str, Choice(DEVICES)] = "auto"
    resume: bool = False
    # fine-tuning the bundled model on a site's healthy CTs takes minutes, not hours
    startFromBundled: bool = True


def _chosen(path) -> bool:
    """A ctkPathLineEdit left empty reads back as Path('.')."""
    return bool(str(path)) and str(path) != "."


# --- dependencies ---------------------------------------------------------------------------
def _torchVersion() -> Optional[str]:
    """The installed torch's version, without importing it (an import costs seconds and
    memory, and background runs do not need torch in Slicer's own process)."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _versionTuple(text: str) -> tuple:
    import re
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:2])


def missingDependencies() -> tuple:
    """(torch is missing, the requirements of REQUIREMENTS_FILE this Python lacks)."""
    from EmphysemaUADLib.process import missing_requirements

    return _torchVersion() is None, missing_requirements(REQUIREMENTS_FILE.read_text())


def ensureDependencies() -> bool:
    """PyTorch through the PyTorch extension's PyTorchUtils and the library's packages, after
    one question for everything that is missing (never silently). False when something is
    still missing; the user has then been told what to do."""
    if sys.version_info < PYTHON_MINIMUM:
        slicer.util.errorDisplay(
            f"Emphysema UAD needs Python {'.'.join(map(str, PYTHON_MINIMUM))} or newer; this "
            f"Slicer has {sys.version.split()[0]}. Use Slicer 5.8 or later.")
        return False
    version = _torchVersion()
    if version is not None and _versionTuple(version) < _versionTuple(TORCH_MINIMUM):
        slicer.util.errorDisplay(
            f"PyTorch {version} is installed; Emphysema UAD needs {TORCH_MINIMUM} or newer. "
            "Open the 'PyTorch Utils' module, uninstall PyTorch, restart Slicer and install it "
            f"again with the version requirement '>={TORCH_MINIMUM}'.")
        return False
    torchMissing, missing = missingDependencies()
    if not torchMissing and not missing:
        return True
    torchLogic = None
    if torchMissing:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                "Emphysema UAD needs PyTorch, which Slicer gets through the 'PyTorch' "
                "extension. Install that extension with the Extensions Manager, restart Slicer, "
                "then run again.", windowTitle="PyTorch extension missing")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    wanted = ([f"PyTorch >= {TORCH_MINIMUM} (the build that suits this computer, up to a few "
               "GB)"] if torchMissing else []) + missing
    if not slicer.util.confirmOkCancelDisplay(
            "Emphysema UAD needs these Python packages, not installed yet:\n\n  "
            + "\n  ".join(wanted) + "\n\nInstall them now into Slicer's Python (some "
            "minutes)?", "Missing Python packages"):
        return False
    with slicer.util.WaitCursor():
        if torchLogic is not None and not torchLogic.torchInstalled():
            # picks the build that matches the NVIDIA driver (a CPU build without one)
            if torchLogic.installTorch(askConfirmation=False,
                                       torchVersionRequirement=f">={TORCH_MINIMUM}") is None:
                slicer.util.errorDisplay("PyTorch was not installed; detection and training "
                                         "need it.")
                return False
        if missing:
            pydeps = _pydeps()
            if pydeps is not None:  # Slicer 5.11+: checks and installs the file's lines
                pydeps.pip_ensure(pydeps.load_requirements(str(REQUIREMENTS_FILE)),
                                  requester="Emphysema UAD")
            else:
                slicer.util.pip_install(" ".join(missing))
    return True


def _pydeps():
    """slicer.pydeps where this Slicer has it (5.11 and later), else None."""
    try:
        import slicer.pydeps as pydeps
    except ImportError:
        return None
    return pydeps if hasattr(pydeps, "pip_ensure") and hasattr(pydeps, "load_requirements") \
        else None


_TORCH_CUDA = {}  # torch version -> whether it can use CUDA (asked in a worker Python)


# --- logic ------------------------------------------------------------------------------------
class SlicerProgress:
    """The library's progress interface, shown on a progress bar and status label; keeps the
    application painting while detection runs in-process."""

    def __init__(self, bar=None, label=None):
        self.bar, self.label = bar, label

    def step(self, step, total, **fields):
        if self.bar is not None:
            self.bar.setValue(int(100 * step / max(total, 1)))
        slicer.app.processEvents()

    def event(self, name, message=None, **fields):
        if self.label is not None and message:
            self.label.setText(message)
        slicer.app.processEvents()

    def log(self, message, level="info"):
        self.event("log", message)


class EmphysemaUADLogic(ScriptedLoadableModuleLogic):
    """Thin: everything below is EmphysemaUADLib (mrml: nodes <-> arrays and files; process:
    the worker process), which the tests run without Slicer."""

    def getParameterNode(self):
        return EmphysemaUADParameterNode(super().getParameterNode())

    @staticmethod
    def modelPath(parameters) -> Optional[str]:
        """The checkpoint to use; None for the bundled model."""
        from EmphysemaUADLib.errors import InputError
        from EmphysemaUADLib.modelinfo import default_model_path

        if parameters.modelSource == MODEL_SOURCES[0]:
            if not default_model_path().is_file():
                raise InputError("this installation has no bundled model; choose 'Checkpoint "
                                 "file' and a .pt file trained in the Training tab.")
            return None
        path = Path(parameters.modelPath)
        if not _chosen(parameters.modelPath) or not path.is_file():
            raise InputError(f"{path}: no such checkpoint file; choose a .pt file or the "
                             "bundled model.")
        return str(path)

    @staticmethod
    def chosenModelFile(parameters) -> Optional[Path]:
        """The model file the panel points at (bundled or chosen), without checks."""
        from EmphysemaUADLib.modelinfo import default_model_path

        if parameters.modelSource == MODEL_SOURCES[0]:
            return default_model_path()
        return Path(parameters.modelPath) if _chosen(parameters.modelPath) else None

    @classmethod
    def thresholdChoice(cls, parameters):
        """modelinfo.ThresholdChoice: the model's threshold unless the user chose one."""
        from EmphysemaUADLib.modelinfo import model_config, threshold_choice

        return threshold_choice(parameters.useModelThreshold, parameters.threshold,
                                model_config(cls.chosenModelFile(parameters)))

    @staticmethod
    def totalSegmentatorLogic():
        """The TotalSegmentator extension's logic; None when it is not installed."""
        if not hasattr(slicer.modules, TOTALSEGMENTATOR_MODULE.lower()):
            return None
        return slicer.util.getModuleLogic(TOTALSEGMENTATOR_MODULE)

    @staticmethod
    def computeLobes(ctNode, totalSegmentatorLogic):
        from EmphysemaUADLib import mrml

        return mrml.lobes_with_totalsegmentator(totalSegmentatorLogic, ctNode)

    def detect(self, ctNode, lobesNode=None, modelPath=None, threshold=None, device="auto",
               outputs=(None, None, None), progress=None, correctHu=True):
        """Detection in this process; returns the output nodes (mrml.OutputNodes)."""
        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.detection import Detector, detect_case
        from EmphysemaUADLib.progress import NO_PROGRESS
        from EmphysemaUADLib.report import case_notes

        ct = mrml.volume_from_node(ctNode)
        detector = Detector.load(modelPath, device, threshold, correct_hu=correctHu)
        with tempfile.TemporaryDirectory(prefix="EmphysemaUAD-") as tmp:
            lobes = mrml.write_lobes(lobesNode, ctNode, tmp) if lobesNode else None
            result = detect_case(ct, detector, lobes=lobes, progress=progress or NO_PROGRESS)
        return mrml.result_to_nodes(result, ctNode, *outputs,
                                    notes=case_notes(result, detector))

    def startBackgroundDetection(self, ctNode, lobesNode=None, modelPath=None, threshold=None,
                                 device="auto", correctHu=True):
        """Writes the CT (and lobes) to a temporary folder and starts `detect` on it; returns
        (process, folder). `backgroundDetectionNodes` turns the finished folder into nodes."""
        import shutil

        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.process import BackgroundProcess, detect_args

        folder = Path(tempfile.mkdtemp(prefix="EmphysemaUAD-"))
        try:
            ct, lobes = mrml.write_detection_inputs(ctNode, folder, lobesNode)
            args = detect_args(ct, folder / "out", lobes, modelPath, threshold, device,
                               correctHu)
            return BackgroundProcess.cli(args).start(), folder
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @staticmethod
    def backgroundDetectionNodes(folder: Path, ctNode, outputs=(None, None, None)):
        import shutil

        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.process import detect_case_dir

        case = detect_case_dir(Path(folder) / mrml.DETECTION_CASE_FILE, Path(folder) / "out")
        try:
            return mrml.detection_outputs_to_nodes(case, ctNode, *outputs)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def trainingFolders(parameters, dataPurpose, outputPurpose):
        """(healthy CT folder, output folder) of the Training tab; InputError, naming what
        each is for, when one is not chosen."""
        from EmphysemaUADLib.errors import InputError

        data = Path(parameters.trainData)
        if not _chosen(parameters.trainData) or not data.is_dir():
            raise InputError(f"{data}: choose the folder of healthy CTs {dataPurpose}.")
        if not _chosen(parameters.trainOutput):
            raise InputError(f"choose an output folder for {outputPurpose}.")
        return data, Path(parameters.trainOutput)

    @classmethod
    def startTraining(cls, parameters):
        from EmphysemaUADLib.errors import InputError
        from EmphysemaUADLib.process import BackgroundProcess, train_args, training_outputs

        data, output = cls.trainingFolders(parameters, "to train on", "the trained model")
        last = training_outputs(output)[0]
        if parameters.resume and not last.is_file():
            raise InputError(f"{output}: holds no last.pt to resume from; untick Resume.")
        if not parameters.resume and last.is_file():
            raise InputError(f"{output}: already holds a training run (last.pt); tick Resume "
                             "to continue it, or choose another output folder.")
        return BackgroundProcess.cli(train_args(
            data, output, parameters.epochs, parameters.width, parameters.batchSize,
            parameters.trainDevice, parameters.resume,
            "bundled" if parameters.startFromBundled else None)).start()

    @classmethod
    def startSiteThreshold(cls, parameters, overwrite=False):
        """A copy of the Detect tab's model, site_model.pt in the training output folder,
        whose threshold is set from the healthy CTs of the training folder (on the HU scale
        the Detect tab's "Correct the HU scale" chooses)."""
        from EmphysemaUADLib.errors import InputError
        from EmphysemaUADLib.process import BackgroundProcess, site_threshold_args

        data, folder = cls.trainingFolders(parameters, "of this scanner",
                                           "the model with the site's threshold")
        output = folder / SITE_MODEL_NAME
        if output.exists() and not overwrite:
            raise InputError(f"{output} already exists; choose another output folder.")
        return BackgroundProcess.cli(site_threshold_args(
            data, output, cls.modelPath(parameters), parameters.trainDevice,
            parameters.correctHu)).start()


# --- widget -----------------------------------------------------------------------------------
class EmphysemaUADWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._devicesShown = None
        self.detectProcess = None
        self.detectFolder = None
        self.detectInput = None
        self.trainProcess = None
        self.trainOutput = None
        self.trainJob = None  # "training" or "threshold": what trainProcess runs
        self.trainedModel = None
        self.dicomExportDialog = None
        self._modelShown = None
        self.detectThresholdText = ""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EmphysemaUAD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EmphysemaUADLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.pollProcesses)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelDetectButton.connect("clicked(bool)", self.onCancelDetect)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.siteThresholdButton.connect("clicked(bool)", self.onSiteThreshold)
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.useTrainedModelButton.connect("clicked(bool)", self.onUseTrainedModel)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.refreshDevicesButton.connect("clicked(bool)",
                                             lambda: self.refreshDeviceInfo(force=True,
                                                                            probeTorch=True))
        self.ui.totalSegmentatorButton.connect("clicked(bool)", self.onComputeLobes)
        self.ui.modelInfoLabel.connect("linkActivated(QString)",
                                       lambda url: qt.QDesktopServices.openUrl(qt.QUrl(url)))
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        self.timer.stop()
        for process in (self.detectProcess, self.trainProcess):
            if process is not None:
                process.kill()

    def enter(self):
        self.initializeParameterNode()
        self.refreshDeviceInfo(force=True)  # free GPU memory changes while away

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        # a background detection belongs to the closing scene: stop it and drop its files
        # (its finish handler would use the removed input and parameter node)
        self.cancelDetectionForSceneClose()
        self.setParameterNode(None)

    def cancelDetectionForSceneClose(self):
        import shutil

        process, folder = self.detectProcess, self.detectFolder
        self.detectProcess = self.detectFolder = self.detectInput = None
        if process is None:
            return
        process.kill()
        shutil.rmtree(folder, ignore_errors=True)
        self.ui.detectProgressBar.setValue(0)
        self.ui.detectStatusLabel.setText("Detection cancelled: the scene was closed.")
        if self.trainProcess is None:
            self.timer.stop()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.outputTable)
            self.updateButtons()

    def updateButtons(self, caller=None, event=None):
        p = self._parameterNode
        detecting = self.detectProcess is not None
        training = self.trainProcess is not None
        self.ui.detectButton.enabled = bool(p and p.inputVolume) and not detecting
        self.ui.modelPathLineEdit.enabled = bool(p and p.modelSource == MODEL_SOURCES[1])
        self.ui.cancelDetectButton.enabled = detecting
        self.ui.startTrainingButton.enabled = not training
        self.ui.siteThresholdButton.enabled = not training
        self.ui.cancelTrainingButton.enabled = training
        self.ui.useTrainedModelButton.enabled = self.trainedModel is not None and not training
        hasResults = bool(p and p.inputVolume and p.outputSegmentation and p.outputTable)
        for button in (self.ui.exportSegmentationButton, self.ui.exportLabelmapButton,
                       self.ui.exportTableButton):
            button.enabled = hasResults
        from_dicom = False
        if hasResults:
            from EmphysemaUADLib.mrml import came_from_dicom
            from_dicom = came_from_dicom(p.inputVolume)
        self.ui.exportDicomSegButton.enabled = from_dicom
        self.ui.totalSegmentatorButton.enabled = bool(p and p.inputVolume)
        self.updateThreshold()
        self.refreshDeviceInfo()

    def updateThreshold(self):
        """Which threshold applies (the model's unless unticked), shown under the slider;
        the slider shows the model's while it applies; and the model's summary line."""
        p = self._parameterNode
        if not p:
            return
        from EmphysemaUADLib.modelinfo import model_config, model_threshold, site_correct_hu

        self.ui.thresholdSlider.enabled = not p.useModelThreshold
        choice = self.logic.thresholdChoice(p)
        self.ui.thresholdInfoLabel.setText(choice.text)
        modelFile = self.logic.chosenModelFile(p)
        config = model_config(modelFile)
        modelValue = model_threshold(config)
        if p.useModelThreshold and modelValue is not None and \
                abs(p.threshold - modelValue) > 1e-6 and 0.01 <= modelValue <= 0.99:
            p.threshold = modelValue  # shown on the slider; Modified calls back here once
        if modelFile != self._modelShown:
            self._modelShown = modelFile
            self.ui.modelInfoLabel.setText(self.modelSummaryText(modelFile, config))
            recorded = site_correct_hu(config)
            if recorded is not None and p.correctHu != recorded:
                # a site threshold holds on scans read as it read its own; still a choice
                p.correctHu = recorded

    @staticmethod
    def modelSummaryText(modelFile, config) -> str:
        from EmphysemaUADLib.modelinfo import NOT_A_DEVICE, model_card_path, model_summary

        if modelFile is None or not Path(modelFile).is_file():
            return NOT_A_DEVICE
        text = model_summary(modelFile, config)
        card = model_card_path(modelFile)
        if card is not None:
            text += f' <a href="{qt.QUrl.fromLocalFile(str(card)).toString()}">Model card</a>'
        return text

    # --- devices ------------------------------------------------------------------------
    def refreshDeviceInfo(self, force=False, probeTorch=False):
        """The Device lines: what the chosen device runs on, with the GPU's name and free
        memory. Looked up in a thread and shown when ready; only again when a device choice
        changed, or when forced. GPUs come from nvidia-smi; whether torch can use CUDA from a
        worker Python (never an import here), asked once per torch version or on Refresh."""
        p = self._parameterNode
        wanted = (p.device, p.trainDevice) if p else ("auto", "auto")
        if wanted == self._devicesShown and not force:
            return
        self._devicesShown = wanted
        from EmphysemaUADLib import devices
        from EmphysemaUADLib.process import torch_sees_cuda_in_worker

        result = {}

        def probe():
            try:
                version = _torchVersion()
                if version is None:
                    cuda = None
                elif probeTorch or version not in _TORCH_CUDA:
                    cuda = _TORCH_CUDA[version] = torch_sees_cuda_in_worker()
                else:
                    cuda = _TORCH_CUDA[version]
                gpus = devices.nvidia_gpus() or []
                result["texts"] = [devices.describe(d, gpus, cuda) for d in wanted]
            except Exception as exc:  # a broken driver or torch must not break the panel
                result["texts"] = [f"Could not check the devices: {exc}"] * 2

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()

        def show():
            if thread.is_alive():
                qt.QTimer.singleShot(100, show)
                return
            if self._devicesShown != wanted:  # a newer lookup is under way
                return
            self.ui.deviceInfoLabel.setText(result["texts"][0])
            self.ui.trainDeviceInfoLabel.setText(result["texts"][1])

        self.ui.deviceInfoLabel.setText("Looking for GPUs...")
        self.ui.trainDeviceInfoLabel.setText("Looking for GPUs...")
        show()

    # --- detection ----------------------------------------------------------------------
    def _outputs(self):
        p = self._parameterNode
        return (p.outputSegmentation, p.outputAnomaly, p.outputTable)

    def onDetect(self):
        with slicer.util.tryWithErrorDisplay("Detection failed.", waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            modelPath = self.logic.modelPath(p)
            choice = self.logic.thresholdChoice(p)
            threshold = choice.value  # None: the model's own, read from its checkpoint
            self.detectThresholdText = choice.text
            self.ui.detectStatusLabel.setText("Starting...")
            self.ui.detectProgressBar.setValue(0)
            if p.runInBackground:
                self.detectInput = p.inputVolume
                self.detectProcess, self.detectFolder = self.logic.startBackgroundDetection(
                    p.inputVolume, p.lobes, modelPath, threshold, p.device, p.correctHu)
                self.timer.start()
                self.updateButtons()
                return
            progress = SlicerProgress(self.ui.detectProgressBar, self.ui.detectStatusLabel)
            nodes = self.logic.detect(p.inputVolume, p.lobes, modelPath, threshold,
                                      p.device, self._outputs(), progress, p.correctHu)
            self.showResults(p.inputVolume, nodes)

    def onComputeLobes(self):
        """Lobes from the TotalSegmentator extension into the Lobes selector; without the
        extension, how to get it."""
        logic = self.logic.totalSegmentatorLogic()
        if logic is None:
            slicer.util.infoDisplay(
                "Lobes can be computed with the 'TotalSegmentator' extension: install it with "
                "the Extensions Manager (View > Extensions Manager, search TotalSegmentator), "
                "restart Slicer, then press this button again. Or load a lobe segmentation "
                "and choose it as Lobes.", windowTitle="TotalSegmentator not installed")
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Lobes could not be computed.", waitCursor=True):
            self.ui.detectStatusLabel.setText("Computing lobes with TotalSegmentator "
                                              "(minutes)...")
            slicer.app.processEvents()
            p.lobes = self.logic.computeLobes(p.inputVolume, logic)
            self.ui.detectStatusLabel.setText("Lobes computed with TotalSegmentator.")

    def onCancelDetect(self):
        if self.detectProcess is not None:
            self.detectProcess.cancel(grace_s=DETECT_CANCEL_GRACE_S)
            self.ui.detectStatusLabel.setText("Cancelling...")

    def showResults(self, ctNode, nodes):
        from EmphysemaUADLib.mrml import NOTES_ATTRIBUTE

        p = self._parameterNode
        p.outputSegmentation, p.outputAnomaly, p.outputTable = \
            nodes.segmentation, nodes.anomaly, nodes.table
        slicer.util.setSliceViewerLayers(background=ctNode, foreground=nodes.anomaly,
                                         foregroundOpacity=0.5, fit=True)
        nodes.segmentation.GetDisplayNode().SetOpacity2DFill(0.3)
        self.ui.resultsTableView.setMRMLTableNode(nodes.table)
        self.ui.resultsCollapsibleButton.collapsed = False
        whole = nodes.table.GetTable()
        stage = whole.GetValueByName(0, "stage").ToString() if whole.GetNumberOfRows() else "?"
        index = whole.GetValueByName(0, "emphysema_index_percent").ToDouble() \
            if whole.GetNumberOfRows() else float("nan")
        self.ui.detectProgressBar.setValue(100)
        notes = nodes.table.GetAttribute(NOTES_ATTRIBUTE) or ""
        self.ui.detectStatusLabel.setText(
            f"Whole lung: stage {stage or 'n/a'}, emphysema index {index:.2f} %. "
            f"{self.detectThresholdText}" + "".join(f"\n{line}" for line in notes.splitlines()))
        self.updateButtons()

    def finishBackgroundDetection(self):
        process, folder, ctNode = self.detectProcess, self.detectFolder, self.detectInput
        self.detectProcess = self.detectFolder = self.detectInput = None
        gone = self._parameterNode is None or ctNode is None or \
            not slicer.mrmlScene.IsNodePresent(ctNode)
        if process.returncode == 0 and gone:  # the input was removed while it ran
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
            self.ui.detectStatusLabel.setText("Detection finished, but its input CT is no "
                                              "longer in the scene; nothing was loaded.")
        elif process.returncode == 0:
            with slicer.util.tryWithErrorDisplay("Could not load the detection results.",
                                                 waitCursor=True):
                self.showResults(ctNode, self.logic.backgroundDetectionNodes(
                    folder, ctNode, self._outputs()))
        else:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
            if process.cancelled:
                self.ui.detectStatusLabel.setText("Detection cancelled.")
            else:
                self.ui.detectStatusLabel.setText("Detection failed.")
                slicer.util.errorDisplay(
                    process.last_error or "Detection failed.",
                    detailedText="\n".join(process.stderr_tail))
        self.refreshDeviceInfo(force=True)
        self.updateButtons()

    # --- training -----------------------------------------------------------------------
    def onStartTraining(self):
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            if not ensureDependencies():
                return
            self.trainedModel = None
            self.ui.trainLogTextEdit.clear()
            self.ui.trainProgressBar.setValue(0)
            self.followTrainJob("training", self.logic.startTraining(self._parameterNode),
                                Path(self._parameterNode.trainOutput),
                                "Reading the healthy CTs...")

    def onSiteThreshold(self):
        with slicer.util.tryWithErrorDisplay("The threshold could not be set.",
                                             waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            output = Path(p.trainOutput) / SITE_MODEL_NAME
            exists = _chosen(p.trainOutput) and output.exists()
            if exists and not slicer.util.confirmYesNoDisplay(f"{output} exists. Replace it?"):
                return
            self.trainedModel = None
            self.ui.trainLogTextEdit.clear()
            self.ui.trainProgressBar.setValue(0)
            self.followTrainJob("threshold", self.logic.startSiteThreshold(p, overwrite=exists),
                                output, "Scoring the healthy CTs...")

    def followTrainJob(self, job, process, output, status):
        """The Training tab's one background job (training or threshold) and what it writes,
        followed by the timer."""
        self.trainProcess, self.trainOutput, self.trainJob = process, output, job
        self.trainLog(f"started: {' '.join(process.command)}")
        self.ui.trainStatusLabel.setText(status)
        self.timer.start()
        self.updateButtons()

    def onCancelTraining(self):
        if self.trainProcess is not None:
            self.trainProcess.cancel()
            self.ui.trainStatusLabel.setText("Stopping: saving last.pt..."
                                             if self.trainJob == "training" else "Stopping...")

    def trainLog(self, text):
        self.ui.trainLogTextEdit.appendPlainText(text)

    def onTrainEvent(self, event):
        kind = event.get("event")
        if kind == "step":
            self.ui.trainProgressBar.setValue(int(100 * event["step"] / max(event["total"], 1)))
            eta = event.get("eta_s")
            loss = event.get("loss")
            self.ui.trainStatusLabel.setText(
                f"step {event['step']}/{event['total']}"
                + (f", loss {loss:.4f}" if loss is not None else "")
                + (f", about {formatDuration(eta)} left" if eta is not None else ""))
        elif kind == "error":
            self.trainLog(f"error: {event.get('message', '')}")
        elif kind != "log" or event.get("level") != "debug":
            fields = {k: v for k, v in event.items() if k not in ("event", "message")}
            self.trainLog(f"[{kind}] {event.get('message', '')} "
                          f"{' '.join(f'{k}={v}' for k, v in fields.items())}".rstrip())

    def showTrainFailure(self, process, what):
        """The status line, the worker's last stderr lines in the log, its error in a dialog."""
        self.ui.trainStatusLabel.setText(f"{what} (exit code {process.returncode}); see the "
                                         "log.")
        for line in process.stderr_tail:
            self.trainLog(line)
        if process.last_error:
            slicer.util.errorDisplay(f"{what}: {process.last_error}")

    def finishSiteThreshold(self):
        process, self.trainProcess = self.trainProcess, None
        code = process.returncode
        if code in (0, 1) and self.trainOutput.is_file():  # 1: some scans could not be used
            self.trainedModel = self.trainOutput
            self.ui.trainProgressBar.setValue(100)
            self.ui.trainStatusLabel.setText(f"Threshold set: {self.trainedModel}"
                                             + (" (some scans were skipped; see the log)"
                                                if code else ""))
            if slicer.util.confirmYesNoDisplay("The threshold is set. Use the model with this "
                                               "site's threshold in the Detect tab?"):
                self.onUseTrainedModel()
        elif process.cancelled or code in (130, 143):
            self.ui.trainStatusLabel.setText("Cancelled; nothing was written.")
        else:
            self.showTrainFailure(process, "The threshold could not be set")
        self.updateButtons()

    def finishTraining(self):
        from EmphysemaUADLib.process import training_outputs

        process, self.trainProcess = self.trainProcess, None
        code = process.returncode
        last, best = training_outputs(self.trainOutput)
        if code == 0 and best.is_file():
            self.trainedModel = best
            self.ui.trainProgressBar.setValue(100)
            self.ui.trainStatusLabel.setText(f"Training finished: {self.trainedModel}")
            if slicer.util.confirmYesNoDisplay("Training finished. Use the new model in the "
                                               "Detect tab?"):
                self.onUseTrainedModel()
        elif process.cancelled or code in (130, 143):
            if last.is_file():
                self.ui.trainStatusLabel.setText(
                    f"Training cancelled. {last} holds the run: tick 'Resume' and start again "
                    "to continue it.")
                if self._parameterNode:
                    self._parameterNode.resume = True
            else:  # stopped before the first step: nothing to resume
                self.ui.trainStatusLabel.setText("Training cancelled before its first step.")
        else:
            self.showTrainFailure(process, "Training failed")
        self.refreshDeviceInfo(force=True)
        self.updateButtons()

    def onUseTrainedModel(self):
        if self.trainedModel is None:
            return
        self._parameterNode.modelSource = MODEL_SOURCES[1]
        self._parameterNode.modelPath = self.trainedModel
        self.ui.tabWidget.setCurrentIndex(0)

    # --- polling ------------------------------------------------------------------------
    def pollProcesses(self):
        if self.detectProcess is not None:
            for event in self.detectProcess.poll():
                if event.get("event") == "step":
                    self.ui.detectProgressBar.setValue(
                        int(100 * event["step"] / max(event["total"], 1)))
                elif event.get("message") and event.get("level") != "debug":
                    self.ui.detectStatusLabel.setText(event["message"][:200])
            if self.detectProcess.finished:
                self.finishBackgroundDetection()
        if self.trainProcess is not None:
            for event in self.trainProcess.poll():
                self.onTrainEvent(event)
            if self.trainProcess.finished:
                if self.trainJob == "threshold":
                    self.finishSiteThreshold()
                else:
                    self.finishTraining()
        if self.detectProcess is None and self.trainProcess is None:
            self.timer.stop()

    # --- export -------------------------------------------------------------------------
    def _saveName(self, title, suggestion, filters):
        return qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), title,
                                              os.path.join(qt.QDir.homePath(), suggestion),
                                              filters)

    def onExportSegmentation(self):
        from EmphysemaUADLib import mrml
        p = self._parameterNode
        path = self._saveName("Save segmentation", f"{p.inputVolume.GetName()}_emphysema.seg.nrrd",
                              "Segmentation (*.seg.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the segmentation."):
                mrml.save_segmentation(p.outputSegmentation, path)

    def onExportLabelmap(self):
        from EmphysemaUADLib import mrml
        p = self._parameterNode
        path = self._saveName("Save label map", f"{p.inputVolume.GetName()}_emphysema.nii.gz",
                              "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the label map."):
                mrml.save_label_map(p.outputSegmentation, p.inputVolume, path)

    def onExportDicomSeg(self):
        """Slicer's own DICOM export dialog with the segmentation selected; its DICOM SEG
        exporter is DICOMSegmentationPlugin (in Slicer's core in recent versions, in the
        QuantitativeReporting extension before)."""
        if DICOM_SEG_PLUGIN not in getattr(slicer.modules, "dicomPlugins", {}):
            slicer.util.errorDisplay(
                "DICOM SEG export needs Slicer's DICOM segmentation plugin, which this Slicer "
                "does not have. Install the 'QuantitativeReporting' extension with the "
                "Extensions Manager and restart Slicer; or export the segmentation as "
                ".seg.nrrd or a NIfTI label map.", windowTitle="DICOM SEG export")
            return
        with slicer.util.tryWithErrorDisplay("DICOM SEG export failed."):
            sh = slicer.mrmlScene.GetSubjectHierarchyNode()
            self.dicomExportDialog = slicer.qSlicerDICOMExportDialog()
            self.dicomExportDialog.setMRMLScene(slicer.mrmlScene)
            self.dicomExportDialog.execDialog(
                sh.GetItemByDataNode(self._parameterNode.outputSegmentation))

    def onExportTable(self):
        from EmphysemaUADLib import mrml
        p = self._parameterNode
        path = self._saveName("Save table", f"{p.inputVolume.GetName()}_emphysema.csv",
                              "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the table."):
                mrml.save_table_csv(p.outputTable, path)


def formatDuration(seconds) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


# --- self-test --------------------------------------------------------------------------------
class EmphysemaUADTest(ScriptedLoadableModuleTest):
    """The whole flow on a synthetic phantom inside Slicer (run by the Extensions Index builds
    as a ctest, and by Reload and Test): the result nodes, titles and terminology without
    torch; then, where PyTorch and the library's packages are installed, a tiny untrained
    model, in-process and background detection, exports and their reload, a short training
    cancelled to a resumable last.pt, a site's threshold set in the background. It never
    installs anything: on a build machine without torch those parts are skipped with the
    reason in the log."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_result_nodes_without_torch()
        torchMissing, missing = missingDependencies()
        if torchMissing or missing:
            reason = ("skipped the detection and training tests: "
                      + ", ".join((["PyTorch"] if torchMissing else []) + missing)
                      + " not installed in this Slicer (the self-test installs nothing)")
            logging.warning(f"EmphysemaUADTest: {reason}")
            self.delayDisplay(reason.capitalize())
            return
        self.setUp()
        self.test_detection_flow()
        self.setUp()
        self.test_training_cancel_is_resumable()
        self.setUp()
        self.test_site_threshold()

    def test_result_nodes_without_torch(self):
        import numpy as np

        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.measurements import Measurements

        self.delayDisplay("Result nodes without torch")
        ctNode = self._phantomNode()
        ct = mrml.volume_from_node(ctNode)
        anomaly = np.zeros(ct.shape, np.float32)
        anomaly[ct.shape[0] // 2, 40:50, 30:40] = 0.9
        emphysema = (anomaly > 0.5).astype(np.uint8)
        lungs = np.zeros(ct.shape, np.uint8)
        lungs[ct.shape[0] // 2, 30:60, 20:50] = 1
        rows = [{"region": "whole lung", "volume_ml": 1.0, "emphysema_index_percent": 2.0,
                 "laa950_percent": 1.0, "perc15_hu": -900.0, "mean_anomaly": 0.1,
                 "stage": "Mild", "stage_probabilities": {"Mild": 1.0}}]
        nodes = mrml.arrays_to_nodes(ctNode, emphysema, lungs, anomaly,
                                     Measurements.from_dicts(rows), "zones")
        self.assertTrue(np.array_equal(mrml.segment_array(nodes.segmentation, ctNode),
                                       emphysema))
        self.assertTrue(np.array_equal(mrml.segment_array(nodes.segmentation, ctNode,
                                                          "Right lung"), lungs))
        self.assertEqual(nodes.table.GetColumnTitle("emphysema_index_percent"),
                         "Emphysema index")
        self.assertEqual(nodes.table.GetColumnUnitLabel("emphysema_index_percent"), "%")
        segment = nodes.segmentation.GetSegmentation().GetNthSegment(0)
        entry = vtk.reference("")
        self.assertTrue(segment.GetTag(mrml.TERMINOLOGY_TAG, entry))
        self.assertIn("87433001", str(entry))
        self.assertIn(mrml.TERMINOLOGY_CONTEXT, str(entry))

    def _phantomNode(self):
        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.phantom import make_phantom

        phantom = make_phantom(3, shape=(24, 96, 96), spacing=(4.0, 3.5, 3.5),
                               emphysema="severe")
        return mrml.volume_to_node(phantom.ct, slicer.mrmlScene, "phantom CT")

    @staticmethod
    def _tinyModel(folder: Path) -> Path:
        from EmphysemaUADLib.checkpoint import save_checkpoint
        from EmphysemaUADLib.network import EDLNet

        model = EDLNet(width=4)
        path = folder / "tiny.pt"
        save_checkpoint(path, model.state_dict(), {"model": model.config, "input_size": 64,
                                                    "intensity_window": [-1000, 400],
                                                    "training": {}})
        return path

    def _waitFor(self, process, timeout_s=300):
        import time
        deadline = time.monotonic() + timeout_s
        while not process.finished and time.monotonic() < deadline:
            process.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(process.finished, "background process did not finish in time")

    def test_detection_flow(self):
        import numpy as np

        from EmphysemaUADLib import mrml

        self.delayDisplay("Detection on a phantom")
        logic = EmphysemaUADLogic()
        ctNode = self._phantomNode()
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"),
                                   "study")
        sh.SetItemParent(sh.GetItemByDataNode(ctNode), study)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = self._tinyModel(tmp)
            nodes = logic.detect(ctNode, None, str(model), 0.5, "cpu")
            ct = mrml.volume_from_node(ctNode)
            self.assertEqual(slicer.util.arrayFromVolume(nodes.anomaly).shape, ct.shape)
            a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            ctNode.GetIJKToRASMatrix(a)
            nodes.anomaly.GetIJKToRASMatrix(b)
            self.assertTrue(all(a.GetElement(r, c) == b.GetElement(r, c)
                                for r in range(4) for c in range(4)))
            for node in (nodes.segmentation, nodes.anomaly, nodes.table):
                self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), study)
            emphysema = mrml.segment_array(nodes.segmentation, ctNode)
            anomaly = slicer.util.arrayFromVolume(nodes.anomaly)
            self.assertTrue(np.array_equal(emphysema > 0, (anomaly > 0.5) & (emphysema > 0)))
            segment = nodes.segmentation.GetSegmentation().GetNthSegment(0)
            entry = vtk.reference("")
            self.assertTrue(segment.GetTag(mrml.TERMINOLOGY_TAG, entry))
            self.assertIn("87433001", str(entry))
            table = nodes.table.GetTable()
            self.assertEqual(table.GetValueByName(0, "region").ToString(), "whole lung")
            self.assertGreaterEqual(table.GetNumberOfRows(), 3)

            self.delayDisplay("Same detection in a background process")
            process, folder = logic.startBackgroundDetection(ctNode, None, str(model), 0.5,
                                                             "cpu")
            self._waitFor(process)
            self.assertEqual(process.returncode, 0, "\n".join(process.stderr_tail))
            again = logic.backgroundDetectionNodes(folder, ctNode)
            self.assertTrue(np.array_equal(mrml.segment_array(again.segmentation, ctNode),
                                           emphysema))

            self.delayDisplay("Exports")
            mrml.save_segmentation(nodes.segmentation, tmp / "e.seg.nrrd")
            reloaded = slicer.util.loadSegmentation(str(tmp / "e.seg.nrrd"))
            self.assertTrue(np.array_equal(mrml.segment_array(reloaded, ctNode), emphysema))
            mrml.save_label_map(nodes.segmentation, ctNode, tmp / "e.nii.gz")
            mrml.save_table_csv(nodes.table, tmp / "t.csv")
            for name in ("e.seg.nrrd", "e.nii.gz", "t.csv"):
                self.assertTrue((tmp / name).is_file(), name)
        self.delayDisplay("Detection flow passed")

    def test_training_cancel_is_resumable(self):
        import time

        from EmphysemaUADLib.phantom import make_phantom
        from EmphysemaUADLib.volume_io import write_volume

        self.delayDisplay("Training in the background, then Cancel")
        logic = EmphysemaUADLogic()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for seed in (1, 2):
                phantom = make_phantom(seed, shape=(16, 64, 64), spacing=(5.0, 5.0, 5.0),
                                       emphysema="none")
                write_volume(phantom.ct.array, phantom.ct.geometry,
                             tmp / "healthy" / f"case{seed}.nii.gz")
            p = logic.getParameterNode()
            p.trainData, p.trainOutput = tmp / "healthy", tmp / "model"
            p.epochs, p.width, p.batchSize, p.trainDevice, p.resume = 1000, 4, 2, "cpu", False
            process = logic.startTraining(p)
            deadline = time.monotonic() + 300
            seen = []
            while time.monotonic() < deadline and not any(
                    e.get("event") == "step" for e in seen) and not process.finished:
                seen += process.poll()
                slicer.app.processEvents()
                time.sleep(0.05)
            self.assertTrue(any(e.get("event") == "step" for e in seen),
                            "\n".join(process.stderr_tail))
            process.cancel()
            self._waitFor(process, 120)
            self.assertEqual(process.returncode, 130, "\n".join(process.stderr_tail))
            self.assertTrue((tmp / "model" / "last.pt").is_file())
        self.delayDisplay("Training cancel passed")

    def test_site_threshold(self):
        from EmphysemaUADLib.errors import InputError
        from EmphysemaUADLib.modelinfo import model_config, threshold_choice
        from EmphysemaUADLib.phantom import make_phantom
        from EmphysemaUADLib.volume_io import write_volume

        self.delayDisplay("A site's threshold from its healthy CTs, in the background")
        logic = EmphysemaUADLogic()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for seed in (1, 2):  # together over the 100 000 lung voxels the 99.9th needs
                phantom = make_phantom(seed, shape=(40, 128, 128), spacing=(5.0, 2.5, 2.5),
                                       emphysema="none")
                write_volume(phantom.ct.array, phantom.ct.geometry,
                             tmp / "healthy" / f"case{seed}.nii.gz")
            p = logic.getParameterNode()
            p.trainData, p.trainOutput, p.trainDevice = tmp / "healthy", tmp / "site", "cpu"
            p.modelSource, p.modelPath = MODEL_SOURCES[1], self._tinyModel(tmp)
            process = logic.startSiteThreshold(p)
            self._waitFor(process)
            self.assertEqual(process.returncode, 0, "\n".join(process.stderr_tail))
            config = model_config(tmp / "site" / SITE_MODEL_NAME)
            self.assertEqual(config["site_threshold"]["scans"], 2)
            self.assertIn("2 healthy scans of this site",
                          threshold_choice(True, 0.5, config).text)
            with self.assertRaises(InputError):  # never replaced without asking
                logic.startSiteThreshold(p)
        self.delayDisplay("Site threshold passed")
