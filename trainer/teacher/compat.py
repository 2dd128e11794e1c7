"""Guarded torchvision workaround, run once by ``trainer/teacher/__init__.py`` before open_clip.

PyPI's torchvision 0.28.0 is a CUDA build. Beside a CPU torch its import fails with
``operator torchvision::nms does not exist`` and open_clip (which needs only torchvision's
transforms) fails with it. When, and only when, the import fails that way, the two missing op
schemas are registered so the Python part of torchvision imports; its C++ ops stay unavailable.
On a normal install (every GPU image) torchvision imports at the first try and this is a no-op.
"""
from __future__ import annotations

import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def guard_torchvision() -> bool:
    """Import torchvision; return whether the op-schema workaround was needed."""
    global _library
    try:
        import torchvision  # noqa: F401
        return False
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # a half-imported package would be returned as is
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401,F811
    return True


