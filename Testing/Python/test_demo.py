"""README's first command: `deepseg demo` builds a scene from a real brain MRI and writes files Slicer opens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DeepSegModuleLib import cli, nodes, storage
from DeepSegModuleLib.context import SceneContext
from DeepSegModuleLib.demo import TISSUE_LABELS


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--output", str(output)]) == 0
    return output


def test_demo_scene_opens_with_named_segments_inside_the_head(demo_output):
    context = SceneContext.headless()
    added = storage.load_scene_bundle(context, demo_output / "deepseg-demo.mrb")
    by_class = {}
    for node in added:
        by_class.setdefault(node.GetClassName(), []).append(node)
    segmentation = by_class["vtkMRMLSegmentationNode"][0]
    t1 = next(node for node in by_class["vtkMRMLScalarVolumeNode"] if node.GetName() == "MNI152 T1")

    labels, _, table = nodes.segmentation_to_labels(context, segmentation, t1)
    assert [info.name for info in table] == [info.name for info in TISSUE_LABELS]
    for info in table:
        assert "SCT^" in info.terminology

    # White matter is brighter than grey matter on a T1, and both sit inside the head (T1 signal).
    t1_array, _ = nodes.volume_to_array(t1)
    grey, white = t1_array[labels == 1], t1_array[labels == 2]
    assert white.mean() > grey.mean() > t1_array[labels == 0].mean()
    # Adult brain tissue volumes at 1 mm: several hundred millilitres each.
    assert 300_000 < grey.size < 1_500_000 and 300_000 < white.size < 1_200_000


def test_demo_files_are_slicer_files(demo_output):
    context = SceneContext.headless()
    segmentation = storage.load_segmentation(context, demo_output / "MNI152_tissues.seg.nrrd")
    names = [segmentation.GetSegmentation().GetNthSegment(n).GetName() for n in range(2)]
    assert names == ["grey matter", "white matter"]
    label_map = storage.load_volume(context, demo_output / "MNI152_tissues.nii.gz", labelmap=True)
    values = np.unique(nodes.volume_to_array(label_map)[0])
    assert values.tolist() == [0, 1, 2]


def test_demo_reports_json_and_fails_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--output", str(blocker / "inside")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "choose another --output" in error[0]
    assert cli.main(["demo", "--no-such-option"]) == 2


def test_demo_preview_picture_shows_the_segments(demo_output):
    from PIL import Image

    picture = np.asarray(Image.open(demo_output / "preview.png").convert("RGB")).astype(int)
    assert picture.shape[0] > 200 and picture.shape[1] > 500
    # Grey anatomy has no colour; the segment overlays tint a large part of the head.
    anatomy = picture.sum(axis=-1) > 60
    tinted = (picture.max(axis=-1) - picture.min(axis=-1)) > 20
    assert anatomy.mean() > 0.15
    assert (tinted & anatomy).sum() > 0.3 * anatomy.sum()
