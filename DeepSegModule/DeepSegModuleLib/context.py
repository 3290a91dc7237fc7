"""The scene and the module logics DeepSeg works with, passed explicitly to every Lib function.

Two builders:

* :meth:`SceneContext.from_application` inside a running 3D Slicer: wraps ``slicer.mrmlScene`` and the
  logics of the loaded modules. It is the only place in the Lib that reads Slicer's globals.
* :meth:`SceneContext.headless` anywhere ``slicer-core`` is installed (tests, the ``deepseg`` command,
  batch jobs): a new ``vtkMRMLScene`` with an application logic and the colors, volumes, segmentations,
  transforms and subject-hierarchy logics registered the way Slicer's module manager registers them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class SceneContext:
    """A MRML scene together with the module logics that operate on it.

    Attributes:
        scene: the ``vtkMRMLScene`` that nodes are read from and written to.
        app_logic: the application logic (``vtkSlicerApplicationLogic`` or Slicer's own).
        colors_logic: colour tables (needed by the volumes logic and for label colours).
        volumes_logic: volume creation, cloning and label-map helpers.
        segmentations_logic: segmentation import/export; its presence registers the segmentation
            converter rules (labelmap to surface and back).
        transforms_logic: transform hardening and helpers.
        subject_hierarchy_logic: the data tree the nodes appear in.
        is_headless: True when built by :meth:`headless` (no Slicer application around it).
    """

    scene: Any
    app_logic: Any
    colors_logic: Any
    volumes_logic: Any
    segmentations_logic: Any
    transforms_logic: Any
    subject_hierarchy_logic: Any
    is_headless: bool = False
    _keep_alive: list = field(default_factory=list, repr=False)

    @classmethod
    def headless(cls) -> SceneContext:
        """Builds a new scene with Slicer's module logics from the ``slicer-core`` wheel, no GUI.

        Raises:
            ImportError: when ``slicer-core`` is not installed; the message says how to install it.
        """
        try:
            import slicer
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DeepSeg's headless mode needs the slicer-core package: pip install 'deepseg' "
                "(or pip install slicer-core==5.13.31053.0 vtk==9.6.2)"
            ) from error

        scene = slicer.vtkMRMLScene()
        # Reading a .mrb unpacks it into the cache manager's folder, as Slicer's application does.
        cache_manager = slicer.vtkCacheManager()
        cache_folder = tempfile.mkdtemp(prefix="deepseg-cache-")
        cache_manager.SetRemoteCacheDirectory(cache_folder)
        data_io_manager = slicer.vtkDataIOManager()
        data_io_manager.SetCacheManager(cache_manager)
        scene.SetCacheManager(cache_manager)
        scene.SetDataIOManager(data_io_manager)
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)

        # The application logic brings its own colour logic (vtkMRMLColorLogic: the default colour tables
        # without Slicer's on-disk colour files, which slicer-core does not ship). The volumes logic looks
        # it up under the name "Colors" and logs "invalid Colors module logic" otherwise.
        colors_logic = app_logic.GetColorLogic()
        _register_logic(app_logic, scene, colors_logic, "Colors")
        if scene.GetFirstNodeByClass("vtkMRMLColorTableNode") is None:
            colors_logic.AddDefaultColorNodes()

        subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        _register_logic(app_logic, scene, subject_hierarchy_logic, "SubjectHierarchy")

        volumes_logic = slicer.vtkSlicerVolumesLogic()
        _register_logic(app_logic, scene, volumes_logic, "Volumes")

        # Creating this logic with a scene is what registers the four segmentation converter rules.
        segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        _register_logic(app_logic, scene, segmentations_logic, "Segmentations")

        transforms_logic = slicer.vtkSlicerTransformLogic()
        _register_logic(app_logic, scene, transforms_logic, "Transforms")

        # Subject hierarchy needs its singleton node before nodes are placed in folders.
        slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)

        context = cls(
            scene=scene,
            app_logic=app_logic,
            colors_logic=colors_logic,
            volumes_logic=volumes_logic,
            segmentations_logic=segmentations_logic,
            transforms_logic=transforms_logic,
            subject_hierarchy_logic=subject_hierarchy_logic,
            is_headless=True,
        )
        # The cache folder (where a .mrb is unpacked) goes with the context, or at exit at the latest.
        _TEMPORARY_FOLDERS.add(cache_folder)
        weakref.finalize(context, _remove_folder, cache_folder)
        return context

    @classmethod
    def from_application(cls) -> SceneContext:
        """Wraps the running Slicer application's scene and module logics.

        Raises:
            RuntimeError: outside a running Slicer (use :meth:`headless` there).
        """
        import slicer

        if not hasattr(slicer, "app") or not hasattr(slicer, "mrmlScene"):
            raise RuntimeError(
                "No running 3D Slicer application: use SceneContext.headless() outside Slicer"
            )
        modules = slicer.modules
        return cls(
            scene=slicer.mrmlScene,
            app_logic=slicer.app.applicationLogic(),
            colors_logic=modules.colors.logic(),
            volumes_logic=modules.volumes.logic(),
            segmentations_logic=modules.segmentations.logic(),
            transforms_logic=modules.transforms.logic(),
            subject_hierarchy_logic=modules.subjecthierarchy.logic(),
            is_headless=False,
        )

    # ------------------------------------------------------------------ scene helpers

    def node_ids(self) -> list[str]:
        """IDs of every node in the scene, in scene order (used to prove a failed run changed nothing)."""
        ids = []
        for index in range(self.scene.GetNumberOfNodes()):
            ids.append(self.scene.GetNthNode(index).GetID())
        return ids

    def add_node(self, node: Any, name: str | None = None) -> Any:
        """Adds ``node`` to the scene under a unique name derived from ``name``."""
        if name:
            node.SetName(self.scene.GenerateUniqueName(name))
        self.scene.AddNode(node)
        return node

    def subject_hierarchy(self) -> Any:
        """The scene's subject hierarchy node (created if missing)."""
        import slicer

        return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    def clear(self) -> None:
        """Removes every data node, as File > Close Scene does."""
        self.scene.Clear(False)


_TEMPORARY_FOLDERS: set[str] = set()


def _remove_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    _TEMPORARY_FOLDERS.discard(folder)


def remove_temporary_folders() -> None:
    """Removes the temporary folders of every headless scene made in this process (an interrupted command)."""
    for folder in list(_TEMPORARY_FOLDERS):
        _remove_folder(folder)


def _register_logic(app_logic: Any, scene: Any, logic: Any, name: str) -> None:
    """Registers a module logic the way Slicer's module manager does: scene, app logic, name."""
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic(name, logic)
