"""Static checks of the Slicer-extension layer, plus the module file imported and run under test stubs.

Real Slicer cannot run here, so what would only fail inside Slicer (or, worse, only in a package built by
the Extensions Index) is checked from the sources: CMake lists every file, the .ui has every widget the code
uses, of a class that has every method, property and signal the code uses on it (widget_classes.py), and binds
only parameters the parameter node has, resources exist where the module looks for them.
Each checker returns a list of problems; the ``*_catches_*`` tests feed it a broken copy to prove it can fail.
"""

from __future__ import annotations

import ast
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree

import numpy as np
import pytest
import slicer_stubs
import widget_classes

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE_NAME = "DeepSegModule"
MODULE_DIR = REPOSITORY / MODULE_NAME
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = REPOSITORY / "Resources" / "UI" / f"{MODULE_NAME}.ui"
ICON_FILE = REPOSITORY / "Resources" / "Icons" / f"{MODULE_NAME}.png"
REQUIREMENTS_FILE = REPOSITORY / "Resources" / "requirements.txt"

EXTENSION_VARIABLES = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CATEGORY",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS",
    "EXTENSION_DEPENDS",
)

# ----------------------------------------------------------------------------------------------- CMake parsing


def _cmake_code(text: str) -> str:
    """CMake text without comments (a ``#`` outside a quoted string starts one)."""
    code_lines = []
    for line in text.splitlines():
        in_quotes = False
        for index, character in enumerate(line):
            if character == '"':
                in_quotes = not in_quotes
            elif character == "#" and not in_quotes:
                line = line[:index]
                break
        code_lines.append(line)
    return "\n".join(code_lines)


def _cmake_arguments(arguments: str) -> list[str]:
    return [quoted if quoted or not bare else bare for quoted, bare in re.findall(r'"([^"]*)"|(\S+)', arguments)]


def cmake_commands(text: str, command: str) -> list[list[str]]:
    """Arguments of every call of ``command`` (case-insensitive, as in CMake), comments removed."""
    # Quoted arguments may hold parentheses (a description often does); bare ones may not, in CMake either.
    pattern = re.compile(rf'\b{re.escape(command)}\s*\(((?:"[^"]*"|[^()"])*)\)', re.IGNORECASE)
    return [_cmake_arguments(match.group(1)) for match in pattern.finditer(_cmake_code(text))]


def cmake_variable(text: str, name: str) -> list[str]:
    """Values given to ``set(name ...)``, with ``${MODULE_NAME}`` expanded as the file defines it."""
    module_name = next((args[1] for args in cmake_commands(text, "set") if args[:1] == ["MODULE_NAME"]), MODULE_NAME)
    for args in cmake_commands(text, "set"):
        if args and args[0] == name:
            return [value.replace("${MODULE_NAME}", module_name) for value in args[1:]]
    raise AssertionError(f"set({name} ...) not found")


# ----------------------------------------------------------------------------------------------- checkers


def module_python_files(module_dir: Path) -> set[str]:
    """Every .py file Slicer would need in a package, relative to the module folder."""
    return {
        path.relative_to(module_dir).as_posix()
        for path in module_dir.rglob("*.py")
        if "__pycache__" not in path.parts and not any(part.endswith(".egg-info") for part in path.parts)
    }


def script_list_problems(module_dir: Path) -> list[str]:
    """Python files missing from MODULE_PYTHON_SCRIPTS, and listed files that do not exist."""
    listed = cmake_variable((module_dir / "CMakeLists.txt").read_text(), "MODULE_PYTHON_SCRIPTS")
    on_disk = module_python_files(module_dir)
    problems = [
        f"{name} is not listed in MODULE_PYTHON_SCRIPTS (it would be missing from the package)"
        for name in sorted(on_disk - set(listed))
    ]
    problems += [
        f"{name} is listed in MODULE_PYTHON_SCRIPTS but does not exist" for name in listed if name not in on_disk
    ]
    problems += [f"{name} is listed twice" for name in sorted({name for name in listed if listed.count(name) > 1})]
    return problems


def listed_resources(module_dir: Path) -> list[str]:
    return cmake_variable((module_dir / "CMakeLists.txt").read_text(), "MODULE_PYTHON_RESOURCES")


def resource_problems(module_dir: Path) -> list[str]:
    """Listed resources that are not files in the top-level Resources/ folder."""
    resources_dir = module_dir.parent / "Resources"
    return [
        f"resource {name} is listed but {resources_dir / name} does not exist"
        for name in listed_resources(module_dir)
        if not (resources_dir / name).is_file()
    ]


def resource_names_used(source: str) -> set[str]:
    """String literals passed to ``resourcePath(...)`` or ``resource_path(...)`` in the module code."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if called in ("resourcePath", "resource_path") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def ui_widgets(ui_path: Path) -> dict[str, ElementTree.Element]:
    """Every named widget of a Qt Designer file."""
    root = ElementTree.parse(ui_path).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def widget_property(widget: ElementTree.Element, name: str) -> ElementTree.Element | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def ui_names_used(source: str) -> set[str]:
    """Names the code reads as ``self.ui.<name>``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def ui_name_problems(source: str, ui_path: Path) -> list[str]:
    widgets = ui_widgets(ui_path)
    return [
        f"self.ui.{name} is used but {ui_path.name} has no widget named {name!r}"
        for name in sorted(ui_names_used(source) - set(widgets))
    ]


def _is_self_ui(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "ui"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _ui_widget_name(node: ast.AST) -> str | None:
    """``<name>`` when ``node`` is ``self.ui.<name>``."""
    return node.attr if isinstance(node, ast.Attribute) and _is_self_ui(node.value) else None


def _ui_aliases(function: ast.AST) -> dict[str, set[str]]:
    """Local names that stand for ``self.ui`` widgets in a function: ``combo = self.ui.modelComboBox``, and the
    loop variables of ``for button, ... in ((self.ui.segmentButton, ...), (self.ui.registerButton, ...))``."""
    aliases: dict[str, set[str]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and _ui_widget_name(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    aliases.setdefault(target.id, set()).add(_ui_widget_name(node.value))
        elif isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)):
            for row in node.iter.elts:
                if isinstance(node.target, ast.Name):
                    pairs = [(node.target, row)]
                elif isinstance(node.target, ast.Tuple) and isinstance(row, (ast.Tuple, ast.List)):
                    pairs = list(zip(node.target.elts, row.elts))
                else:
                    continue
                for target, value in pairs:
                    if isinstance(target, ast.Name) and _ui_widget_name(value):
                        aliases.setdefault(target.id, set()).add(_ui_widget_name(value))
    return aliases


def ui_attribute_uses(source: str) -> set[tuple[str, str, str, str | None, int]]:
    """Every ``self.ui.<widget>.<attribute>`` (directly or through a local alias) as
    ``(widget, attribute, use, signal, line)``; ``use`` is "call", "store" or "load", and ``signal`` is the signature
    a ``connect("signal(args)", ...)`` call names."""
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    uses = set()
    for function in (node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
        aliases = _ui_aliases(function)
        for node in ast.walk(function):
            if not isinstance(node, ast.Attribute):
                continue
            widget = _ui_widget_name(node.value)
            widgets = {widget} if widget else set()
            if isinstance(node.value, ast.Name) and node.value.id in aliases:
                widgets = aliases[node.value.id]
            if not widgets:
                continue
            parent = parents.get(node)
            signal = None
            if isinstance(node.ctx, ast.Store) or (isinstance(parent, ast.AugAssign) and parent.target is node):
                use = "store"
            elif isinstance(parent, ast.Call) and parent.func is node:
                use = "call"
                if node.attr in ("connect", "disconnect") and parent.args and isinstance(parent.args[0], ast.Constant):
                    signal = widget_classes.normalized_signal(str(parent.args[0].value))
            else:
                use = "load"
            uses.update((name, node.attr, use, signal, node.lineno) for name in widgets)
    return uses


def widget_class_problems(source: str, ui_path: Path) -> list[str]:
    """Attributes the code uses on a widget that its class in the .ui does not offer in Slicer's Python (PythonQt):
    unknown members, properties called like methods, read-only properties or methods assigned to, and
    ``connect("signal(args)")`` naming a signal the class does not have."""
    classes = {name: widget.get("class") for name, widget in ui_widgets(ui_path).items()}
    problems = set()
    for widget, attribute, use, signal, line in sorted(ui_attribute_uses(source)):
        class_name = classes.get(widget)
        if class_name is None:
            continue  # a missing widget is ui_name_problems' to report
        if class_name not in widget_classes.WIDGET_CLASSES:
            problems.add(
                f"self.ui.{widget} is a {class_name}, which Testing/Python/widget_classes.py does not describe: "
                "add the class with its members from its documentation"
            )
            continue
        properties = widget_classes.members(class_name, "properties")
        methods = widget_classes.members(class_name, "methods")
        where = f"self.ui.{widget}.{attribute} (line {line})"
        if attribute not in properties | methods | widget_classes.signal_names(class_name):
            problems.add(f"self.ui.{widget}.{attribute} is used but {class_name} has no {attribute}")
        elif use == "call" and attribute in properties:
            problems.add(f"{where} is called, but {class_name}.{attribute} is a property: read it without calling")
        elif use == "store" and attribute not in properties:
            problems.add(f"{where} is assigned, but {class_name}.{attribute} is not a property")
        elif use == "store" and attribute in widget_classes.members(class_name, "read_only"):
            problems.add(f"{where} is assigned, but {class_name}.{attribute} is a read-only property")
        elif signal is not None and signal not in widget_classes.members(class_name, "signals"):
            problems.add(f"{where} names signal {signal!r}, which {class_name} does not have")
    return sorted(problems)


def parameter_node_fields(source: str, class_name: str = f"{MODULE_NAME}ParameterNode") -> dict[str, ast.expr]:
    """Annotated fields of the @parameterNodeWrapper class, read with ``ast`` (no import)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            decorators = {
                getattr(decorator, "id", getattr(decorator, "attr", None)) for decorator in node.decorator_list
            }
            assert "parameterNodeWrapper" in decorators, f"{class_name} is not decorated with @parameterNodeWrapper"
            return {
                statement.target.id: statement.annotation
                for statement in node.body
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            }
    raise AssertionError(f"class {class_name} not found")


def parameter_binding_problems(source: str, ui_path: Path) -> list[str]:
    """SlicerParameterName properties that connectGui could not bind to a parameter node field."""
    fields = parameter_node_fields(source)
    problems = []
    for name, widget in ui_widgets(ui_path).items():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is None:
            continue
        parameter = prop.findtext("string")
        if parameter not in fields:
            problems.append(f"widget {name} binds SlicerParameterName {parameter!r}, which the parameter node lacks")
            continue
        annotation = ast.unparse(fields[parameter])
        widget_class = widget.get("class")
        if widget_class == "qMRMLNodeComboBox":
            node_types = [text.text for text in widget.iter("string") if text.text and text.text.startswith("vtkMRML")]
            if annotation not in node_types:
                problems.append(f"widget {name} lists node types {node_types} but {parameter} is a {annotation}")
        elif widget_class in ("QComboBox", "ctkComboBox") and "Choice(" not in annotation:
            # Slicer's combo-box connector raises at connectGui without a Choice annotation.
            problems.append(f"widget {name} is a combo box but {parameter} ({annotation}) has no Choice annotation")
        elif widget_class in VALUE_WIDGET_TYPES and _value_type(annotation) not in VALUE_WIDGET_TYPES[widget_class]:
            # Slicer's connectors match the exact widget class to the field's type; no match fails at connectGui.
            problems.append(f"widget {name} is a {widget_class}, which cannot show {parameter} ({annotation})")
        elif widget_class == "QDoubleSpinBox" and "WithinRange(" in annotation:
            low, high = (float(value) for value in re.search(r"WithinRange\(([^,]+),([^)]+)\)", annotation).groups())
            spin_range = [float(widget_property(widget, key).findtext("double")) for key in ("minimum", "maximum")]
            if spin_range != [low, high]:
                problems.append(f"widget {name} allows {spin_range} but {parameter} is within [{low}, {high}]")
    return problems


#: Widget classes Slicer's parameter-node GUI connectors bind (exact class), and the field types each can show.
VALUE_WIDGET_TYPES = {
    "QCheckBox": {"bool"},
    "ctkCheckBox": {"bool"},
    "QLineEdit": {"str"},
    "QTextEdit": {"str"},
    "QLabel": {"str"},
    "QDoubleSpinBox": {"float", "int"},
    "ctkSliderWidget": {"float", "int"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
}


def _value_type(annotation: str) -> str:
    """``Annotated[float, WithinRange(0, 1)]`` -> ``float``."""
    match = re.fullmatch(r"Annotated\[\s*(\w+)\s*,.*\]", annotation, flags=re.DOTALL)
    return match.group(1) if match else annotation


def unbound_parameter_problems(source: str, ui_path: Path) -> list[str]:
    """Parameter node fields that no widget binds, or that more than one widget binds."""
    bindings: dict[str, list[str]] = {}
    for name, widget in ui_widgets(ui_path).items():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            bindings.setdefault(prop.findtext("string"), []).append(name)
    problems = []
    for field_name in parameter_node_fields(source):
        widgets = bindings.get(field_name, [])
        if len(widgets) != 1:
            problems.append(f"parameter {field_name} is bound by {len(widgets)} widgets {widgets}, not one")
    return problems


def stray_module_files(module_dir: Path) -> list[str]:
    """.py files beside the module file: Slicer would try to load each as a module of its own."""
    return sorted(path.name for path in module_dir.glob("*.py") if path.name != f"{module_dir.name}.py")


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert header[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    return struct.unpack(">II", header[16:24])


# ----------------------------------------------------------------------------------------------- the repository


def test_every_python_file_of_the_module_is_listed_in_cmake_and_every_listed_file_exists():
    assert script_list_problems(MODULE_DIR) == []


def test_module_cmake_builds_a_scripted_module_with_generic_tests_and_registers_the_module_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    [build] = cmake_commands(text, "slicerMacroBuildScriptedModule")
    assert build[build.index("NAME") + 1] in ("${MODULE_NAME}", MODULE_NAME)
    assert "WITH_GENERIC_TESTS" in build
    assert "${MODULE_PYTHON_SCRIPTS}" in build
    code = _cmake_code(text)
    assert re.search(
        r"if\s*\(\s*BUILD_TESTING\s*\)\s*slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", code
    )


def test_every_listed_resource_exists_in_the_top_level_resources_folder():
    assert listed_resources(MODULE_DIR), "MODULE_PYTHON_RESOURCES is empty"
    assert resource_problems(MODULE_DIR) == []


def test_every_resource_the_module_asks_for_is_listed_for_packaging():
    used = resource_names_used(MODULE_FILE.read_text())
    assert {"UI/DeepSegModule.ui", "Icons/DeepSegModule.png", "requirements.txt"} <= used
    assert sorted(used - set(listed_resources(MODULE_DIR))) == []


def test_the_module_test_runs_on_the_bundled_test_data_and_all_of_it_is_packaged():
    """DeepSegModuleTest reads its model and brain pair from Resources/Testing; an unlisted file is not installed."""
    test_data = {
        path.relative_to(REPOSITORY / "Resources").as_posix()
        for path in (REPOSITORY / "Resources" / "Testing").rglob("*")
        if path.is_file()
    }
    assert test_data == {
        "Testing/BrainPair/fixed.nrrd", "Testing/BrainPair/moving.nrrd", "Testing/BrainPair/motion.json",
        "Testing/BrightSphere/bright-sphere.ts", "Testing/BrightSphere/deepseg.json",
    }  # fmt: skip
    assert test_data <= resource_names_used(MODULE_FILE.read_text())
    assert test_data <= set(listed_resources(MODULE_DIR))


def test_module_cmake_copies_and_installs_resources_next_to_the_module_scripts():
    """Resources must land in <qt-scripted-modules>/Resources, where resource_path() looks in a package."""
    code = _cmake_code((MODULE_DIR / "CMakeLists.txt").read_text())
    assert re.search(r"\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/Resources/\$\{_resource\}", code)
    assert re.search(r"DESTINATION\s+\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/Resources/", code)
    assert "/../Resources" in code


def test_top_level_cmake_declares_the_extension():
    text = (REPOSITORY / "CMakeLists.txt").read_text()
    assert cmake_commands(text, "cmake_minimum_required")
    assert cmake_commands(text, "project") == [["DeepSeg"]]
    for variable in EXTENSION_VARIABLES:
        values = cmake_variable(text, variable)
        assert values and all(value.strip() for value in values), f"{variable} is empty"
    assert cmake_variable(text, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert "PyTorch" in cmake_variable(text, "EXTENSION_DEPENDS")[0].split(";")
    assert ["Slicer", "REQUIRED"] in cmake_commands(text, "find_package")
    includes = [args[0] for args in cmake_commands(text, "include")]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert ["DeepSegModule"] in cmake_commands(text, "add_subdirectory")
    # Slicer's ExtensionWizard inserts new modules at this exact line.
    assert "## NEXT_MODULE" in text.splitlines()


def test_extension_icon_and_screenshot_urls_point_at_committed_files():
    text = (REPOSITORY / "CMakeLists.txt").read_text()
    homepage = cmake_variable(text, "EXTENSION_HOMEPAGE")[0]
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", homepage)
    assert match, f"homepage {homepage} is not a GitHub repository"
    raw_prefix = f"https://raw.githubusercontent.com/{match[1]}/{match[2]}/main/"
    [icon_url] = cmake_variable(text, "EXTENSION_ICONURL")
    assert icon_url.startswith(raw_prefix), "the catalog downloads the icon: it must be a raw URL in this repository"
    assert (REPOSITORY / icon_url.removeprefix(raw_prefix)).is_file()
    for screenshot_url in cmake_variable(text, "EXTENSION_SCREENSHOTURLS")[0].split():
        assert screenshot_url.startswith(raw_prefix) and screenshot_url.endswith((".png", ".jpg", ".gif"))
        assert (REPOSITORY / screenshot_url.removeprefix(raw_prefix)).is_file()


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


PANEL_PARAMETERS = {
    # segmentation
    "inputVolume", "inputVolume2", "inputVolume3", "inputVolume4", "modelName", "labelsToKeep",
    "outputSegmentation", "probabilities", "trustModelCode",
    # registration
    "fixedVolume", "movingVolume", "fixedMask", "movingMask", "movingSegmentation", "registrationPreset",
    "outputTransform", "outputVolume", "registeredSegmentation", "inverseTransform", "showQualityReport",
    # both
    "device", "overlap", "mirroring",
}  # fmt: skip


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


def test_icon_is_a_128_pixel_square_png():
    assert png_size(ICON_FILE) == (128, 128)


def test_license_is_apache_2():
    text = (REPOSITORY / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "http://www.apache.org/licenses/" in text


def test_no_other_python_file_sits_next_to_the_module_file():
    assert stray_module_files(MODULE_DIR) == []


def test_requirements_parse_and_leave_torch_and_simpleitk_to_slicer():
    from packaging.requirements import Requirement

    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS_FILE.read_text().splitlines()]
    names = {Requirement(line).name.lower() for line in lines if line}
    assert "monai" in names
    assert not names & {"torch", "simpleitk"}, "torch comes from the PyTorch extension; Slicer bundles SimpleITK"


def test_resource_path_finds_packaged_and_checkout_layouts_and_names_both_when_missing(tmp_path: Path):
    from DeepSegModuleLib.resources import resource_path

    packaged = tmp_path / "lib" / "Slicer-5.13" / "qt-scripted-modules"  # DeepSegModule.py sits here
    (packaged / "Resources" / "UI").mkdir(parents=True)
    (packaged / "Resources" / "UI" / "DeepSegModule.ui").write_text("<ui/>")
    assert resource_path("UI/DeepSegModule.ui", packaged) == packaged / "Resources" / "UI" / "DeepSegModule.ui"

    checkout = tmp_path / "repo" / MODULE_NAME
    (checkout.parent / "Resources").mkdir(parents=True)
    (checkout.parent / "Resources" / "requirements.txt").write_text("monai\n")
    assert resource_path("requirements.txt", checkout) == checkout.parent / "Resources" / "requirements.txt"

    with pytest.raises(FileNotFoundError) as missing:
        resource_path("Icons/DeepSegModule.png", checkout)
    assert str(checkout / "Resources" / "Icons") in str(missing.value)
    assert str(checkout.parent / "Resources" / "Icons") in str(missing.value)
    with pytest.raises(ValueError):
        resource_path("../LICENSE", checkout)


# ----------------------------------------------------------------------------------------------- the checkers can fail


@pytest.fixture
def broken_copy(tmp_path: Path) -> Path:
    """A copy of the module folder, the .ui and the resources, for the checkers to find faults in."""
    copy = tmp_path / "repo"
    shutil.copytree(MODULE_DIR, copy / MODULE_NAME, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPOSITORY / "Resources", copy / "Resources")
    return copy / MODULE_NAME


def test_script_check_catches_an_unlisted_file_and_a_stale_entry(broken_copy: Path):
    (broken_copy / "DeepSegModuleLib" / "forgotten.py").write_text("")
    (broken_copy / "DeepSegModuleLib" / "resources.py").unlink()
    problems = script_list_problems(broken_copy)
    assert any("forgotten.py is not listed" in problem for problem in problems)
    assert any("resources.py is listed" in problem for problem in problems)


def test_resource_check_catches_a_missing_resource(broken_copy: Path):
    missing = broken_copy.parent / "Resources" / "requirements.txt"
    missing.unlink()
    assert resource_problems(broken_copy) == [f"resource requirements.txt is listed but {missing} does not exist"]


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
    text = text.replace("<string>labelsToKeep</string>", "<string>modelName</string>")
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


def test_stray_file_check_catches_a_helper_next_to_the_module_file(broken_copy: Path):
    (broken_copy / "helpers.py").write_text("")
    assert stray_module_files(broken_copy) == ["helpers.py"]


# ----------------------------------------------------------------------------------------------- the module under stubs


@pytest.fixture
def deepseg_module():
    with slicer_stubs.stubbed_slicer():
        yield slicer_stubs.load_module_file(MODULE_FILE)


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
    for name in ("fixedMask", "movingMask", "movingSegmentation", "registeredSegmentation"):
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
        modelName="", labelsToKeep="", probabilities=False, trustModelCode=False, registrationPreset="rigid",
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

    widget, shown = panel
    spacing = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = ((32, 32, 32), spacing)
    fixed, _ = sphere_volume(np.array([31.0, 31.0, 31.0]), 10.0, grid)
    moving, _ = sphere_volume(np.array([35.0, 28.0, 33.0]), 10.0, grid)
    parameters = widget._parameterNode
    parameters.fixedVolume = nodes.array_to_volume(context, gaussian_filter(fixed.array, 1.5), spacing, name="fixed")
    parameters.movingVolume = nodes.array_to_volume(context, gaussian_filter(moving.array, 1.5), spacing, name="moving")
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
