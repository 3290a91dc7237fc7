"""The panel's run cycle with stand-ins for Qt only (the one part that cannot exist here): Apply, progress, Cancel,
results shown, the quality report logged, trusted code confirmed, on real MRML and the real engines."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from extension_checks import (
    PANEL_PARAMETERS,
    MODULE_FILE,
    ui_names_used,
)


# ----------------------------------------------------------------------------------------------- the panel's run cycle


class _FakeWidget:
    """Stands in for any Qt widget the panel touches: properties are plain attributes, and the few methods the
    panel calls record what they were given. It lets the widget's run logic (buttons, polling, results) run here."""

    def __init__(self) -> None:
        self.text = ""
        self.toolTip = ""
        self.enabled = True
        self.visible = True
        self.value = 0
        self.currentIndex = -1
        self.items: list[str] = []
        self.lines: list[str] = []

    def blockSignals(self, block: bool) -> bool:
        return False

    def clear(self) -> None:
        self.items.clear()

    def addItem(self, text: str) -> None:
        self.items.append(text)

    def findText(self, text: str) -> int:
        return self.items.index(text) if text in self.items else -1

    def itemText(self, index: int) -> str:
        return self.items[index]

    def appendPlainText(self, line: str) -> None:
        self.lines.append(line)

    def setRange(self, low: int, high: int) -> None:
        pass


class _FakeTimer:
    def __init__(self) -> None:
        self.active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


@pytest.fixture
def panel(deepseg_module, context, tmp_path, monkeypatch):
    """The module widget with fake widgets, on a headless scene, with an in-process worker."""
    import slicer.util
    from DeepSegModuleLib.jobs import InProcessWorker

    shown = {"layers": [], "errors": []}
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **layers: shown["layers"].append(layers))
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown["errors"].append(text))
    # What slicer.util.tryWithErrorDisplay (the real one) needs from the application: the wait cursor.
    cursor = SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(**vars(cursor), testingEnabled=lambda: False), raising=False)
    sys.modules["qt"].Qt = SimpleNamespace(WaitCursor=None)
    widget = deepseg_module.DeepSegModuleWidget(parent=None)
    names = ui_names_used(MODULE_FILE.read_text())
    widget.ui = SimpleNamespace(**{name: _FakeWidget() for name in names})
    widget.logic = deepseg_module.DeepSegModuleLogic(
        context=context, worker=InProcessWorker(), modelStoreRoot=tmp_path / "store"
    )
    widget._pollTimer = _FakeTimer()
    widget._ensurePythonRequirements = lambda: None
    fields = {name: None for name in PANEL_PARAMETERS}
    fields.update(
        modelName="", labels="", probabilities=False, trustModelCode=False, registrationPreset="rigid",
        inverseTransform=False,
        showQualityReport=True, device="cpu", overlap=0.25, mirroring=False,
    )  # fmt: skip
    widget._parameterNode = SimpleNamespace(**fields)
    widget._updateButtons()
    yield widget, shown
    widget.logic.shutdown()


def _poll_until_idle(widget, seen_texts: set, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while widget._run is not None:
        assert time.monotonic() < deadline, "the run did not finish"
        seen_texts.update({widget.ui.segmentButton.text, widget.ui.registerButton.text})
        widget._onPollTimer()
        time.sleep(0.05)


def test_panel_segments_shows_cancel_while_running_and_shows_the_result(panel, context, tmp_path):
    from DeepSegModuleLib import nodes
    from segmentation_helpers import Thresholder, sphere_volume, write_torchscript_model

    widget, shown = panel
    card = write_torchscript_model(tmp_path / "model", Thresholder())
    assert widget.logic.importModel(str(card.parent / "model.ts")) == "model"
    widget._refreshStoredModels()
    # The models that ship with DeepSeg are offered too, before the user's own.
    assert widget.ui.modelComboBox.items == ["deepseg-brain", "model"]
    grid = ((20, 24, 22), np.diag([1.5, 1.5, 1.5, 1.0]))
    volume, _ = sphere_volume(np.array([16.0, 18.0, 15.0]), 8.0, grid)
    parameters = widget._parameterNode
    parameters.inputVolume = nodes.array_to_volume(context, volume.array, volume.ijk_to_ras, name="CT")
    assert widget.ui.segmentButton.enabled is False  # no model yet
    widget.onStoredModelChosen(1)
    assert parameters.modelName == "model"
    widget._updateButtons()
    assert widget.ui.segmentButton.enabled and widget.ui.registerButton.enabled is False

    widget.onSegmentButton()
    assert widget.ui.segmentButton.text == "Cancel" and widget.ui.registerButton.enabled is False
    assert widget.ui.progressBar.visible and widget._pollTimer.active
    texts: set = set()
    _poll_until_idle(widget, texts)

    assert shown["errors"] == []
    assert "Cancel" in texts
    assert widget.ui.segmentButton.text == "Segment" and widget.ui.segmentButton.enabled
    assert not widget.ui.progressBar.visible and not widget._pollTimer.active
    segmentation = parameters.outputSegmentation
    assert segmentation is not None and segmentation.GetScene() is context.scene
    assert segmentation.GetDisplayNode().GetVisibility3D()
    assert shown["layers"] == [{"background": parameters.inputVolume}]
    log = widget.ui.logTextEdit.lines
    assert "Stage: inference" in log and "Segments: Sphere" in log
    assert widget.ui.statusLabel.text.startswith("Done: 1 segments")


def test_panel_registers_overlays_the_result_and_logs_the_quality_report(panel, context):
    from DeepSegModuleLib import nodes
    from scipy.ndimage import gaussian_filter
    from segmentation_helpers import sphere_volume

    from DeepSegModuleLib import segments
    from DeepSegModuleLib.labels import LabelInfo

    widget, shown = panel
    spacing = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = ((32, 32, 32), spacing)
    fixed, fixed_ball = sphere_volume(np.array([31.0, 31.0, 31.0]), 10.0, grid)
    moving, moving_ball = sphere_volume(np.array([35.0, 28.0, 33.0]), 10.0, grid)
    parameters = widget._parameterNode
    parameters.fixedVolume = nodes.array_to_volume(context, gaussian_filter(fixed.array, 1.5), spacing, name="fixed")
    parameters.movingVolume = nodes.array_to_volume(context, gaussian_filter(moving.array, 1.5), spacing, name="moving")
    # the same structure drawn on both: the report gives its Dice, by name
    parameters.movingSegmentation = segments.labels_to_segmentation(
        context, moving_ball.astype(np.uint8), [LabelInfo(1, "Ball")], reference_volume=parameters.movingVolume)
    parameters.fixedSegmentation = segments.labels_to_segmentation(
        context, fixed_ball.astype(np.uint8), [LabelInfo(1, "Ball")], reference_volume=parameters.fixedVolume)
    widget._updateButtons()

    widget.onRegisterButton()
    assert widget.ui.registerButton.text == "Cancel" and widget.ui.segmentButton.enabled is False
    _poll_until_idle(widget, set())

    assert shown["errors"] == []
    registered = parameters.outputVolume
    assert registered is not None and registered.GetName() == "moving registered"
    assert shown["layers"] == [
        {"background": parameters.fixedVolume, "foreground": registered, "foregroundOpacity": 0.5}
    ]
    log = widget.ui.logTextEdit.lines
    assert "  Quality report:" in log and any(line.startswith("  time: ") for line in log)
    dice = next(line for line in log if "Dice" in line)
    assert "Ball:" in dice and float(dice.split("Ball:")[1].split(";")[0]) > 0.9
    assert widget.ui.registerButton.text == "Register"


def test_panel_cancel_leaves_the_scene_unchanged_and_a_wrong_output_transform_is_refused_up_front(panel, context):
    from DeepSegModuleLib import nodes

    widget, shown = panel
    rng = np.random.default_rng(0)
    parameters = widget._parameterNode
    parameters.fixedVolume = nodes.array_to_volume(context, rng.random((40, 40, 40), dtype=np.float32), np.eye(4))
    parameters.movingVolume = nodes.array_to_volume(context, rng.random((40, 40, 40), dtype=np.float32), np.eye(4))
    parameters.registrationPreset = "deformable accurate"
    before = context.node_ids()

    widget.onRegisterButton()
    widget.onRegisterButton()  # the button reads "Cancel" now
    assert widget.ui.registerButton.enabled is False and widget.ui.statusLabel.text == "Cancelling…"
    _poll_until_idle(widget, set(), timeout=60)
    assert widget.ui.statusLabel.text == "Cancelled; the scene is unchanged."
    assert context.node_ids() == before and shown["errors"] == []

    # A linear transform cannot hold a deformable result: refused before any work, with a message (Slicer's
    # tryWithErrorDisplay shows it, then re-raises for the console).
    parameters.outputTransform = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "linear")
    before = context.node_ids()
    with pytest.raises(ValueError, match="grid transform"):
        widget.onRegisterButton()
    assert widget._run is None and context.node_ids() == before
    assert len(shown["errors"]) == 1 and "'linear' is a vtkMRMLLinearTransformNode" in shown["errors"][0]
    assert widget.ui.registerButton.text == "Register" and widget.ui.registerButton.enabled


def test_panel_asks_before_running_a_models_own_code_and_records_the_answer(panel, context, tmp_path, monkeypatch):
    """A bundle whose config names its own class: the panel shows what would run and runs nothing when the user
    declines; an accepted decision is recorded in the store for that model."""
    import json

    import slicer.util
    from DeepSegModuleLib import nodes
    from DeepSegModuleLib.models.store import ModelStore
    from segmentation_helpers import sphere_volume

    widget, shown = panel
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text("")
    canary = tmp_path / "canary"
    (bundle / "scripts" / "net.py").write_text(f"open({str(canary)!r}, 'w').close()\nclass Net: pass\n")
    (bundle / "models" / "model.pt").write_bytes(b"")
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "scripts.net.Net"},
        "preprocessing": {"_target_": "Compose", "transforms": []}}))  # fmt: skip
    store = ModelStore(tmp_path / "store")
    store.import_model(bundle, model_id="own-code")
    grid = ((12, 12, 12), np.diag([1.5, 1.5, 1.5, 1.0]))
    volume, _ = sphere_volume(np.array([8.0, 8.0, 8.0]), 4.0, grid)
    parameters = widget._parameterNode
    parameters.inputVolume = nodes.array_to_volume(context, volume.array, volume.ijk_to_ras, name="CT")
    parameters.modelName = "own-code"
    parameters.trustModelCode = True
    questions = []

    def decline(text, **kwargs):
        questions.append(kwargs.get("detailedText", ""))
        return False

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", decline, raising=False)
    before = context.node_ids()
    widget.onSegmentButton()
    assert widget._run is None and context.node_ids() == before and not canary.exists()
    assert "scripts.net.Net" in questions[0]
    assert not store.get("own-code").trusted

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: True, raising=False)
    widget.onSegmentButton()
    _poll_until_idle(widget, set(), timeout=60)
    assert store.get("own-code").trusted["what_runs"] == [q for q in questions[0].split("\n") if q]
