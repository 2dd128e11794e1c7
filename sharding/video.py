"""Teacher frames from a raw video file at given feature-step times, through PyAV.

Runs in decoder processes, so it imports neither torch nor the shard schema. A video that
cannot give its frames is never fatal: :func:`extract` returns the reason ("missing: ...",
"unreadable: ...", "too short: ...") for the caller to count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from sharding.images import encode_jpeg

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi")
# Beyond this gap to the next wanted time, seeking to a keyframe beats decoding every frame.
SEEK_GAP_S = 5.0
_EPS = 1e-6
PROBLEMS = ("missing", "unreadable", "too short")


@dataclass(frozen=True)
class FrameJob:
    """One video's frames: ``centres`` in source feature steps (0..n_steps), one frame each."""

    video_id: str
    path: str | None
    centres: tuple[float, ...]
    n_steps: int
    seconds_per_step: float | None   # None: the n_steps spread evenly over the video
    size: int
    quality: int


def index_videos(folder) -> dict[str, str]:
    """{file stem: path} of every video file under ``folder`` (recursive, first path wins)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--videos {folder!s} is not a folder; point it at the folder "
                                f"that holds the video files ({', '.join(VIDEO_EXTS)})")
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTS:
                found.setdefault(stem, os.path.join(root, name))
    return found


def find_video(index: dict[str, str], video_id: str) -> str | None:
    """The file of ``video_id``: ``<id>.<ext>``, or without ActivityNet's ``v_`` prefix."""
    path = index.get(video_id)
    if path is None and video_id.startswith("v_"):
        path = index.get(video_id[2:])
    return path


def extract(job: FrameJob) -> tuple[str, list[bytes] | None, str | None]:
    """(video id, one JPEG per centre, None) or (video id, None, reason)."""
    if job.path is None:
        return job.video_id, None, (f"missing: no {'/'.join(VIDEO_EXTS)} file named "
                                    f"{job.video_id!r} under --videos")
    import av

    try:
        with av.open(job.path) as container:
            if not container.streams.video:
                return job.video_id, None, f"unreadable: {job.path} has no video stream"
            stream = container.streams.video[0]
            start, duration = _span(container, stream)
            if duration <= 0:
                return job.video_id, None, f"too short: {job.path} has no duration"
            if job.seconds_per_step is None:
                times = [c / job.n_steps * duration for c in job.centres]
            else:
                times = [c * job.seconds_per_step for c in job.centres]
                if times[-1] > duration + _EPS:
                    return job.video_id, None, (
                        f"too short: {job.path} lasts {duration:.2f} s but its "
                        f"{job.n_steps} feature steps at {job.seconds_per_step:g} s/step reach "
                        f"{job.n_steps * job.seconds_per_step:.2f} s; check --seconds-per-step")
            jpegs = _frames_at(container, stream, start, [start + t for t in times],
                               lambda frame: _jpeg(frame.to_image(), job.size, job.quality))
    except Exception as err:  # noqa: BLE001  (any demuxer/decoder failure: count, go on)
        return job.video_id, None, f"unreadable: {job.path}: {type(err).__name__}: {err}"
    if jpegs is None:
        return job.video_id, None, f"too short: no frame of {job.path} decodes"
    return job.video_id, jpegs, None


def _span(container, stream) -> tuple[float, float]:
    """(start, duration) in seconds of the video stream, from the headers or the packets."""
    import av

    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if stream.duration is not None:
        return start, float(stream.duration * stream.time_base)
    if container.duration is not None:
        return start, container.duration / av.time_base
    end = start
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    container.seek(0)
    return start, end - start


def _frames_at(container, stream, start: float, times: list[float], convert):
    """``convert(frame)`` of the frame shown at each (ascending) time: the last with a timestamp
    <= t (the first frame for a time before it); None when nothing decodes. Frames are converted
    as they are picked, so one video holds at most two decoded frames in memory."""
    out, decoded, cur, nxt = [], None, None, None
    last = (None, b"")
    for t in times:
        if decoded is None or (nxt is not None and t - nxt.time > SEEK_GAP_S):
            if t - start > SEEK_GAP_S:
                container.seek(int(t / stream.time_base), stream=stream, backward=True)
            decoded = container.decode(stream)
            cur, nxt = None, _next(decoded)
        while nxt is not None and nxt.time <= t + _EPS:
            cur, nxt = nxt, _next(decoded)
        pick = cur if cur is not None else nxt
        if pick is None:
            return None
        if pick is not last[0]:
            last = (pick, convert(pick))
        out.append(last[1])
    return out


def _next(decoded):
    frame = next(decoded, None)
    if frame is not None and frame.time is None:
        raise ValueError("a frame has no timestamp")
    return frame


def _jpeg(img, size: int, quality: int) -> bytes:
    """Shortest side to ``size`` (bicubic), centre crop to size x size, as open_clip's eval
    transform does; the teacher then has nothing left to resize."""
    from PIL import Image

    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new != (w, h):
        img = img.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return encode_jpeg(img.crop((left, top, left + size, top + size)), quality)
