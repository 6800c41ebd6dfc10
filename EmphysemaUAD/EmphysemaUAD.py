"""3D Slicer module: detect and stage emphysema on a CT volume; train a model on healthy CTs.

Kept thin: the work is done by the EmphysemaUADLib package (no Qt), which this module finds
beside itself (built extension) or one folder up (source checkout). Training, and detection
when asked, run as a separate `PythonSlicer -m EmphysemaUADLib ... --progress json` process
that a timer polls, so the application never freezes.
"""
import importlib.metadata
import importlib.util
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

MODEL_SOURCES = ["Bundled model", "Checkpoint file"]
DEVICES = list(DEVICE_CHOICES)
POLL_INTERVAL_MS = 250
DETECT_CANCEL_GRACE_S = 5  # detection has nothing to save: stop it quickly
# what the library needs beyond Slicer's own Python (torch comes from the PyTorch extension)
PIP_REQUIREMENTS = {"skimage": "scikit-image>=0.21", "sklearn": "scikit-learn>=1.3"}
TORCH_MINIMUM = "2.1"
DICOM_SEG_PLUGIN = "DICOMSegmentationPlugin"


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
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: Annotated[str, Choice(DEVICES)] = "auto"
    runInBackground: bool = True
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


def ensureDependencies() -> bool:
    """PyTorch through the PyTorch extension's PyTorchUtils and the library's pip packages,
    each installed only after the user agrees (never silently). False when something is
    still missing; the user has then been told what to do."""
    version = _torchVersion()
    if version is None:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                "Emphysema UAD needs PyTorch, which Slicer gets through the 'PyTorch' "
                "extension. Install that extension with the Extensions Manager, restart Slicer, "
                "then run again.", windowTitle="PyTorch extension missing")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            # installTorch asks the user first (askConfirmation) and picks the build that
            # matches the NVIDIA driver (a CPU build without one); None when declined
            with slicer.util.WaitCursor():
                torch = torchLogic.installTorch(askConfirmation=True,
                                                torchVersionRequirement=f">={TORCH_MINIMUM}")
            if torch is None:
                slicer.util.errorDisplay("PyTorch was not installed; detection and training "
                                         "need it.")
                return False
    elif _versionTuple(version) < _versionTuple(TORCH_MINIMUM):
        slicer.util.errorDisplay(
            f"PyTorch {version} is installed; Emphysema UAD needs {TORCH_MINIMUM} or newer. "
            "Open the 'PyTorch Utils' module, uninstall PyTorch, restart Slicer and install it "
            f"again with the version requirement '>={TORCH_MINIMUM}'.")
        return False
    missing = [requirement for module, requirement in PIP_REQUIREMENTS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
                f"Emphysema UAD needs these Python packages: {', '.join(missing)}. "
                "Install them now into Slicer's Python (a few minutes)?",
                "Missing Python packages"):
            return False
        with slicer.util.WaitCursor():
            for requirement in missing:
                slicer.util.pip_install(requirement)
    return True


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
        from EmphysemaUADLib.detection import default_model_path
        from EmphysemaUADLib.errors import InputError

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

    def detect(self, ctNode, lobesNode=None, modelPath=None, threshold=None, device="auto",
               outputs=(None, None, None), progress=None):
        """Detection in this process; returns the output nodes (mrml.OutputNodes)."""
        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.detection import Detector, detect_case
        from EmphysemaUADLib.progress import NO_PROGRESS

        ct = mrml.volume_from_node(ctNode)
        detector = Detector.load(modelPath, device, threshold)
        with tempfile.TemporaryDirectory(prefix="EmphysemaUAD-") as tmp:
            lobes = mrml.write_lobes(lobesNode, ctNode, tmp) if lobesNode else None
            result = detect_case(ct, detector, lobes=lobes, progress=progress or NO_PROGRESS)
        return mrml.result_to_nodes(result, ctNode, *outputs)

    def startBackgroundDetection(self, ctNode, lobesNode=None, modelPath=None, threshold=None,
                                 device="auto"):
        """Writes the CT (and lobes) to a temporary folder and starts `detect` on it; returns
        (process, folder). `backgroundDetectionNodes` turns the finished folder into nodes."""
        import shutil

        from EmphysemaUADLib import mrml
        from EmphysemaUADLib.process import BackgroundProcess, detect_args

        folder = Path(tempfile.mkdtemp(prefix="EmphysemaUAD-"))
        try:
            ct, lobes = mrml.write_detection_inputs(ctNode, folder, lobesNode)
            args = detect_args(ct, folder / "out", lobes, modelPath, threshold, device)
            return BackgroundProcess.cli(args).start(), folder
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @staticmethod
    def backgroundDetectionNodes(folder: Path, ctNode, outputs=(None, None, None)):
        import shutil

        from EmphysemaUADLib import mrml

        case = Path(folder) / "out" / Path(mrml.DETECTION_CASE_FILE).name.split(".")[0]
        try:
            return mrml.detection_outputs_to_nodes(case, ctNode, *outputs)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def startTraining(parameters):
        from EmphysemaUADLib.errors import InputError
        from EmphysemaUADLib.process import BackgroundProcess

        data, output = Path(parameters.trainData), Path(parameters.trainOutput)
        if not _chosen(parameters.trainData) or not data.is_dir():
            raise InputError(f"{data}: choose the folder of healthy CTs to train on.")
        if not _chosen(parameters.trainOutput):
            raise InputError("choose an output folder for the trained model.")
        if parameters.resume and not (output / "last.pt").is_file():
            raise InputError(f"{output}: holds no last.pt to resume from; untick Resume.")
        if not parameters.resume and (output / "last.pt").is_file():
            raise InputError(f"{output}: already holds a training run (last.pt); tick Resume "
                             "to continue it, or choose another output folder.")
        args = ["train", data, "--output", output, "--epochs", parameters.epochs,
                "--width", parameters.width, "--batch-size", parameters.batchSize,
                "--device", parameters.trainDevice]
        args += ["--resume"] if parameters.resume else []
        return BackgroundProcess.cli(args).start()


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
        self.trainedModel = None
        self.dicomExportDialog = None

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
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.useTrainedModelButton.connect("clicked(bool)", self.onUseTrainedModel)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.refreshDevicesButton.connect("clicked(bool)",
                                             lambda: self.refreshDeviceInfo(force=True))
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
        self.setParameterNode(None)

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
        self.refreshDeviceInfo()

    # --- devices ------------------------------------------------------------------------
    def refreshDeviceInfo(self, force=False):
        """The Device lines: what the chosen device runs on, with the GPU's name and free
        memory. Looked up in a thread (nvidia-smi, and a first torch import, take a moment)
        and shown when ready; only again when a device choice changed, or when forced."""
        p = self._parameterNode
        wanted = (p.device, p.trainDevice) if p else ("auto", "auto")
        if wanted == self._devicesShown and not force:
            return
        self._devicesShown = wanted
        from EmphysemaUADLib import devices

        result = {}

        def probe():
            try:
                gpus, cuda = devices.nvidia_gpus() or [], devices.torch_sees_cuda()
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
            self.ui.detectStatusLabel.setText("Starting...")
            self.ui.detectProgressBar.setValue(0)
            if p.runInBackground:
                self.detectInput = p.inputVolume
                self.detectProcess, self.detectFolder = self.logic.startBackgroundDetection(
                    p.inputVolume, p.lobes, modelPath, p.threshold, p.device)
                self.timer.start()
                self.updateButtons()
                return
            progress = SlicerProgress(self.ui.detectProgressBar, self.ui.detectStatusLabel)
            nodes = self.logic.detect(p.inputVolume, p.lobes, modelPath, p.threshold,
                                      p.device, self._outputs(), progress)
            self.showResults(p.inputVolume, nodes)

    def onCancelDetect(self):
        if self.detectProcess is not None:
            self.detectProcess.cancel(grace_s=DETECT_CANCEL_GRACE_S)
            self.ui.detectStatusLabel.setText("Cancelling...")

    def showResults(self, ctNode, nodes):
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
        self.ui.detectStatusLabel.setText(f"Whole lung: stage {stage or 'n/a'}, emphysema "
                                          f"index {index:.2f} %.")
        self.updateButtons()

    def finishBackgroundDetection(self):
        process, folder, ctNode = self.detectProcess, self.detectFolder, self.detectInput
        self.detectProcess = self.detectFolder = self.detectInput = None
        if process.returncode == 0:
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
            self.trainProcess = self.logic.startTraining(self._parameterNode)
            self.trainLog(f"started: {' '.join(self.trainProcess.command)}")
            self.ui.trainStatusLabel.setText("Reading the healthy CTs...")
            self.timer.start()
            self.updateButtons()

    def onCancelTraining(self):
        if self.trainProcess is not None:
            self.trainProcess.cancel()
            self.ui.trainStatusLabel.setText("Stopping: saving last.pt...")

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

    def finishTraining(self):
        process, self.trainProcess = self.trainProcess, None
        output = Path(self._parameterNode.trainOutput)
        code = process.returncode
        last = output / "last.pt"
        if code == 0 and (output / "best.pt").is_file():
            self.trainedModel = output / "best.pt"
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
                self._parameterNode.resume = True
            else:  # stopped before the first step: nothing to resume
                self.ui.trainStatusLabel.setText("Training cancelled before its first step.")
        else:
            self.ui.trainStatusLabel.setText(f"Training failed (exit code {code}); see the log.")
            for line in process.stderr_tail:
                self.trainLog(line)
            if process.last_error:
                slicer.util.errorDisplay(f"Training failed: {process.last_error}")
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
    and by Reload and Test): a tiny untrained model, in-process and background detection,
    result nodes on the input's grid under its study, exports and their reload, a short
    training cancelled to a resumable last.pt."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_detection_flow()
        self.setUp()
        self.test_training_cancel_is_resumable()

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
        self.assertTrue(ensureDependencies())
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
