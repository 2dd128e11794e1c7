"""A synthetic PRVR world: untrimmed videos, moment captions, a student and a teacher modality.

Why it exists: no dataset or weights can be fetched in tests or the demo, yet the method's ideas
(partial relevance, a useful but incomplete teacher, hard negatives) must be visible at small
scale. docs/synthetic-world.md explains the design. Every video is a pure function of
(seed, split, index), so shards are byte-identical for one seed whatever the order of work.

Concepts: colours and shapes are visible in the rendered frames and, weakly, in the student
features; actions are only in the student features (a still frame cannot show motion); patterns
are only in the rendered frames (the teacher sees them, the student cannot): the domain gap.

One concern over 400 lines: the vocabulary, the layout of a video, its student features, its
captions and its rendered frames are one generative model over shared concept vectors, each part
drawing from its own seeded stream of the video (``_rng(seed, split, index, part)``); the writers
at the end only hand its samples to sharding.writer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sharding.batch import VideoSample
from sharding.preprocess import prepare_frames, prepare_tokens
from sharding.schema import ImageText
from sharding.writer import IMAGE_TEXT, Manifest, write_split

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "purple": (150, 60, 200), "orange": (240, 130, 30)}
SHAPES = ("square", "circle", "triangle", "diamond", "cross")
PATTERNS = ("plain", "striped", "dotted", "checkered")
ACTIONS = ("spins", "jumps", "slides", "shrinks", "grows", "bounces", "rolls", "wobbles")
FILLERS = ("a", "the", "we", "see", "then", "that", "slowly", "quickly", "in", "clip", "with",
           "pattern", "on", "screen", "here", "again", "of", "photo", "is", "and", "an", "empty",
           "background", "clutter", "nothing", "but")
VOCAB = tuple(COLOURS) + SHAPES + PATTERNS + ACTIONS + FILLERS
# Caption templates for one moment: {C} colour, {S} shape, {P} pattern, {A} action. Some omit an
# attribute, so some queries are ambiguous, as real captions are.
CAPTION_TEMPLATES = (
    "a {P} {C} {S} {A}",
    "the {C} {S} {A}",
    "we see a {C} {P} {S} that {A} slowly",
    "then a {C} {S} with a {P} pattern {A}",
    "in the clip the {P} {S} {A} quickly",
    "a {C} {P} {S} {A} on screen",
    "here the {C} {S} {A} again",
)
PRETRAIN_TEMPLATES = ("a {P} {C} {S}", "a photo of a {C} {S} with a {P} pattern", "{C} {S}",
                      "the {S} is {C} and {P}", "a {C} {P} {S} on screen")
BACKGROUND_TEXT = "an empty background with clutter"
SPLITS = {"train": 1, "val": 2, "test": 3, "pretrain": 4}
_DARK = 0.4   # brightness of the "off" cells of a pattern


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and signal strengths of the world (fixed per world: never tuned per ablation)."""

    video_dim: int = 128
    query_dim: int = 64
    image_size: int = 32
    min_frames: int = 16
    max_frames: int = 64          # > 128 exercises the method.md §2 uniform sampling
    min_captions: int = 2
    max_captions: int = 6
    max_moments: int = 3
    moment_fraction: tuple[float, float] = (0.08, 0.18)   # one moment's share of the frames
    colour_weight: float = 0.35   # weak in the student features
    shape_weight: float = 0.35
    action_weight: float = 1.0    # strong in the student features
    scene_weight: float = 0.8     # a per-video vector shared by all its frames
    distractor_weight: float = 0.8
    frame_noise: float = 1.2      # norm of the per-frame noise vector
    token_noise: float = 0.35     # norm of the per-token noise vector

    def __post_init__(self):
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 2 <= min_frames <= max_frames, got {self.min_frames}, "
                             f"{self.max_frames}")
        if not 1 <= self.min_captions <= self.max_captions:
            raise ValueError(f"need 1 <= min_captions <= max_captions, got {self.min_captions}, "
                             f"{self.max_captions}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.max_moments < 1 or self.max_moments * self.moment_fraction[1] >= 0.6:
            raise ValueError("moments must stay a minority of the frames: max_moments * "
                             f"moment_fraction[1] < 0.6, got {self.max_moments} and "
                             f"{self.moment_fraction}")


@dataclass(frozen=True)
class Moment:
    colour: str
    shape: str
    pattern: str
    action: str
    start: int   # first frame (original frame index)
    end: int     # one past the last frame


@dataclass(frozen=True)
class Distractor:
    """A background stretch showing one stray concept (a colour, a shape or a motion)."""

    kind: str    # "colour" | "shape" | "action"
    word: str
    start: int
    end: int


@dataclass
class VideoLayout:
    video_id: str
    n_frames: int
    moments: list[Moment]
    distractors: list[Distractor]
    captions: list[tuple[str, int]] = field(default_factory=list)   # (text, moment index)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed, *path])


def caption_concepts(text: str) -> dict[str, str]:
    """The concept words a caption names: {"colour"|"shape"|"pattern"|"action": word}."""
    found = {}
    for w in text.split():
        for kind, words in (("colour", COLOURS), ("shape", SHAPES), ("pattern", PATTERNS),
                            ("action", ACTIONS)):
            if w in words:
                found[kind] = w
    return found


class World:
    """The fixed concept vectors of one seed and the generators of its videos."""

    def __init__(self, seed: int = 0, cfg: WorldConfig = WorldConfig()):
        self.seed, self.cfg = seed, cfg
        rng = _rng(seed, 0)
        self.concept_vecs = {w: _unit(rng.standard_normal(cfg.video_dim))
                             for w in tuple(COLOURS) + SHAPES + ACTIONS}
        self.word_vecs = {w: _unit(rng.standard_normal(cfg.query_dim)) for w in VOCAB}
        self.weights = {"colour": cfg.colour_weight, "shape": cfg.shape_weight,
                        "action": cfg.action_weight}

    # -- layout -------------------------------------------------------------------------------
    def layout(self, split: str, index: int) -> VideoLayout:
        cfg, rng = self.cfg, _rng(self.seed, SPLITS[split], index, 0)
        n = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
        k = int(rng.integers(1, cfg.max_moments + 1))
        lengths = [max(2, round(n * rng.uniform(*cfg.moment_fraction))) for _ in range(k)]
        while sum(lengths) * 2 >= n:          # moments stay a minority of the frames
            lengths[int(np.argmax(lengths))] -= 1
            if min(lengths) < 1:
                raise ValueError(f"min_frames {cfg.min_frames} is too short for "
                                 f"{cfg.max_moments} moments")
        # Background frames split into k + 1 gaps (inner gaps >= 1 so moments never touch).
        n_bg = n - sum(lengths)
        gaps = np.ones(k + 1, np.int64)
        gaps[0] = gaps[-1] = 0
        gaps += rng.multinomial(n_bg - int(gaps.sum()), np.ones(k + 1) / (k + 1))
        moments, combos, t = [], set(), int(gaps[0])
        for m in range(k):
            while True:
                colour = str(rng.choice(list(COLOURS)))
                shape, pattern = str(rng.choice(SHAPES)), str(rng.choice(PATTERNS))
                action = str(rng.choice(ACTIONS))
                if moments and rng.random() < 0.5:   # a near-duplicate inside the video
                    prev = moments[-1]
                    if rng.random() < 0.5:
                        colour = prev.colour
                    else:
                        shape = prev.shape
                if (colour, shape, action) not in combos:
                    break
            combos.add((colour, shape, action))
            moments.append(Moment(colour, shape, pattern, action, t, t + lengths[m]))
            t += lengths[m] + int(gaps[m + 1])
        distractors = []
        bg_runs = [(0, moments[0].start)] + [(a.end, b.start) for a, b in zip(moments, moments[1:])]
        bg_runs.append((moments[-1].end, n))
        for a, b in bg_runs:
            if b - a >= 2 and rng.random() < 0.6:
                s = int(rng.integers(a, b - 1))
                e = int(rng.integers(s + 1, b + 1))
                kind = str(rng.choice(["colour", "shape", "action"]))
                word = str(rng.choice({"colour": list(COLOURS), "shape": SHAPES,
                                       "action": ACTIONS}[kind]))
                distractors.append(Distractor(kind, word, s, e))
        vid = f"syn_{split}_{index:06d}"
        n_caps = int(rng.integers(cfg.min_captions, cfg.max_captions + 1))
        which = list(range(min(k, n_caps))) + [int(rng.integers(k)) for _ in range(n_caps - k)]
        caps = []
        for m in which:
            mo = moments[m]
            tpl = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
            caps.append((tpl.format(C=mo.colour, S=mo.shape, P=mo.pattern, A=mo.action), m))
        return VideoLayout(vid, n, moments, distractors, caps)

    # -- student modality -----------------------------------------------------------------------
    def student_frames(self, lay: VideoLayout, rng: np.random.Generator) -> np.ndarray:
        """Raw (n, Dv) float32 frame features: scene + noise + concepts present at each frame."""
        cfg = self.cfg
        scene = _unit(rng.standard_normal(cfg.video_dim))
        noise = rng.standard_normal((lay.n_frames, cfg.video_dim)) * (cfg.frame_noise
                                                                      / np.sqrt(cfg.video_dim))
        x = cfg.scene_weight * scene + noise
        for m in lay.moments:
            x[m.start:m.end] += self.moment_vector(m.colour, m.shape, m.action)
        for d in lay.distractors:
            x[d.start:d.end] += cfg.distractor_weight * self.concept_vecs[d.word]
        return x.astype(np.float32)

    def moment_vector(self, colour: str | None, shape: str | None,
                      action: str | None) -> np.ndarray:
        """The student-space signal of a moment (or of the concepts a caption names)."""
        v = np.zeros(self.cfg.video_dim)
        for kind, word in (("colour", colour), ("shape", shape), ("action", action)):
            if word is not None:
                v += self.weights[kind] * self.concept_vecs[word]
        return v

    def tokens(self, text: str, rng: np.random.Generator) -> np.ndarray:
        """Raw (n_words, Dq) token features: each word's fixed vector plus noise, order kept."""
        words = text.split()
        noise = rng.standard_normal((len(words), self.cfg.query_dim)) * (
            self.cfg.token_noise / np.sqrt(self.cfg.query_dim))
        return (np.stack([self.word_vecs[w] for w in words]) + noise).astype(np.float32)

    # -- teacher modality -----------------------------------------------------------------------
    def render(self, lay: VideoLayout, rng: np.random.Generator) -> np.ndarray:
        """(n, H, W, 3) uint8 frames: clutter everywhere, the moment's object during a moment.

        Takes no action anywhere: a still frame cannot show motion, so action words carry no
        signal for the teacher. Stray colours and shapes of the background are drawn small.
        """
        size = self.cfg.image_size
        level = rng.uniform(70, 170)
        img = clutter(rng, size, level, lay.n_frames)
        for m in lay.moments:
            # The object drifts (a clipped random walk), whatever its action.
            steps = rng.normal(0, 1, (m.end - m.start, 2))
            walk = rng.uniform(0.35, 0.65, 2) * size + np.cumsum(steps, 0)
            cy, cx = np.clip(walk, 0.3 * size, 0.7 * size).T
            paint(img[m.start:m.end], m.colour, m.shape, m.pattern, cy, cx, 0.3 * size, level)
        for d in lay.distractors:
            if d.kind == "action":
                continue
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            paint(img[d.start:d.end], d.word if d.kind == "colour" else None,
                  d.word if d.kind == "shape" else "square", "plain", np.full(d.end - d.start, cy),
                  np.full(d.end - d.start, cx), 0.12 * size, level)
        return to_uint8(img)

    # -- one sample -----------------------------------------------------------------------------
    def sample(self, split: str, index: int, *, with_frames: bool = True) -> VideoSample:
        """The preprocessed VideoSample of one video (method.md §2 steps applied, as real data)."""
        lay = self.layout(split, index)
        base = (self.seed, SPLITS[split], index)
        frames = self.student_frames(lay, _rng(*base, 1))
        tok_rng = _rng(*base, 2)
        tokens = [prepare_tokens(self.tokens(text, tok_rng)) for text, _ in lay.captions]
        return VideoSample(
            video_id=lay.video_id, frames=prepare_frames(frames), tokens=tokens,
            cap_ids=[f"{lay.video_id}#enc#{c}" for c in range(len(lay.captions))],
            captions=[text for text, _ in lay.captions], n_frames_orig=lay.n_frames,
            moments=[[float(lay.moments[m].start), float(lay.moments[m].end)]
                     for _, m in lay.captions],
            teacher_frames=self.render(lay, _rng(*base, 3)) if with_frames else None)


def shape_mask(shape: str, size: int, cy: np.ndarray, cx: np.ndarray, r: float) -> np.ndarray:
    """Boolean (k, size, size) masks of ``shape`` centred at (cy[i], cx[i]) with half-extent r."""
    grid = np.arange(size) + 0.5
    dy = grid[None, :, None] - np.asarray(cy, np.float64)[:, None, None]
    dx = grid[None, None, :] - np.asarray(cx, np.float64)[:, None, None]
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "square":
        return (adx <= 0.8 * r) & (ady <= 0.8 * r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "diamond":
        return adx + ady <= r
    if shape == "triangle":
        return (ady <= r) & (adx <= (dy + r) / 2)
    if shape == "cross":
        return ((adx <= r / 3) & (ady <= r)) | ((ady <= r / 3) & (adx <= r))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def pattern_gain(pattern: str, size: int) -> np.ndarray:
    """(size, size) brightness of a pattern: 1 on its bright cells, _DARK on its dark ones."""
    y, x = np.mgrid[0:size, 0:size]
    if pattern == "plain":
        on = np.ones((size, size), bool)
    elif pattern == "striped":
        on = (y // 2) % 2 == 0
    elif pattern == "dotted":
        on = ~((y % 4 < 2) & (x % 4 < 2))
    elif pattern == "checkered":
        on = (y // 3 + x // 3) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")
    return np.where(on, 1.0, _DARK)


def clutter(rng: np.random.Generator, size: int, level: float, n: int) -> np.ndarray:
    """(n, size, size, 3) float grey background noise around ``level`` (uniform: cheap to draw)."""
    grey = rng.integers(-24, 25, (n, size, size, 1), dtype=np.int16)
    tint = rng.integers(-8, 9, (n, size, size, 3), dtype=np.int16)
    return (grey + tint).astype(np.float32) + np.float32(level)


def paint(img: np.ndarray, colour: str | None, shape: str, pattern: str, cy: np.ndarray,
          cx: np.ndarray, r: float, level: float) -> None:
    """Draw one object into every frame of ``img`` (k, H, W, 3), in place; colour None: grey."""
    rgb = np.array(COLOURS[colour] if colour else (level + 60,) * 3, np.float32)
    fill = pattern_gain(pattern, img.shape[1])[:, :, None] * rgb
    mask = shape_mask(shape, img.shape[1], cy, cx, r)
    img[mask] = np.broadcast_to(fill, img.shape)[mask]


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -- the image-text pretraining split for a tiny teacher ------------------------------------------
def pretrain_pair(world: World, index: int) -> ImageText:
    """One image-text pair: an object named by colour, shape and pattern, or plain clutter."""
    rng = _rng(world.seed, SPLITS["pretrain"], index)
    key, size = f"pt{index:07d}", world.cfg.image_size
    level = rng.uniform(70, 170)
    img = clutter(rng, size, level, 1)
    if rng.random() < 0.1:
        return ImageText(key, to_uint8(img[0]), BACKGROUND_TEXT)
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    pattern = str(rng.choice(PATTERNS))
    cy, cx = rng.uniform(0.3, 0.7, (2, 1)) * size
    paint(img, colour, shape, pattern, cy, cx, 0.3 * size, level)
    tpl = PRETRAIN_TEMPLATES[int(rng.integers(len(PRETRAIN_TEMPLATES)))]
    return ImageText(key, to_uint8(img[0]), tpl.format(C=colour, S=shape, P=pattern))


def write_pretrain(out_dir, world: World, pairs: int, pairs_per_shard: int = 1000, *,
                   progress: bool = True, overwrite: bool = False) -> Manifest:
    """The image-text split (``pt0000000.jpg`` + ``pt0000000.txt``, ...) and its manifest,
    written as every split is (``write_split``: resumable, refused over another world)."""
    return write_split(out_dir, "pretrain", [str(i) for i in range(pairs)],
                       lambda i: pretrain_pair(world, int(i)), videos_per_shard=pairs_per_shard,
                       dims={"image_size": world.cfg.image_size}, kind=IMAGE_TEXT,
                       notes={"format": "webdataset: {key}.jpg (RGB) + {key}.txt (UTF-8 caption)"},
                       progress=progress, generator=_generator(world), overwrite=overwrite)


def _generator(world: World) -> dict:
    """What every split of a world is a function of, besides the video or pair index."""
    return {"world": "synthetic", "seed": world.seed, "config": asdict(world.cfg)}


# -- the whole world ------------------------------------------------------------------------------
def build_world(out, videos: int = 600, eval_videos: int | None = None, seed: int = 0,
                pretrain_pairs: int = 3000, cfg: WorldConfig = WorldConfig(), *,
                videos_per_shard: int = 100, max_shard_bytes: int | None = None,
                progress: bool = True, overwrite: bool = False) -> dict[str, Manifest]:
    """Write ``out/{train,val,test,pretrain}``: ``videos`` train videos, ``eval_videos`` (default
    videos // 4) each for val and test, and ``pretrain_pairs`` image-text pairs. A folder holding
    a world of another seed or config is refused unless ``overwrite`` (see ``write_split``)."""
    if videos < 1 or pretrain_pairs < 0:
        raise ValueError(f"need videos >= 1 and pretrain_pairs >= 0, got {videos} and "
                         f"{pretrain_pairs}")
    n_eval = max(1, videos // 4) if eval_videos is None else eval_videos
    world = World(seed, cfg)
    dims = {"video_dim": cfg.video_dim, "query_dim": cfg.query_dim, "image_size": cfg.image_size}
    notes = {"world": "synthetic", "seed": seed, "config": asdict(cfg),
             "moments": "[start, end) in original frames, one per caption",
             "teacher": "raw RGB frames rendered at image_size (f000.jpg..), one per original "
                        "frame; caption texts for the text tower"}
    out = Path(out)
    result: dict[str, Manifest] = {}
    for split, n in (("train", videos), ("val", n_eval), ("test", n_eval)):
        result[split] = write_split(
            out / split, split, [str(i) for i in range(n)],
            lambda i, split=split: world.sample(split, int(i)),
            videos_per_shard=videos_per_shard, max_shard_bytes=max_shard_bytes, dims=dims,
            notes=notes, progress=progress, overwrite=overwrite, generator=_generator(world))
    if pretrain_pairs:
        result["pretrain"] = write_pretrain(out / "pretrain", world, pretrain_pairs,
                                            progress=progress, overwrite=overwrite)
    return result


# -- a training-free oracle (how hard the world is) -----------------------------------------------
def oracle_scores(world: World, samples: list[VideoSample]) -> tuple[np.ndarray, np.ndarray]:
    """(Nq, Nv) scores max_l cos(concept signal, frame l) of every caption against every video,
    and (Nq,) each caption's own video, to rank with ``trainer.method.metrics``.

    The oracle knows the world's concept vectors (no training, no teacher), so its ranks measure
    how separable the student features are.
    """
    L = max(s.frames.shape[0] for s in samples)
    feats = np.zeros((len(samples), L, world.cfg.video_dim), np.float32)
    mask = np.zeros((len(samples), L), bool)
    for j, s in enumerate(samples):
        feats[j, :len(s.frames)] = s.frames
        mask[j, :len(s.frames)] = True
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True) + 1e-12
    queries, gt = [], []
    for j, s in enumerate(samples):
        for text in s.captions:
            c = caption_concepts(text)
            signal = world.moment_vector(c.get("colour"), c.get("shape"), c.get("action"))
            queries.append(_unit(signal))
            gt.append(j)
    q = np.stack(queries).astype(np.float32)
    cos = np.einsum("qd,bld->qbl", q, feats)
    return np.where(mask[None], cos, -np.inf).max(-1), np.asarray(gt, np.int64)
