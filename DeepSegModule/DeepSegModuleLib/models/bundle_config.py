"""A MONAI bundle config resolved without running the bundle author's code.

``monai.bundle.ConfigParser`` builds a bundle by importing any ``_target_`` and ``eval``-ing any ``$``
string, so a config is a program. :class:`SafeBundleConfig` reads the same syntax (``@id`` references,
``::``/``#`` ids, relative ids ``@::x``, ``%file::id`` macros, ``_target_``/``_disabled_``/``_requires_``/
``_mode_``, ``_meta_``) and builds the part of the graph that DeepSeg asks for, but:

- a ``_target_`` must be a name on the allow-list of :mod:`bundle_allowlist` (matched by identity with the
  object that name has in MONAI, never imported from the config's text), and arguments that would make it
  download are refused unless false;
- a ``$`` string is parsed with :mod:`ast` and interpreted node by node: literals, arithmetic, comparisons,
  conditionals, displays and comprehensions, indexing, ``lambda``, attribute reads (no names starting with
  ``_``) and calls of allow-listed functions, classes and methods. Nothing is compiled or ``eval``-ed;
  statements (``import``...) are not expressions and are refused;
- macros and ``torch.jit.load`` read only files inside the bundle folder, and a TorchScript file is
  inspected before it is loaded (:func:`~DeepSegModuleLib.models.torchscript_check.check_torchscript`);
- file reading and writing transforms (``LoadImage(d)``, ``SaveImage(d)``) are not built at all: DeepSeg hands
  the volume over itself. Their keys are recorded in :attr:`SafeBundleConfig.io_components`.

:meth:`SafeBundleConfig.audit` lists, without building anything, every target and expression outside the
allow-list that the requested ids reach: what trusted mode would run.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from DeepSegModuleLib.models import bundle_allowlist as allow
from DeepSegModuleLib.models.bundle_expressions import (
    REF_NAME,
    BoundComponent,
    Interpreter,
    Literal,
    UntrustedCodeError,
    allowed_names,
    static_problems,
)
from DeepSegModuleLib.models.errors import ModelFormatError

#: A config file larger than this is not a bundle config (real ones are a few kB).
MAX_CONFIG_BYTES = 16 * 1024**2
_SEP = "::"
_REFERENCE = re.compile(r"@(?:\w*)(?:::\w*)*")
_RELATIVE_PREFIX = re.compile(r"(?:@|%)(?:::)+")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_NON_ARGUMENT_KEYS = {"_target_", "_desc_", "_requires_", "_mode_", "_disabled_"}


class _Disabled:
    """Marks a component with ``_disabled_: true``; dropped from the list or dict holding it."""


_DISABLED = _Disabled()


@dataclass(frozen=True)
class IOComponent:
    """A file-reading or -writing transform the config names, left unbuilt; ``keys`` as the config gives them."""

    name: str
    keys: tuple[str, ...]


def _is_monai_component(name: str) -> bool:
    """Whether MONAI's own locator knows a short class name (it scans MONAI's modules; imports nothing named)."""
    from monai.bundle import ComponentLocator

    return ComponentLocator().get_component_module_name(name) is not None


def _is_io_target(name: str) -> bool:
    short = name.rsplit(".", 1)[-1]
    return short in allow.IO_TRANSFORMS and (name == short or name.startswith("monai."))


def _read_structured(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{path} is {size / 1e6:.0f} MB; a bundle config is at most {MAX_CONFIG_BYTES >> 20} MB")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelFormatError(f"{path} is not valid JSON ({error})") from None
    try:
        import yaml
    except ImportError:
        raise ModelFormatError(f"{path} is YAML and PyYAML is not installed: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ModelFormatError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None


def read_bundle_config(path: Path) -> dict[str, Any]:
    """Reads a bundle's JSON or YAML config as plain data (``yaml.safe_load``: no tags, no objects)."""
    content = _read_structured(path)
    if not isinstance(content, dict):
        raise ModelFormatError(f"{path} holds a {type(content).__name__}, not a config (a mapping of ids)")
    return content


def _normalize(text: str) -> str:
    return text.replace("#", _SEP)


class SafeBundleConfig:
    """A bundle config whose items are built through the allow-list (see the module docstring).

    Args:
        config: the parsed config (``read_bundle_config``).
        metadata: the parsed ``metadata.json`` (reachable as ``@_meta_::...``).
        bundle_root: the bundle folder; macros and loaded files must resolve inside it.
        overrides: ids replaced before anything is resolved (``bundle_root``, ``device``).
        source: how messages name the bundle.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        metadata: Mapping[str, Any],
        bundle_root: Path,
        overrides: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.source = source or str(bundle_root)
        self._files: dict[Path, Any] = {}
        root = copy.deepcopy(dict(config))
        root["_meta_"] = copy.deepcopy(dict(metadata))
        self._written = root  # what a same-file macro copies from: the config as written, as MONAI does
        self.config = self._expand(root, "")
        for key, value in (overrides or {}).items():
            self.config[key] = Literal(value)
        self._resolved: dict[str, Any] = {}
        self._resolving: list[str] = []
        self.io_components: list[IOComponent] = []

    # -- ids, macros, relative ids ------------------------------------------------------------------
    def _expand(self, node: Any, node_id: str) -> Any:
        if isinstance(node, dict):
            return {k: self._expand(v, f"{node_id}{_SEP}{k}" if node_id else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._expand(v, f"{node_id}{_SEP}{i}" if node_id else str(i)) for i, v in enumerate(node)]
        if isinstance(node, str):
            node = self._absolute_ids(node_id, node)
            if node.startswith("%"):
                # the copy is expanded too (a macro naming a macro); a chain longer than 16 is circular
                self._macro_depth = getattr(self, "_macro_depth", 0) + 1
                try:
                    if self._macro_depth > 16:
                        raise ModelFormatError(f"config item {node_id!r}: macros nest too deep (a circle?)")
                    return self._expand(copy.deepcopy(self._macro(node[1:], node_id)), node_id)
                finally:
                    self._macro_depth -= 1
        return node

    @staticmethod
    def _absolute_ids(node_id: str, text: str) -> str:
        text = _normalize(text)
        current = node_id.split(_SEP)
        for prefix in sorted(set(_RELATIVE_PREFIX.findall(text)), reverse=True):
            symbol = prefix[0]
            levels = prefix[1:].count(_SEP)
            if levels > len(current):
                raise ModelFormatError(f"config item {node_id!r}: the relative id in {text!r} goes above the config")
            parent = "" if levels == len(current) else _SEP.join(current[:-levels]) + _SEP
            text = text.replace(prefix, symbol + parent)
        return text

    def _macro(self, text: str, node_id: str) -> Any:
        path_text, item_id = "", text
        for suffix in _CONFIG_SUFFIXES:
            index = text.lower().find(suffix)
            if index >= 0 and (text[index + len(suffix) :] == "" or text[index + len(suffix) :].startswith(_SEP)):
                path_text, item_id = text[: index + len(suffix)], text[index + len(suffix) + len(_SEP) :]
                break
        if not path_text:
            return self._raw(self._written, item_id, node_id)
        path = self.inside_bundle(path_text, f"config item {node_id!r}: the macro %{text}")
        if path not in self._files:
            self._files[path] = _read_structured(path)
        return self._raw(self._files[path], item_id, node_id)

    def inside_bundle(self, path_text: str, what: str) -> Path:
        """Resolves a path a config names (relative to the bundle folder); refuses one outside it."""
        candidate = Path(path_text)
        if not candidate.is_absolute():
            candidate = self.bundle_root / candidate
        resolved = candidate.resolve()
        if resolved != self.bundle_root and self.bundle_root not in resolved.parents:
            raise UntrustedCodeError([f"{what} reads {path_text!r}, outside the bundle folder"], self.source)
        if not resolved.is_file():
            raise ModelFormatError(f"{what} names {path_text!r}, which is not a file in the bundle")
        return resolved

    @staticmethod
    def _raw(root: Any, item_id: str, where: str) -> Any:
        node = root
        if item_id == "":
            return node
        for part in _normalize(item_id).split(_SEP):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            else:
                raise ModelFormatError(f"config item {where!r} refers to {item_id!r}, which the config does not define")
        return node

    def __contains__(self, item_id: str) -> bool:
        try:
            self._raw(self.config, item_id, item_id)
        except ModelFormatError:
            return False
        return True

    def get(self, item_id: str, default: Any = None) -> Any:
        """The raw item (as ``ConfigParser.get``), or ``default``."""
        return self.raw(item_id) if item_id in self else default

    def get_parsed_content(self, item_id: str, instantiate: bool = True) -> Any:
        """The built item (as ``ConfigParser.get_parsed_content``); building is always through the allow-list."""
        return self.resolve(item_id)

    def raw(self, item_id: str) -> Any:
        """The config item as written (macros and relative ids expanded), unresolved."""
        node = self._raw(self.config, item_id, item_id)
        return node.value if isinstance(node, Literal) else node

    # -- building ------------------------------------------------------------------------------------
    def resolve(self, item_id: str) -> Any:
        """Builds the item ``item_id`` (and everything it refers to) through the allow-list.

        Raises:
            UntrustedCodeError: it needs a target or expression outside the allow-list.
            ModelFormatError: the config is inconsistent (a missing id, a circular reference, a bad argument).
        """
        item_id = _normalize(item_id)
        if item_id in self._resolved:
            return self._resolved[item_id]
        if item_id in self._resolving:
            chain = " -> ".join([*self._resolving, item_id])
            raise ModelFormatError(f"{self.source}: circular reference in the config ({chain})")
        self._resolving.append(item_id)
        try:
            value = self._build(self._raw(self.config, item_id, item_id), item_id)
        finally:
            self._resolving.pop()
        self._resolved[item_id] = value
        return value

    def _build(self, node: Any, node_id: str) -> Any:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, dict):
            if "_target_" in node:
                return self._component(node, node_id)
            built = {k: self._build(v, self._child(node_id, k)) for k, v in node.items()}
            return {k: v for k, v in built.items() if v is not _DISABLED}
        if isinstance(node, list):
            built = [self._build(v, self._child(node_id, i)) for i, v in enumerate(node)]
            kept = [v for v in built if v is not _DISABLED and not isinstance(v, IOComponent)]
            self.io_components += [v for v in built if isinstance(v, IOComponent)]
            return kept
        if isinstance(node, str):
            if node.startswith("$"):
                return self.evaluate(node, node_id)
            if _REFERENCE.fullmatch(node) and len(node) > 1:
                return self.resolve(node[1:])
        return node

    @staticmethod
    def _child(node_id: str, key: Any) -> str:
        return f"{node_id}{_SEP}{key}" if node_id else str(key)

    def _component(self, node: dict, node_id: str) -> Any:
        target_name = node["_target_"]
        if not isinstance(target_name, str) or target_name.startswith(("$", "@", "%")):
            raise UntrustedCodeError(
                [f"{node_id}: '_target_' must be a plain class name, not {target_name!r}"], self.source
            )
        if _is_io_target(target_name):
            # only its keys are built (they may be a reference, "@image_key"); the reader itself never is
            keys = self._build(node.get("keys", ()), self._child(node_id, "keys"))
            keys = (keys,) if isinstance(keys, str) else tuple(k for k in keys if isinstance(k, str))
            return IOComponent(name=target_name.rsplit(".", 1)[-1], keys=keys)
        if "_disabled_" in node and self._truth(self._build(node["_disabled_"], self._child(node_id, "_disabled_"))):
            return _DISABLED
        target = self.target(target_name, node_id)
        requires = node.get("_requires_", [])
        for index, required in enumerate(requires if isinstance(requires, list) else [requires]):
            self._build(required, self._child(node_id, f"_requires_{_SEP}{index}"))
        arguments = {
            key: self._build(value, self._child(node_id, key))
            for key, value in node.items()
            if key not in _NON_ARGUMENT_KEYS
        }
        arguments = {k: v for k, v in arguments.items() if v is not _DISABLED}
        self.check_arguments(target_name, arguments, node_id)
        mode = node.get("_mode_", "default")
        try:
            if mode == "default":
                return target(**arguments)
            if mode == "callable":
                return BoundComponent(target, **arguments) if arguments else target
        except (UntrustedCodeError, ModelFormatError):
            raise
        except Exception as error:
            raise ModelFormatError(
                f"{self.source}: config item {node_id!r} ({target_name}) could not be built: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from None
        raise ModelFormatError(f"{self.source}: config item {node_id!r} has '_mode_' {mode!r}; DeepSeg runs 'default' "
                               "and 'callable'")  # fmt: skip

    def target(self, name: str, where: str) -> Any:
        """The allow-listed object a ``_target_`` names (full or short name), or UntrustedCodeError."""
        by_name, _, by_short = allowed_names()
        if name in by_name:
            return by_name[name]
        if "." not in name and len(by_short.get(name, [])) == 1:
            return by_short[name][0]
        if "." not in name and not _is_monai_component(name):
            raise UntrustedCodeError([f"{where}: '_target_' {name!r} is not a MONAI component (written for another "
                                      "MONAI version, or a class of the bundle's own scripts?)"], self.source)  # fmt: skip
        raise UntrustedCodeError([f"{where}: '_target_' {name!r}"], self.source)

    def check_arguments(self, name: str, arguments: Mapping[str, Any], where: str) -> None:
        for key in allow.FALSE_ONLY_ARGUMENTS & set(arguments):
            if self._truth(arguments[key]):
                raise UntrustedCodeError([f"{where}: {name}({key}={arguments[key]!r}) would download or read files"],
                                         self.source)  # fmt: skip

    @staticmethod
    def _truth(value: Any) -> bool:
        return bool(value) if isinstance(value, (bool, int, float, str, type(None), list, tuple, dict)) else True

    # -- expressions ---------------------------------------------------------------------------------
    def evaluate(self, expression: str, node_id: str) -> Any:
        """Evaluates a ``$`` string with the restricted interpreter; ``@id`` references are resolved first."""
        tree, references = self._parse(expression, node_id)
        scope = {REF_NAME.format(i): self.resolve(ref) for i, ref in enumerate(references)}
        try:
            return Interpreter(self, node_id).run(tree.body, scope)
        except ModelFormatError:
            raise
        except (Exception, MemoryError) as error:  # an operator on the wrong types, a bad index...
            detail = str(error).splitlines()[0] if str(error) else ""
            raise ModelFormatError(
                f"{self.source}: config item {node_id!r}: {expression[:120]!r} failed ({type(error).__name__}: "
                f"{detail[:200]})"
            ) from None

    def _parse(self, expression: str, node_id: str) -> tuple[ast.Expression, list[str]]:
        code = _normalize(expression[1:])
        references = sorted(set(m for m in _REFERENCE.findall(code) if len(m) > 1), key=len, reverse=True)
        for index, reference in enumerate(references):
            code = code.replace(reference, REF_NAME.format(index))
        try:
            tree = ast.parse(code.strip(), mode="eval")
        except SyntaxError:
            raise UntrustedCodeError([f"{node_id}: {expression!r} is a statement, not an expression"],
                                     self.source) from None  # fmt: skip
        problems = static_problems(tree)
        if problems:
            raise UntrustedCodeError([f"{node_id}: {expression!r} ({problems[0]})"], self.source)
        return tree, [r[1:] for r in references]

    # -- what trusted mode would run -----------------------------------------------------------------
    def audit(self, ids: Iterable[str]) -> list[str]:
        """Every target and expression outside the allow-list reachable from ``ids``, without building."""
        findings: list[str] = []
        seen: set[str] = set()
        pending = [_normalize(i) for i in ids if i in self]
        while pending:
            item_id = pending.pop()
            if item_id in seen:
                continue
            seen.add(item_id)
            try:
                node = self._raw(self.config, item_id, item_id)
            except ModelFormatError as error:
                findings.append(str(error))
                continue
            pending += self._audit_node(node, item_id, findings)
        return findings

    def _audit_node(self, node: Any, node_id: str, findings: list[str]) -> list[str]:
        references: list[str] = []
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and not (isinstance(target, str) and _is_io_target(target)):
                try:
                    self.target(target if isinstance(target, str) else repr(target), node_id)
                except UntrustedCodeError as error:
                    findings += error.findings
            for key, value in node.items():
                references += self._audit_node(value, self._child(node_id, key), findings)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                references += self._audit_node(value, self._child(node_id, index), findings)
        elif isinstance(node, str):
            if node.startswith("$"):
                try:
                    references += self._parse(node, node_id)[1]
                except UntrustedCodeError as error:
                    findings += error.findings
                    references += [r[1:] for r in _REFERENCE.findall(_normalize(node)) if len(r) > 1]
            elif _REFERENCE.fullmatch(node) and len(node) > 1:
                references.append(node[1:])
        return references


