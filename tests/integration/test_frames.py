"""`dldkd shard frames` on videos written with PyAV whose frame at every time is known.

Frame i of every test video is a solid grey of level 8 i, so the level of a stored JPEG says
which frame it came from; the expected frame of each feature step is computed here with loops
from the reference's chunk boundaries and the step's time.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from sharding.batch import VideoSample
from sharding.frames import add_frames
from sharding.preprocess import prepare_frames, prepare_tokens
from sharding.reader import read_all
from sharding.writer import sha256_file, write_split
from trainer.config import load_config

av = pytest.importorskip("av")

FPS = 8
N_VIDEO_FRAMES = 32            # 4 s at 8 fps; levels 0, 8, .., 248
DV, DQ = 128, 64               # configs/tiny.yaml
CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def write_video(path, n_frames: int = N_VIDEO_FRAMES, size=(48, 32)) -> None:
    container = av.open(str(path), "w")
    stream = container.add_stream(CODECS[path.suffix], rate=FPS)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.bit_rate = 20_000_000      # mpeg4's default rate blurs the grey levels
    for i in range(n_frames):
        img = np.full((size[1], size[0], 3), 8 * i, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def write_source(folder, n_steps: dict[str, int]) -> None:
    """A split with one video per id and ``n_steps`` source feature steps each (no frames)."""
    rng = np.random.default_rng(0)

    def load(vid):
        caps = [f"{vid}#{k}" for k in range(2)]
        return VideoSample(vid, prepare_frames(rng.normal(size=(n_steps[vid], DV))),
                           [prepare_tokens(rng.normal(size=(5, DQ))) for _ in caps], caps,
                           [f"a caption {k} of {vid}" for k in range(2)],
                           n_frames_orig=n_steps[vid])

    write_split(folder, "train", list(n_steps), load, videos_per_shard=2,
                dims={"video_dim": DV, "query_dim": DQ}, progress=False)


def reference_rows(n: int, m: int = 128) -> list[tuple[int, int]]:
    """MS-SL's uniform_feature_sampling chunks as loops (round half to even, clipped to n-1)."""
    if n <= m:
        return [(i, i + 1) for i in range(n)]
    idx = [min(int(np.round(k / m * n)), n - 1) for k in range(m + 1)]
    return [(idx[k], idx[k + 1] if idx[k + 1] > idx[k] else idx[k] + 1) for k in range(m)]


def expected_frames(n: int, seconds_per_step: float | None = None) -> list[int]:
    duration = N_VIDEO_FRAMES / FPS
    out = []
    for a, b in reference_rows(n):
        centre = (a + b) / 2
        t = centre * seconds_per_step if seconds_per_step else centre / n * duration
        out.append(min(math.floor(t * FPS + 1e-6), N_VIDEO_FRAMES - 1))
    return out


def frame_levels(sample: VideoSample) -> list[int]:
    return [round(float(img.mean()) / 8) for img in sample.teacher_frames]


def test_frames_at_the_steps_times_in_every_container(tmp_path):
    steps = {"short": 8, "long": 300, "just_over": 129, "mid": 255, "broken": 10, "absent": 12}
    write_source(tmp_path / "src", steps)
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    for vid, ext in (("short", ".mp4"), ("long", ".mkv"), ("just_over", ".webm"),
                     ("mid", ".avi")):
        write_video(videos / "sub" / f"{vid}{ext}")
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    before = {p.name: sha256_file(p) for p in (tmp_path / "src").glob("*.tar")}

    m = add_frames(tmp_path / "src", videos, tmp_path / "out", size=32, workers=1,
                   progress=False)

    got = {s.video_id: s for s in read_all(str(tmp_path / "out"))}
    assert sorted(got) == ["just_over", "long", "mid", "short"]
    for vid, s in got.items():
        assert s.teacher_frames.shape == (len(s.frames), 32, 32, 3)
        assert frame_levels(s) == expected_frames(steps[vid]), vid
        assert len(s.frames) == min(steps[vid], 128) and s.cap_ids == [f"{vid}#0", f"{vid}#1"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dims"] == {"video_dim": DV, "query_dim": DQ, "image_size": 32}
    assert manifest["totals"]["videos"] == 4 == m.totals["videos"]
    assert manifest["skipped"]["count"] == 2
    assert manifest["skipped"]["ids"]["broken"].startswith("frames: unreadable")
    assert manifest["skipped"]["ids"]["absent"].startswith("frames: missing")
    assert manifest["notes"]["frames"]["skipped"] == {"missing": 1, "unreadable": 1,
                                                      "too short": 0}
    # The source split is read, never written.
    assert {p.name: sha256_file(p) for p in (tmp_path / "src").glob("*.tar")} == before


def test_fixed_seconds_per_step_and_too_short_videos(tmp_path):
    steps = {"quarter": 12, "dense": 300, "overlong": 20}
    write_source(tmp_path / "src", steps)
    (tmp_path / "videos").mkdir()
    for vid in steps:
        write_video(tmp_path / "videos" / f"{vid}.mp4")
    # 0.25 s per step: 12 steps fill 3 s of the 4 s videos; 20 (5 s) and 300 do not fit.
    add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / "out", size=32,
               seconds_per_step=0.25, workers=1, progress=False)
    got, = read_all(str(tmp_path / "out"))
    assert got.video_id == "quarter"
    assert frame_levels(got) == expected_frames(12, 0.25) == [2 * k + 1 for k in range(12)]
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]["ids"]
    assert "too short" in skipped["overlong"] and "too short" in skipped["dense"]
    assert "--seconds-per-step" in skipped["overlong"]
    # 0.01 s per step: 300 steps in 3 s, averaged to 128 rows over the reference's chunks.
    add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / "out2", size=32,
               seconds_per_step=0.01, workers=1, progress=False)
    got = {s.video_id: s for s in read_all(str(tmp_path / "out2"))}
    assert sorted(got) == ["dense", "overlong", "quarter"]
    for vid, n in steps.items():
        assert frame_levels(got[vid]) == expected_frames(n, 0.01), vid


def test_rerun_resumes_and_parallel_decoding_writes_the_same_shards(tmp_path, monkeypatch):
    steps = {f"v{i}": 6 + 7 * i for i in range(5)}
    write_source(tmp_path / "src", steps)
    (tmp_path / "videos").mkdir()
    for vid in steps:
        write_video(tmp_path / "videos" / f"{vid}.mp4")
    add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / "out", size=32, workers=2,
               progress=False)
    shards = sorted((tmp_path / "out").glob("*.tar"))
    assert len(shards) == 3
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}

    add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / "serial", size=32, workers=1,
               progress=False)
    assert [sha256_file(p) for p in shards] == [
        sha256_file(p) for p in sorted((tmp_path / "serial").glob("*.tar"))]

    # A rerun decodes nothing; a damaged output shard is the only one written again.
    with shards[1].open("r+b") as f:
        f.truncate(100)
    calls = []
    import sharding.frames as frames_mod

    real = frames_mod.extract
    monkeypatch.setattr(frames_mod, "extract", lambda job: calls.append(job.video_id) or real(job))
    add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / "out", size=32, workers=1,
               progress=False)
    assert calls == ["v2", "v3"]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    assert after[shards[0].name] == stamp[shards[0].name]
    assert after[shards[2].name] == stamp[shards[2].name]
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert sha256_file(shards[1]) == sha256_file(tmp_path / "serial" / shards[1].name)


def test_other_options_are_refused_unless_overwrite(tmp_path, capsys):
    from launch.cli import main
    from sharding.writer import load_manifest

    write_source(tmp_path / "src", {"a": 4})
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4")
    out = tmp_path / "out"
    args = ["shard", "frames", "--videos", str(tmp_path / "videos"), "--shards",
            str(tmp_path / "src"), "--out", str(out), "--workers", "1"]
    assert main(args + ["--size", "32"]) == 0
    first = {p.name: sha256_file(p) for p in out.glob("*.tar")}
    capsys.readouterr()

    assert main(args + ["--size", "48"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "frames.size: 32 on disk, 48 now" in err and "--overwrite" in err
    assert {p.name: sha256_file(p) for p in out.glob("*.tar")} == first

    assert main(args + ["--size", "48", "--overwrite"]) == 0
    s, = read_all(str(out))
    assert s.teacher_frames.shape[1:] == (48, 48, 3)
    generator = load_manifest(out).generator
    assert generator["frames"]["size"] == 48
    assert generator["source"] == load_manifest(tmp_path / "src").generator


def test_bad_arguments_name_the_fix(tmp_path):
    write_source(tmp_path / "src", {"a": 4})
    with pytest.raises(ValueError, match="must differ"):
        add_frames(tmp_path / "src", tmp_path, tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        add_frames(tmp_path / "src", tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .mp4"):
        add_frames(tmp_path / "src", tmp_path / "empty", tmp_path / "out")


def test_online_teacher_trains_on_the_frames(tmp_path, tiny_teacher):
    from trainer.recipe import Recipe

    steps = {f"clip{i}": 5 + 3 * i for i in range(8)}
    write_source(tmp_path / "src", steps)
    (tmp_path / "videos").mkdir()
    for vid in steps:
        write_video(tmp_path / "videos" / f"{vid}.webm", size=(40, 40))
    add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / "out", size=32, workers=1,
               progress=False)
    out = str(tmp_path / "out")
    cfg = load_config("configs/tiny.yaml", [
        f"data.train={out}", f"data.val={out}", "data.batch_videos=4", "data.steps_per_epoch=2",
        "train.epochs=1", "train.log_every=1", f"teacher.pretrained={tiny_teacher}",
        "teacher.placement=replicated", f"run.storage={tmp_path / 'runs'}", "run.name=frames",
        "tracking.system_metrics=false"])
    recipe = Recipe(cfg, use_deepspeed=False)
    recipe.setup()
    try:
        state = recipe.train()
    finally:
        recipe.cleanup()
    assert state.step == 2
    assert recipe.teacher.calls["image"] >= 2       # the image tower ran on the decoded frames


def test_jpeg_quality_is_applied(tmp_path):
    write_source(tmp_path / "src", {"q": 4})
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "q.mp4", size=(64, 48))
    sizes = {}
    for quality in (20, 95):
        add_frames(tmp_path / "src", tmp_path / "videos", tmp_path / f"q{quality}", size=48,
                   quality=quality, workers=1, progress=False)
        sizes[quality] = sum(p.stat().st_size for p in (tmp_path / f"q{quality}").glob("*.tar"))
        m = json.loads((tmp_path / f"q{quality}" / "manifest.json").read_text())
        assert m["notes"]["frames"]["quality"] == quality
    from PIL import Image

    s, = read_all(str(tmp_path / "q95"))
    assert s.teacher_frames.shape[1:] == (48, 48, 3)
    assert Image.open(io.BytesIO(_first_jpeg(tmp_path / "q95"))).size == (48, 48)
    assert sizes[20] <= sizes[95]


def _first_jpeg(folder) -> bytes:
    import tarfile

    with tarfile.open(next(folder.glob("*.tar"))) as tar:
        member = next(m for m in tar if m.name.endswith("f000.jpg"))
        return tar.extractfile(member).read()


def test_cli_reports_skipped_videos_by_id(tmp_path, capsys):
    from launch.cli import main

    write_source(tmp_path / "src", {"here": 4, "gone": 4})
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "here.mp4")
    code = main(["shard", "frames", "--videos", str(tmp_path / "videos"), "--shards",
                 str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "32",
                 "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped gone: missing" in out
    assert "1 videos with frames" in out and "1 missing, 0 unreadable, 0 too short" in out


def test_frames_follow_the_release_conversion_grid(tmp_path):
    """With CLIP features the converter first averages the student onto the CLIP frames' grid;
    each frame still lands at the centre of its row's span of source steps."""
    from sharding.msssl import convert
    from tests.release_fixture import make_release

    rel = make_release(tmp_path / "release", "charades", {"train": 4}, long_video_frames=1000)
    convert(rel.root, "charades", "train", tmp_path / "shards", progress=False)
    (tmp_path / "videos").mkdir()
    for vid in rel.frames:
        write_video(tmp_path / "videos" / f"{vid}.mp4")
    add_frames(tmp_path / "shards" / "train", tmp_path / "videos", tmp_path / "out", size=32,
               workers=1, progress=False)
    got = {s.video_id: s for s in read_all(str(tmp_path / "out"))}
    assert sorted(got) == sorted(v for v in rel.frames)
    for vid, s in got.items():
        n_s, n_t = len(rel.frames[vid]), len(rel.clip_video[vid])
        grid = reference_rows(n_s, min(n_s, n_t))
        spans = [(grid[a][0], grid[b - 1][1]) for a, b in reference_rows(len(grid))]
        want = [min(math.floor((a + b) / 2 / n_s * N_VIDEO_FRAMES + 1e-6), N_VIDEO_FRAMES - 1)
                for a, b in spans]
        assert frame_levels(s) == want, vid
    assert max(s.n_frames_orig for s in got.values()) == 1000


def test_rerun_after_a_missing_video_was_added_writes_its_frames(tmp_path, capsys):
    """The shard whose video was missing is written again once the video is there (the other
    shard is kept); no stale "missing" line is printed."""
    from launch.cli import main
    from sharding.writer import load_manifest

    write_source(tmp_path / "src", {"a": 4, "b": 4, "c": 4, "gone": 4})
    (tmp_path / "videos").mkdir()
    for vid in ("a", "b", "c"):
        write_video(tmp_path / "videos" / f"{vid}.mp4")
    args = ["shard", "frames", "--videos", str(tmp_path / "videos"), "--shards",
            str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "32",
            "--workers", "1"]
    assert main(args) == 0
    assert "skipped gone: missing" in capsys.readouterr().out
    kept = sorted(tmp_path.joinpath("out").glob("*.tar"))[0]
    stamp = kept.stat().st_mtime_ns

    write_video(tmp_path / "videos" / "gone.mp4")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped gone" not in out and "4 videos with frames" in out
    assert "gone" not in load_manifest(tmp_path / "out").skipped["ids"]
    assert {s.video_id for s in read_all(str(tmp_path / "out"))} == {"a", "b", "c", "gone"}
    assert kept.stat().st_mtime_ns == stamp, "the unchanged shard was rewritten"
