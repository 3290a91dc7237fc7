"""DeepSeg's GUI-free library: scene context, MRML bridge, engines, jobs and command line.

Nothing here imports Qt or reads Slicer's application globals; every function that needs the
scene takes a :class:`~DeepSegModuleLib.context.SceneContext`.
"""

__version__ = "0.1.0"
