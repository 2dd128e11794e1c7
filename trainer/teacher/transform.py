"""open_clip's eval image transform for a whole batch of uint8 frames on the teacher's device.

open_clip's own transform (``image_transform_v2``) is a per-image PIL pipeline (convert to RGB,
``ToTensor``); the teacher gets one (N, H, W, 3) tensor per step, already on its device. The
steps and every setting come from open_clip (its ``PreprocessCfg`` and ``center_crop_or_pad``);
only the resize is done here, tensor-wise.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, center_crop_or_pad, merge_preprocess_dict
from torch import Tensor


def preprocess_frames(frames: Tensor, cfg: dict) -> Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, h, w), as open_clip's eval transform.

    Resize with the model's interpolation and resize mode, centre crop or pad, scale to [0, 1],
    normalise; a resize rounds to whole pixel values as PIL's uint8 resize does. ``cfg`` is the
    model's preprocess config (open_clip's defaults fill the keys it lacks).
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"teacher frames must be uint8 (N, H, W, 3) RGB, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    pp = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), cfg))
    th, tw = pp.input_size[1:]
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    new = _resized_size(h, w, th, tw, pp.resize_mode)
    if new != (h, w):
        mode = "bilinear" if pp.interpolation == "bilinear" else "bicubic"
        x = F.interpolate(x, size=new, mode=mode, align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    x = center_crop_or_pad(x, [th, tw], fill=pp.fill_color) / 255.0
    mean = torch.tensor(pp.mean, dtype=x.dtype).to(x.device, non_blocking=True)
    std = torch.tensor(pp.std, dtype=x.dtype).to(x.device, non_blocking=True)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _resized_size(h: int, w: int, th: int, tw: int, mode: str) -> tuple[int, int]:
    """The size open_clip's Resize / ResizeKeepRatio would give an (h, w) image."""
    if mode == "squash":
        return th, tw
    if mode == "shortest" and th == tw:  # torchvision Resize(int): short side -> th, truncating
        if h <= w:
            return th, int(th * w / h)
        return int(th * h / w), th
    if mode not in ("shortest", "longest"):
        raise ValueError(f"unknown open_clip resize_mode {mode!r}")
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
    return round(h / ratio), round(w / ratio)
