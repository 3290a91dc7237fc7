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
import math
import re
from typing import Annotated

import qt
import slicer
import vtk
from DeepSegModuleLib.resources import resource_path
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

logger = logging.getLogger(__name__)

#: Devices the user can pick; "auto" means the GPU when PyTorch sees one, else the CPU.
DEVICE_CHOICES = ["auto", "cpu", "cuda"]

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
    """What the user chose in the panel; saved with the scene.

    inputVolume - the volume to segment.
    outputSegmentation - where segments are written; a new segmentation is created when empty.
    device - "auto", "cpu" or "cuda".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"


#
# DeepSegModuleWidget
#


class DeepSegModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and hands work to the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

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

        self.logic = DeepSegModuleLogic()

        # The progress bar is for runs; it stays out of the way until one starts.
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = ""

        # A closed scene takes the parameter node with it: let go of it before, make a new one after.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        # Also needed after "Reload" in developer mode.
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens another module: stop mirroring the parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """The parameter node is about to be deleted with the scene; stop using it."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """If the panel is showing while the scene closes, give it a fresh parameter node at once."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Makes sure a parameter node exists and is observed; preselects the first volume."""
        self.setParameterNode(self.logic.getParameterNode())

        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: DeepSegModuleParameterNode | None) -> None:
        """Swaps the parameter node the panel mirrors (widgets carry a SlicerParameterName property)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.toolTip = _("Segment the input volume")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select an input volume")
            self.ui.applyButton.enabled = False

    def onApplyButton(self) -> None:
        """Runs when the user presses Apply: ensures dependencies, then prepares the output."""
        with slicer.util.tryWithErrorDisplay(_("DeepSeg could not run."), waitCursor=True):
            self._ensurePythonRequirements()
            outputSegmentation = self.logic.prepareOutputSegmentation(
                self._parameterNode.inputVolume, self._parameterNode.outputSegmentation
            )
            self._parameterNode.outputSegmentation = outputSegmentation
            self.ui.statusLabel.text = _("Output segmentation '{name}' is ready.").format(
                name=outputSegmentation.GetName()
            )

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
# DeepSegModuleLogic
#


class DeepSegModuleLogic(ScriptedLoadableModuleLogic):
    """The module's GUI-free entry point: usable from scripts and the Python console without the panel.

    Works on a :class:`~DeepSegModuleLib.context.SceneContext`: the running application's by default, or a
    headless one (``SceneContext.headless()``) for batch use.
    """

    def __init__(self, context=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        if context is None:
            from DeepSegModuleLib.context import SceneContext

            context = SceneContext.from_application()
        self.context = context

    def resourcePath(self, filename: str) -> str:
        """Absolute path of a resource, in a packaged extension or a source checkout alike."""
        return str(resource_path(filename))

    def getParameterNode(self) -> DeepSegModuleParameterNode:
        return DeepSegModuleParameterNode(super().getParameterNode())

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
        imageData = inputVolume.GetImageData()
        if imageData is None or imageData.GetNumberOfPoints() == 0:
            raise ValueError(_("Volume '{name}' has no voxels.").format(name=inputVolume.GetName()))
        components = imageData.GetNumberOfScalarComponents()
        if components != 1:
            raise ValueError(
                _("Volume '{name}' has {components} values per voxel; a single-component image is needed.").format(
                    name=inputVolume.GetName(), components=components
                )
            )
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        elements = [ijkToRas.GetElement(row, column) for row in range(4) for column in range(4)]
        if not all(math.isfinite(element) for element in elements) or ijkToRas.Determinant() == 0:
            raise ValueError(
                _("Volume '{name}' has an invalid geometry (non-finite or singular IJK to RAS matrix).").format(
                    name=inputVolume.GetName()
                )
            )

    def prepareOutputSegmentation(self, inputVolume, outputSegmentation=None):
        """Checks the input and returns the segmentation a run writes into, set to the input's geometry.

        Args:
            inputVolume: the scalar volume node to segment.
            outputSegmentation: an existing segmentation node, or None to create one named after the input.

        Raises:
            ValueError: the input is unusable (see :meth:`checkInputVolume`); the scene is left as it was.
        """
        self.checkInputVolume(inputVolume)
        scene = self.context.scene
        if outputSegmentation is None:
            outputSegmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation")
            )
            outputSegmentation.CreateDefaultDisplayNodes()
        # Segments are stored on the input's voxel grid, so labels from the network map back voxel for voxel.
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        logger.info(
            "DeepSeg: output segmentation '%s' uses the geometry of '%s'",
            outputSegmentation.GetName(),
            inputVolume.GetName(),
        )
        return outputSegmentation


#
# DeepSegModuleTest
#


class DeepSegModuleTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer: the Reload-and-Test button, or ``Slicer --testing`` through CTest."""

    def setUp(self) -> None:
        """Every test starts from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_OutputSegmentationTakesInputGeometry()
        self.setUp()
        self.test_UnusableInputLeavesSceneUnchanged()

    def test_OutputSegmentationTakesInputGeometry(self) -> None:
        import numpy as np

        self.delayDisplay("Starting the test")
        # Anisotropic spacing and an offset origin, so a geometry taken from the wrong place cannot match.
        voxels = np.zeros((12, 10, 8), dtype=np.int16)  # (k, j, i), Slicer's array order
        voxels[4:8, 3:7, 2:6] = 100
        ijkToRas = np.array([[0.7, 0, 0, -20.0], [0, 0.9, 0, 15.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
        inputVolume = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijkToRas, name="DeepSegTestVolume")

        logic = DeepSegModuleLogic()
        segmentation = logic.prepareOutputSegmentation(inputVolume)

        self.assertTrue(segmentation.IsA("vtkMRMLSegmentationNode"))
        self.assertEqual(segmentation.GetName(), "DeepSegTestVolume segmentation")
        self.assertEqual(
            segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()), inputVolume.GetID()
        )
        geometryName = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        expectedGeometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
            slicer.util.vtkMatrixFromArray(ijkToRas), inputVolume.GetImageData()
        )
        self.assertEqual(segmentation.GetSegmentation().GetConversionParameter(geometryName), expectedGeometry)

        # An existing output is reused, not duplicated.
        self.assertIs(logic.prepareOutputSegmentation(inputVolume, segmentation), segmentation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
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
                logic.prepareOutputSegmentation(unusable)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")
