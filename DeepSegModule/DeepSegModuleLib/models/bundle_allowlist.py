"""What an untrusted MONAI bundle config may build and call: exact names, nothing by pattern.

A name is allowed because it was read and judged to compute on tensors only: it reads no file, writes
none, downloads nothing, imports nothing and runs no code handed to it except through DeepSeg's own
restricted evaluator. Adding a name is a security decision: read the class first (and its ``__init__``
arguments: a ``pretrained=True`` that downloads is guarded in :data:`FALSE_ONLY_ARGUMENTS`).

Names are the public ones (``monai.transforms.Spacingd``); the loader also accepts the defining module's
name of the same object (``monai.transforms.spatial.dictionary.Spacingd``), matched by identity, never by
importing what a config names.
"""

from __future__ import annotations

#: Segmentation networks of ``monai.networks.nets``.
NETWORKS = (
    "AttentionUnet", "BasicUNet", "BasicUNetPlusPlus", "DiNTS", "TopologyInstance", "DynUNet", "FlexibleUNet",
    "HighResNet", "MedNeXt", "SegResNet", "SegResNetDS", "SegResNetDS2", "SegResNetVAE", "SwinUNETR", "UNETR",
    "UNet", "VNet", "VISTA3D", "vista3d132",
)  # fmt: skip

#: Array transforms of ``monai.transforms``; each one's dictionary form (``name + 'd'``) is allowed too.
TRANSFORMS = (
    # spatial
    "Spacing", "Orientation", "Resize", "Zoom", "Flip", "Rotate90", "SpatialPad", "BorderPad", "DivisiblePad",
    "ResizeWithPadOrCrop", "CenterSpatialCrop", "SpatialCrop", "CropForeground", "Transpose",
    # intensity
    "ScaleIntensity", "ScaleIntensityRange", "ScaleIntensityRangePercentiles", "NormalizeIntensity",
    "ThresholdIntensity", "ClipIntensityPercentiles", "ShiftIntensity", "MaskIntensity",
    # utility
    "EnsureChannelFirst", "EnsureType", "CastToType", "ToTensor", "ToNumpy", "AsChannelLast", "SqueezeDim",
    "SplitDim", "RepeatChannel", "Identity", "Lambda", "ToDevice", "LabelToMask", "MapLabelValue",
    "ConvertToMultiChannelBasedOnBratsClasses", "AddCoordinateChannels",
    # post-processing
    "Activations", "AsDiscrete", "KeepLargestConnectedComponent", "RemoveSmallObjects", "FillHoles", "LabelFilter",
)  # fmt: skip

#: Dictionary-only transforms of ``monai.transforms``.
DICT_TRANSFORMS = ("ConcatItemsd", "CopyItemsd", "DeleteItemsd", "SelectItemsd", "Invertd")

#: Other components by full name.
OTHER_COMPONENTS = (
    "monai.transforms.Compose",
    "monai.inferers.SimpleInferer",
    "monai.inferers.SlidingWindowInferer",
    "monai.inferers.SlidingWindowInfererAdapt",
    "monai.inferers.SliceInferer",
    "monai.apps.vista3d.transforms.VistaPreTransformd",
    "monai.apps.vista3d.transforms.VistaPostTransformd",
)

#: Functions and types an expression (``$...``) may call or name, besides the components above.
FUNCTIONS = (
    "torch.device", "torch.cuda.is_available", "torch.where", "torch.nan_to_num", "torch.argmax", "torch.cat",
    "torch.stack", "torch.sigmoid", "torch.softmax", "torch.tensor", "torch.as_tensor", "torch.zeros",
    "torch.ones", "torch.zeros_like", "torch.ones_like", "torch.clamp", "torch.flip", "torch.logical_and",
    "torch.logical_or", "torch.logical_not", "torch.round", "torch.isin", "torch.Size", "torch.from_numpy",
    "numpy.array", "numpy.asarray", "numpy.where", "numpy.zeros", "numpy.ones", "numpy.clip", "numpy.float16",
    "numpy.float32", "numpy.float64", "numpy.uint8", "numpy.int8", "numpy.int16", "numpy.int32", "numpy.int64",
    "numpy.uint16", "numpy.bool_",
)  # fmt: skip

#: Built-in functions an expression may call (no getattr, open, eval, exec, __import__, print, input, type...).
BUILTINS = (
    "abs", "all", "any", "bool", "dict", "enumerate", "float", "int", "len", "list", "max", "min", "range",
    "reversed", "round", "set", "sorted", "str", "sum", "tuple", "zip", "map", "filter", "isinstance",
)  # fmt: skip

#: Methods an expression may call on values it holds (tensors, arrays, networks, strings, lists, dicts).
METHODS = frozenset(
    {
        "to", "eval", "float", "half", "double", "long", "int", "bool", "cpu", "cuda", "detach", "clone",
        "numpy", "item", "tolist", "unsqueeze", "squeeze", "argmax", "argmin", "sum", "max", "min", "mean",
        "round", "permute", "flip", "reshape", "view", "contiguous", "astype", "copy", "get", "keys", "values",
        "items", "lower", "upper", "replace", "split", "join", "startswith", "endswith", "strip",
        "index", "count", "where", "as_tensor",
    }
)  # fmt: skip

#: Arguments that make an allowed component download or read something unless they are false.
FALSE_ONLY_ARGUMENTS = frozenset({"pretrained", "download", "pretrained_path", "model_path"})

#: Arguments of allow-listed callables whose names sound like files or downloads, read and judged harmless:
#: a dropout rate, a cache kept in memory, attention kept for inspection, a console progress bar.
REVIEWED_ARGUMENTS = frozenset({"dropout_path_rate", "hyena_l_cache", "save_attn", "progress", "cache_roi_weight_map"})

#: File input/output transforms: never built in untrusted mode (DeepSeg hands the volume over itself);
#: the loader records their keys.
IO_TRANSFORMS = frozenset({"LoadImage", "LoadImaged", "SaveImage", "SaveImaged"})


def component_names() -> tuple[str, ...]:
    """Every allowed ``_target_`` by its public full name."""
    names = [f"monai.networks.nets.{name}" for name in NETWORKS]
    for name in TRANSFORMS:
        names += [f"monai.transforms.{name}", f"monai.transforms.{name}d"]
    names += [f"monai.transforms.{name}" for name in DICT_TRANSFORMS]
    names += list(OTHER_COMPONENTS)
    return tuple(names)
