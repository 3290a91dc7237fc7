"""TEST-ONLY stand-ins for the parts of 3D Slicer that the ``slicer-core`` wheel does not ship.

``DeepSegModule.py`` imports ``qt``, ``ctk``, ``slicer.i18n``, ``slicer.ScriptedLoadableModule`` and
``slicer.parameterNodeWrapper``, which exist only inside the Slicer application. These stubs let the tests
import the module file with the real ``slicer`` package (MRML classes, ``slicer.util``) from slicer-core, to
check its classes and metadata and to run its logic on a real headless scene.

They are never installed by the package and must never be imported by module code. :func:`stubbed_slicer`
puts them into ``sys.modules`` only for the duration of a ``with`` block and takes them out again, so no
other test sees them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import typing
import unittest
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

#: Module names the stubs stand in for; the real ones exist only inside Slicer.
STUBBED_MODULE_NAMES = ("qt", "ctk", "slicer.i18n", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper")


class _PlaceholderModule(ModuleType):
    """A module whose every unknown attribute is an inert class named after it (``qt.QTimer`` and the like).

    The module file only touches Qt inside methods the tests do not call; this keeps its import from failing
    on a Qt name the stubs did not spell out, without pretending to implement Qt.
    """

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (), {"__init__": lambda self, *args, **kwargs: None, "stubArguments": ()})
        setattr(self, name, placeholder)
        return placeholder


class QIcon:
    """Remembers the file it was made from, so tests can check which icon the module picked."""

    def __init__(self, path: str = "") -> None:
        self.path = path


def _make_qt() -> ModuleType:
    qt = _PlaceholderModule("qt")
    qt.QIcon = QIcon
    return qt


def _make_i18n() -> ModuleType:
    i18n = ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return i18n


def _make_scripted_loadable_module() -> ModuleType:
    """Minimal bases with the behaviour DeepSegModule.py relies on from Slicer's originals."""

    def _module_dir(path: str) -> str:
        return os.path.dirname(path)

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__
            # Slicer fills these with template defaults; empty ones let the tests see what the module set.
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""

        def resourcePath(self, filename: str) -> str:
            # Slicer's own rule: Resources/ next to the module file.
            return os.path.join(_module_dir(self.parent.path), "Resources", filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__.removesuffix("Widget")

        def setup(self) -> None:
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            self.moduleName = type(self).__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            raise NotImplementedError("test stub: parameter nodes need slicer.mrmlScene and the real wrapper")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
            pass

    module = ModuleType("slicer.ScriptedLoadableModule")
    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    module.__all__ = [
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
    ]
    return module


def _make_parameter_node_wrapper() -> ModuleType:
    class Choice:
        def __init__(self, choices) -> None:
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, minimum, maximum) -> None:
            self.minimum = minimum
            self.maximum = maximum

    class Default:
        def __init__(self, value) -> None:
            self.value = value

    def parameterNodeWrapper(classtype: type) -> type:
        # Slicer's wrapper starts exactly like this; an annotation it could not resolve fails here too.
        classtype.stubParameterTypes = typing.get_type_hints(classtype, include_extras=True)
        return classtype

    module = ModuleType("slicer.parameterNodeWrapper")
    module.Choice = Choice
    module.WithinRange = WithinRange
    module.Default = Default
    module.parameterNodeWrapper = parameterNodeWrapper
    return module


def make_stub_modules() -> dict[str, ModuleType]:
    """Fresh stub modules, keyed by the name they stand in for."""
    return {
        "qt": _make_qt(),
        "ctk": _PlaceholderModule("ctk"),
        "slicer.i18n": _make_i18n(),
        "slicer.ScriptedLoadableModule": _make_scripted_loadable_module(),
        "slicer.parameterNodeWrapper": _make_parameter_node_wrapper(),
    }


@contextmanager
def stubbed_slicer(module_names: tuple[str, ...] = ("DeepSegModule",)) -> Iterator[dict[str, ModuleType]]:
    """Installs the stubs for the ``with`` block; afterwards restores ``sys.modules``, ``sys.path`` and ``slicer``.

    Args:
        module_names: modules loaded inside the block that bind the stubs (the module file); they are
            removed afterwards so that nothing keeps handing the stubs out.
    """
    import slicer  # the real package from slicer-core: imported first so that it outlives the stubs
    import slicer.util

    watched = STUBBED_MODULE_NAMES + tuple(module_names)
    saved_modules = {name: sys.modules.get(name) for name in watched}
    saved_path = list(sys.path)
    saved_slicer_attributes = set(vars(slicer))
    stubs = make_stub_modules()
    sys.modules.update(stubs)
    try:
        yield stubs
    finally:
        for name, original in saved_modules.items():
            if original is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = original
        sys.path[:] = saved_path
        for attribute in set(vars(slicer)) - saved_slicer_attributes:
            if any(getattr(slicer, attribute) is stub for stub in stubs.values()):
                delattr(slicer, attribute)


def load_module_file(path: Path, name: str = "DeepSegModule") -> ModuleType:
    """Loads a scripted-module file the way Slicer does (registered in ``sys.modules`` before it runs).

    Like Slicer's "Additional module paths", the file's folder goes on ``sys.path`` so that its ``Lib``
    package imports; call inside :func:`stubbed_slicer`, which restores ``sys.path``.
    """
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
