"""DeepSeg: deep-learning segmentation and registration for 3D Slicer.

This file holds only the classes Slicer's scripted-module machinery looks for (module, parameter node,
widget, logic, test). The work is done in ``DeepSegModuleLib``, which imports neither Qt nor Slicer's
application globals and runs headless on ``slicer-core``. Heavy packages (torch, MONAI) are imported only
once a run starts, never when Slicer loads the module.
"""

# No ``from __future__ import annotations`` in this file: ``@parameterNodeWrapper`` reads the field types
# with ``typing.get_type_hints`` while the class is being decorated. Evaluated annotations do not depend on
# the module's globals being reachable through ``sys.modules`` at that moment, whichever way the file is
# loaded (Slicer's loader, "Reload" in developer mode, the stubbed import in Testing/Python).

import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import qt
import slicer
import vtk
from DeepSegModuleLib.devices import DEVICES
from DeepSegModuleLib.models.store import DEFAULT_MODEL_ID
from DeepSegModuleLib.registration.presets import RegistrationOptions, preset_names
from DeepSegModuleLib.resources import resource_path
from DeepSegModuleLib.segmentation.options import SegmentationOptions, label_names
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

logger = logging.getLogger(__name__)

#: Devices the user can pick ("auto": the GPU when PyTorch sees one, else the CPU) and the registration presets,
#: read from their source: the options modules import no torch.
DEVICE_CHOICES = list(DEVICES)
REGISTRATION_PRESETS = preset_names()

#: Packages that must never be pip-installed into Slicer: torch comes from the PyTorch extension (it picks the
#: CUDA build that matches the driver) and Slicer bundles its own SimpleITK build with Slicer-specific IO.
PACKAGES_NOT_TO_PIP_INSTALL = ["torch", "SimpleITK"]


#
# DeepSegModule
#


class DeepSegModule(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepSeg developers"]
        self.parent.helpText = _("""
Deep-learning segmentation and registration. Pick a volume and a model (MONAI bundle, nnU-Net v2 folder
or TorchScript), press Apply, and get named, coloured segments, or register two scans and get a transform.
Runs on the GPU when there is one and on the CPU otherwise.
See the <a href="https://github.com/deepseg/SlicerDeepSeg">module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
DeepSeg builds on 3D Slicer, PyTorch and MONAI. The module layout follows Slicer's scripted-module template
by Jean-Christophe Fillion-Robin (Kitware), Andras Lasso (PerkLab) and Steve Pieper (Isomics).
""")
        # Slicer's base class only looks for the icon in <module folder>/Resources, which does not exist in a
        # source checkout (resources are in the repository's top-level Resources/).
        try:
            self.parent.icon = qt.QIcon(self.resourcePath("Icons/DeepSegModule.png"))
        except FileNotFoundError as error:
            # A missing icon is a packaging bug, but not a reason to refuse to load the module.
            logger.warning(str(error))

    def resourcePath(self, filename: str) -> str:
        """Absolute path of a resource, in a packaged extension or a source checkout alike."""
        return str(resource_path(filename))


#
# DeepSegModuleParameterNode
#


@parameterNodeWrapper
class DeepSegModuleParameterNode:
    """What the user chose in the panel; saved with the scene, so a reopened scene shows the panel as it was.

    Segmentation:
    inputVolume, inputVolume2..4 - the model's inputs in its order (most models take one image).
    modelName - a model in the local model store, or the path of a model folder, .zip or TorchScript file.
    labels - label names to write, separated by commas; empty for all.
    outputSegmentation - where segments are written; a new segmentation is created when empty.
    probabilities - also write one probability volume per label.
    trustModelCode - let a MONAI bundle run its own code (shown, and confirmed, before each run that needs it).

    Registration:
    fixedVolume, movingVolume - the moving volume is aligned to the fixed one.
    fixedMask, movingMask - optional segmentations limiting which voxels count.
    movingSegmentation - optional segments on the moving volume to carry onto the fixed volume.
    fixedSegmentation - optional reference segments on the fixed volume: the report gives each structure's Dice.
    registrationPreset - one of the engine's presets.
    outputTransform, outputVolume, registeredSegmentation - where results go; new nodes when empty.
    inverseTransform - also write the fixed-to-moving transform.
    showQualityReport - write the quality report into the log.

    Both: device ("auto", "cpu" or "cuda"); overlap and mirroring trade speed for quality in segmentation.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    modelName: str = DEFAULT_MODEL_ID
    labels: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    probabilities: bool = False
    trustModelCode: bool = False

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLSegmentationNode
    movingMask: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    fixedSegmentation: vtkMRMLSegmentationNode
    registrationPreset: Annotated[str, Choice(REGISTRATION_PRESETS)] = "deformable fast"
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    registeredSegmentation: vtkMRMLSegmentationNode
    inverseTransform: bool = False
    showQualityReport: bool = True

    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    mirroring: bool = False


#
# DeepSegModuleWidget
#


class DeepSegModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node, starts runs in the logic and follows them from a timer.

    One run at a time: while it runs, its button reads "Cancel" and the other section's button is disabled.
    Progress is read from the run on the main thread every ``POLL_INTERVAL_MS``; the logic writes the result
    into the scene in that same poll, as one change, so MRML is never touched from another thread.
    """

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the run in progress (DeepSegModuleLib.logic.Run), if any
        self._runKind = None  # "segment" or "register"
        self._runStage = None
        self._pollTimer = None
        self._importMenu = None

    def resourcePath(self, filename: str) -> str:
        """Absolute path of a resource; also used by the developer section's "Edit UI" button."""
        return str(resource_path(filename))

    def setup(self) -> None:
        """Builds the panel once, when the user first opens the module."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSegModule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the root widget's mrmlSceneChanged signal to every node selector's setMRMLScene.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # One logic, hence one persistent worker, per panel: models stay loaded between runs.
        self.logic = DeepSegModuleLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        # The progress bar is for runs; it stays out of the way until one starts.
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = ""

        # One button, two dialogs: Qt's file dialog picks either files or folders, and models come as both.
        self._importMenu = qt.QMenu(self.ui.importModelButton)
        fileAction = self._importMenu.addAction(_("From a file (.zip or TorchScript)…"))
        fileAction.connect("triggered()", self.onImportModelFile)
        folderAction = self._importMenu.addAction(_("From a folder (MONAI bundle, nnU-Net, TorchScript with card)…"))
        folderAction.connect("triggered()", self.onImportModelFolder)
        self.ui.importModelButton.setMenu(self._importMenu)
        self.ui.modelComboBox.connect("activated(int)", self.onStoredModelChosen)
        self._refreshStoredModels()

        # A closed scene takes the parameter node with it: let go of it before, make a new one after.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)

        # Also needed after "Reload" in developer mode.
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: stops the run and the worker."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self._refreshStoredModels()

    def exit(self) -> None:
        """Called each time the user opens another module: stop mirroring the parameter node (a run goes on)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to be cleared: a run's result has nowhere to go, and the parameter node goes."""
        if self._run is not None:
            # Dropped, not just cancelled: a job that has already finished would otherwise be applied by the next
            # poll, into the new scene, from nodes of the old one.
            self._run.cancel()
            self._endRun()
            self._log(_("Run stopped: the scene was closed."))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """If the panel is showing while the scene closes, give it a fresh parameter node at once."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Makes sure a parameter node exists and is observed; preselects the first volume."""
        self.setParameterNode(self.logic.getParameterNode())

        firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if firstVolumeNode:
            if not self._parameterNode.inputVolume:
                self._parameterNode.inputVolume = firstVolumeNode
            if not self._parameterNode.fixedVolume:
                self._parameterNode.fixedVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: DeepSegModuleParameterNode | None) -> None:
        """Swaps the parameter node the panel mirrors (widgets carry a SlicerParameterName property)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._showModelInComboBox()
        self._updateButtons()

    # models

    def _refreshStoredModels(self) -> None:
        """Lists the local model store's models (read from its folder: no torch needed to open the panel)."""
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for modelId in self.logic.storedModelIds():
            self.ui.modelComboBox.addItem(modelId)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        self._showModelInComboBox()

    def _showModelInComboBox(self) -> None:
        # The combo box only offers stored models; the parameter node's model name (bound to the line edit) is
        # what runs. It shows the stored model of that name, or nothing when a path was typed.
        modelName = self._parameterNode.modelName if self._parameterNode else ""
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.findText(modelName) if modelName else -1
        self.ui.modelComboBox.blockSignals(wasBlocked)

    def onStoredModelChosen(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemText(index)

    def onImportModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("Import a model file"),
            "",
            _("Models (*.zip *.ts *.pt *.pth);;All files (*)"),
        )
        if path:
            self._importModel(path)

    def onImportModelFolder(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Import a model folder"))
        if path:
            self._importModel(path)

    def _importModel(self, source: str) -> None:
        """Copies the model into the store (checksums recorded) and selects it."""
        with slicer.util.tryWithErrorDisplay(_("The model could not be imported."), waitCursor=True):
            modelId = self.logic.suggestedModelId(source)
            replace = False
            if modelId in self.logic.storedModelIds():
                replace = slicer.util.confirmYesNoDisplay(
                    _("A model named '{name}' is already stored. Replace it?").format(name=modelId)
                )
                if not replace:
                    return
            # The model store reads cards with the model loaders, which need torch and MONAI.
            self._ensurePythonRequirements()
            modelId = self.logic.importModel(source, modelId=modelId, replace=replace)
            self._refreshStoredModels()
            self._parameterNode.modelName = modelId
            self._log(
                _("Imported model '{name}' from {source}; checksums recorded.").format(name=modelId, source=source)
            )

    # runs

    def _updateButtons(self) -> None:
        parameters = self._parameterNode
        running = self._run is not None
        canSegment = bool(parameters and parameters.inputVolume and parameters.modelName.strip())
        canRegister = bool(parameters and parameters.fixedVolume and parameters.movingVolume)
        for button, kind, ready, idleText, readyTip, notReadyTip in (
            (self.ui.segmentButton, "segment", canSegment, _("Segment"),
             _("Segment the input volume with the chosen model"), _("Select an input volume and a model")),
            (self.ui.registerButton, "register", canRegister, _("Register"),
             _("Register the moving volume to the fixed volume"), _("Select a fixed and a moving volume")),
        ):  # fmt: skip
            if running and self._runKind == kind:
                button.text = _("Cancel")
                button.toolTip = _("Stop this run; the scene is left as it was")
                button.enabled = True
            else:
                button.text = idleText
                button.toolTip = readyTip if ready else notReadyTip
                button.enabled = ready and not running

    def onSegmentButton(self) -> None:
        if self._run is not None:
            self._cancelRun()
            return
        with slicer.util.tryWithErrorDisplay(_("DeepSeg could not start the segmentation."), waitCursor=True):
            self._ensurePythonRequirements()
            trust = self._confirmTrustedCode() if self._parameterNode.trustModelCode else False
            if trust is None:
                return
            self._startRun("segment", self.logic.startSegmentFromParameters(
                self._parameterNode, self._onJobEvent, trustCode=trust))

    def _confirmTrustedCode(self) -> bool | None:
        """Shows what a trusted run executes and asks; True to run trusted, None when the user declines."""
        whatRuns = self.logic.codeOutsideAllowList(self._parameterNode.modelName)
        if not whatRuns:
            return False  # nothing outside the allow-list: no trust needed
        if not slicer.util.confirmOkCancelDisplay(
            _("This model runs code of its own, outside DeepSeg's allow-list. Run it only if you trust its "
              "author. Your decision is recorded for this model."),
            windowTitle=_("Run this model's code?"), detailedText="\n".join(whatRuns),
        ):  # fmt: skip
            return None
        self.logic.recordTrust(self._parameterNode.modelName, whatRuns)
        self._log(_("Trusted mode: {lines}").format(lines="; ".join(whatRuns)))
        return True

    def onRegisterButton(self) -> None:
        if self._run is not None:
            self._cancelRun()
            return
        with slicer.util.tryWithErrorDisplay(_("DeepSeg could not start the registration."), waitCursor=True):
            self._ensurePythonRequirements()
            self._startRun("register", self.logic.startRegisterFromParameters(self._parameterNode, self._onJobEvent))

    def _startRun(self, kind: str, run) -> None:
        self._run, self._runKind, self._runStage = run, kind, None
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.statusLabel.text = _("Starting…")
        self._log(_("Segmentation started.") if kind == "segment" else _("Registration started."))
        self._updateButtons()
        self._pollTimer.start()

    def _cancelRun(self) -> None:
        self.ui.statusLabel.text = _("Cancelling…")
        self.ui.segmentButton.enabled = self.ui.registerButton.enabled = False
        self._run.cancel()

    def _onJobEvent(self, event) -> None:
        """Called from :meth:`_onPollTimer` (main thread) for each event the worker sent."""
        if event.kind == "progress" and event.stage and event.stage != self._runStage:
            self._runStage = event.stage
            self._log(_("Stage: {stage}").format(stage=event.stage))
        elif event.kind == "log" and event.message:
            self._log(f"  {event.message}")

    def _onPollTimer(self) -> None:
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        try:
            finished = run.poll()
        except Exception as error:  # writing the result into the scene failed; the logic undid it
            logger.exception("DeepSeg: applying the result failed")
            self._endRun()
            slicer.util.errorDisplay(_("DeepSeg could not write the result: {error}").format(error=error))
            return
        if not finished:
            self._showProgress(run.job)
            return
        kind = self._runKind
        self._endRun()
        if run.outcome is not None:
            self._showResult(kind, run.outcome)
        elif run.cancelled:
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
            self._log(self.ui.statusLabel.text)
        else:
            self.ui.statusLabel.text = _("Failed; the scene is unchanged.")
            self._log(_("Failed: {error}").format(error=run.error))
            slicer.util.errorDisplay(_("DeepSeg failed: {error}").format(error=run.error))

    def _showProgress(self, job) -> None:
        stage = job.stage or _("waiting for the worker")
        self.ui.progressBar.value = round(100 * max(0.0, min(1.0, job.fraction)))
        secondsLeft = job.seconds_left()
        if secondsLeft is None:
            self.ui.statusLabel.text = _("{stage}…").format(stage=stage)
        else:
            self.ui.statusLabel.text = _("{stage}: about {time} left").format(
                stage=stage, time=_formatDuration(secondsLeft)
            )

    def _endRun(self) -> None:
        self._pollTimer.stop()
        self._run = self._runKind = self._runStage = None
        self.ui.progressBar.visible = False
        self._updateButtons()

    def _showResult(self, kind: str, outcome) -> None:
        """Puts the new nodes into the views and the panel, and reports in the log."""
        parameters = self._parameterNode
        if kind == "segment":
            segmentation = outcome.segmentation
            if parameters:
                parameters.outputSegmentation = segmentation  # the next run replaces these segments
                slicer.util.setSliceViewerLayers(background=parameters.inputVolume)
            self.logic.showSegmentation(segmentation)
            names = self.logic.segmentNames(segmentation)
            result = outcome.result
            self.ui.statusLabel.text = _("Done: {count} segments in '{name}' ({seconds:.1f} s on {device}).").format(
                count=len(names), name=segmentation.GetName(), seconds=result.timings.get("total", 0.0),
                device=result.device,
            )  # fmt: skip
            self._log(self.ui.statusLabel.text)
            self._log(_("Segments: {names}").format(names=", ".join(names)))
            for message in result.messages:
                self._log(f"  {message}")
            return
        registered = outcome.volume
        if parameters:
            parameters.outputVolume = registered
            if outcome.segmentation is not None:
                parameters.registeredSegmentation = outcome.segmentation
            slicer.util.setSliceViewerLayers(
                background=parameters.fixedVolume, foreground=registered, foregroundOpacity=0.5
            )
        if outcome.segmentation is not None:
            self.logic.showSegmentation(outcome.segmentation)
        self.ui.statusLabel.text = _("Done: transform '{transform}', registered volume '{volume}'.").format(
            transform=outcome.transform.GetName(), volume=registered.GetName()
        )
        self._log(self.ui.statusLabel.text)
        if parameters is None or parameters.showQualityReport:
            for line in qualityReportLines(outcome.quality):
                self._log(f"  {line}")

    def _log(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    # dependencies

    def _ensurePythonRequirements(self) -> None:
        """Installs what DeepSeg needs on first use (never at import, as Slicer's packaging guide asks)."""
        self._ensureTorch()
        requirementsFile = self.resourcePath("requirements.txt")
        try:
            import slicer.packaging as slicerPackaging
        except ImportError:  # Slicer 5.10 and older
            slicerPackaging = None
        if slicerPackaging is not None:
            # Slicer >= 5.12: asks the user first, skips installs in --testing, offers a restart if needed.
            # skip_packages keeps pip from pulling torch or SimpleITK in as dependencies of MONAI.
            slicerPackaging.pip_ensure(
                slicerPackaging.load_requirements(requirementsFile),
                skip_packages=PACKAGES_NOT_TO_PIP_INSTALL,
                requester="DeepSeg",
            )
            return
        # Slicer 5.10 has no slicer.packaging: install only what is missing, after asking.
        missing = _missingRequirements(requirementsFile)
        if not missing:
            return
        if not slicer.util.confirmOkCancelDisplay(
            _("DeepSeg needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))
        ):
            raise RuntimeError(_("DeepSeg cannot run without its Python packages."))
        slicer.util.pip_install(missing)

    def _ensureTorch(self) -> None:
        # PyTorch comes from the PyTorch extension's installer, which picks the CUDA build for this driver.
        if importlib.util.find_spec("torch") is not None:
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(
                _("DeepSeg needs the PyTorch extension: install 'PyTorch' in the Extensions Manager, then restart.")
            ) from error
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
            raise RuntimeError(_("PyTorch was not installed; DeepSeg cannot run without it."))


def _missingRequirements(requirementsFile: str) -> list[str]:
    """Requirement lines of ``requirementsFile`` whose distribution is not installed (versions not compared)."""
    import importlib.metadata

    missing = []
    with open(requirementsFile, encoding="utf-8") as lines:
        for line in lines:
            requirement = line.split("#", 1)[0].strip()
            if not requirement:
                continue
            distribution = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
            try:
                importlib.metadata.distribution(distribution)
            except importlib.metadata.PackageNotFoundError:
                missing.append(requirement)
    return missing


#
# Formatting for the panel
#


def _formatDuration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``: what a progress line needs, no more precise than an estimate is."""
    from DeepSegModuleLib.jobs import format_duration

    return format_duration(seconds)


def qualityReportLines(quality) -> list[str]:
    """The registration quality report (a ``QualityReport``) as short lines for the panel's log."""
    return [_("Quality report:"), *quality.lines()]


def slicerPythonExecutable() -> str | None:
    """Slicer's own Python launcher (PythonSlicer), which the worker process must run with; None outside Slicer.

    Inside Slicer ``sys.executable`` is normally PythonSlicer already; otherwise it sits next to it.
    """
    if os.path.basename(sys.executable).lower().startswith("pythonslicer"):
        return sys.executable
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    for name in names:
        candidate = os.path.join(os.path.dirname(sys.executable), name)
        if os.path.isfile(candidate):
            return candidate
    return shutil.which("PythonSlicer")


#
# DeepSegModuleLogic
#


class DeepSegModuleLogic(ScriptedLoadableModuleLogic):
    """The module's GUI-free entry point: usable from scripts and the Python console without the panel.

    Works on a :class:`~DeepSegModuleLib.context.SceneContext`: the running application's by default, or a
    headless one (``SceneContext.headless()``) for batch use. From Slicer's Python console::

        logic = slicer.util.getModuleLogic("DeepSegModule")
        from DeepSegModuleLib.segmentation.options import SegmentationOptions
        from DeepSegModuleLib.registration.presets import RegistrationOptions
        outcome = logic.segment(volumeNode, "my-model", SegmentationOptions(labels=["liver"]))  # a store name or a path
        outcome.segmentation
        outcome = logic.register(fixedNode, movingNode, RegistrationOptions(preset="rigid"))
        outcome.transform, outcome.volume, outcome.quality.lines()

    Args:
        context: the scene and module logics; the running Slicer's when None.
        worker: where engines run; a persistent worker process running Slicer's Python when None (started at
            the first run, kept until :meth:`shutdown`, so models stay loaded between runs).
        modelStoreRoot: the local model store's folder; its default (``~/.deepseg/models``) when None.
    """

    def __init__(self, context=None, worker=None, modelStoreRoot=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        if context is None:
            from DeepSegModuleLib.context import SceneContext

            context = SceneContext.from_application()
        self.context = context
        self._worker = worker
        self.modelStoreRoot = modelStoreRoot
        self._engineLogic = None

    @property
    def engineLogic(self):
        """The Lib's :class:`~DeepSegModuleLib.logic.DeepSegLogic`, made on first use (it holds the worker)."""
        if self._engineLogic is None:
            from DeepSegModuleLib.jobs import ProcessWorker
            from DeepSegModuleLib.logic import DeepSegLogic

            worker = self._worker
            if worker is None:
                # Inside Slicer the worker must run Slicer's Python (sys.executable may be the Slicer app itself).
                worker = ProcessWorker(python=slicerPythonExecutable() if hasattr(slicer, "app") else None)
            self._engineLogic = DeepSegLogic(self.context, worker, model_store_root=self.modelStoreRoot)
        return self._engineLogic

    def shutdown(self) -> None:
        """Stops the worker process (a later run starts a new one)."""
        if self._engineLogic is not None:
            self._engineLogic.shutdown()
            self._engineLogic = None

    def resourcePath(self, filename: str) -> str:
        """Absolute path of a resource, in a packaged extension or a source checkout alike."""
        return str(resource_path(filename))

    def getParameterNode(self) -> DeepSegModuleParameterNode:
        return DeepSegModuleParameterNode(super().getParameterNode())

    # models

    def storedModelIds(self) -> list[str]:
        """Names of the models in the local model store (no torch needed)."""
        from DeepSegModuleLib.logic import stored_model_ids

        return stored_model_ids(self.modelStoreRoot)

    @staticmethod
    def suggestedModelId(source: str) -> str:
        """A store name for a model file or folder: its name without extensions, in the characters the store takes."""
        stem = os.path.basename(os.path.normpath(str(source))).split(".")[0]
        modelId = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:128]
        return modelId or "model"

    def importModel(self, source: str, modelId: str | None = None, replace: bool = False) -> str:
        """Copies a model folder, ``.zip`` or TorchScript file (with its card) into the store; returns its name."""
        from DeepSegModuleLib.logic import DeepSegLogic

        # Importing needs no worker: a bare DeepSegLogic keeps a console import from starting one.
        logic = self._engineLogic or DeepSegLogic(self.context, None, model_store_root=self.modelStoreRoot)
        return logic.import_model(source, model_id=modelId or self.suggestedModelId(source), replace=replace)

    # checks

    def checkInputVolume(self, inputVolume) -> None:
        """Raises ValueError saying what makes ``inputVolume`` unusable as a segmentation input."""
        if inputVolume is None:
            raise ValueError(_("No input volume selected."))
        if not inputVolume.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(
                _("'{name}' is a {kind}, not a scalar volume.").format(
                    name=inputVolume.GetName(), kind=inputVolume.GetClassName()
                )
            )
        from DeepSegModuleLib.nodes import check_volume_node

        check_volume_node(inputVolume)

    @staticmethod
    def labelNames(text: str) -> list[str]:
        """The "labels to keep" field as names: comma-separated, blanks ignored; empty means all labels."""
        return label_names(text) or []

    @staticmethod
    def segmentationInputs(parameterNode) -> list:
        """The input volumes in the model's input order; a gap (input 3 without input 2) is an error."""
        volumes = [parameterNode.inputVolume, parameterNode.inputVolume2, parameterNode.inputVolume3,
                   parameterNode.inputVolume4]  # fmt: skip
        while volumes and volumes[-1] is None:
            volumes.pop()
        if not volumes:
            raise ValueError(_("No input volume selected."))
        if any(volume is None for volume in volumes):
            missing = [str(index + 1) for index, volume in enumerate(volumes) if volume is None]
            raise ValueError(
                _("Input {inputs} is empty: the model's inputs are filled in order.").format(inputs=", ".join(missing))
            )
        return volumes

    @staticmethod
    def checkOutputTransform(options: RegistrationOptions, outputTransform) -> None:
        """Raises ValueError, before any work, when ``outputTransform`` cannot hold what ``options`` produce."""
        if outputTransform is None:
            return
        linear = options.linear
        preset = options.preset
        kind = "vtkMRMLLinearTransformNode" if linear else "vtkMRMLGridTransformNode"
        if not outputTransform.IsA(kind):
            raise ValueError(
                _(
                    "The '{preset}' preset writes a {kind}; '{name}' is a {actual}. Choose 'Create new transform' "
                    "or a transform of that kind."
                ).format(
                    preset=preset,
                    kind=_("linear transform") if linear else _("grid transform"),
                    name=outputTransform.GetName(),
                    actual=outputTransform.GetClassName(),
                )
            )

    # runs: start* return a Run to poll from the main thread; segment/register wait for it

    def startSegment(self, inputVolumes, model: str, options: SegmentationOptions | None = None,
                     outputSegmentation=None, onEvent=None):  # fmt: skip
        """Starts a segmentation; returns a :class:`~DeepSegModuleLib.logic.Run` (``poll()`` it, or ``wait()``).

        Args:
            inputVolumes: a scalar volume node, or a list of them in the model's input order.
            model: a model store name, or the path of a model folder, ``.zip`` or TorchScript file.
            options: a :class:`~DeepSegModuleLib.segmentation.options.SegmentationOptions` (labels to keep,
                probabilities, device, overlap, mirroring, precision, trust_code); its defaults when None. A stored
                model the user trusted before runs trusted anyway.
            outputSegmentation: a segmentation to write into (segments of the same name are replaced), or None.
            onEvent: called with each :class:`~DeepSegModuleLib.jobs.JobEvent` from ``poll()``.

        Raises:
            ValueError: an unusable input; ChecksumError: a stored model was changed. Nothing is started then.
        """
        volumes = list(inputVolumes) if isinstance(inputVolumes, (list, tuple)) else [inputVolumes]
        for volume in volumes:
            self.checkInputVolume(volume)
        if not str(model or "").strip():
            raise ValueError(_("No model selected: choose a stored model, import one, or enter a path."))
        return self.engineLogic.start_segment(
            volumes, str(model).strip(), options, output_segmentation=outputSegmentation, on_event=onEvent
        )

    def segment(self, inputVolumes, model: str, options: SegmentationOptions | None = None,
                timeout: float | None = None, **where):  # fmt: skip
        """Segments and returns the :class:`~DeepSegModuleLib.logic.SegmentationOutcome` once the segments are in
        the scene: ``outcome.segmentation`` is the segmentation node. Arguments as in :meth:`startSegment`."""
        return self.startSegment(inputVolumes, model, options, **where).wait(timeout)

    def startRegister(self, fixedVolume, movingVolume, options: RegistrationOptions | None = None, fixedMask=None,
                      movingMask=None, movingSegmentation=None, outputTransform=None, outputVolume=None,
                      outputSegmentation=None, onEvent=None, fixedSegmentation=None):  # fmt: skip
        """Starts registering ``movingVolume`` to ``fixedVolume``; returns a Run (``poll()`` it, or ``wait()``).

        ``options``: a :class:`~DeepSegModuleLib.registration.presets.RegistrationOptions` (preset, device,
        inverse). The transform node holds the resampling transform (fixed point to moving point): put the moving
        volume under it to see it aligned. Outputs are new nodes unless existing ones are given. With
        ``fixedSegmentation`` (reference segments on the fixed volume) and ``movingSegmentation``, the quality
        report gives the Dice of each structure the two share by name.

        Raises:
            ValueError: an unusable input, option or output; nothing is started then.
        """
        for volume in (fixedVolume, movingVolume):
            self.checkInputVolume(volume)
        options = options or RegistrationOptions()
        try:
            options.config()
        except ValueError:
            raise ValueError(_("Unknown preset '{preset}'.").format(preset=options.preset)) from None
        options.checked()  # the device
        self.checkOutputTransform(options, outputTransform)
        return self.engineLogic.start_register(
            fixedVolume, movingVolume, options, fixed_mask=fixedMask, moving_mask=movingMask,
            moving_segmentation=movingSegmentation, output_transform=outputTransform, output_volume=outputVolume,
            output_segmentation=outputSegmentation, on_event=onEvent, fixed_segmentation=fixedSegmentation,
        )  # fmt: skip

    def register(self, fixedVolume, movingVolume, options: RegistrationOptions | None = None,
                 timeout: float | None = None, **where):  # fmt: skip
        """Registers and returns the :class:`~DeepSegModuleLib.logic.RegistrationOutcome` once the results are in
        the scene: ``outcome.transform``, ``outcome.volume``, ``outcome.inverse_transform`` and
        ``outcome.segmentation`` when asked for, ``outcome.quality``. Arguments as in :meth:`startRegister`."""
        return self.startRegister(fixedVolume, movingVolume, options, **where).wait(timeout)

    @classmethod
    def segmentationOptions(cls, parameterNode, trustCode: bool = False) -> SegmentationOptions:
        """The options the panel describes (``trustCode``: the user confirmed the model's own code)."""
        return SegmentationOptions(
            device=parameterNode.device, overlap=parameterNode.overlap, mirroring=parameterNode.mirroring,
            labels=cls.labelNames(parameterNode.labels) or None, probabilities=parameterNode.probabilities,
            trust_code=trustCode,
        )  # fmt: skip

    @staticmethod
    def registrationOptions(parameterNode) -> RegistrationOptions:
        """The options the panel describes."""
        return RegistrationOptions(
            preset=parameterNode.registrationPreset, device=parameterNode.device, inverse=parameterNode.inverseTransform
        )

    def startSegmentFromParameters(self, parameterNode, onEvent=None, trustCode=False):
        """Starts the segmentation the panel describes (``trustCode``: the user confirmed the model's own code)."""
        return self.startSegment(
            self.segmentationInputs(parameterNode), parameterNode.modelName,
            self.segmentationOptions(parameterNode, trustCode), outputSegmentation=parameterNode.outputSegmentation,
            onEvent=onEvent,
        )  # fmt: skip

    def codeOutsideAllowList(self, model: str) -> list[str]:
        """What trusted mode would run for ``model`` (a MONAI bundle), or [] when nothing outside the allow-list."""
        path = Path(self.engineLogic.resolve_model(str(model).strip()))
        if not (path / "configs").is_dir():
            return []
        from DeepSegModuleLib.models.monai_bundle import trusted_code_summary

        lines = trusted_code_summary(path)
        return [] if lines == ["nothing outside the allow-list"] else lines

    def recordTrust(self, model: str, whatRuns: list[str]) -> None:
        """Records the user's trust decision for a stored model (a path is trusted for this run only)."""
        from DeepSegModuleLib.models.store import ModelStore, model_argument

        store = ModelStore(self.engineLogic.model_store_root)
        kind, value = model_argument(str(model).strip(), store)
        if kind == "store":
            store.set_trusted(str(value), True, whatRuns)

    def startRegisterFromParameters(self, parameterNode, onEvent=None):
        """Starts the registration the panel describes."""
        return self.startRegister(
            parameterNode.fixedVolume, parameterNode.movingVolume, self.registrationOptions(parameterNode),
            fixedMask=parameterNode.fixedMask, movingMask=parameterNode.movingMask,
            movingSegmentation=parameterNode.movingSegmentation, outputTransform=parameterNode.outputTransform,
            outputVolume=parameterNode.outputVolume, outputSegmentation=parameterNode.registeredSegmentation,
            onEvent=onEvent, fixedSegmentation=parameterNode.fixedSegmentation,
        )  # fmt: skip

    # results

    @staticmethod
    def showSegmentation(segmentation) -> None:
        """Makes the segments visible in the slice views and, as surfaces, in the 3D view."""
        if segmentation.GetDisplayNode() is None:
            segmentation.CreateDefaultDisplayNodes()
        display = segmentation.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2D(True)
        display.SetVisibility3D(True)
        segmentation.CreateClosedSurfaceRepresentation()

    @staticmethod
    def segmentNames(segmentation) -> list[str]:
        segments = segmentation.GetSegmentation()
        return [segments.GetNthSegment(index).GetName() for index in range(segments.GetNumberOfSegments())]


#
# DeepSegModuleTest
#


class DeepSegModuleTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (the Reload-and-Test button, or ``Slicer --testing`` through CTest) and, under test
    stubs, in the pytest suite on slicer-core. Real work, on data shipped with the module (``Resources/Testing``,
    written by ``Resources/make_test_data.py``): a tiny TorchScript model is imported into a model store and segments
    a bright sphere; a real brain (the MNI152 template) moved by a known rigid motion is registered back.
    """

    def setUp(self) -> None:
        """Every test starts from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        for test in (
            self.test_UnusableInputLeavesSceneUnchanged,
            self.test_SegmentBrightSphereWithImportedModel,
            self.test_RigidRegistrationOfBrainPairRecoversKnownMotion,
        ):
            self.setUp()
            test()

    # helpers

    @staticmethod
    def _worker():
        """In-process worker in the test runner and headless (fast, no process start); in an interactive Slicer
        (Reload and Test) None, which gives the panel's own worker process running PythonSlicer."""
        from DeepSegModuleLib.jobs import InProcessWorker

        app = getattr(slicer, "app", None)
        testing = app is None or not hasattr(app, "testingEnabled") or app.testingEnabled()
        return InProcessWorker() if testing else None

    @staticmethod
    def _rasOfVoxels(shapeKji, ijkToRas):
        import numpy as np

        k, j, i = np.meshgrid(*(np.arange(size) for size in shapeKji), indexing="ij")
        ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
        return (ijk @ np.asarray(ijkToRas).T)[..., :3]

    # tests

    def test_SegmentBrightSphereWithImportedModel(self) -> None:
        import json

        import numpy as np

        self.delayDisplay("Segmenting a bright sphere with the bundled test model, imported into a model store")
        # The module's test model: voxels brighter than 150 are "Sphere". Its card (beside it) names the label and
        # records the weights' sha256, which the store checks on import and before each run.
        weights = resource_path("Testing/BrightSphere/bright-sphere.ts")
        with open(resource_path("Testing/BrightSphere/deepseg.json"), encoding="utf-8") as cardFile:
            [label] = json.load(cardFile)["labels"]
        workFolder = tempfile.mkdtemp(prefix="DeepSegModuleTest-")
        logic = DeepSegModuleLogic(worker=self._worker(), modelStoreRoot=os.path.join(workFolder, "store"))
        try:
            modelId = logic.importModel(str(weights))
            self.assertEqual(modelId, "bright-sphere")
            self.assertIn("bright-sphere", logic.storedModelIds())  # beside any models shipped with DeepSeg

            # Anisotropic voxels and an offset origin: a segment put in the wrong place cannot pass.
            ijkToRas = np.array([[1.2, 0, 0, -30.0], [0, 1.0, 0, -25.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
            shape = (30, 50, 45)  # (k, j, i)
            centre = np.array([-6.0, 3.0, -12.0])
            sphere = np.linalg.norm(self._rasOfVoxels(shape, ijkToRas) - centre, axis=-1) <= 10.0
            volume = slicer.util.addVolumeFromArray(
                np.where(sphere, 300, 0).astype(np.int16), ijkToRAS=ijkToRas, name="Sphere CT"
            )

            # As the panel runs it: parameters in, a Run polled from this thread until the result is applied.
            parameters = SimpleNamespace(
                inputVolume=volume,
                inputVolume2=None,
                inputVolume3=None,
                inputVolume4=None,
                modelName=modelId,
                labels="",
                outputSegmentation=None,
                probabilities=False,
                device="cpu",
                overlap=0.25,
                mirroring=False,
            )
            stages = []
            run = logic.startSegmentFromParameters(parameters, lambda event: stages.append(event.stage))
            deadline = time.monotonic() + 300
            while not run.poll():
                self.assertLess(time.monotonic(), deadline, "the segmentation did not finish in 5 minutes")
                time.sleep(0.05)
            self.assertIsNone(run.error)
            self.assertIn("inference", stages)
            segmentation = run.outcome.segmentation
            self.assertEqual(logic.segmentNames(segmentation), [label["name"]])
            # Segments are stored on the input's voxel grid, so they map back voxel for voxel.
            geometryName = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
            expectedGeometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
                slicer.util.vtkMatrixFromArray(ijkToRas), volume.GetImageData()
            )
            self.assertEqual(segmentation.GetSegmentation().GetConversionParameter(geometryName), expectedGeometry)

            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(label["name"])
            segmentColor = segmentation.GetSegmentation().GetSegment(segmentId).GetColor()
            self.assertLess(np.abs(np.subtract(segmentColor, label["color"])).max(), 1e-3)
            found = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume) > 0
            self.assertTrue(found.any(), "the Sphere segment is empty")
            dice = 2.0 * np.count_nonzero(found & sphere) / (np.count_nonzero(found) + np.count_nonzero(sphere))
            self.assertGreater(dice, 0.85)
            foundCentre = self._rasOfVoxels(shape, ijkToRas)[found].mean(axis=0)
            self.assertLess(np.linalg.norm(foundCentre - centre), 1.5)

            # Running again into the same segmentation replaces the segment instead of adding one.
            again = logic.segment(volume, modelId, SegmentationOptions(device="cpu"), outputSegmentation=segmentation)
            self.assertIs(again.segmentation, segmentation)
            self.assertEqual(logic.segmentNames(segmentation), ["Sphere"])
            logic.showSegmentation(segmentation)
            self.assertTrue(segmentation.GetDisplayNode().GetVisibility3D())
        finally:
            logic.shutdown()
            shutil.rmtree(workFolder, ignore_errors=True)
        self.delayDisplay("Test passed")

    def test_RigidRegistrationOfBrainPairRecoversKnownMotion(self) -> None:
        import json

        import numpy as np
        from DeepSegModuleLib.storage import load_volume

        self.delayDisplay("Registering a brain moved by a known rigid motion, with the rigid preset")
        # The MNI152 template at 4 mm (fixed) and the same template rotated by a few degrees and shifted by a few mm
        # (moving); motion.json holds that motion as the fixed-to-moving RAS matrix.
        with open(resource_path("Testing/BrainPair/motion.json"), encoding="utf-8") as motionFile:
            fixedToMoving = np.array(json.load(motionFile)["fixed_to_moving_ras"])
        logic = DeepSegModuleLogic(worker=self._worker())
        fixed = load_volume(logic.context, resource_path("Testing/BrainPair/fixed.nrrd"), name="Brain fixed")
        moving = load_volume(logic.context, resource_path("Testing/BrainPair/moving.nrrd"), name="Brain moving")
        try:
            outcome = logic.register(fixed, moving, RegistrationOptions(preset="rigid", device="cpu"))
        finally:
            logic.shutdown()

        transform = outcome.transform
        self.assertTrue(transform.IsA("vtkMRMLLinearTransformNode"))
        # Slicer's own transform: its "from parent" direction maps a fixed point to the moving point sampled there,
        # the direction motion.json gives. Points across the brain: an error in the rotation shows far from its centre.
        fromParent = transform.GetTransformFromParent()
        for fixedPoint in ([0.0, 0.0, 0.0], [45.0, -20.0, 10.0], [-45.0, 20.0, 10.0], [0.0, 55.0, 5.0],
                           [0.0, -70.0, 10.0], [10.0, -10.0, 50.0], [0.0, -20.0, -30.0]):  # fmt: skip
            expected = (fixedToMoving @ [*fixedPoint, 1.0])[:3]
            moved = np.array(fromParent.TransformPoint(fixedPoint))
            self.assertLess(np.linalg.norm(moved - expected), 1.5, f"{fixedPoint} went to {moved}, not {expected}")

        # The registered volume lies on the fixed grid and on the fixed brain, much better than the moving one did.
        fixedArray = slicer.util.arrayFromVolume(fixed).astype(float)
        registered = slicer.util.arrayFromVolume(outcome.volume).astype(float)
        self.assertEqual(registered.shape, fixedArray.shape)
        before = np.corrcoef(slicer.util.arrayFromVolume(moving).astype(float).ravel(), fixedArray.ravel())[0, 1]
        after = np.corrcoef(registered.ravel(), fixedArray.ravel())[0, 1]
        self.assertGreater(after, 0.97)
        self.assertGreater(after, before + 0.05)
        self.assertGreater(len(qualityReportLines(outcome.quality)), 1)
        self.delayDisplay("Test passed")

    def test_UnusableInputLeavesSceneUnchanged(self) -> None:
        import numpy as np

        emptyVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
        colourVolume = slicer.util.addVolumeFromArray(
            np.zeros((4, 5, 6, 3), dtype=np.uint8), name="Colour", nodeClassName="vtkMRMLVectorVolumeNode"
        )
        logic = DeepSegModuleLogic()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        for unusable in (None, emptyVolume, colourVolume):
            with self.assertRaises(ValueError):
                logic.startSegment(unusable, "any-model")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")
