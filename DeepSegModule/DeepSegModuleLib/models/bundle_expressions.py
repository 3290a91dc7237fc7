"""The restricted interpreter of a MONAI bundle config's ``$`` expressions (see :mod:`.bundle_config`).

An expression is parsed with :mod:`ast` and interpreted node by node: literals, arithmetic, comparisons,
conditionals, displays and comprehensions, indexing, ``lambda``, attribute reads (no names starting with ``_``)
and calls of allow-listed functions, classes and methods. Nothing is compiled or ``eval``-ed. Step, sequence and
integer-size budgets bound what an expression may cost; read-only stand-ins for ``json``, ``copy``, ``os.path`` and
``pathlib`` reach only the bundle's own files.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import inspect
import operator
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from DeepSegModuleLib.models import bundle_allowlist as allow
from DeepSegModuleLib.models.errors import ModelFormatError

if TYPE_CHECKING:  # pragma: no cover
    from DeepSegModuleLib.models.bundle_config import SafeBundleConfig

#: Interpreter steps one expression may take (a comprehension over a million items is not a config).
MAX_EVALUATION_STEPS = 2_000_000
#: Longest sequence an expression may build with ``*`` or ``range``.
MAX_SEQUENCE_LENGTH = 10_000_000
_MAX_INT_BITS = 4096
ROOT_MODULES = ("torch", "monai", "numpy")
REF_NAME = "__deepseg_ref_{}__"
REF_NAME_PATTERN = re.compile(r"^__deepseg_ref_\d+__$")


class UntrustedCodeError(ModelFormatError):
    """The config asks for code outside DeepSeg's allow-list; ``findings`` says what and where."""

    def __init__(self, findings: list[str], bundle: str = "the bundle") -> None:
        self.findings = list(findings)
        shown = "; ".join(self.findings[:5]) + (f"; and {len(self.findings) - 5} more" if len(findings) > 5 else "")
        super().__init__(
            f"{bundle} needs code outside DeepSeg's allow-list ({shown}). Run it only if you trust its author: "
            "`deepseg segment --trust-code` (the panel: 'Trust this model's code') shows what will run first."
        )


@dataclass
class SafeLambda:
    """A ``lambda`` from a config, run by the restricted interpreter each time it is called."""

    node: ast.Lambda
    closure: dict[str, Any]
    evaluator: Interpreter
    defaults: list[Any] = field(default_factory=list)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.node.args
        names = [a.arg for a in spec.posonlyargs + spec.args]
        scope = dict(self.closure)
        if len(args) > len(names) and spec.vararg is None:
            raise TypeError(f"lambda takes {len(names)} arguments, {len(args)} given")
        for name, value in zip(names, args):
            scope[name] = value
        if spec.vararg is not None:
            scope[spec.vararg.arg] = tuple(args[len(names) :])
        missing = [n for n in names[len(args) :] if n not in kwargs]
        defaults = dict(zip(names[len(names) - len(self.defaults) :], self.defaults))
        for name in missing:
            if name not in defaults:
                raise TypeError(f"lambda is missing argument {name!r}")
            scope[name] = defaults[name]
        extra = {}
        for key, value in kwargs.items():
            if key in names or key in [a.arg for a in spec.kwonlyargs]:
                scope[key] = value
            elif spec.kwarg is not None:
                extra[key] = value
            else:
                raise TypeError(f"lambda got an unexpected argument {key!r}")
        if spec.kwarg is not None:
            scope[spec.kwarg.arg] = extra
        # each call has its own step budget: a transform's lambda runs once per image, run after run
        outer_steps, self.evaluator.steps = self.evaluator.steps, 0
        try:
            return self.evaluator.run(self.node.body, scope)
        finally:
            self.evaluator.steps = outer_steps


@functools.lru_cache(maxsize=1)
def allowed_names() -> tuple[dict[str, Any], dict[int, Any], dict[str, list[Any]]]:
    """(full name -> object, id(object) -> object, short name -> objects) of every allowed name."""
    import importlib

    by_name: dict[str, Any] = {}
    for full_name in (*allow.component_names(), *allow.FUNCTIONS):
        module_name, _, attribute = full_name.rpartition(".")
        try:
            try:
                target: Any = importlib.import_module(module_name)
            except ImportError:  # a subpackage reached as an attribute (torch.cuda.is_available)
                root, *rest = module_name.split(".")
                target = importlib.import_module(root)
                for part in rest:
                    target = getattr(target, part)
            target = getattr(target, attribute)
        except (ImportError, AttributeError):  # not in this MONAI version, or its optional packages are missing
            continue
        by_name[full_name] = target
        defining = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        by_name.setdefault(defining, target)
    by_id = {id(target): target for target in by_name.values()}
    by_short: dict[str, list[Any]] = {}
    for full_name, target in by_name.items():
        short = full_name.rsplit(".", 1)[-1]
        if all(existing is not target for existing in by_short.setdefault(short, [])):
            by_short[short].append(target)
    return by_name, by_id, by_short


def is_allowed_callable(target: Any) -> bool:
    """True when ``target`` is an allow-listed component or function (by identity)."""
    return id(target) in allowed_names()[1] and allowed_names()[1][id(target)] is target


@dataclass(frozen=True)
class Literal:
    """A value DeepSeg put into the config (an override): used as it is, never evaluated."""

    value: Any


_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitAnd: operator.and_, ast.BitXor: operator.xor,
    ast.MatMult: operator.matmul,
}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_, ast.Invert: operator.invert}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}  # fmt: skip
_ALLOWED_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.Attribute, ast.Subscript, ast.Slice,
    ast.Tuple, ast.List, ast.Dict, ast.Set, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call,
    ast.keyword, ast.Starred, ast.Lambda, ast.arguments, ast.arg, ast.ListComp, ast.SetComp, ast.DictComp,
    ast.GeneratorExp, ast.comprehension, ast.JoinedStr, ast.FormattedValue, ast.And, ast.Or,
    *_BINARY, *_UNARY, *_COMPARE,
)  # fmt: skip


#: Names an expression may use besides its own lambda arguments and comprehension variables.
KNOWN_NAMES = frozenset({"torch", "monai", "numpy", "np", "copy", "json", "os", "pathlib", "Path", "True", "False",
                         "None", *allow.BUILTINS})  # fmt: skip


def _bound_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.comprehension):
            names |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    return names


def static_problems(tree: ast.AST) -> list[str]:
    problems = []
    known = KNOWN_NAMES | _bound_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not REF_NAME_PATTERN.match(node.id) and node.id not in known:
            problems.append(f"the name {node.id!r} is not available")
        if not isinstance(node, _ALLOWED_NODES):
            problems.append(f"{type(node).__name__} is not allowed")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            problems.append(f"attribute {node.attr!r} is private")
        elif isinstance(node, ast.Name) and node.id.startswith("_") and not REF_NAME_PATTERN.match(node.id):
            problems.append(f"name {node.id!r} is private")
        elif isinstance(node, ast.comprehension) and node.is_async:
            problems.append("async comprehensions are not allowed")
    return problems


def _named_arguments(function: Any, arguments: list, keywords: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments by their parameter names too, so ``Net(1, 2, 'b0', True)`` is checked like
    ``Net(..., pretrained=True)``."""
    try:
        return dict(inspect.signature(function).bind_partial(*arguments, **keywords).arguments)
    except (TypeError, ValueError):  # no signature (a C function), or arguments that do not fit: call reports it
        return dict(keywords)


class Interpreter:
    """Walks an expression's syntax tree; every name, attribute and call goes through the allow-list."""

    def __init__(self, config: SafeBundleConfig, node_id: str) -> None:
        import numpy
        import torch

        import monai

        self.config = config
        self.node_id = node_id
        self.steps = 0
        namespaces = _file_namespaces(config)
        self.modules = {"torch": torch, "monai": monai, "numpy": numpy, "np": numpy, **namespaces}
        self.builtins = {name: getattr(builtins, name) for name in allow.BUILTINS}
        self.builtins["range"] = self._range
        self.builtins.update({"True": True, "False": False, "None": None})
        self.replacements = {id(torch.jit.load): self._jit_load, id(torch.load): self._torch_load,
                             id(torch.serialization.load): self._torch_load}  # fmt: skip
        self.extra_callables = {id(value) for value in self.builtins.values() if callable(value)}
        for namespace in namespaces.values():
            self.extra_callables |= _namespace_callables(namespace) if not callable(namespace) else {id(namespace)}

    def refuse(self, what: str) -> UntrustedCodeError:
        return UntrustedCodeError([f"{self.node_id}: {what}"], self.config.source)

    def run(self, node: ast.AST, scope: dict[str, Any]) -> Any:
        self.steps += 1
        if self.steps > MAX_EVALUATION_STEPS:
            raise self.refuse(f"the expression takes more than {MAX_EVALUATION_STEPS} steps")
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is None:
            raise self.refuse(f"{type(node).__name__} is not allowed")
        try:
            return handler(node, scope)
        except (UntrustedCodeError, ModelFormatError):
            raise
        except RecursionError:
            raise self.refuse("the expression nests too deeply") from None

    # values
    def _Constant(self, node: ast.Constant, scope: dict) -> Any:
        return node.value

    def _Name(self, node: ast.Name, scope: dict) -> Any:
        for table in (scope, self.modules, self.builtins):
            if node.id in table:
                return table[node.id]
        raise self.refuse(f"the name {node.id!r} is not available (allowed: torch, monai, numpy, np, "
                          "and a few built-ins)")  # fmt: skip

    def _Attribute(self, node: ast.Attribute, scope: dict) -> Any:
        if node.attr.startswith("_"):
            raise self.refuse(f"attribute {node.attr!r} is private")
        owner = self.run(node.value, scope)
        try:
            value = getattr(owner, node.attr)
        except AttributeError:
            raise ModelFormatError(
                f"{self.config.source}: config item {self.node_id!r}: {type(owner).__name__} has no attribute "
                f"{node.attr!r}"
            ) from None
        return self.checked(value, node.attr)

    def checked(self, value: Any, name: str) -> Any:
        """Lets a value through when it is data, an allowed module, callable or method."""
        if isinstance(value, types.ModuleType):
            if value.__name__.split(".")[0] not in ROOT_MODULES:
                raise self.refuse(f"module {value.__name__!r} is not allowed")
            return value
        if isinstance(value, SafeLambda) or is_allowed_callable(value) or id(value) in self.replacements:
            return value
        if id(value) in self.extra_callables or isinstance(value, BundlePath):
            return value
        if inspect.ismethod(value) or isinstance(value, types.BuiltinMethodType | types.MethodWrapperType):
            owner = getattr(value, "__self__", None)
            if isinstance(owner, BundlePath) and not name.startswith("_"):
                return value
            if not isinstance(owner, (types.ModuleType, type)) and name in allow.METHODS:
                return value
            raise self.refuse(f"calling {name!r} is not allowed")
        if inspect.isroutine(value) or isinstance(value, type):
            raise self.refuse(f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', name)} is not "
                              "on the allow-list")  # fmt: skip
        if callable(value) and not is_allowed_callable(type(value)) and not isinstance(value, _DataCallables):
            raise self.refuse(f"{type(value).__name__} objects cannot be called")
        return value

    def _Subscript(self, node: ast.Subscript, scope: dict) -> Any:
        return self.checked(self.run(node.value, scope)[self.run(node.slice, scope)], "item")

    def _Slice(self, node: ast.Slice, scope: dict) -> Any:
        parts = (node.lower, node.upper, node.step)
        return slice(*(None if p is None else self.run(p, scope) for p in parts))

    def _Tuple(self, node: ast.Tuple, scope: dict) -> Any:
        return tuple(self._items(node.elts, scope))

    def _List(self, node: ast.List, scope: dict) -> Any:
        return self._items(node.elts, scope)

    def _Set(self, node: ast.Set, scope: dict) -> Any:
        return set(self._items(node.elts, scope))

    def _items(self, elements: list[ast.expr], scope: dict) -> list:
        items: list = []
        for element in elements:
            if isinstance(element, ast.Starred):
                items.extend(self.run(element.value, scope))
            else:
                items.append(self.run(element, scope))
        return items

    def _Dict(self, node: ast.Dict, scope: dict) -> Any:
        result: dict = {}
        for key, value in zip(node.keys, node.values):
            if key is None:
                result.update(self.run(value, scope))
            else:
                result[self.run(key, scope)] = self.run(value, scope)
        return result

    def _JoinedStr(self, node: ast.JoinedStr, scope: dict) -> Any:
        return "".join(str(self.run(v, scope)) for v in node.values)

    def _FormattedValue(self, node: ast.FormattedValue, scope: dict) -> Any:
        value = self.run(node.value, scope)
        value = {115: str, 114: repr, 97: ascii}.get(node.conversion, lambda v: v)(value)
        spec = self.run(node.format_spec, scope) if node.format_spec is not None else ""
        return format(value, spec)

    # operators
    def _BinOp(self, node: ast.BinOp, scope: dict) -> Any:
        left, right = self.run(node.left, scope), self.run(node.right, scope)
        kind = type(node.op)
        if kind in (ast.Pow, ast.LShift) and isinstance(left, int) and isinstance(right, int):
            bits = abs(left).bit_length() * right if kind is ast.Pow else abs(left).bit_length() + right
            if bits > _MAX_INT_BITS:
                raise self.refuse("the expression builds an integer too large for a config")
        if kind is ast.Mult:
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(count, int):
                    if len(sequence) * count > MAX_SEQUENCE_LENGTH:
                        raise self.refuse("the expression builds a sequence too long for a config")
        return _BINARY[kind](left, right)

    def _UnaryOp(self, node: ast.UnaryOp, scope: dict) -> Any:
        return _UNARY[type(node.op)](self.run(node.operand, scope))

    def _BoolOp(self, node: ast.BoolOp, scope: dict) -> Any:
        value: Any = None
        for operand in node.values:
            value = self.run(operand, scope)
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
        return value

    def _Compare(self, node: ast.Compare, scope: dict) -> Any:
        left = self.run(node.left, scope)
        if len(node.ops) == 1:  # tensors compare element-wise: the result is the value, not its truth
            return _COMPARE[type(node.ops[0])](left, self.run(node.comparators[0], scope))
        for op, comparator in zip(node.ops, node.comparators):
            right = self.run(comparator, scope)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, node: ast.IfExp, scope: dict) -> Any:
        return self.run(node.body if self.run(node.test, scope) else node.orelse, scope)

    # calls and functions
    def _Call(self, node: ast.Call, scope: dict) -> Any:
        function = self.run(node.func, scope)
        arguments = self._items(node.args, scope)
        keywords: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                keywords.update(self.run(keyword.value, scope))
            else:
                keywords[keyword.arg] = self.run(keyword.value, scope)
        function = self.checked(function, getattr(node.func, "attr", "function"))
        replaced = id(function) in self.replacements
        function = self.replacements.get(id(function), function)
        if is_allowed_callable(function):
            name = getattr(function, "__name__", "")
            self.config.check_arguments(name, _named_arguments(function, arguments, keywords), self.node_id)
        try:
            result = function(*arguments, **keywords)
        except (UntrustedCodeError, ModelFormatError):
            raise
        except Exception as error:
            raise ModelFormatError(
                f"{self.config.source}: config item {self.node_id!r}: {type(error).__name__}: {error}"
            ) from None
        # DeepSeg's own replacements (the checked torch.jit.load) return what they vouch for
        return result if replaced else self.checked(result, getattr(function, "__name__", "result"))

    def _Lambda(self, node: ast.Lambda, scope: dict) -> Any:
        defaults = [self.run(d, scope) for d in node.args.defaults]
        return SafeLambda(node=node, closure=dict(scope), evaluator=self, defaults=defaults)

    def _comprehension(self, generators: list[ast.comprehension], scope: dict, emit: Callable[[dict], None]) -> None:
        if not generators:
            emit(scope)
            return
        first, rest = generators[0], generators[1:]
        for item in self.run(first.iter, scope):
            inner = dict(scope)
            self._bind(first.target, item, inner)
            if all(self.run(condition, inner) for condition in first.ifs):
                self._comprehension(rest, inner, emit)

    def _bind(self, target: ast.expr, value: Any, scope: dict) -> None:
        if isinstance(target, ast.Name):
            scope[target.id] = self.checked(value, target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = list(value)
            if len(values) != len(target.elts):
                raise ModelFormatError(f"{self.config.source}: config item {self.node_id!r}: cannot unpack")
            for element, item in zip(target.elts, values):
                self._bind(element, item, scope)
        else:
            raise self.refuse(f"cannot assign to {type(target).__name__}")

    def _ListComp(self, node: ast.ListComp, scope: dict) -> Any:
        result: list = []
        self._comprehension(node.generators, scope, lambda s: result.append(self.run(node.elt, s)))
        return result

    _GeneratorExp = _ListComp

    def _SetComp(self, node: ast.SetComp, scope: dict) -> Any:
        return set(self._ListComp(node, scope))  # type: ignore[arg-type]

    def _DictComp(self, node: ast.DictComp, scope: dict) -> Any:
        result: dict = {}

        def emit(inner: dict) -> None:
            result[self.run(node.key, inner)] = self.run(node.value, inner)

        self._comprehension(node.generators, scope, emit)
        return result

    # wrapped functions
    def _range(self, *arguments: int) -> range:
        values = range(*arguments)
        if len(values) > MAX_SEQUENCE_LENGTH:
            raise self.refuse("range() is too long for a config")
        return values

    def _torch_load(self, path: Any, map_location: Any = None, **_: Any) -> Any:
        """``torch.load`` of a file inside the bundle, always ``weights_only=True`` (tensors, no pickled code)."""
        import torch

        from DeepSegModuleLib.models.errors import load_error_detail

        from DeepSegModuleLib.models.nnunet import numpy_safe_globals

        checked = self.config.inside_bundle(str(path), f"config item {self.node_id!r}: torch.load")
        try:
            # tensors and plain numpy arrays only (a DiNTS architecture file holds both), on the CPU: DeepSeg
            # moves the network to its device itself
            with torch.serialization.safe_globals(numpy_safe_globals()):
                return torch.load(str(checked), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelFormatError(
                f"{self.config.source}: config item {self.node_id!r}: {checked.name} could not be read as tensors "
                f"only ({load_error_detail(error)})"
            ) from None

    def _jit_load(self, path: Any, map_location: Any = None, **_: Any) -> Any:
        from DeepSegModuleLib.models.torchscript_check import load_checked_torchscript

        checked = self.config.inside_bundle(str(path), f"config item {self.node_id!r}: torch.jit.load")
        return load_checked_torchscript(checked, map_location=map_location)


class BundlePath:
    """``pathlib.Path`` as a config sees it: paths inside the bundle folder only, read-only."""

    def __init__(self, *parts: Any, config: SafeBundleConfig | None = None) -> None:
        self._config = config
        self._path = Path(*[str(p) for p in parts])

    def _inside(self) -> Path:
        assert self._config is not None
        return self._config.inside_bundle(str(self._path), f"the path {str(self._path)!r}")

    def read_text(self, encoding: str | None = "utf-8") -> str:
        return self._inside().read_text(encoding=encoding or "utf-8")

    def read_bytes(self) -> bytes:
        return self._inside().read_bytes()

    def exists(self) -> bool:
        try:
            self._inside()
        except ModelFormatError:
            return False
        return True

    is_file = exists

    def joinpath(self, *parts: Any) -> BundlePath:
        return BundlePath(self._path, *parts, config=self._config)

    def __truediv__(self, part: Any) -> BundlePath:
        return self.joinpath(part)

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def suffix(self) -> str:
        return self._path.suffix

    @property
    def stem(self) -> str:
        return self._path.stem

    @property
    def parent(self) -> BundlePath:
        return BundlePath(self._path.parent, config=self._config)

    def __str__(self) -> str:
        return str(self._path)

    def __fspath__(self) -> str:
        return str(self._path)


def _file_namespaces(config: SafeBundleConfig) -> dict[str, Any]:
    """``json``, ``os.path`` and ``pathlib`` as configs use them: pure functions, and files inside the bundle."""
    import json as json_module
    import os.path as os_path

    def path(*parts: Any) -> BundlePath:
        return BundlePath(*parts, config=config)

    def exists(name: Any) -> bool:
        return path(name).exists()

    os_namespace = types.SimpleNamespace(
        path=types.SimpleNamespace(join=os_path.join, basename=os_path.basename, dirname=os_path.dirname,
                                   splitext=os_path.splitext, exists=exists, isfile=exists)  # fmt: skip
    )
    return {
        "copy": types.SimpleNamespace(deepcopy=copy.deepcopy, copy=copy.copy),
        "json": types.SimpleNamespace(loads=json_module.loads, dumps=json_module.dumps),
        "os": os_namespace,
        "pathlib": types.SimpleNamespace(Path=path),
        "Path": path,
    }


def _namespace_callables(namespace: Any) -> set[int]:
    found = set()
    for value in vars(namespace).values():
        if isinstance(value, types.SimpleNamespace):
            found |= _namespace_callables(value)
        elif callable(value):
            found.add(id(value))
    return found


class BoundComponent(functools.partial):
    """An allowed component with its config arguments bound (``_mode_: callable``)."""


_DataCallables = (SafeLambda, BoundComponent)
