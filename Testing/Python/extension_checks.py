"""Checkers of the Slicer-extension layer, read from the sources (real Slicer cannot run here): CMake lists every file,
the .ui has every widget the code uses, of a class that has every method, property and signal the code uses on it
(widget_classes.py), and binds only parameters the parameter node has; resources exist where the module looks for
them. Each checker returns a list of problems; the ``*_catches_*`` tests feed it a broken copy to prove it can fail.
Used by test_layout_packaging.py, test_layout_ui.py, test_module_under_stubs.py and test_panel.py.
"""

from __future__ import annotations

import ast
import re
import struct
from pathlib import Path
from xml.etree import ElementTree

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


#: The parameter node's fields: what the panel lets a user set.
PANEL_PARAMETERS = {
    # segmentation
    "inputVolume", "inputVolume2", "inputVolume3", "inputVolume4", "modelName", "labels",
    "outputSegmentation", "probabilities", "trustModelCode",
    # registration
    "fixedVolume", "movingVolume", "fixedMask", "movingMask", "movingSegmentation", "fixedSegmentation",
    "registrationPreset",
    "outputTransform", "outputVolume", "registeredSegmentation", "inverseTransform", "showQualityReport",
    # both
    "device", "overlap", "mirroring",
}  # fmt: skip
