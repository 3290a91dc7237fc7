"""README's first command: `deepseg demo` registers two real brain MRIs and writes files Slicer opens."""

from __future__ import annotations

import numpy as np
import pytest

from DeepSegModuleLib import cli, nodes, segments, storage
from DeepSegModuleLib.context import SceneContext
from DeepSegModuleLib.demo import TISSUE_LABELS


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--output", str(output)]) == 0
    return output


def test_demo_scene_opens_with_the_registration_and_segments_on_the_subject(demo_output):
    context = SceneContext.headless()
    added = storage.load_scene_bundle(context, demo_output / "deepseg-demo.mrb")
    by_name = {node.GetName(): node for node in added if node.IsA("vtkMRMLStorableNode")}
    subject = by_name["subject T1"]
    tissues = by_name["subject tissues (from the template)"]
    assert any(node.IsA("vtkMRMLGridTransformNode") for node in added)

    labels, _, table = segments.segmentation_to_labels(context, tissues, subject)
    assert [info.name for info in table] == [info.name for info in TISSUE_LABELS]
    for info in table:
        assert "SCT^" in info.terminology
    # The template's tissue classes, carried onto the subject, fall on the subject's own tissue: on a T1 white
    # matter is brighter than grey matter, and both are brighter than the ventricles/background they replace.
    subject_array, _ = nodes.volume_to_array(subject)
    grey, white = subject_array[labels == 1], subject_array[labels == 2]
    assert grey.size > 5000 and white.size > 5000
    assert np.median(white) > 1.1 * np.median(grey)


def test_demo_transform_file_moves_points_as_the_scene_does(demo_output):
    import SimpleITK as sitk

    context = SceneContext.headless()
    transform = storage.load_transform(context, demo_output / "MNI152_to_subject.h5")
    itk_transform = sitk.ReadTransform(str(demo_output / "MNI152_to_subject.h5"))
    subject = storage.load_volume(context, demo_output / "subject_T1.nrrd")
    _, grid = nodes.volume_to_array(subject)
    lps = np.array([-1.0, -1.0, 1.0])
    for ijk in ([16, 20, 12], [10, 30, 5], [25, 8, 20]):  # voxel centres of the subject (the field's grid)
        point = (grid @ [*ijk, 1.0])[:3]
        moved = nodes.transform_points(transform, point)[0]
        np.testing.assert_allclose(np.array(itk_transform.TransformPoint((point * lps).tolist())) * lps, moved, atol=1e-3)


def test_demo_files_are_slicer_files(demo_output):
    context = SceneContext.headless()
    segmentation = storage.load_segmentation(context, demo_output / "subject_tissues.seg.nrrd")
    names = [segmentation.GetSegmentation().GetNthSegment(n).GetName() for n in range(2)]
    assert names == ["grey matter", "white matter"]
    registered = storage.load_volume(context, demo_output / "MNI152_on_subject.nrrd")
    subject = storage.load_volume(context, demo_output / "subject_T1.nrrd")
    np.testing.assert_allclose(nodes.volume_to_array(registered)[1], nodes.volume_to_array(subject)[1], atol=1e-5)


def test_demo_segments_the_template_with_the_bundled_model_where_its_own_maps_put_the_brain(demo_output):
    context = SceneContext.headless()
    added = storage.load_scene_bundle(context, demo_output / "deepseg-demo.mrb")
    by_name = {node.GetName(): node for node in added if node.IsA("vtkMRMLStorableNode")}
    template = by_name["MNI152 T1"]
    labels, _, table = segments.segmentation_to_labels(context, by_name["MNI152 tissues (deepseg-brain model)"], template)
    assert [info.name for info in table] == ["cerebrospinal fluid", "grey matter", "white matter"]
    assert all("SCT^" in info.terminology for info in table)
    # The same file, read on its own, has the segments too.
    segmentation = storage.load_segmentation(context, demo_output / "MNI152_tissues_model.seg.nrrd")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    # The brain mask is where the template's own grey/white matter maps put the brain, and on this T1 the
    # model's white matter is brighter than its grey matter, its grey matter brighter than its CSF.
    reference, _, _ = segments.segmentation_to_labels(context, by_name["MNI152 tissues"], template)
    brain, model_brain = reference > 0, labels > 0
    assert 2.0 * (brain & model_brain).sum() / (brain.sum() + model_brain.sum()) > 0.85
    t1, _ = nodes.volume_to_array(template)
    csf, grey, white = (np.median(t1[labels == value]) for value in (1, 2, 3))
    assert white > grey > csf


def test_demo_pictures_show_the_segments(demo_output):
    from PIL import Image

    picture = np.asarray(Image.open(demo_output / "preview.png").convert("RGB")).astype(int)
    assert picture.shape[0] > 200 and picture.shape[1] > 500
    # Grey anatomy has no colour; the segment overlays tint a large part of the brain.
    anatomy = picture.sum(axis=-1) > 60
    tinted = (picture.max(axis=-1) - picture.min(axis=-1)) > 20
    assert anatomy.mean() > 0.15
    assert (tinted & anatomy).sum() > 0.3 * anatomy.sum()
    assert (demo_output / "registration.png").stat().st_size > 10_000
    assert (demo_output / "segmentation.png").stat().st_size > 10_000


def test_demo_reports_json_and_fails_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--output", str(blocker / "inside")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "choose another --output" in error[0]
    assert cli.main(["demo", "--no-such-option"]) == 2
