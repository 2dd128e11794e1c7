"""JPEG in and out, one way for every image dldkd stores: teacher frames (sharding.schema,
sharding.video) and pretraining images (sharding.synthetic, trainer.teacher.pretrain).

Imports neither torch nor the shard schema: the frame decoders of ``dldkd shard frames`` run it
in fresh processes.
"""
from __future__ import annotations

import io

import numpy as np

JPEG_QUALITY = 90


def encode_jpeg(image, quality: int = JPEG_QUALITY) -> bytes:
    """RGB JPEG bytes of an (H, W, 3) uint8 array or a PIL image."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of JPEG bytes; ValueError (saying what is wrong, for the caller
    to name the file) for another image format or damaged data."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise ValueError(f"is {img.format}, not JPEG")
            return np.array(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"is not a readable JPEG ({e})") from e
