"""The open_clip teacher: model, weights, placement, frame cache, transform, pretraining.

Importing the package first runs the torchvision guard (``compat``), so every process that
reaches open_clip through ``trainer.teacher`` (Ray workers, DeepSpeed ranks, loader workers)
has it applied once, before open_clip is imported.
"""
from trainer.teacher.compat import guard_torchvision

TORCHVISION_PATCHED = guard_torchvision()
