"""nnU-Net v2 folders: same labels as nnU-Net's own nnUNetPredictor, and bad folders refused clearly."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.models import ModelCache, ModelFileError, ModelFormat, ModelFormatError, load_model
from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, inference, segment
from DeepSegModuleLib.segmentation.grid import resize, resized_labels
from DeepSegModuleLib.segmentation.inference import (
    PRECISION_ENVIRONMENT_VARIABLE,
    cpu_has_native_bfloat16,
    nnunet_gaussian,
    nnunet_steps,
    nnunet_tiled_inference,
    resolve_precision,
)
from DeepSegModuleLib.segmentation.nnunet_preprocessing import _resize
from nnunet_helpers import (
    dataset_json,
    network_from_plans,
    phantom_patch,
    plans,
    train_tiny_network,
    write_nnunet_folder,
)
from segmentation_helpers import dice, oblique_grid

pytest.importorskip("dynamic_network_architectures")


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return train_tiny_network()


@pytest.fixture(scope="module")
def model_folder(network, tmp_path_factory) -> Path:
    return write_nnunet_folder(tmp_path_factory.mktemp("nnunet"), network, folds=("0", "1"))


def _case(shape_kji, seed: int) -> tuple[VolumeArray, np.ndarray]:
    # An oblique grid whose spacing (0.9, 0.8, 2.5 mm along i, j, k) differs from the plans' (1, 1, 3).
    image, truth = phantom_patch(np.random.default_rng(seed), shape=shape_kji)
    _, ijk_to_ras = oblique_grid(shape_kji=shape_kji, spacing_ijk=(0.9, 0.8, 2.5))
    return VolumeArray(image, ijk_to_ras), truth


def _reference(folder: Path, volume: VolumeArray, folds, mirroring: bool) -> np.ndarray:
    predictor_module = pytest.importorskip("nnunetv2.inference.predict_from_raw_data")
    predictor = predictor_module.nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, perform_everything_on_device=False,
        device=torch.device("cpu"), verbose=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    # nnU-Net reads images with SimpleITK: array (k, j, i) and spacing (sk, sj, si), direction ignored.
    return predictor.predict_single_npy_array(volume.array[None], {"spacing": list(volume.spacing[::-1])})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_fold_ensemble_agrees_with_nnunet_predictor(model_folder, precision):
    # nnUNetPredictor computes in float32 on a CPU; DeepSeg's bfloat16 autocast (its default on CPUs with
    # native bfloat16) must give the same labels. On other CPUs bf16 is emulated: slower, same answer.
    volume, truth = _case((20, 70, 60), seed=5)
    options = SegmentationOptions(device="cpu", precision=precision)
    result = segment(volume, model_folder, options, cache=ModelCache())
    reference = _reference(model_folder, volume, ("0", "1"), mirroring=False)
    assert result.labels.shape == reference.shape == volume.array.shape
    assert [(i.value, i.name) for i in result.label_table] == [(1, "bright"), (2, "dim")]
    for value in (1, 2):
        assert (reference == value).any()
        agreement = dice(result.labels == value, reference == value)
        print(f"nnU-Net label {value} Dice vs nnUNetPredictor (2 folds, no mirroring, {precision}): {agreement:.4f}")
        assert agreement >= 0.99
    # Not noise: the bright blob is found.
    assert dice(result.labels == 1, truth == 1) > 0.5


def test_mirroring_agrees_with_nnunet_predictor(model_folder):
    volume, _ = _case((10, 40, 36), seed=7)
    options = SegmentationOptions(device="cpu", mirroring=True)
    result = segment(volume, model_folder, options, cache=ModelCache())
    model = load_model(model_folder, folds=["0"])
    single = segment(volume, model, options)
    reference = _reference(model_folder, volume, ("0",), mirroring=True)
    assert model.description.mirror_axes == (0, 1, 2)
    for value in (1, 2):
        if (reference == value).sum() >= 20:
            assert dice(single.labels == value, reference == value) >= 0.99
    assert result.labels.shape == volume.array.shape


def test_truncated_checkpoint_is_a_clear_error(model_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    checkpoint = copy / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(copy, folds=["0"])


class _Payload:
    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


def test_checkpoint_with_pickled_code_is_refused(model_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    checkpoint = copy / "fold_0" / "checkpoint_final.pth"
    content = torch.load(checkpoint, weights_only=False)
    content["payload"] = _Payload()
    torch.save(content, checkpoint)
    with pytest.raises(ModelFileError, match="weights-only"):
        load_model(copy, folds=["0"])


def _edit_json(folder: Path, name: str, edit) -> None:
    path = folder / name
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_plans_naming_code_outside_the_network_library_is_refused(model_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)

    def edit(plans):
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"

    _edit_json(copy, "plans.json", edit)
    with pytest.raises(ModelFormatError, match="refusing"):
        load_model(copy)


def test_model_wanting_two_inputs_given_one_names_the_fix(model_folder, tmp_path, network):
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    _edit_json(copy, "dataset.json", lambda d: d["channel_names"].update({"1": "T2"}))
    _edit_json(
        copy, "plans.json",
        lambda p: p["configurations"]["3d_fullres"].update(
            normalization_schemes=["CTNormalization", "ZScoreNormalization"], use_mask_for_norm=[False, False]
        ),
    )  # fmt: skip
    with pytest.raises(ModelFileError, match="does not fit"):
        load_model(copy)  # the 1-channel checkpoint cannot serve a 2-channel plan
    description_only = load_model(model_folder).description
    assert description_only.format == ModelFormat.NNUNET_V2
    volume, _ = _case((10, 40, 36), seed=1)
    with pytest.raises(ValueError, match="takes 1 input"):
        segment([volume, volume], model_folder, SegmentationOptions(device="cpu"), cache=ModelCache())


def test_region_based_models_are_reported_as_unsupported(model_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    _edit_json(copy, "dataset.json", lambda d: d["labels"].update({"whole": [1, 2]}))
    with pytest.raises(ModelFormatError, match="region"):
        load_model(copy)


def test_reoriented_models_segment_the_same_anatomy_whatever_the_voxel_order(model_folder, tmp_path):
    # The same image stored twice: B has A's i axis flipped and j/k swapped. A model reoriented to RAS
    # (as TotalSegmentator's are) must label the same physical voxels in both.
    volume_a, _ = _case((12, 40, 36), seed=3)
    n_i = volume_a.array.shape[2]
    array_b = np.ascontiguousarray(volume_a.array.transpose(1, 0, 2)[:, :, ::-1])
    b_to_a = np.array([[-1, 0, 0, n_i - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    volume_b = VolumeArray(array_b, volume_a.ijk_to_ras @ b_to_a)
    model = load_model(model_folder, folds=["0"], orientation="RAS")
    labels_a = segment(volume_a, model, SegmentationOptions(device="cpu")).labels
    labels_b = segment(volume_b, model, SegmentationOptions(device="cpu")).labels
    assert labels_a.any()
    np.testing.assert_array_equal(labels_b.transpose(1, 0, 2)[:, :, ::-1], labels_a)

    totalsegmentator_like = tmp_path / "Dataset291_TotalSegmentator_part1_organs" / model_folder.name
    shutil.copytree(model_folder, totalsegmentator_like)
    assert load_model(totalsegmentator_like, folds=["0"]).description.orientation == "RAS"
    assert load_model(model_folder, folds=["0"]).description.orientation is None


def test_precision_names_resolve_to_what_this_machine_runs_fast(model_folder, monkeypatch):
    monkeypatch.delenv(PRECISION_ENVIRONMENT_VARIABLE, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if cpu_has_native_bfloat16() else None)
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setenv(PRECISION_ENVIRONMENT_VARIABLE, "fp32")
    assert resolve_precision("auto", cpu) is None
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        segment(
            _case((10, 40, 36), seed=1)[0], model_folder, SegmentationOptions(precision="double"), cache=ModelCache()
        )


@pytest.mark.parametrize("nearest_axis", [None, 2])
def test_slab_by_slab_labels_equal_argmax_of_the_whole_resized_outputs(nearest_axis):
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn((4, 9, 11, 7), generator=generator)
    outputs = torch.nn.functional.avg_pool3d(outputs[None], 3, stride=1, padding=1)[0]  # smooth, like logits
    shape = (20, 17, 23)
    if nearest_axis is None:
        whole = resize(outputs, shape).argmax(0)
    else:  # nnU-Net's anisotropic rule: linear in-plane, nearest along the low-resolution axis
        in_plane = resize(outputs, (shape[0], shape[1], outputs.shape[3]))
        index = torch.clamp(torch.floor((torch.arange(shape[2]) + 0.5) * (7 / shape[2]) - 0.5 + 0.5), 0, 6).long()
        whole = in_plane[..., index].argmax(0)
    for slab_bytes in (1, 10**9):  # one slice per slab, and everything at once
        slabs = resized_labels(outputs, shape, lambda planes: planes.argmax(1), nearest_axis, slab_bytes=slab_bytes)
        assert slabs.shape == shape
        assert (slabs == whole).float().mean() >= 0.999  # float rounding may split an exact tie


def test_separable_spline_resize_is_scipys_zoom():
    from scipy import ndimage

    image = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(23, 40, 31)), 2).astype(np.float32) * 300
    for shape in [(12, 61, 31), (40, 21, 17)]:
        expected = ndimage.zoom(image.astype(np.float64), [n / o for n, o in zip(shape, image.shape)], order=3,
                                mode="nearest", grid_mode=True)  # fmt: skip
        expected = np.clip(expected, image.min(), image.max())
        resized = _resize(image, shape, order=3)
        assert resized.shape == shape and resized.dtype == np.float32
        np.testing.assert_allclose(resized, expected, atol=1e-3)


class _WindowNetwork:
    """100 output channels from a fixed random convolution of each window, plus a term from the window's mean:
    zero padding at window edges and the mean make overlapping windows disagree, so the blend matters."""

    def __init__(self, channels: int = 100, scale: float = 1.0) -> None:
        generator = torch.Generator().manual_seed(3)
        self.kernel = torch.randn((channels, 1, 3, 3, 3), generator=generator) * scale
        self.offset = torch.randn(channels, generator=generator) * scale

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.conv3d(windows, self.kernel, padding=1)
        return logits + windows.mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1, 1) * self.offset.view(1, -1, 1, 1, 1)


def _blend_in_float64(image: torch.Tensor, predictor, patch, step: float) -> torch.Tensor:
    """The gaussian-weighted average of every window's outputs, written out plainly in float64."""
    weights = nnunet_gaussian(tuple(patch)).double()
    total, weight_sum = None, torch.zeros(image.shape[2:], dtype=torch.float64)
    for origin in itertools.product(*nnunet_steps(image.shape[2:], patch, step)):
        region = tuple(slice(o, o + p) for o, p in zip(origin, patch))
        output = predictor(image[(slice(None), slice(None), *region)])[0].double()
        if total is None:
            total = torch.zeros((output.shape[0], *image.shape[2:]), dtype=torch.float64)
        total[(slice(None), *region)] += output * weights
        weight_sum[region] += weights
    return total / weight_sum


def _tiled(image, predictor, patch, dtype) -> torch.Tensor:
    cpu = torch.device("cpu")
    return nnunet_tiled_inference(image, predictor, patch, 0.5, 2, cpu, cpu, accumulation_dtype=dtype)[0]


def test_float16_window_blending_gives_float32_labels_for_100_labels_at_half_the_memory():
    smooth = torch.nn.functional.avg_pool3d(
        torch.randn((1, 1, 32, 28, 24), generator=torch.Generator().manual_seed(0)), 5, stride=1, padding=2
    )
    image, patch = smooth * 10, (16, 16, 16)
    network = _WindowNetwork()
    exact = _blend_in_float64(image, network, patch, 0.5)
    full = _tiled(image, network, patch, torch.float32)
    half = _tiled(image, network, patch, torch.float16)
    assert full.dtype == torch.float32 and half.dtype == torch.float16 and half.shape == exact.shape
    assert half.element_size() * 2 == full.element_size()
    assert torch.allclose(full.double(), exact, atol=1e-4)
    # float16's rounding is relative: 2^-11 of the logits' size, nothing more (no overflow, no lost windows).
    assert (half.double() - exact).abs().max() <= 2e-3 * exact.abs().max()
    labels_full, labels_half = full.argmax(0), half.float().argmax(0)
    assert len(labels_full.unique()) >= 30
    assert (labels_full == labels_half).float().mean() >= 0.99
    for value in labels_full.unique():
        if (labels_full == value).sum() >= 200:
            assert dice((labels_half == value).numpy(), (labels_full == value).numpy()) >= 0.99


def test_logits_beyond_float16_range_are_blended_in_float32():
    image = (
        torch.nn.functional.avg_pool3d(
            torch.randn((1, 1, 24, 20, 20), generator=torch.Generator().manual_seed(1)), 3, stride=1, padding=1
        )
        * 10
    )
    network = _WindowNetwork(channels=4, scale=3e4)
    blended = _tiled(image, network, (16, 16, 16), torch.float16)
    assert blended.dtype == torch.float32 and torch.isfinite(blended).all()
    exact = _blend_in_float64(image, network, (16, 16, 16), 0.5)
    assert torch.allclose(blended.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


def test_hundred_label_model_gives_the_labels_of_float32_blending(tmp_path, monkeypatch):
    folder = write_nnunet_folder(tmp_path, network_from_plans(plans(), classes=100), dataset=dataset_json(100))
    volume, _ = _case((12, 40, 36), seed=5)
    options = SegmentationOptions(device="cpu", precision="fp32", probabilities=True)
    half = segment(volume, folder, options, cache=ModelCache())
    monkeypatch.setattr(
        inference, "nnunet_tiled_inference",
        functools.partial(inference.nnunet_tiled_inference, accumulation_dtype=torch.float32),
    )  # fmt: skip
    full = segment(volume, folder, options, cache=ModelCache())
    found = np.unique(full.labels)
    assert len(found) >= 5
    assert (half.labels == full.labels).mean() >= 0.99
    for value in found:
        if (full.labels == value).sum() >= 200:
            assert dice(half.labels == value, full.labels == value) >= 0.99
    assert len(half.probabilities) == len(full.probabilities) == 99
    for value in found[found > 0]:
        assert half.probabilities[value].dtype == np.float32
        np.testing.assert_allclose(half.probabilities[value], full.probabilities[value], atol=2e-3)


# 2d configurations: every slice along the first axis predicted on its own with a 2D sliding window.


@pytest.fixture(scope="module")
def model_folder_2d(tmp_path_factory) -> Path:
    from nnunet_helpers import plans_2d, train_tiny_2d_network

    root = tmp_path_factory.mktemp("nnunet2d")
    return write_nnunet_folder(root, train_tiny_2d_network(), plan=plans_2d(), configuration="2d")


@pytest.mark.parametrize("mirroring", [False, True])
@pytest.mark.parametrize("shape_kji", [(4, 50, 44), (1, 50, 44)], ids=["volume", "single slice"])
def test_2d_configuration_agrees_with_nnunet_predictor(model_folder_2d, mirroring, shape_kji):
    volume, truth = _case(shape_kji, seed=1)
    model = load_model(model_folder_2d)
    description = model.description
    assert description.patch_size == (1, 32, 32) and description.spacing is None
    assert description.mirror_axes == (1, 2)  # the checkpoint's 2D axes (0, 1), after the slice axis
    result = segment(volume, model, SegmentationOptions(device="cpu", precision="fp32", mirroring=mirroring))
    reference = _reference(model_folder_2d, volume, ("0",), mirroring=mirroring)
    assert result.labels.shape == reference.shape == volume.array.shape
    for value in (1, 2):
        assert (reference == value).sum() >= 20
        agreement = dice(result.labels == value, reference == value)
        print(f"2d label {value} Dice vs nnUNetPredictor ({shape_kji}, mirroring {mirroring}): {agreement:.4f}")
        assert agreement >= 0.99
        assert dice(result.labels == value, truth == value) > 0.5  # not noise


def test_2d_checkpoint_mirror_axes_are_the_in_plane_axes(model_folder_2d, tmp_path):
    from nnunet_helpers import plans_2d

    network = load_model(model_folder_2d).networks[0].network
    folder = write_nnunet_folder(tmp_path, network, plan=plans_2d(), configuration="2d", mirror_axes=(1,))
    model = load_model(folder)
    assert model.description.mirror_axes == (2,)
    volume, _ = _case((6, 40, 36), seed=2)
    result = segment(volume, model, SegmentationOptions(device="cpu", precision="fp32", mirroring=True))
    reference = _reference(folder, volume, ("0",), mirroring=True)
    for value in (1, 2):
        if (reference == value).sum() >= 20:
            assert dice(result.labels == value, reference == value) >= 0.99


def test_2d_configuration_with_a_transposed_slice_axis_agrees_with_nnunet_predictor(model_folder_2d, tmp_path):
    # transpose_forward puts the input's j axis (the 2.5 mm one here) first: the slices are j = const planes.
    from nnunet_helpers import plans_2d

    plan = plans_2d()
    plan["transpose_forward"] = plan["transpose_backward"] = [1, 0, 2]
    network = load_model(model_folder_2d).networks[0].network
    folder = write_nnunet_folder(tmp_path, network, plan=plan, configuration="2d")
    image, _ = phantom_patch(np.random.default_rng(1), shape=(30, 6, 44))
    _, ijk_to_ras = oblique_grid(shape_kji=(30, 6, 44), spacing_ijk=(0.9, 2.5, 0.8))
    volume = VolumeArray(image, ijk_to_ras)
    result = segment(volume, folder, SegmentationOptions(device="cpu", precision="fp32"), cache=ModelCache())
    reference = _reference(folder, volume, ("0",), mirroring=False)
    for value in (1, 2):
        assert (reference == value).sum() >= 20
        assert dice(result.labels == value, reference == value) >= 0.99


def test_2d_window_grid_and_weights_are_nnunets():
    sliding = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    for image_shape, patch in (((7, 50, 44), (32, 32)), ((3, 32, 90), (32, 40)), ((1, 200, 33), (64, 32))):
        steps = nnunet_steps(image_shape, (1, *patch), 0.5)
        assert steps[0] == list(range(image_shape[0]))  # every slice once
        assert steps[1:] == sliding.compute_steps_for_sliding_window(image_shape[1:], patch, 0.5)
        theirs = sliding.compute_gaussian(patch, 1.0 / 8, 1.0, dtype=torch.float32, device=torch.device("cpu"))
        ours = nnunet_gaussian((1, *patch))
        assert ours.shape == (1, *patch)
        torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=1e-7)


def _cascade_folder(model_folder: Path, root: Path) -> Path:
    """A 3d_lowres + 3d_cascade_fullres pair as nnU-Net writes them (the cascade checkpoint has 3 more inputs)."""
    plan = json.loads((model_folder / "plans.json").read_text())
    fullres = plan["configurations"]["3d_fullres"]
    plan["configurations"]["3d_lowres"] = {**fullres, "data_identifier": "nnUNetPlans_3d_lowres",
                                           "spacing": [6.0, 2.0, 2.0], "next_stage": ["3d_cascade_fullres"]}  # fmt: skip
    plan["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    network = network_from_plans(plans(), classes=3, input_channels=3)
    cascade = write_nnunet_folder(root, network, plan=plan, configuration="3d_cascade_fullres", mirror_axes=(0, 1, 2))
    write_nnunet_folder(root, network_from_plans(plans(), classes=3), plan=plan, configuration="3d_lowres")
    return cascade


def test_cascade_is_refused_naming_the_folders_to_run(model_folder, tmp_path):
    cascade = _cascade_folder(model_folder, tmp_path)
    with pytest.raises(ModelFormatError, match="cascade") as error:
        load_model(cascade)
    message = str(error.value)
    assert "Run the 3d_fullres or the 3d_lowres folder of this model instead" in message
    assert str(cascade.parent / "nnUNetTrainer__nnUNetPlans__3d_lowres") in message
    assert "does not fit" not in message
    volume, _ = _case((10, 40, 36), seed=1)
    with pytest.raises(ModelFormatError, match="cascade"):
        segment(volume, cascade, SegmentationOptions(device="cpu"), cache=ModelCache())
    # The first stage runs as it is.
    assert load_model(cascade.parent / "nnUNetTrainer__nnUNetPlans__3d_lowres").description.spacing == (6.0, 2.0, 2.0)


@pytest.mark.parametrize("patch_size", [[64], [8, 16, 16, 16]])
def test_configurations_neither_2d_nor_3d_are_refused(model_folder, tmp_path, patch_size):
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    _edit_json(copy, "plans.json", lambda p: p["configurations"]["3d_fullres"].update(patch_size=patch_size))
    with pytest.raises(ModelFormatError, match="2D or 3D"):
        load_model(copy)
