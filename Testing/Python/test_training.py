"""The default brain model's training code: template labels, the synthetic-scan generator, a smoke run of the
training loop whose export loads and runs through the normal pipeline, and the evaluation's skip."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from DeepSegModuleLib.models.store import ModelStore
from DeepSegModuleLib.models.torchscript import load_torchscript_model
from DeepSegModuleLib.segmentation import SegmentationOptions, VolumeArray, segment
from DeepSegModuleLib.training import evaluate
from DeepSegModuleLib.training.data import (
    CSF,
    GENERATION_CLASSES,
    GREY_MATTER,
    OUTER_CSF,
    WHITE_MATTER,
    brain_hull,
    generation_to_target,
    template_labels,
)
from DeepSegModuleLib.training.synth import BrainSynth, SynthSettings
from DeepSegModuleLib.training.publish import publish
from DeepSegModuleLib.training.train import train, train_recipe

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def template():
    pytest.importorskip("nilearn")
    return template_labels(spacing=2)


def test_template_labels_are_a_plausible_brain(template):
    voxel_ml = 8.0 / 1000.0
    volumes = {value: float((template.labels == value).sum() * voxel_ml) for value in (CSF, GREY_MATTER, WHITE_MATTER)}
    brain_ml = sum(volumes.values())
    # The MNI152 2009 brain (cerebrum, cerebellum, brainstem) is roughly 1.5 to 2 litres.
    assert 1400 < brain_ml < 2200, volumes
    assert volumes[GREY_MATTER] > volumes[WHITE_MATTER] > volumes[CSF] > 50
    # The ventricles are CSF: the voxel at RAS (0, 0, 20) mm... lies between the lateral ventricles' bodies;
    # a lateral ventricle at RAS (+/-8, -5, 18) mm is CSF on at least one side.
    ras_to_ijk = np.linalg.inv(template.ijk_to_ras)
    ventricle_labels = []
    for x in (-8.0, 8.0):
        i, j, k = np.round(ras_to_ijk @ np.array([x, -5.0, 18.0, 1.0]))[:3].astype(int)
        ventricle_labels.append(int(template.labels[i, j, k]))
    assert CSF in ventricle_labels, ventricle_labels
    # Outside the brain there is nothing but air in the labels, and the distance map grows away from it.
    assert template.outside_mm[template.labels > 0].max() == 0
    assert template.outside_mm[0, 0, 0] > 50
    assert set(np.unique(generation_to_target(np.arange(GENERATION_CLASSES, dtype=np.uint8)))) == {0, 1, 2, 3}


def test_generator_is_seeded_normalised_and_labels_only_the_brain(template):
    settings = SynthSettings(crop=(32, 32, 32))
    first = BrainSynth(template, settings, seed=3).sample()
    again = BrainSynth(template, settings, seed=3).sample()
    other = BrainSynth(template, settings, seed=4).sample()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])

    stripped = BrainSynth(template, SynthSettings(crop=(32, 32, 32), skull_stripped_probability=1.0), seed=5)
    for _ in range(3):
        image, target = stripped.sample()
        assert image.shape == (1, 32, 32, 32) and target.shape == (1, 32, 32, 32)
        assert image.dtype == torch.float32 and target.dtype == torch.int64
        assert float(image.min()) == 0.0 and float(image.max()) == pytest.approx(1.0)
        assert set(torch.unique(target).tolist()) <= {0, 1, 2, 3}
        # Brain-extracted scans are zero outside the brain, as the real ones are.
        assert float(image[target == 0].abs().max()) == 0.0


def test_smoke_training_run_exports_a_model_the_normal_pipeline_runs(template, tmp_path):
    summary = train(tmp_path, iterations=3, crop=(32, 32, 32), seed=0, log_every=1, template=template)
    with (tmp_path / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == [1, 2, 3]
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert "iteration 3" in (tmp_path / "train.log").read_text()
    assert summary["iterations"] == 3 and 1_000_000 <= summary["parameters"] <= 3_000_000

    card = json.loads((tmp_path / "deepseg.json").read_text())
    assert "not for clinical use" in card["description"]
    loaded = load_torchscript_model(tmp_path)  # the normal TorchScript + card loader, sha256 checked
    assert [label.name for label in loaded.description.labels] == [
        "cerebrospinal fluid",
        "grey matter",
        "white matter",
    ]
    assert all(label.terminology for label in loaded.description.labels)

    # A small oblique volume in, a label map on its own grid out, through the engine the user runs.
    ijk_to_ras = np.diag([3.0, 3.0, 3.0, 1.0])
    ijk_to_ras[:3, 3] = (-40.0, -50.0, -30.0)
    volume = VolumeArray(np.random.default_rng(0).random((24, 30, 26)).astype(np.float32) * 100, ijk_to_ras)
    result = segment(volume, loaded, SegmentationOptions(device="cpu"))
    assert result.labels.shape == (24, 30, 26)
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}

    # Publishing puts it where the store finds shipped models, checksums recorded and verified.
    bundled = tmp_path / "bundled"
    manifest = publish(tmp_path, bundled / "smoke-brain", model_id="smoke-brain")
    assert set(manifest["files"]) == {"deepseg-brain.ts", "deepseg.json", "train.log", "loss.csv"}
    store = ModelStore(tmp_path / "user-store", bundled_root=bundled)
    assert store.list_ids() == ["smoke-brain"]
    stored = store.verify("smoke-brain")
    assert stored.bundled and load_torchscript_model(stored.model_path).description.labels[0].name == "cerebrospinal fluid"
    with pytest.raises(PermissionError, match="ships with DeepSeg"):
        store.remove("smoke-brain")
    with pytest.raises(FileExistsError, match="ships with DeepSeg"):
        store.import_model(tmp_path / "deepseg-brain.ts", model_id="smoke-brain")


def test_recipe_runs_its_stages_in_turn_and_exports_the_last(template, tmp_path):
    recipe = (
        {"name": "plain", "iterations": 2, "seed": 0, "learning_rate": 1e-3},
        {"name": "layered", "iterations": 1, "seed": 1, "learning_rate": 1e-3, "layered_head_probability": 1.0},
    )
    # float32: in bfloat16 a 32^3 crop (a 2^3 bottleneck) occasionally gave a NaN loss at iteration 2 on a fresh
    # machine (the shipped recipe's 96x112x96 crops never did); this test is about chaining the stages.
    result = train_recipe(tmp_path, recipe, crop=(32, 32, 32), template=template, precision="fp32")
    assert result["training"]["iterations"] == 3
    assert "initial_weights=" + str(tmp_path / "plain" / "checkpoint.pt") in (tmp_path / "layered" / "train.log").read_text()
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("stage,iteration") and [row.split(",")[:2] for row in rows[1:]] == [
        ["plain", "1"], ["plain", "2"], ["layered", "1"]
    ]
    card = json.loads((tmp_path / "deepseg.json").read_text())
    assert "layered_head_probability" in card["description"]
    # The exported network is the last stage's, not the first's.
    exported = dict(torch.jit.load(str(tmp_path / "deepseg-brain.ts")).state_dict())
    final = torch.load(tmp_path / "layered" / "checkpoint.pt", weights_only=True)
    first = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    changed = [name for name, value in final.items() if not torch.equal(value, first[name])]
    assert changed and all(torch.equal(exported[name], final[name]) for name in changed)


def test_layered_heads_paint_marrow_and_muscle_and_plain_heads_draw_as_before(template):
    plain = BrainSynth(template, SynthSettings(crop=(48, 48, 48)), seed=3)
    again = BrainSynth(template, SynthSettings(crop=(48, 48, 48), layered_head_probability=0.0), seed=3)
    torch.testing.assert_close(plain.sample()[0], again.sample()[0])
    layered = BrainSynth(template, SynthSettings(crop=(96, 112, 96), layered_head_probability=1.0), seed=3)
    labels, distance = layered._sample_geometry()
    head = layered._paint_head(labels, distance)
    # Other-tissue classes now also sit inside the head shells (marrow, muscle), not only beyond the scalp.
    near = (distance > 0) & (distance < 8)
    assert torch.isin(head[near], torch.tensor([7, 8])).any()


def test_hull_brain_ends_at_the_brain_surface_and_keeps_the_inner_csf(template):
    hull = template_labels(spacing=2, brain="hull")
    intracranial_brain = (template.labels >= CSF) & (template.labels <= WHITE_MATTER)
    hull_brain = (hull.labels >= CSF) & (hull.labels <= WHITE_MATTER)
    # Same head, same grid; the hull's brain is inside the intracranial one, the difference is outer CSF.
    assert hull.labels.shape == template.labels.shape and np.allclose(hull.ijk_to_ras, template.ijk_to_ras)
    assert not (hull_brain & ~intracranial_brain).any()
    outer = hull.labels == OUTER_CSF
    assert outer.any() and not (outer & ~intracranial_brain).any() and not (template.labels[outer] > CSF).all()
    lost_ml = float((intracranial_brain & ~hull_brain).sum() * 8 / 1000)
    assert 20 < lost_ml < 150, lost_ml  # a thin shell of a 1.9 litre brain
    # Grey matter is where it was (2 mm blocks split between CSF and outer CSF may vote differently at the
    # edge); the inner CSF stays CSF, the ventricles included.
    same_grey = (hull.labels == GREY_MATTER) & (template.labels == GREY_MATTER)
    assert same_grey.sum() > 0.97 * (template.labels == GREY_MATTER).sum()
    assert (hull.labels == CSF).sum() > 0.4 * (template.labels == CSF).sum()
    ras_to_ijk = np.linalg.inv(hull.ijk_to_ras)
    ventricles = [int(hull.labels[tuple(np.round(ras_to_ijk @ np.array([x, -5.0, 18.0, 1.0]))[:3].astype(int))]) for x in (-8.0, 8.0)]
    assert CSF in ventricles
    # The distance map (where the skull is painted) still starts at the intracranial surface.
    assert hull.outside_mm[outer].max() == 0
    assert set(np.unique(generation_to_target(hull.labels))) == {0, 1, 2, 3}
    # The hull bridges a gap narrower than the closing and fills an enclosed cavity.
    tissue = np.zeros((30, 30, 30), bool)
    tissue[5:25, 5:25, 5:13] = tissue[5:25, 5:25, 15:25] = True  # a 2-voxel cleft
    tissue[12:18, 12:18, 18:22] = False  # a cavity
    closed = brain_hull(tissue, closing_mm=3.0)
    assert closed[15, 15, 13:15].all() and closed[15, 15, 18:22].all() and not closed[2, 2, 2]
    with pytest.raises(ValueError, match="brain must be one of"):
        template_labels(spacing=2, brain="skull")


def test_outer_csf_takes_the_csf_intensity_when_tied(template):
    always = BrainSynth(template, SynthSettings(crop=(32, 32, 32), outer_csf_like_csf_probability=1.0), seed=7)
    never = BrainSynth(template, SynthSettings(crop=(32, 32, 32)), seed=7)
    tied = [always._class_intensities() for _ in range(20)]
    free = [never._class_intensities() for _ in range(20)]
    assert all(abs(means[OUTER_CSF] - means[CSF]) < 0.1 for means, _ in tied)
    assert max(abs(means[OUTER_CSF] - means[CSF]) for means, _ in free) > 0.2


def test_outer_csf_thickness_follows_its_setting(template):
    def outer_csf_voxels(thickness_mm: float) -> int:
        settings = SynthSettings(crop=(64, 64, 64), outer_csf_mm=(thickness_mm, thickness_mm), no_head_probability=0.0)
        synth = BrainSynth(template, settings, seed=11)
        labels, distance = synth._sample_geometry()
        return int((synth._paint_head(labels, distance) == OUTER_CSF).sum())

    thin, thick = outer_csf_voxels(1.0), outer_csf_voxels(6.0)
    assert thin > 0 and thick > 3 * thin, (thin, thick)


def test_publish_refuses_a_card_that_describes_other_weights(template, tmp_path):
    train(tmp_path / "model", iterations=1, crop=(32, 32, 32), seed=0, template=template)
    card_path = tmp_path / "model" / "deepseg.json"
    card = json.loads(card_path.read_text())
    card["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="export the model again"):
        publish(tmp_path / "model", tmp_path / "bundled" / "x", model_id="x")
    assert not (tmp_path / "bundled").exists()


def test_evaluation_skips_cleanly_without_the_sample_data(tmp_path):
    scores = evaluate.evaluate(tmp_path / "model", data=tmp_path / "no-such-folder")
    assert set(scores) == {"skipped"} and "no sample data" in scores["skipped"]
