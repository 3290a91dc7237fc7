"""The panel's .ui against the code: every widget and member the code uses exists, every parameter is bound by exactly
one widget that can show it; and the checkers can fail."""

from __future__ import annotations

import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest
import widget_classes

from extension_checks import (
    PANEL_PARAMETERS,
    MODULE_FILE,
    MODULE_NAME,
    UI_FILE,
    parameter_binding_problems,
    parameter_node_fields,
    ui_attribute_uses,
    ui_name_problems,
    ui_names_used,
    ui_widgets,
    unbound_parameter_problems,
    widget_class_problems,
    widget_property,
)


def test_ui_file_is_a_designer_form_with_the_template_sections():
    root = ElementTree.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == MODULE_NAME
    widgets = ui_widgets(UI_FILE)
    sections = {
        widget_property(w, "text").findtext("string")
        for w in widgets.values()
        if w.get("class") == "ctkCollapsibleButton"
    }
    assert sections == {"Segmentation", "Registration", "Advanced"}
    classes = {name: widget.get("class") for name, widget in widgets.items()}
    assert {"QPushButton", "QProgressBar", "QLabel", "QComboBox", "qMRMLNodeComboBox"} <= set(classes.values())
    # The run log is read-only: it reports, the user does not edit it.
    assert classes["logTextEdit"] == "QPlainTextEdit"
    assert widget_property(widgets["logTextEdit"], "readOnly").findtext("bool") == "true"
    # Node selectors only get the scene through these connections from the root widget.
    connected = {
        c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert connected == {name for name, cls in classes.items() if cls == "qMRMLNodeComboBox"}


def test_every_widget_the_code_uses_exists_in_the_ui():
    source = MODULE_FILE.read_text()
    assert ui_names_used(source), "no self.ui.<name> found: the checker is looking at the wrong thing"
    assert ui_name_problems(source, UI_FILE) == []


def test_every_widget_attribute_the_code_uses_exists_on_the_widgets_class_in_the_ui():
    source = MODULE_FILE.read_text()
    uses = ui_attribute_uses(source)
    # The checker must see the uses that matter: calls, assignments, connections, and uses through loop aliases.
    assert ("progressBar", "setRange", "call", None) in {use[:4] for use in uses}
    assert ("segmentButton", "connect", "call", "clicked(bool)") in {use[:4] for use in uses}
    assert {("segmentButton", "text", "store"), ("registerButton", "toolTip", "store")} <= {use[:3] for use in uses}
    assert widget_class_problems(source, UI_FILE) == []


def test_the_widget_table_describes_every_class_in_the_ui_by_its_own_members():
    classes = {widget.get("class") for widget in ui_widgets(UI_FILE).values()}
    assert sorted(classes - set(widget_classes.WIDGET_CLASSES)) == []
    # A few facts the table must get right for the check to mean anything.
    members = widget_classes.members
    assert "setCurrentNode" in members("qMRMLNodeComboBox", "methods")
    assert "addItem" not in members("qMRMLNodeComboBox", "methods")  # a QWidget wrapping a combo box, not one
    assert "text" in members("QLabel", "properties") and "text" not in members("QLabel", "methods")
    assert "text" in members("QProgressBar", "read_only") and "count" in members("QComboBox", "read_only")
    assert "currentNodeChanged(vtkMRMLNode*)" in members("qMRMLNodeComboBox", "signals")
    assert "contentsCollapsed(bool)" in members("ctkCollapsibleButton", "signals")
    assert widget_classes.normalized_signal("textChanged(const QString &)") == "textChanged(QString)"




def test_every_parameter_the_ui_binds_is_a_field_of_the_parameter_node():
    source = MODULE_FILE.read_text()
    assert set(parameter_node_fields(source)) == PANEL_PARAMETERS
    assert parameter_binding_problems(source, UI_FILE) == []


def test_every_parameter_node_field_is_bound_by_exactly_one_widget():
    """A field no widget shows is a setting the user cannot see; two widgets on one field fight over it."""
    assert unbound_parameter_problems(MODULE_FILE.read_text(), UI_FILE) == []


def test_the_panel_offers_exactly_the_registration_engines_presets(deepseg_module):
    from DeepSegModuleLib.registration.presets import PRESETS, preset_names

    assert deepseg_module.REGISTRATION_PRESETS == preset_names()
    choice = deepseg_module.DeepSegModuleParameterNode.stubParameterTypes["registrationPreset"].__metadata__[0]
    assert choice.choices == preset_names()
    assert deepseg_module.DeepSegModuleParameterNode.registrationPreset in preset_names()
    # The panel checks an existing output transform's kind before a run; it must agree with the presets.
    import slicer
    from DeepSegModuleLib.registration.presets import RegistrationOptions

    logic = deepseg_module.DeepSegModuleLogic
    linear, grid = slicer.vtkMRMLLinearTransformNode(), slicer.vtkMRMLGridTransformNode()
    for name, config in PRESETS.items():
        right, wrong = (grid, linear) if "deformable" in config.stages else (linear, grid)
        logic.checkOutputTransform(RegistrationOptions(preset=name), right)
        with pytest.raises(ValueError, match=f"'{name}' preset writes"):
            logic.checkOutputTransform(RegistrationOptions(preset=name), wrong)



# ----------------------------------------------------------------------------------------------- the checkers can fail


def test_ui_checks_catch_a_renamed_widget_and_an_unknown_parameter(broken_copy: Path):
    ui_path = broken_copy.parent / "Resources" / "UI" / f"{MODULE_NAME}.ui"
    text = ui_path.read_text()
    ui_path.write_text(
        text.replace('name="segmentButton"', 'name="runButton"').replace(
            "<string>device</string>", "<string>devices</string>"
        )
    )
    source = MODULE_FILE.read_text()
    assert ui_name_problems(source, ui_path) == [
        "self.ui.segmentButton is used but DeepSegModule.ui has no widget named 'segmentButton'"
    ]
    assert any("'devices'" in problem for problem in parameter_binding_problems(source, ui_path))
    assert unbound_parameter_problems(source, ui_path) == ["parameter device is bound by 0 widgets [], not one"]


def test_ui_checks_catch_a_widget_that_cannot_show_its_parameter_and_a_doubly_bound_one(broken_copy: Path):
    ui_path = broken_copy.parent / "Resources" / "UI" / f"{MODULE_NAME}.ui"
    text = ui_path.read_text()
    # A check box bound to the overlap (a float), and the model name bound a second time.
    text = text.replace("<string>mirroring</string>", "<string>overlap</string>")
    text = text.replace("<string>labels</string>", "<string>modelName</string>")
    ui_path.write_text(text)
    source = MODULE_FILE.read_text()
    problems = parameter_binding_problems(source, ui_path)
    assert any("mirroringCheckBox is a QCheckBox" in problem for problem in problems), problems
    unbound = unbound_parameter_problems(source, ui_path)
    assert any(problem.startswith("parameter modelName is bound by 2 widgets") for problem in unbound), unbound
    assert any(problem.startswith("parameter overlap is bound by 2 widgets") for problem in unbound), unbound
    assert any(problem.startswith("parameter mirroring is bound by 0") for problem in unbound), unbound


def test_ui_checks_catch_a_spin_box_range_that_differs_from_the_parameter_range(broken_copy: Path):
    ui_path = broken_copy.parent / "Resources" / "UI" / f"{MODULE_NAME}.ui"
    ui_path.write_text(ui_path.read_text().replace("<double>0.9</double>", "<double>0.99</double>"))
    problems = parameter_binding_problems(MODULE_FILE.read_text(), ui_path)
    assert problems == ["widget overlapSpinBox allows [0.0, 0.99] but overlap is within [0.0, 0.9]"]


def test_parameter_check_catches_a_type_mismatch_and_a_missing_choice():
    source = MODULE_FILE.read_text()
    source = source.replace(
        "outputSegmentation: vtkMRMLSegmentationNode", "outputSegmentation: vtkMRMLLabelMapVolumeNode"
    )
    source = source.replace('device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"', 'device: str = "auto"')
    problems = parameter_binding_problems(source, UI_FILE)
    assert len(problems) == 2, problems


def test_widget_class_check_catches_a_widget_whose_class_lacks_what_the_code_uses(broken_copy: Path):
    ui_path = broken_copy.parent / "Resources" / "UI" / f"{MODULE_NAME}.ui"
    text = ui_path.read_text()
    # The progress bar made a label, and the segment button a node selector.
    text = text.replace('class="QProgressBar" name="progressBar"', 'class="QLabel" name="progressBar"')
    text = text.replace('class="QPushButton" name="segmentButton"', 'class="qMRMLNodeComboBox" name="segmentButton"')
    text = text.replace('class="QPlainTextEdit" name="logTextEdit"', 'class="ctkConsole" name="logTextEdit"')
    ui_path.write_text(text)
    problems = widget_class_problems(MODULE_FILE.read_text(), ui_path)
    assert "self.ui.progressBar.setRange is used but QLabel has no setRange" in problems
    assert "self.ui.progressBar.value is used but QLabel has no value" in problems
    assert "self.ui.segmentButton.text is used but qMRMLNodeComboBox has no text" in problems
    assert any(
        problem.startswith("self.ui.segmentButton.connect (line ") and "'clicked(bool)'" in problem
        for problem in problems
    ), problems
    assert any(problem.startswith("self.ui.logTextEdit is a ctkConsole") for problem in problems), problems
    assert not any("registerButton" in problem or "modelComboBox" in problem for problem in problems), problems


def test_widget_class_check_catches_a_called_property_an_assigned_method_and_a_wrong_signal():
    source = MODULE_FILE.read_text() + textwrap.dedent(
        """
        def _broken(self):
            self.ui.applyButton = None
            self.ui.segmentButton.setCurrentNode(None)
            label = self.ui.statusLabel.text()
            self.ui.modelComboBox.count = 3
            self.ui.progressBar.setValue = 5
            self.ui.modelComboBox.connect("currentNodeChanged(vtkMRMLNode*)", print)
            for widget in (self.ui.statusLabel, self.ui.logTextEdit):
                widget.setCurrentNode(None)
        """
    )
    problems = widget_class_problems(source, UI_FILE)
    assert "self.ui.segmentButton.setCurrentNode is used but QPushButton has no setCurrentNode" in problems
    assert "self.ui.statusLabel.setCurrentNode is used but QLabel has no setCurrentNode" in problems
    assert "self.ui.logTextEdit.setCurrentNode is used but QPlainTextEdit has no setCurrentNode" in problems
    expected_fragments = [
        "self.ui.statusLabel.text (line ", "QLabel.text is a property: read it without calling",
        "QComboBox.count is a read-only property", "QProgressBar.setValue is not a property",
        "signal 'currentNodeChanged(vtkMRMLNode*)', which QComboBox does not have",
    ]  # fmt: skip
    for fragment in expected_fragments:
        assert any(fragment in problem for problem in problems), (fragment, problems)
    assert len(problems) == 7, problems
    assert ui_name_problems(source, UI_FILE) == [
        "self.ui.applyButton is used but DeepSegModule.ui has no widget named 'applyButton'"
    ]
