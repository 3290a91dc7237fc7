"""The module file imported under Slicer's stubbed GUI: it follows Slicer's template, loads no heavy package, finds
its resources; its logic refuses bad input on real MRML, and its own Slicer test passes on a headless scene."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import slicer_stubs

from extension_checks import (
    ICON_FILE,
    MODULE_FILE,
    MODULE_NAME,
    REQUIREMENTS_FILE,
    UI_FILE,
)


# ----------------------------------------------------------------------------------------------- the module under stubs


def test_module_classes_follow_slicers_template(deepseg_module):
    bases = sys.modules["slicer.ScriptedLoadableModule"]
    from slicer.util import VTKObservationMixin

    assert issubclass(deepseg_module.DeepSegModule, bases.ScriptedLoadableModule)
    assert issubclass(deepseg_module.DeepSegModuleWidget, bases.ScriptedLoadableModuleWidget)
    assert issubclass(deepseg_module.DeepSegModuleWidget, VTKObservationMixin)
    assert issubclass(deepseg_module.DeepSegModuleLogic, bases.ScriptedLoadableModuleLogic)
    assert issubclass(deepseg_module.DeepSegModuleTest, bases.ScriptedLoadableModuleTest)
    test_methods = [name for name in vars(deepseg_module.DeepSegModuleTest) if name.startswith("test_")]
    assert len(test_methods) >= 2
    assert "setUp" in vars(deepseg_module.DeepSegModuleTest) and "runTest" in vars(deepseg_module.DeepSegModuleTest)


def test_module_metadata_is_filled_and_the_icon_is_found_from_a_source_checkout(deepseg_module):
    parent = SimpleNamespace(path=str(MODULE_FILE))
    deepseg_module.DeepSegModule(parent)
    # Slicer's generic module test requires non-empty categories, contributors and acknowledgement.
    assert parent.title == "DeepSeg"
    assert parent.categories == ["Segmentation"]
    assert parent.contributors and all(parent.contributors)
    assert parent.helpText.strip() and parent.acknowledgementText.strip()
    # Slicer's default lookup (<module folder>/Resources) has nothing in a checkout; the module's own must.
    assert Path(parent.icon.path) == ICON_FILE


def test_parameter_node_types_resolve_as_slicers_wrapper_resolves_them(deepseg_module):
    import slicer

    parameter_types = deepseg_module.DeepSegModuleParameterNode.stubParameterTypes
    assert parameter_types["inputVolume"] is slicer.vtkMRMLScalarVolumeNode
    assert parameter_types["outputSegmentation"] is slicer.vtkMRMLSegmentationNode
    choice = parameter_types["device"].__metadata__[0]
    assert choice.choices == ["auto", "cpu", "cuda"]
    assert deepseg_module.DeepSegModuleParameterNode.device in choice.choices
    for name in ("inputVolume2", "inputVolume3", "inputVolume4", "fixedVolume", "movingVolume", "outputVolume"):
        assert parameter_types[name] is slicer.vtkMRMLScalarVolumeNode
    for name in ("fixedMask", "movingMask", "movingSegmentation", "fixedSegmentation", "registeredSegmentation"):
        assert parameter_types[name] is slicer.vtkMRMLSegmentationNode
    assert parameter_types["outputTransform"] is slicer.vtkMRMLTransformNode


def test_widget_and_logic_find_resources_where_the_module_loads_them(deepseg_module):
    widget = deepseg_module.DeepSegModuleWidget.__new__(deepseg_module.DeepSegModuleWidget)
    assert Path(widget.resourcePath("UI/DeepSegModule.ui")) == UI_FILE
    logic = deepseg_module.DeepSegModuleLogic(context=SimpleNamespace(scene=None))
    assert Path(logic.resourcePath("requirements.txt")) == REQUIREMENTS_FILE


def test_stubs_do_not_outlive_the_with_block():
    import slicer

    originals = {name: sys.modules.get(name) for name in slicer_stubs.STUBBED_MODULE_NAMES}
    with slicer_stubs.stubbed_slicer():
        slicer_stubs.load_module_file(MODULE_FILE)
        assert isinstance(sys.modules["qt"], slicer_stubs._PlaceholderModule)
    assert {name: sys.modules.get(name) for name in slicer_stubs.STUBBED_MODULE_NAMES} == originals
    assert MODULE_NAME not in sys.modules
    assert not any(hasattr(slicer, name) for name in ("i18n", "ScriptedLoadableModule", "parameterNodeWrapper"))


def test_importing_the_module_loads_no_heavy_package():
    """Slicer imports every module at startup: torch or MONAI there would slow every launch."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import slicer_stubs
        from pathlib import Path
        with slicer_stubs.stubbed_slicer():
            slicer_stubs.load_module_file(Path({str(MODULE_FILE)!r}))
            print(sorted(name for name in ("torch", "monai", "SimpleITK", "nibabel") if name in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_first_apply_installs_only_the_requirements_that_are_missing(deepseg_module, tmp_path: Path):
    """Slicer 5.10 has no slicer.packaging; the fallback must not reinstall what is there."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# comment\nnumpy>=1.0  # installed here\n\ndeepseg-no-such-package[extra]>=1 ; python_version>'3'\n"
    )
    assert deepseg_module._missingRequirements(str(requirements)) == [
        "deepseg-no-such-package[extra]>=1 ; python_version>'3'"
    ]


# ----------------------------------------------------------------------------------------------- the logic on real MRML


def _volume(scene, voxels: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*voxels.shape[2::-1])
    components = 1 if voxels.ndim == 3 else voxels.shape[3]
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.reshape(-1, components), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    node.SetAndObserveImageData(image)
    return node


OBLIQUE_IJK_TO_RAS = np.array(
    [
        [0.66, -0.21, 0.79, 12.5],
        [0.24, 0.85, -0.30, -31.25],
        [-0.05, 0.31, 2.31, 7.75],
        [0, 0, 0, 1],
    ]
)


@pytest.mark.parametrize("fault", ["none", "no voxels", "three components", "nan geometry", "singular geometry"])
def test_logic_rejects_unusable_input_and_leaves_the_scene_unchanged(deepseg_module, context, fault):
    volume = None
    if fault == "no voxels":
        volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    elif fault == "three components":
        volume = _volume(context.scene, np.zeros((4, 5, 6, 3), dtype=np.uint8), np.eye(4), "Colour")
    elif fault in ("nan geometry", "singular geometry"):
        matrix = np.eye(4)
        matrix[0, 0] = np.nan if fault == "nan geometry" else 0.0
        volume = _volume(context.scene, np.zeros((4, 5, 6), dtype=np.int16), np.eye(4), "Broken")
        volume.SetIJKToRASMatrix(__import__("slicer").util.vtkMatrixFromArray(matrix))
    logic = deepseg_module.DeepSegModuleLogic(context=context)
    nodes_before = context.node_ids()

    with pytest.raises(ValueError):
        logic.startSegment(volume, "any-model")

    assert context.node_ids() == nodes_before


def test_the_modules_own_slicer_test_passes_on_a_headless_scene(deepseg_module, context, monkeypatch):
    """Runs DeepSegModuleTest (what CTest runs in real Slicer) against slicer-core's MRML."""
    import unittest

    import slicer

    # The Slicer globals the test and SceneContext.from_application() read, backed by the headless context.
    modules = SimpleNamespace(
        **{
            name: SimpleNamespace(logic=lambda logic=logic: logic)
            for name, logic in {
                "colors": context.colors_logic,
                "volumes": context.volumes_logic,
                "segmentations": context.segmentations_logic,
                "transforms": context.transforms_logic,
                "subjecthierarchy": context.subject_hierarchy_logic,
            }.items()
        }
    )
    monkeypatch.setattr(slicer, "mrmlScene", context.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(applicationLogic=lambda: context.app_logic), raising=False)

    result = unittest.TestResult()
    deepseg_module.DeepSegModuleTest("runTest").run(result)

    assert result.testsRun == 1
    assert not result.errors and not result.failures, "\n".join(trace for _, trace in result.errors + result.failures)
