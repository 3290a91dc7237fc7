"""TorchScript archives inspected before ``torch.jit.load`` runs any of their code.

A TorchScript file is a zip whose ``code/`` folder holds the model's methods as Python-syntax source, and
``torch.jit.load`` runs some of it while loading (``__setstate__``). TorchScript cannot import Python
modules, but its operator library reaches further than tensors: ``torch.from_file`` maps any file into a
tensor (read, overwrite, create), and custom operator namespaces run native code. So every call in
every code file is read with :mod:`ast` and must be one of:

- an operator of ``torch``/``aten``/``prim`` on the allow-list :data:`ALLOWED_OPERATORS` (tensor maths,
  shapes, indexing, the network layers and TorchScript's own bookkeeping), or a tensor method of the same
  name;
- a method or function defined in the archive itself (``forward``, ``__torch__.x.y.helper``), whose body is
  checked the same way;
- a TorchScript built-in of :data:`ALLOWED_BUILTINS` (``int``, ``len``, ``annotate``...).

Anything else (``from_file``, ``torch.ops.<namespace>.*`` beyond ``aten``/``prim``, ``torch.classes``,
``save``, ``print``...) refuses the archive with the operator's name and where it appears, before any byte
of it runs. What the check cannot see, it does not allow: an archive with no ``code/`` or unreadable code
is refused too.
"""

from __future__ import annotations

import ast
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from DeepSegModuleLib.models.errors import ModelFileError, ModelFormatError

#: Code files larger than this (all together) are not a network's methods.
MAX_CODE_BYTES = 64 * 1024**2

#: Tensor operators a network may call (``torch.X``, ``ops.aten.X``, ``torch.nn.functional.X`` and
#: ``tensor.X``). Chosen from what MONAI's and nnU-Net's networks compile to, plus their close relatives;
#: none reads or writes files, allocates from a path, or leaves the process.
ALLOWED_OPERATORS = frozenset(
    """
    abs absolute acos adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d add add_ addmm all allclose alpha_dropout amax amin any arange
    argmax argmin argsort asin atan atan2 avg_pool1d avg_pool2d avg_pool3d baddbmm
    batch_norm bernoulli binary_cross_entropy bitwise_and bitwise_not bitwise_or bitwise_xor bmm bool
    broadcast_tensors broadcast_to cat ceil celu chunk clamp clamp_ clamp_max clamp_min clip clone
    constant_pad_nd contiguous conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
    convolution copy_ cos cosh count_nonzero cpu cuda cumprod cumsum detach device diag dim div div_ dot
    dropout dropout_ einsum elu elu_ embedding eq erf exp expand expand_as expm1 eye
    feature_alpha_dropout feature_dropout fill_ flatten flip floor floor_divide fmod frac full full_like gather
    ge gelu get_device glu grid_sampler group_norm gt hardshrink hardsigmoid hardswish hardtanh index_select
    instance_norm interpolate is_floating_point isfinite isinf isnan item layer_norm le leaky_relu leaky_relu_
    linear linspace log log10 log1p log2 log_softmax logical_and logical_not logical_or logsigmoid logsumexp
    lt masked_fill masked_fill_ matmul max max_pool1d max_pool1d_with_indices max_pool2d
    max_pool2d_with_indices max_pool3d max_pool3d_with_indices maximum mean median min minimum mish mm mul
    mul_ narrow ne neg new_full new_ones new_zeros nonzero norm normal numel one_hot ones ones_like
    pad permute pixel_shuffle pow prelu prod rand rand_like randint randn randn_like reciprocal reflection_pad1d
    reflection_pad2d reflection_pad3d relu relu6 relu_ remainder repeat repeat_interleave replication_pad1d
    replication_pad2d replication_pad3d reshape reshape_as roll round rrelu rsqrt rsub scalar_tensor scatter
    scatter_add select selu sigmoid sigmoid_ sign silu silu_ sin sinh size slice softmax softplus softshrink
    sort split sqrt square squeeze stack std sub sub_ sum t tan tanh tanhshrink tensor tensor_split threshold
    threshold_ to topk transpose tril triu true_divide trunc type_as unbind unflatten unsqueeze
    upsample_bicubic2d upsample_bilinear2d upsample_linear1d upsample_nearest1d upsample_nearest2d
    upsample_nearest3d upsample_trilinear3d var view view_as where zero_ zeros zeros_like
    __and__ __contains__ __derive_index __getitem__ __is__ __isnot__ __not__ __or__ __range_length __round_to_zero
    _assert _cast_Float _convolution _set_item dtype list len format warn mode append extend insert index
    as_tensor _upsample_bicubic2d_aa _upsample_bilinear2d_aa _upsample_lanczos2d_aa _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d
    """.split()
)

#: Operators of TorchScript's own runtime (``ops.prim.X``): values, control flow, type checks.
ALLOWED_PRIM = frozenset(
    """
    device dtype data layout isinstance unchecked_cast min max abs RaiseException TupleIndex TupleConstruct
    ListConstruct DictConstruct Uninitialized requires_grad is_cuda is_cpu is_mkldnn is_quantized is_sparse
    is_meta is_xpu is_mps is_nested NumToTensor shape grad name index
    """.split()
)

#: Calls by bare name that TorchScript's serializer writes.
ALLOWED_BUILTINS = frozenset(
    """
    annotate uninitialized unchecked_cast isinstance int float bool str len range enumerate zip min max abs
    list tuple dict divmod round sum any all
    """.split()
)

_OPERATOR_ROOTS = {("torch",), ("ops", "aten"), ("torch", "ops", "aten"), ("torch", "nn", "functional"),
                   ("torch", "_C", "_nn"), ("torch", "functional"), ("torch", "linalg"), ("torch", "fft"),
                   ("torch", "special")}  # fmt: skip
_PRIM_ROOTS = {("ops", "prim"), ("torch", "ops", "prim")}


class UnsafeTorchScriptError(ModelFormatError):
    """The archive calls operators outside the allow-list; loading it could read or write files."""


@dataclass(frozen=True)
class _Call:
    name: str
    where: str


def _dotted(node: ast.AST) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return tuple(reversed(parts))
    return None


def _code_files(archive: Path) -> dict[str, str]:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            members = [m for m in zip_file.infolist() if not m.is_dir()]
            code = [m for m in members if "/code/" in f"/{m.filename}" and m.filename.endswith(".py")]
            if sum(m.file_size for m in code) > MAX_CODE_BYTES:
                raise UnsafeTorchScriptError(f"{archive}: its code is larger than {MAX_CODE_BYTES >> 20} MB")
            return {m.filename: zip_file.read(m).decode("utf-8") for m in code}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, UnicodeDecodeError, ValueError, NotImplementedError) as error:
        raise ModelFileError(
            f"{archive} ({_size(archive)}) is not a readable TorchScript archive ({error}): it is truncated, damaged "
            "or not TorchScript (export with torch.jit.script or torch.jit.trace and save with torch.jit.save)"
        ) from None


def _size(path: Path) -> str:
    try:
        return f"{os.path.getsize(path)} bytes"
    except OSError:
        return "unreadable"


def check_torchscript(archive: str | os.PathLike) -> None:
    """Refuses a TorchScript archive that calls anything outside the allow-lists (see the module docstring).

    Raises:
        UnsafeTorchScriptError: naming the first disallowed calls and the files they are in.
        ModelFileError: the file is not a readable archive or has no code.
    """
    archive = Path(archive)
    files = _code_files(archive)
    if not files:
        raise ModelFileError(f"{archive} has no TorchScript code (code/*.py); it is not a TorchScript archive")
    trees: dict[str, ast.Module] = {}
    for name, text in files.items():
        try:
            trees[name] = ast.parse(text)
        except (SyntaxError, ValueError) as error:
            raise UnsafeTorchScriptError(f"{archive}: {name} cannot be read ({error}); refusing to load it") from None
    defined_methods, defined_qualified = _definitions(trees)
    refused = [call for name, tree in trees.items() for call in _calls(tree, name)
               if not _allowed_call(call.name, defined_methods, defined_qualified)]  # fmt: skip
    if refused:
        shown = ", ".join(sorted({f"{c.name} ({PurePosixPath(c.where).name})" for c in refused})[:6])
        raise UnsafeTorchScriptError(
            f"{archive} calls operators outside DeepSeg's TorchScript allow-list: {shown}. Such operators can read "
            "or write files or run native code; DeepSeg does not load this file. If you made it yourself, "
            "export the network without them."
        )


def _definitions(trees: dict[str, ast.Module]) -> tuple[set[str], set[str]]:
    methods: set[str] = set()
    qualified: set[str] = set()
    for name, tree in trees.items():
        module = "__torch__." + PurePosixPath(name.split("/code/__torch__/", 1)[-1]).with_suffix("").as_posix()
        module = module.replace("/", ".")
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                qualified.add(f"{module}.{node.name}")
                methods.update(f.name for f in node.body if isinstance(f, ast.FunctionDef))
            elif isinstance(node, ast.FunctionDef):
                qualified.add(f"{module}.{node.name}")
    # a method may not take the name of an operator that is refused: tensor.from_file() must not pass
    return methods, qualified


def _aliases(tree: ast.Module) -> dict[str, str]:
    """``_0 = __torch__.torch.nn.functional.interpolate``: local names the serializer binds to functions."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            dotted = _dotted(node.value)
            if dotted is not None:
                aliases[node.targets[0].id] = ".".join(dotted)
    return aliases


def _resolve_alias(name: str, aliases: dict[str, str]) -> str:
    for _ in range(16):
        if name not in aliases or aliases[name] == name:
            return name
        name = aliases[name]
    return name


def _calls(tree: ast.Module, where: str) -> list[_Call]:
    calls = []
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id == "getattr":
                calls.append(_Call(_getattr_call(node), where))
            elif isinstance(node.func, ast.Name) and node.func.id not in ALLOWED_BUILTINS:
                calls.append(_Call(_resolve_alias(node.func.id, aliases), where))
            elif dotted is not None:
                calls.append(_Call(".".join(dotted), where))
            elif isinstance(node.func, ast.Attribute):
                calls.append(_Call("." + node.func.attr, where))  # a method of a computed value
            else:
                calls.append(_Call("<computed call>", where))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            calls.append(_Call("import", where))
    return calls


def _getattr_call(node: ast.Call) -> str:
    """``getattr(self, "0")`` (a submodule by index) passes; on ``torch``/``ops`` or a computed name it does not."""
    if len(node.args) != 2 or node.keywords:
        return "getattr(<computed>)"
    owner, attribute = node.args
    dotted = _dotted(owner)
    if not (isinstance(attribute, ast.Constant) and isinstance(attribute.value, str)):
        return "getattr(<computed>)"
    if dotted is None or dotted[0] in ("torch", "ops", "__torch__"):
        return f"getattr({'.'.join(dotted or ('<computed>',))}, {attribute.value!r})"
    return "getattr"


def _allowed_call(name: str, methods: set[str], qualified: set[str]) -> bool:
    parts = tuple(name.split("."))
    if name == "getattr":
        return True
    if name.startswith("__torch__."):
        return name in qualified or name.rsplit(".", 1)[0] in qualified
    if len(parts) == 1:
        return parts[0] in ALLOWED_BUILTINS
    root, last = parts[:-1], parts[-1]
    if root in _PRIM_ROOTS:
        return last in ALLOWED_PRIM
    if root in _OPERATOR_ROOTS:
        return last in ALLOWED_OPERATORS
    if root and root[0] in ("torch", "ops"):
        return False  # another namespace (torch.classes, ops.<custom>, torch.jit...)
    # a method call on a value: the archive's own method, or a tensor method on the allow-list
    if last in ALLOWED_OPERATORS:
        return True
    return last in methods and last not in _REFUSED_METHOD_NAMES


# Operators that exist as tensor methods or torch functions and must not be reached by naming a method
# after them.
_REFUSED_METHOD_NAMES = frozenset({"from_file", "set_", "storage", "untyped_storage", "save", "share_memory_"})


def load_checked_torchscript(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.jit.load`` after :func:`check_torchscript`; errors name the file and what to do."""
    import torch

    path = Path(path)
    check_torchscript(path)
    try:
        return torch.jit.load(str(path), map_location=map_location)
    except (RuntimeError, ValueError) as error:
        raise ModelFileError(
            f"{path} ({_size(path)}) could not be read as TorchScript: it is truncated, damaged, or not a "
            "TorchScript file (export with torch.jit.script or torch.jit.trace and save with torch.jit.save). "
            f"Details: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
