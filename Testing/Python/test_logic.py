"""The headless logic end to end: volume nodes in, engine in the worker, segment / transform nodes out."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from DeepSegModuleLib import nodes, segments
from DeepSegModuleLib.jobs import InProcessWorker, JobFailed, ProcessWorker
from DeepSegModuleLib.logic import DeepSegLogic
from DeepSegModuleLib.registration.presets import RegistrationOptions
from DeepSegModuleLib.segmentation.options import SegmentationOptions
from segmentation_helpers import Thresholder, dice, grid_center, oblique_grid, sphere_volume, write_torchscript_model


@pytest.fixture(scope="module")
def sphere_model(tmp_path_factory):
    return write_torchscript_model(tmp_path_factory.mktemp("model"), Thresholder())


@pytest.fixture(scope="module")
def process_worker():
    worker = ProcessWorker()
    yield worker
    worker.shutdown()


def sphere_case(context):
    grid = oblique_grid()
    volume, truth = sphere_volume(grid_center(grid) + [3.0, -2.0, 1.0], 9.0, grid)
    node = nodes.array_to_volume(context, volume.array, volume.ijk_to_ras, name="CT")
    return node, truth


def test_segment_in_the_persistent_worker_puts_the_segment_on_the_sphere(context, sphere_model, process_worker):
    volume, truth = sphere_case(context)
    logic = DeepSegLogic(context, process_worker)
    events = []
    options = SegmentationOptions(device="cpu", probabilities=True)
    run = logic.start_segment(volume, str(sphere_model), options, on_event=events.append)
    while not run.poll():
        pass
    outcome = run.outcome
    segmentation = outcome.segmentation
    labels, _, table = segments.segmentation_to_labels(context, segmentation, volume)
    assert [info.name for info in table] == ["Sphere"]
    assert dice(labels == 1, truth) > 0.9
    assert segmentation.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx((0.9, 0.2, 0.1))
    probability, _ = nodes.volume_to_array(outcome.probabilities["Sphere"])
    assert probability[truth].mean() > 0.9 and probability[~truth].mean() < 0.1
    assert {event.stage for event in events if event.kind == "progress"} >= {"inference"}
    assert outcome.result.timings["total"] > 0
    assert outcome.result.labels.shape == nodes.volume_to_array(volume)[0].shape  # the engine's own label map

    again = logic.segment(volume, str(sphere_model), SegmentationOptions(device="cpu"), output_segmentation=segmentation)
    assert again.segmentation is segmentation and again.probabilities == {}
    assert again.result.model_from_cache is True  # the worker kept the model loaded
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1


def test_failed_run_leaves_the_scene_as_it_was(context, tmp_path):
    volume, _ = sphere_case(context)
    before = context.node_ids()
    logic = DeepSegLogic(context, InProcessWorker())
    from DeepSegModuleLib.models import ModelFileError

    with pytest.raises(ModelFileError, match="does not exist"):  # found before any work starts
        logic.segment(volume, str(tmp_path / "no-such-model.ts"), SegmentationOptions(device="cpu"))
    assert context.node_ids() == before
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "deepseg.json").write_text("{}")
    with pytest.raises(JobFailed):  # found by the worker when it loads the model
        logic.segment(volume, str(broken), SegmentationOptions(device="cpu"))
    assert context.node_ids() == before


def test_register_writes_a_transform_that_moves_points_like_the_engine(context, process_worker):
    """A rigid registration of a shifted sphere: the node maps fixed points onto the moving sphere."""
    spacing = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (32, 32, 32)
    grid = (shape, spacing)
    fixed_volume, _ = sphere_volume(np.array([31.0, 31.0, 31.0]), 10.0, grid)
    shift = np.array([4.0, -3.0, 2.0])
    moving_volume, _ = sphere_volume(np.array([31.0, 31.0, 31.0]) + shift, 10.0, grid)
    # Smooth the spheres a little so the similarity has a gradient to follow.
    from scipy.ndimage import gaussian_filter

    fixed_array = gaussian_filter(fixed_volume.array, 1.5)
    fixed = nodes.array_to_volume(context, fixed_array, spacing, name="fixed")
    moving = nodes.array_to_volume(context, gaussian_filter(moving_volume.array, 1.5), spacing, name="moving")

    options = RegistrationOptions(preset="rigid", device="cpu", inverse=True)
    outcome = DeepSegLogic(context, process_worker).register(fixed, moving, options)
    transform = outcome.transform
    assert transform.IsA("vtkMRMLLinearTransformNode")
    centre = np.array([31.0, 31.0, 31.0])
    np.testing.assert_allclose(nodes.transform_points(transform, centre)[0], centre + shift, atol=0.6)
    np.testing.assert_allclose(
        nodes.transform_points(outcome.inverse_transform, centre + shift)[0], centre, atol=0.6
    )
    registered, registered_grid = nodes.volume_to_array(outcome.volume)
    np.testing.assert_allclose(registered_grid, spacing)
    moving_array, _ = nodes.volume_to_array(moving)
    assert dice(moving_array > 150, fixed_array > 150) < 0.75  # before: clearly misaligned
    assert dice(registered > 150, fixed_array > 150) > 0.9  # after: on top of the fixed sphere
    assert outcome.segmentation is None and outcome.outputs.total_displacement_ras is None  # linear: a matrix
    assert outcome.quality.runtime_s["total"] > 0 and outcome.quality.lines()


def test_stored_model_ids_agree_with_the_model_store_without_importing_it(tmp_path, monkeypatch, sphere_model):
    """The panel lists stored models before torch may be installed; its listing must match the store's."""
    from DeepSegModuleLib.logic import stored_model_ids
    from DeepSegModuleLib.models.store import ModelStore

    store = ModelStore(tmp_path / "store")
    shipped = store.bundled_ids()  # the models shipped with DeepSeg are listed in every store
    assert stored_model_ids(store.root) == store.list_ids() == shipped
    store.import_model(sphere_model.parent / "model.ts", model_id="sphere")
    store.import_model(sphere_model.parent, model_id="sphere-folder")
    (store.root / "not-a-model").mkdir()
    expected = sorted(["sphere", "sphere-folder", *shipped])
    assert stored_model_ids(store.root) == store.list_ids() == expected

    monkeypatch.setenv("DEEPSEG_MODEL_DIR", str(store.root))
    assert stored_model_ids() == ModelStore().list_ids() == expected

    # What the panel does when it opens, in a fresh interpreter: list the store, and import neither torch nor MONAI.
    script = (
        "import sys\n"
        "from DeepSegModuleLib.logic import stored_model_ids\n"
        f"print(stored_model_ids({str(store.root)!r}))\n"
        "print(sorted(name for name in ('torch', 'monai') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [repr(expected), "[]"]


def test_segment_by_model_store_name_and_refuse_a_tampered_model(context, tmp_path, sphere_model):
    volume, truth = sphere_case(context)
    logic = DeepSegLogic(context, InProcessWorker(), model_store_root=tmp_path / "store")
    from DeepSegModuleLib.models.store import ModelStore

    shipped = ModelStore(tmp_path / "store").bundled_ids()  # the models that ship with DeepSeg are listed too
    assert logic.stored_model_ids() == shipped
    name = logic.import_model(sphere_model.parent / "model.ts", model_id="bright-sphere")
    assert name == "bright-sphere" and logic.stored_model_ids() == sorted([*shipped, "bright-sphere"])

    outcome = logic.segment(volume, "bright-sphere", SegmentationOptions(device="cpu"))
    labels, _, table = segments.segmentation_to_labels(context, outcome.segmentation, volume)
    assert [info.name for info in table] == ["Sphere"]
    assert dice(labels == 1, truth) > 0.9
    # A path is used as it is, and a name that is neither is left for the worker to report.
    assert logic.resolve_model(str(sphere_model)) == str(sphere_model)
    from DeepSegModuleLib.models import ModelFileError

    with pytest.raises(ModelFileError, match="neither a file or folder nor in the model store"):
        logic.resolve_model("no-such-model")

    weights = tmp_path / "store" / "bright-sphere" / "model.ts"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    before = context.node_ids()
    from DeepSegModuleLib.models.errors import ChecksumError

    with pytest.raises(ChecksumError, match="model.ts"):
        logic.start_segment(volume, "bright-sphere", SegmentationOptions(device="cpu"))
    assert context.node_ids() == before


def test_the_options_object_reaches_the_worker_unchanged_and_results_come_back_typed(context, sphere_model):
    """One options object from the caller to the engine: what the worker is given is the caller's object, with
    the same fields (it pickles); what comes back is the engine's typed result, not a dict."""
    import pickle

    from DeepSegModuleLib.segmentation.results import SegmentationResult

    volume, _ = sphere_case(context)
    worker = InProcessWorker()
    submitted = []
    submit = worker.submit
    worker.submit = lambda task, inputs, params: submitted.append(params) or submit(task, inputs, params)
    options = SegmentationOptions(device="cpu", overlap=0.25, labels=["Sphere"], precision="fp32")
    outcome = DeepSegLogic(context, worker).segment(volume, str(sphere_model), options)
    assert submitted[0]["options"] == options and pickle.loads(pickle.dumps(options)) == options
    assert isinstance(outcome.result, SegmentationResult)
    assert [info.name for info in outcome.result.label_table] == ["Sphere"]
    with pytest.raises(ValueError, match="overlap must be in 0..1"):
        DeepSegLogic(context, worker).start_segment(volume, str(sphere_model), SegmentationOptions(overlap=1.5))
    with pytest.raises(ValueError, match="precision must be one of"):
        DeepSegLogic(context, worker).start_segment(volume, str(sphere_model), SegmentationOptions(precision="fp8"))
    assert len(submitted) == 1  # refused before anything was sent
