"""nnU-Net v2 folders: same labels as nnU-Net's own nnUNetPredictor, and bad folders refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.models import ModelCache, ModelFileError, ModelFormat, ModelFormatError, load_model
from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment
from DeepSegModuleLib.segmentation.grid import resize, resized_labels
from DeepSegModuleLib.segmentation.inference import (
    PRECISION_ENVIRONMENT_VARIABLE,
    cpu_has_native_bfloat16,
    resolve_precision,
)
from DeepSegModuleLib.segmentation.nnunet_preprocessing import _resize
from nnunet_helpers import phantom_patch, train_tiny_network, write_nnunet_folder
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
