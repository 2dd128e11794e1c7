"""The shard sample schema (version 1): one video with all its captions (docs/shards.md), and
the image-text pair of a teacher's pretraining split.

A sample is a WebDataset group of tar members sharing a key. Only three kinds of video member
exist: ``.npy`` arrays (read with ``allow_pickle=False``), one ``.json`` metadata document and
``.jpg`` teacher frames. Anything else, notably the pickle-based ``.pyd``/``.pickle``/``.pkl``
that webdataset's default decoders would unpickle, is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import numpy as np

from sharding.batch import VideoSample
from sharding.images import decode_jpeg, encode_jpeg
from sharding.preprocess import MAX_FRAMES, MAX_WORDS

SCHEMA_VERSION = 1

FRAMES = "frames.npy"          # (n, Dv) float16 student frame features, n <= 128, rows L2-normalised
TOKENS = "tokens.npy"          # (sum n_tok, Dq) float16, every caption's tokens concatenated
OFFSETS = "offsets.npy"        # (n_caps + 1,) int32, caption c = tokens[offsets[c]:offsets[c + 1]]
META = "meta.json"             # ids, texts, moments, counts, schema version
TEACHER_EMB = "tframes.npy"    # (n_t, Dt) float16 pre-extracted CLIP frame embeddings
TEACHER_TEXT = "ttext.npy"     # (n_caps, Dt) float16 pre-extracted CLIP text embeddings
STEPS = "steps.npy"            # (n, 2) int32 source feature steps [start, end) behind each row
_JPEG = re.compile(r"f(\d{3,})\.jpg")
_ARRAYS = {FRAMES, TOKENS, OFFSETS, TEACHER_EMB, TEACHER_TEXT, STEPS}
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ShardError(ValueError):
    """A sample in a shard is damaged or malformed (the reader may skip and count it)."""


class UnsafeMemberError(ShardError):
    """A shard holds a member type that could execute code when decoded (never skipped silently)."""


def sample_key(video_id: str) -> str:
    """A tar/WebDataset-safe key for ``video_id``.

    WebDataset splits the key from the extension at the first dot of the file name and treats
    slashes as directories, so ids with anything but ``[A-Za-z0-9_-]`` are rewritten and given a
    short digest of the true id (kept in meta.json) so that two ids cannot collide.
    """
    if _SAFE_KEY.fullmatch(video_id):
        return video_id
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", video_id)[:80]
    return f"{safe}-{hashlib.sha1(video_id.encode()).hexdigest()[:10]}"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_sample(s: VideoSample) -> dict:
    """A WebDataset sample dict (``__key__`` + member name -> bytes) for one preprocessed video."""
    where = f"video {s.video_id!r}"
    frames = np.asarray(s.frames)
    if frames.ndim != 2 or not 1 <= frames.shape[0] <= MAX_FRAMES:
        raise ValueError(f"{where}: frames must be (n, Dv) with 1 <= n <= {MAX_FRAMES}, got "
                         f"{frames.shape}; apply sharding.preprocess.prepare_frames first")
    n_caps = len(s.cap_ids)
    if n_caps == 0:
        raise ValueError(f"{where}: a video needs at least one caption")
    if len(s.tokens) != n_caps or len(s.captions) != n_caps:
        raise ValueError(f"{where}: {n_caps} cap_ids but {len(s.tokens)} token arrays and "
                         f"{len(s.captions)} captions")
    if s.moments is not None and len(s.moments) != n_caps:
        raise ValueError(f"{where}: {len(s.moments)} moments for {n_caps} captions")
    dq = s.tokens[0].shape[-1]
    for cid, t in zip(s.cap_ids, s.tokens):
        if t.ndim != 2 or not 1 <= t.shape[0] <= MAX_WORDS or t.shape[1] != dq:
            raise ValueError(f"{where}: caption {cid!r} tokens must be (n_tok, {dq}) with 1 <= "
                             f"n_tok <= {MAX_WORDS}, got {t.shape}; apply prepare_tokens first")
    offsets = np.concatenate([[0], np.cumsum([t.shape[0] for t in s.tokens])]).astype(np.int32)
    meta = {"schema_version": SCHEMA_VERSION, "video_id": s.video_id, "cap_ids": list(s.cap_ids),
            "captions": list(s.captions), "n_frames_orig": int(s.n_frames_orig or frames.shape[0]),
            "moments": None if s.moments is None else [[float(x) for x in m] for m in s.moments]}
    out = {"__key__": sample_key(s.video_id),
           META: json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(),
           FRAMES: _npy(frames.astype(np.float16)),
           TOKENS: _npy(np.concatenate(s.tokens).astype(np.float16)),
           OFFSETS: _npy(offsets)}
    if s.step_rows is not None:
        rows = np.asarray(s.step_rows)
        if rows.shape != (frames.shape[0], 2) or rows.dtype.kind not in "iu":
            raise ValueError(f"{where}: step_rows must be ({frames.shape[0]}, 2) integers, got "
                             f"{rows.shape} {rows.dtype}")
        out[STEPS] = _npy(rows.astype(np.int32))
    if s.teacher_frames is not None:
        tf = np.asarray(s.teacher_frames)
        if tf.ndim != 4 or tf.shape[-1] != 3 or tf.dtype != np.uint8 or tf.shape[0] == 0:
            raise ValueError(f"{where}: teacher_frames must be (n_t, H, W, 3) uint8, got "
                             f"{tf.shape} {tf.dtype}")
        for i, img in enumerate(tf):
            out[f"f{i:03d}.jpg"] = encode_jpeg(img)
    if s.teacher_frame_emb is not None:
        if s.teacher_frame_emb.ndim != 2 or s.teacher_frame_emb.shape[0] == 0:
            raise ValueError(f"{where}: teacher_frame_emb must be (n_t, Dt), got "
                             f"{s.teacher_frame_emb.shape}")
        out[TEACHER_EMB] = _npy(np.asarray(s.teacher_frame_emb).astype(np.float16))
    if s.teacher_text_emb is not None:
        if s.teacher_text_emb.ndim != 2 or s.teacher_text_emb.shape[0] != n_caps:
            raise ValueError(f"{where}: teacher_text_emb must be ({n_caps}, Dt), got "
                             f"{s.teacher_text_emb.shape}")
        out[TEACHER_TEXT] = _npy(np.asarray(s.teacher_text_emb).astype(np.float16))
    return out


@dataclass(frozen=True)
class ImageText:
    """One sample of an image-text (teacher pretraining) split: ``KEY.jpg`` + ``KEY.txt``."""

    key: str
    image: np.ndarray   # (H, W, 3) uint8 RGB
    text: str


def encode_image_text(p: ImageText) -> dict:
    """The WebDataset sample dict of a pair: RGB JPEG and the UTF-8 caption."""
    if not _SAFE_KEY.fullmatch(p.key):
        raise ValueError(f"image-text key {p.key!r} must match [A-Za-z0-9_-]+")
    return {"__key__": p.key, "jpg": encode_jpeg(p.image), "txt": p.text.encode()}


def check_member_names(names, source: str) -> None:
    """Refuse any member that is not part of the schema (pickles with UnsafeMemberError)."""
    for name in names:
        if name.startswith("__"):
            continue
        if name in _ARRAYS or name == META or _JPEG.fullmatch(name):
            continue
        ext = name.rsplit(".", 1)[-1].lower()
        if ext not in ("npy", "json", "jpg"):
            raise UnsafeMemberError(
                f"shard {source}: member {name!r} has type .{ext}, which this reader never decodes "
                "(only .npy without pickle, .json and .jpg are allowed; pickled members could run "
                "code). Rewrite the shard with `dldkd shard`.")
        raise ShardError(f"shard {source}: member {name!r} is not part of shard schema "
                         f"v{SCHEMA_VERSION} (docs/shards.md)")


def _load_npy(data: bytes, name: str, source: str, key: str) -> np.ndarray:
    """A read-only view of a .npy member (no copy: ~5x faster than ``np.load`` on a BytesIO).

    Same refusal as ``np.load(allow_pickle=False)``: an object dtype would need unpickling.
    """
    fmt = np.lib.format
    try:
        f = io.BytesIO(data)
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError("object arrays need pickle, which is never allowed here")
        flat = np.frombuffer(data, dtype, int(np.prod(shape)), offset=f.tell())
        return flat.reshape(shape, order="F" if fortran else "C")
    except ValueError as e:
        raise ShardError(f"shard {source}: sample {key!r} member {name!r} is not a plain .npy "
                         f"array ({e})") from e


def decode_sample(members: dict, source: str, *, teacher_frames: bool = True) -> VideoSample:
    """Decode one sample's members (name -> bytes, ``__key__`` etc. ignored) into a VideoSample.

    Raises UnsafeMemberError for a pickle-capable member and ShardError for a damaged sample;
    both name the shard (``source``) and the member.
    """
    key = members.get("__key__", "?")
    check_member_names(members.keys(), source)
    for name in (META, FRAMES, TOKENS, OFFSETS):
        if name not in members:
            raise ShardError(f"shard {source}: sample {key!r} lacks member {name!r}")
    try:
        meta = json.loads(members[META])
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"shard {source}: sample {key!r} member {META!r} is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        version = meta.get("schema_version") if isinstance(meta, dict) else None
        raise ShardError(f"shard {source}: sample {key!r} has schema version {version!r}, this "
                         f"reader reads version {SCHEMA_VERSION}; rewrite the shards")
    frames = _load_npy(members[FRAMES], FRAMES, source, key)
    tokens = _load_npy(members[TOKENS], TOKENS, source, key)
    offsets = _load_npy(members[OFFSETS], OFFSETS, source, key)
    cap_ids, captions = meta.get("cap_ids", []), meta.get("captions", [])
    if not (isinstance(cap_ids, list) and isinstance(captions, list)
            and isinstance(meta.get("moments"), (list, type(None)))
            and isinstance(meta.get("n_frames_orig", 0), int)):
        raise ShardError(f"shard {source}: sample {key!r} member {META!r} has a field of the "
                         "wrong type (cap_ids, captions, moments: lists; n_frames_orig: int)")
    n_caps = len(cap_ids)
    bad = None
    if frames.ndim != 2 or frames.shape[0] == 0 or frames.dtype.kind != "f":
        bad = f"{FRAMES} has shape {frames.shape} dtype {frames.dtype}"
    elif tokens.ndim != 2 or tokens.dtype.kind != "f":
        bad = f"{TOKENS} has shape {tokens.shape} dtype {tokens.dtype}"
    elif (offsets.ndim != 1 or offsets.dtype.kind != "i" or len(offsets) != n_caps + 1
          or n_caps == 0 or offsets[0] != 0 or offsets[-1] != tokens.shape[0]
          or np.any(np.diff(offsets) <= 0)):
        bad = f"{OFFSETS} {offsets.tolist()} does not split {tokens.shape[0]} tokens into {n_caps}"
    elif len(captions) != n_caps:
        bad = f"{len(captions)} captions for {n_caps} cap_ids"
    elif meta.get("moments") is not None and len(meta["moments"]) != n_caps:
        bad = f"{len(meta['moments'])} moments for {n_caps} cap_ids"
    elif not isinstance(meta.get("video_id"), str):
        bad = f"{META} has no video_id"
    if bad:
        raise ShardError(f"shard {source}: sample {key!r} is malformed: {bad}")
    sample = VideoSample(
        video_id=meta["video_id"], frames=frames,
        tokens=[tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        cap_ids=list(cap_ids), captions=list(captions),
        n_frames_orig=int(meta.get("n_frames_orig", frames.shape[0])), moments=meta.get("moments"))
    if STEPS in members:
        rows = _load_npy(members[STEPS], STEPS, source, key)
        if rows.shape != (frames.shape[0], 2) or rows.dtype.kind not in "iu":
            raise ShardError(f"shard {source}: sample {key!r} {STEPS} has shape {rows.shape} "
                             f"{rows.dtype} for {frames.shape[0]} frames")
        sample.step_rows = rows
    jpgs = sorted((int(_JPEG.fullmatch(n).group(1)), n) for n in members if _JPEG.fullmatch(n))
    if jpgs and teacher_frames:
        if [i for i, _ in jpgs] != list(range(len(jpgs))):
            raise ShardError(f"shard {source}: sample {key!r} teacher frames are not numbered "
                             f"f000.jpg.. contiguously: {[n for _, n in jpgs]}")
        images = [_load_jpeg(members[n], n, source, key) for _, n in jpgs]
        if len({im.shape for im in images}) != 1:
            raise ShardError(f"shard {source}: sample {key!r} teacher frames differ in size")
        sample.teacher_frames = np.stack(images)
    if TEACHER_EMB in members:
        emb = _load_npy(members[TEACHER_EMB], TEACHER_EMB, source, key)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ShardError(f"shard {source}: sample {key!r} {TEACHER_EMB} has shape {emb.shape}")
        sample.teacher_frame_emb = emb
    if TEACHER_TEXT in members:
        emb = _load_npy(members[TEACHER_TEXT], TEACHER_TEXT, source, key)
        if emb.ndim != 2 or emb.shape[0] != n_caps:
            raise ShardError(f"shard {source}: sample {key!r} {TEACHER_TEXT} has shape "
                             f"{emb.shape} for {n_caps} captions")
        sample.teacher_text_emb = emb
    return sample


def _load_jpeg(data: bytes, name: str, source: str, key: str) -> np.ndarray:
    try:
        return decode_jpeg(data)
    except ValueError as e:
        raise ShardError(f"shard {source}: sample {key!r} member {name!r} {e}") from e
