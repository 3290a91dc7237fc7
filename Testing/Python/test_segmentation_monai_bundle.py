"""MONAI bundles run as their authors meant: same labels as the bundle's own inference workflow."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from DeepSegModuleLib.models import ModelCache, ModelFileError, ModelFormatError, UnsafeArchiveError, load_model
from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment
from segmentation_helpers import dice, grid_center, oblique_grid, ras_of_voxels, sphere_volume

monai = pytest.importorskip("monai")
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

NETWORK_DEF = {
    "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [8, 16], "strides": [2], "num_res_units": 1,
}  # fmt: skip

INFERENCE = {
    "imports": ["$import glob"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/nonexistent",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cpu')",
    "network_def": NETWORK_DEF,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 300, "b_min": 0, "b_max": 1,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 2, "overlap": 0.25},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "resample": False, "separate_folder": False, "print_log": False},
    ]},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                  "load_dict": {"model": "@network"}}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers", "amp": False},
}  # fmt: skip

METADATA = {
    "name": "Tiny sphere bundle",
    "version": "0.1.0",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1, "spatial_shape": [32, 32, 32]}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "sphere"}}},
    },
}


def _train_tiny_unet() -> UNet:
    """A few dozen steps on random sphere phantoms, enough for outputs that are not noise."""
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    network = UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"})
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    coords = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), axis=-1)
    for _ in range(60):
        images, targets = [], []
        for _ in range(2):
            center = generator.uniform(6, 26, size=3)
            radius = generator.uniform(4, 10)
            mask = np.linalg.norm(coords - center, axis=-1) <= radius
            image = np.where(mask, 300.0, 30.0) + generator.normal(0, 20, mask.shape)
            images.append(np.clip(image / 300.0, 0, 1)[None])
            targets.append(mask[None])
        x = torch.tensor(np.stack(images), dtype=torch.float32)
        y = torch.tensor(np.stack(targets), dtype=torch.long)[:, 0]
        loss = torch.nn.functional.cross_entropy(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle") / "tiny_sphere"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=1))
    torch.save(_train_tiny_unet().state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    grid = oblique_grid(shape_kji=(24, 64, 52))
    center = grid_center(grid) + np.array([3.0, -2.0, 4.0])
    volume, truth = sphere_volume(center, 12.0, grid, inside=300.0, outside=30.0)
    noisy = volume.array + np.random.default_rng(1).normal(0, 15, volume.array.shape).astype(np.float32)
    folder = tmp_path_factory.mktemp("data")
    nib.save(nib.Nifti1Image(noisy.transpose(2, 1, 0), volume.ijk_to_ras), folder / "case.nii.gz")
    # Both tools read the same file: the NIfTI header stores the matrix in float32, and MONAI's Spacingd
    # aligns its output grid differently for matrices that differ in the 8th digit.
    volume = VolumeArray(noisy, nib.load(folder / "case.nii.gz").affine)
    return folder, volume, truth, grid, center


def _reference_labels(bundle: Path, data_folder: Path, output: Path) -> np.ndarray:
    """The bundle's own inference workflow (its evaluator, its transforms, its SaveImaged)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["dataset_dir"] = str(data_folder)
    parser["output_dir"] = str(output)
    parser.get_parsed_content("evaluator").run()
    (written,) = list(output.glob("*.nii.gz"))
    image = nib.load(written)
    return np.asarray(image.dataobj).squeeze().transpose(2, 1, 0), image.affine


def test_bundle_agrees_with_its_own_inference_workflow(bundle, phantom, tmp_path):
    data_folder, volume, truth, grid, center = phantom
    reference, reference_affine = _reference_labels(bundle, data_folder, tmp_path / "eval")
    np.testing.assert_allclose(reference_affine, volume.ijk_to_ras, atol=1e-4)

    result = segment(volume, bundle, SegmentationOptions(device="cpu"), cache=ModelCache())
    assert [(info.value, info.name) for info in result.label_table] == [(1, "sphere")]
    assert result.labels.shape == volume.array.shape
    assert reference.any()
    agreement = dice(result.labels == 1, reference == 1)
    print(f"bundle Dice vs MONAI workflow: {agreement:.4f}; timings {result.timings}")
    assert agreement >= 0.99
    # ...and the segment is on the sphere, in physical space.
    assert dice(result.labels == 1, truth) > 0.8
    segment_ras = ras_of_voxels(*grid)[result.labels == 1]
    assert np.linalg.norm(segment_ras.mean(axis=0) - center) < 1.5


def test_zipped_bundle_runs_and_a_traversing_zip_is_refused(bundle, phantom, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEG_CACHE_DIR", str(tmp_path / "unpacked"))
    _, volume, truth, _, _ = phantom
    archive = tmp_path / "tiny_sphere.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in bundle.rglob("*"):
            if path.is_file():
                zf.write(path, f"tiny_sphere/{path.relative_to(bundle).as_posix()}")
    result = segment(volume, archive, SegmentationOptions(device="cpu"), cache=ModelCache())
    assert dice(result.labels == 1, truth) > 0.8

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("tiny_sphere/configs/inference.json", "{}")
        zf.writestr("../../escaped.json", "{}")
    with pytest.raises(UnsafeArchiveError):
        load_model(evil)
    assert not (tmp_path / "escaped.json").exists()


def _bundle_copy(bundle: Path, tmp_path: Path, inference: dict) -> Path:
    import shutil

    copy_root = tmp_path / "bundle"
    shutil.copytree(bundle, copy_root)
    (copy_root / "configs" / "inference.json").write_text(json.dumps(inference))
    return copy_root


def test_bundle_naming_an_unknown_class_is_a_clear_error(bundle, tmp_path):
    inference = copy.deepcopy(INFERENCE)
    inference["network_def"]["_target_"] = "HyperUNetThatDoesNotExist"
    with pytest.raises(ModelFormatError, match="not a MONAI component"):
        load_model(_bundle_copy(bundle, tmp_path, inference))


def test_bundle_code_outside_monai_needs_trust(bundle, tmp_path):
    inference = copy.deepcopy(INFERENCE)
    inference["preprocessing"]["transforms"].append({"_target_": "os.system", "command": "echo owned"})
    with pytest.raises(ModelFormatError, match="--trust-code"):
        load_model(_bundle_copy(bundle, tmp_path, inference))
    inference = copy.deepcopy(INFERENCE)
    inference["network_def"]["channels"] = "$__import__('os').getcwd() and [8, 16]"
    with pytest.raises(ModelFormatError, match="--trust-code"):
        load_model(_bundle_copy(bundle, tmp_path / "2", inference))


def test_truncated_bundle_weights_are_a_clear_error(bundle, tmp_path):
    copy_root = _bundle_copy(bundle, tmp_path, INFERENCE)
    weights = copy_root / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(copy_root)


@pytest.mark.parametrize("padding_mode", ["replicate", "constant", "reflect"])
def test_the_sliding_window_pads_as_the_bundles_inferer_does(padding_mode):
    """A bundle's SlidingWindowInferer says how an image smaller than a window is padded (wholeBody_ct_segmentation
    replicates its border); DeepSeg's window must give MONAI's own outputs for each mode, not zero padding's."""
    from DeepSegModuleLib.labels import LabelInfo
    from DeepSegModuleLib.models.description import InputSpec, LoadedModel, ModelDescription, ModelFormat
    from DeepSegModuleLib.segmentation.inference import sliding_window_predict
    from monai.inferers import SlidingWindowInferer

    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, kernel_size=5, padding=2).eval()  # sees 2 voxels past every edge
    description = ModelDescription(
        name="padding probe", format=ModelFormat.TORCHSCRIPT, inputs=[InputSpec("image")],
        labels=[LabelInfo(1, "x")], channel_to_label=[0, 1], patch_size=(16, 16, 16),
    )  # fmt: skip
    model = LoadedModel(description, network, torch.device("cpu"), networks=[network])
    image = torch.rand(1, 1, 11, 13, 9) + 1.0  # smaller than a window along every axis, far from zero
    ours = sliding_window_predict(image, model, overlap=0.25, sw_batch_size=1, precision="fp32",
                                  blend_mode="constant", padding_mode=padding_mode)  # fmt: skip
    with torch.inference_mode():
        theirs = SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.25, mode="constant",
                                      padding_mode=padding_mode)(image, network)  # fmt: skip
        zero_padded = SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.25, mode="constant")(image, network)
    torch.testing.assert_close(ours, torch.as_tensor(theirs), atol=1e-5, rtol=1e-5)
    if padding_mode != "constant":
        assert (torch.as_tensor(zero_padded) - torch.as_tensor(theirs)).abs().max() > 1e-2  # the mode matters here


def test_a_bundle_that_pads_by_replicating_agrees_with_its_own_workflow(bundle, phantom, tmp_path):
    """One window larger than the image, padded as the bundle's inferer says: DeepSeg's labels are MONAI's."""
    inference = copy.deepcopy(INFERENCE)
    inference["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 1,
                            "overlap": 0.25, "padding_mode": "replicate", "mode": "constant"}  # fmt: skip
    replicating = _bundle_copy(bundle, tmp_path, inference)
    data_folder, volume, _, _, _ = phantom
    reference, _ = _reference_labels(replicating, data_folder, tmp_path / "eval")
    result = segment(volume, replicating, SegmentationOptions(device="cpu", precision="fp32"), cache=ModelCache())
    assert reference.any() and dice(result.labels == 1, reference == 1) >= 0.99
    assert np.mean(result.labels == reference) >= 0.999


def test_a_bundle_of_overlapping_regions_is_refused_not_misnamed(bundle, tmp_path):
    """BraTS-style outputs (tumour core, whole tumour, enhancing tumour) become label values the metadata does not
    name (1, 2, 4): refused with the reason, instead of regions named after the wrong channels."""
    regions = copy.deepcopy(METADATA)
    regions["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "Tumor core", "1": "Whole tumor"}
    copied = _bundle_copy(bundle, tmp_path, INFERENCE)
    (copied / "configs" / "metadata.json").write_text(json.dumps(regions))
    with pytest.raises(ModelFormatError, match="overlapping regions .Tumor core, Whole tumor."):
        load_model(copied)


def test_a_2d_bundle_is_refused_with_the_reason(bundle, tmp_path):
    flat = copy.deepcopy(INFERENCE)
    flat["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": [256, 256], "sw_batch_size": 1}
    with pytest.raises(ModelFormatError, match="segments 2D images"):
        load_model(_bundle_copy(bundle, tmp_path, flat))
