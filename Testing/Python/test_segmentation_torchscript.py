"""The segmentation engine on TorchScript + model-card models whose right answer is known."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepSegModuleLib.models import (
    LoadedModel,
    ModelCache,
    ModelFileError,
    ModelFormatError,
    ModelMismatchError,
    load_model,
)
from DeepSegModuleLib.segmentation import (
    SegmentationCancelled,
    SegmentationOptions,
    VolumeArray,
    segment,
    segment_with_models,
)
from segmentation_helpers import (
    EdgeAlongFirstAxis,
    Thresholder,
    dice,
    grid_center,
    oblique_grid,
    ras_of_voxels,
    sphere_volume,
    write_torchscript_model,
)

CPU = SegmentationOptions(device="cpu")


@pytest.fixture(scope="module")
def sphere_case():
    grid = oblique_grid()
    center = grid_center(grid) + np.array([2.0, -1.5, 1.0])
    volume, truth = sphere_volume(center, 9.0, grid)
    return grid, center, volume, truth


@pytest.fixture(scope="module")
def thresholder_card(tmp_path_factory) -> Path:
    return write_torchscript_model(tmp_path_factory.mktemp("thresholder"), Thresholder())


def test_sphere_segment_lands_on_the_sphere_of_an_oblique_anisotropic_volume(sphere_case, thresholder_card):
    grid, center, volume, truth = sphere_case
    result = segment(volume, thresholder_card, CPU, cache=ModelCache())

    assert result.labels.shape == volume.array.shape
    np.testing.assert_array_equal(result.ijk_to_ras, volume.ijk_to_ras)
    assert dice(result.labels == 1, truth) > 0.95
    segment_ras = ras_of_voxels(*grid)[result.labels == 1]
    assert np.linalg.norm(segment_ras.mean(axis=0) - center) < 0.6  # mm; voxels are up to 3 mm thick
    assert np.linalg.norm(segment_ras - center, axis=1).max() < 9.0 + 2.0


def test_label_names_colours_and_terminology_come_from_the_card(sphere_case, thresholder_card):
    _, _, volume, _ = sphere_case
    result = segment(volume, thresholder_card, CPU, cache=ModelCache())
    card = json.loads(thresholder_card.read_text())
    (info,) = result.label_table
    assert info.value == 1
    assert info.name == card["labels"][0]["name"]
    assert info.color == tuple(card["labels"][0]["color"])
    assert "SCT^4147007^Mass" in info.terminology_string()
    assert set(result.timings) >= {"load", "preprocess", "inference", "resample", "postprocess", "total"}
    assert result.peak_memory["process_peak_rss_bytes"] > 0


@pytest.mark.parametrize(
    ("orientation", "expected_direction"),
    [("RAS", [1, 0, 0]), ("LPS", [-1, 0, 0]), ("PLS", [0, -1, 0]), ("SRA", [0, 0, 1])],
)
def test_model_grid_axes_point_where_the_card_says(tmp_path, sphere_case, orientation, expected_direction):
    # The network marks where intensity drops along its first input axis, i.e. the sphere's edge on the
    # side that axis points to: R for an RAS model, L for LPS, P for PLS, S for SRA.
    grid, center, volume, _ = sphere_case
    card = write_torchscript_model(tmp_path, EdgeAlongFirstAxis(), {"orientation": orientation, "spacing": [1, 1, 1]})
    result = segment(volume, card, CPU, cache=ModelCache())
    offset = ras_of_voxels(*grid)[result.labels == 1].mean(axis=0) - center
    assert float(offset @ np.array(expected_direction, dtype=float)) > 4.0


def test_second_run_with_the_same_model_skips_loading(sphere_case, thresholder_card):
    _, _, volume, _ = sphere_case
    cache = ModelCache()
    first = segment(volume, thresholder_card, CPU, cache=cache)
    second = segment(volume, thresholder_card, CPU, cache=cache)
    assert (first.model_from_cache, second.model_from_cache) == (False, True)
    assert cache.loads == 1 and cache.hits == 1
    assert second.timings["load"] == 0.0
    np.testing.assert_array_equal(first.labels, second.labels)


def test_changed_model_file_is_loaded_again(tmp_path, sphere_case):
    _, _, volume, _ = sphere_case
    card = write_torchscript_model(tmp_path, Thresholder(threshold=150.0))
    cache = ModelCache()
    assert segment(volume, card, CPU, cache=cache).labels.any()
    time.sleep(0.01)
    write_torchscript_model(tmp_path, Thresholder(threshold=1000.0))  # nothing is that bright
    again = segment(volume, card, CPU, cache=cache)
    assert cache.loads == 2 and not again.model_from_cache
    assert not again.labels.any()


def test_truncated_weights_give_a_clear_error(tmp_path):
    card = write_torchscript_model(tmp_path, Thresholder())
    weights = tmp_path / "model.ts"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(card)


def test_card_checksum_mismatch_is_refused(tmp_path):
    card = write_torchscript_model(tmp_path, Thresholder(), {"sha256": "0" * 64})
    with pytest.raises(ModelFileError, match="sha256"):
        load_model(card)


def test_card_with_more_labels_than_the_network_outputs_is_a_clear_error(tmp_path, sphere_case):
    _, _, volume, _ = sphere_case
    labels = [{"value": 1, "name": "Sphere"}, {"value": 2, "name": "Shell"}]
    card = write_torchscript_model(tmp_path, Thresholder(), {"labels": labels})
    with pytest.raises(ModelMismatchError, match="2 output channels|3 output channels"):
        segment(volume, card, CPU, cache=ModelCache())


@pytest.mark.parametrize(
    ("change", "message"),
    [({"deepseg_model_card": 7}, "deepseg_model_card"), ({"patch_size": [16, 16]}, "patch_size"),
     ({"orientation": "RAR"}, "orientation"), ({"labels": [{"value": 0, "name": "x"}]}, "value")],
)  # fmt: skip
def test_bad_cards_are_reported(tmp_path, change, message):
    card = write_torchscript_model(tmp_path, Thresholder(), change)
    with pytest.raises(ModelFormatError, match=message):
        load_model(card)


def test_bad_inputs_name_the_fix(sphere_case, thresholder_card):
    _, _, volume, _ = sphere_case
    with pytest.raises(ValueError, match="takes 1 input"):
        segment([volume, volume], thresholder_card, CPU)
    nan_volume = VolumeArray(np.where(volume.array > 0, np.nan, 0).astype(np.float32), volume.ijk_to_ras)
    with pytest.raises(ValueError, match="NaN"):
        segment(nan_volume, thresholder_card, CPU)
    flat = VolumeArray(volume.array[:1], volume.ijk_to_ras)
    with pytest.raises(ValueError, match="2D"):
        segment(flat, thresholder_card, CPU)
    with pytest.raises(ValueError, match="no label named"):
        segment(volume, thresholder_card, SegmentationOptions(device="cpu", labels=["Liver"]))


def test_multi_input_model_uses_every_input_resampled_onto_the_first(tmp_path, sphere_case):
    # Channel 2 (on a different, axis-aligned grid) carries the sphere; channel 1 is blank.
    _, center, volume, truth = sphere_case

    class SecondChannel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            score = (x[:, 1:2] - 150.0) / 50.0
            return torch.cat([-score, score], dim=1)

    second_ijk_to_ras = np.diag([1.3, 1.3, 1.3, 1.0])
    second_ijk_to_ras[:3, 3] = center - 19.5  # a 39 mm cube around the sphere
    second_grid = ((30, 30, 30), second_ijk_to_ras)
    second, _ = sphere_volume(center, 9.0, second_grid)
    blank = VolumeArray(np.zeros_like(volume.array), volume.ijk_to_ras)
    inputs = [{"name": "T1", "modality": "MR"}, {"name": "T2", "modality": "MR"}]
    card = write_torchscript_model(tmp_path, SecondChannel(), {"inputs": inputs})
    result = segment([blank, second], card, CPU, cache=ModelCache())
    assert result.labels.shape == blank.array.shape
    assert dice(result.labels == 1, truth) > 0.9


def test_keep_only_requested_labels_and_probabilities(tmp_path, sphere_case):
    _, _, volume, truth = sphere_case
    labels = [{"value": 1, "name": "Sphere"}, {"value": 2, "name": "Never"}]
    card = write_torchscript_model(tmp_path, Thresholder(classes=3), {"labels": labels})
    options = SegmentationOptions(device="cpu", labels=["Never"], probabilities=True)
    result = segment(volume, card, options, cache=ModelCache())
    assert [info.name for info in result.label_table] == ["Never"]
    assert not result.labels.any()
    assert set(result.probabilities) == {2}
    assert result.probabilities[2].shape == volume.array.shape and result.probabilities[2].dtype == np.float32

    everything = segment(volume, card, SegmentationOptions(device="cpu", probabilities=True))
    sphere_probability = everything.probabilities[1]
    assert sphere_probability[truth].mean() > 0.8 and sphere_probability[~truth].mean() < 0.2


def test_cleanup_keeps_the_largest_component_and_drops_specks(tmp_path):
    grid = ((24, 40, 40), np.diag([1.0, 1.0, 2.0, 1.0]))
    big, big_truth = sphere_volume(np.array([12.0, 20.0, 24.0]), 7.0, grid)
    speck, _ = sphere_volume(np.array([30.0, 8.0, 24.0]), 2.0, grid)
    volume = VolumeArray(np.maximum(big.array, speck.array), big.ijk_to_ras)
    card = write_torchscript_model(tmp_path, Thresholder(), {"orientation": None, "spacing": None})
    cache = ModelCache()
    raw = segment(volume, card, CPU, cache=cache)
    assert (raw.labels == 1).sum() > (big_truth).sum()
    largest = segment(volume, card, SegmentationOptions(device="cpu", keep_largest_component=True), cache=cache)
    assert dice(largest.labels == 1, big_truth) > 0.97
    no_specks = segment(volume, card, SegmentationOptions(device="cpu", min_component_mm3=200.0), cache=cache)
    np.testing.assert_array_equal(no_specks.labels, largest.labels)


def test_out_of_memory_falls_back_to_one_window_at_a_time(sphere_case, thresholder_card):
    _, _, volume, truth = sphere_case
    real = load_model(thresholder_card)

    def picky_network(windows: torch.Tensor) -> torch.Tensor:
        if windows.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real.predictor(windows)

    model = LoadedModel(description=real.description, predictor=picky_network, device=torch.device("cpu"))
    result = segment(volume, model, SegmentationOptions(device="cpu", sw_batch_size=4))
    assert any("one window at a time" in line for line in result.messages)
    assert dice(result.labels == 1, truth) > 0.95


def test_out_of_memory_after_every_fallback_is_a_clear_error(sphere_case, thresholder_card):
    _, _, volume, _ = sphere_case
    real = load_model(thresholder_card)

    def hopeless(windows: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("out of memory")

    model = LoadedModel(description=real.description, predictor=hopeless, device=torch.device("cpu"))
    with pytest.raises(MemoryError, match="crop the volume"):
        segment(volume, model, SegmentationOptions(device="cpu", sw_batch_size=2))


def test_cancel_stops_the_run_and_progress_is_reported(sphere_case, thresholder_card):
    _, _, volume, _ = sphere_case
    stages: list[tuple[str, float]] = []
    segment(volume, thresholder_card, CPU, progress=lambda s, f: stages.append((s, f)), cache=ModelCache())
    assert [s for s, _ in stages if s == "inference"] and ("postprocess", 1.0) in stages
    assert max(f for s, f in stages if s == "inference") == 1.0
    with pytest.raises(SegmentationCancelled):
        segment(volume, thresholder_card, CPU, cancel=lambda: True, cache=ModelCache())


def test_mirroring_averages_flipped_predictions(tmp_path, sphere_case):
    # The edge detector is not mirror-symmetric: mirroring along its axis marks both edges weakly,
    # so the averaged logits no longer cross the threshold on one side only.
    _, _, volume, _ = sphere_case
    card = write_torchscript_model(tmp_path, EdgeAlongFirstAxis(), {"spacing": [1, 1, 1], "mirror_axes": [0]})
    cache = ModelCache()
    plain = segment(volume, card, CPU, cache=cache)
    mirrored = segment(volume, card, SegmentationOptions(device="cpu", mirroring=True), cache=cache)
    assert plain.labels.sum() > 0
    assert mirrored.labels.sum() < plain.labels.sum()


def test_several_models_merge_into_one_segmentation(tmp_path):
    # A sphere of 200 with a core of 400: the first model labels > 100 ("Sphere"), the second > 300
    # ("Core", and a second "Sphere" that gets its model's name). Earlier models win overlapping voxels.
    grid = oblique_grid()
    center = grid_center(grid)
    outer, outer_truth = sphere_volume(center, 9.0, grid, inside=200.0)
    core, core_truth = sphere_volume(center, 5.0, grid, inside=400.0)
    volume = VolumeArray(np.maximum(outer.array, core.array), outer.ijk_to_ras)
    first = write_torchscript_model(tmp_path / "first", Thresholder(threshold=100.0), {"name": "Whole"})
    second_labels = [{"value": 1, "name": "Core", "color": [0, 0, 1]}, {"value": 2, "name": "Sphere"}]
    second = write_torchscript_model(
        tmp_path / "second", Thresholder(threshold=300.0, classes=3), {"name": "Parts", "labels": second_labels}
    )
    cache = ModelCache()
    merged = segment_with_models(volume, [first, second], CPU, cache=cache)
    assert [(i.value, i.name) for i in merged.label_table] == [(1, "Sphere"), (2, "Core"), (3, "Parts: Sphere")]
    assert merged.label_table[1].color == (0.0, 0.0, 1.0)
    assert dice(merged.labels == 1, outer_truth) > 0.95  # the first model keeps its voxels
    assert not (merged.labels == 2).any()  # the core lies inside the first model's sphere
    again = segment_with_models(volume, [first, second], CPU, cache=cache)
    assert again.model_from_cache and cache.loads == 2

    core_first = segment_with_models(volume, [second, first], SegmentationOptions(device="cpu", labels=["Core"]))
    assert [i.name for i in core_first.label_table] == ["Core"]
    assert dice(core_first.labels == 1, core_truth) > 0.85


def test_image_smaller_than_the_patch_is_padded(tmp_path):
    grid = ((6, 9, 8), np.diag([1.5, 1.5, 1.5, 1.0]))
    volume, truth = sphere_volume(np.array([5.0, 6.0, 4.0]), 3.5, grid)
    card = write_torchscript_model(tmp_path, Thresholder(), {"patch_size": [32, 32, 32]})
    result = segment(volume, card, CPU, cache=ModelCache())
    assert result.labels.shape == volume.array.shape
    assert dice(result.labels == 1, truth) > 0.9
