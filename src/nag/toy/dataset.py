"""A procedural image/caption dataset with exact ground truth.

Every sample is a small RGB image of one to three identical objects (same shape, colour and size)
on a plain or textured background, with a caption that mentions some of its attributes and the
exact attributes it was drawn from. Everything is a deterministic function of ``(seed, index)``:
sample ``i`` of seed ``s`` is the same whatever else is generated, in any order or process.

    from nag.toy.dataset import ToyDataset
    data = ToyDataset(seed=0)
    sample = data[3]          # ToySample(image=PIL.Image, caption=str, attributes=Attributes)
    sample.attributes.colour  # 'red'

Attributes (the names are the caption words):

- ``shape``: circle, square, triangle, star, diamond, cross
- ``colour``: red, orange, yellow, green, cyan, blue, purple, pink (objects only; backgrounds are
  achromatic, so an object's colour never matches its background)
- ``count``: 1, 2 or 3 ("a", "two", "three")
- ``size``: small or large (several objects are always small)
- ``position``: center, left, right, top, bottom (one object only; several are scattered)
- ``background``: white, black, gray, checkered, striped

Captions name the count and the shape noun (or "shape" when the shape is left out) and each other
attribute with some probability, so prompts underspecify: "a circle" is a circle of any colour.
A few captions are a lone attribute ("red", "star"), and with ``caption_dropout`` some are empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "PALETTE",
    "SIZES",
    "COUNTS",
    "POSITIONS",
    "BACKGROUNDS",
    "ATTRIBUTE_VALUES",
    "VOCABULARY",
    "Attributes",
    "ToySample",
    "ToyDataset",
    "render",
    "caption_for",
    "full_caption",
    "sample_attributes",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "cyan": (30, 195, 215),
    "blue": (35, 70, 225),
    "purple": (135, 45, 190),
    "pink": (250, 125, 195),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "checkered", "striped")

#: Every attribute's possible values, in label order (what the probe classifies).
ATTRIBUTE_VALUES: dict[str, tuple] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "count": COUNTS,
    "size": SIZES,
    "position": POSITIONS + ("scattered",),
    "background": BACKGROUNDS,
}

_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES + ("shape",)}

#: Every word a caption can contain (the tokenizer's vocabulary is built from it).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        list(_COUNT_WORDS.values())
        + list(SIZES)
        + list(COLOURS)
        + list(SHAPES)
        + ["shape"]
        + list(_PLURALS.values())
        + " ".join(_POSITION_PHRASES.values()).split()
        + ["on", "a", "background"]
        + list(BACKGROUNDS)
    )
)

# Object radius as a fraction of the image side, per size; the largest offset from the center
# a positioned object takes, as a fraction of the side.
_RADIUS = {"small": 0.19, "large": 0.32}
_OFFSET = 0.26


@dataclass(frozen=True)
class Attributes:
    """The exact ground truth of one image.

    ``objects`` holds each object's center ``(x, y)`` and radius in pixels of the rendered image.
    ``position`` is ``"scattered"`` when there are several objects.
    """

    shape: str
    colour: str
    count: int
    size: str
    position: str
    background: str
    objects: tuple[tuple[float, float, float], ...] = field(default=())

    def label(self, attribute: str) -> int:
        """The class index of ``attribute`` in :data:`ATTRIBUTE_VALUES` order."""
        return ATTRIBUTE_VALUES[attribute].index(getattr(self, attribute))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ToySample:
    """One dataset sample: the image, its caption and its ground truth."""

    image: Image.Image
    caption: str
    attributes: Attributes


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def sample_attributes(
    rng: np.random.Generator,
    image_size: int = 32,
    backgrounds: Sequence[str] = BACKGROUNDS,
    counts: Sequence[int] = COUNTS,
) -> Attributes:
    """Draw a random attribute combination and object placement.

    ``backgrounds`` and ``counts`` restrict those attributes to a subset (one object in 5/8 of
    the images when all counts are allowed, the rest split evenly).
    """
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    background = backgrounds[rng.integers(len(backgrounds))]
    weights = np.array([5.0 if c == 1 else 1.5 for c in counts])
    count = int(rng.choice(list(counts), p=weights / weights.sum()))
    size = SIZES[rng.integers(len(SIZES))] if count == 1 else "small"
    r = _RADIUS[size] * image_size
    r *= 1.0 + rng.uniform(-0.06, 0.06)
    if count == 1:
        position = POSITIONS[rng.integers(len(POSITIONS))]
        dx, dy = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[position]
        lo, hi = r + 0.5, image_size - r - 0.5
        cx = image_size / 2 + dx * _OFFSET * image_size + rng.uniform(-0.03, 0.03) * image_size
        cy = image_size / 2 + dy * _OFFSET * image_size + rng.uniform(-0.03, 0.03) * image_size
        objects = ((float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi)), float(r)),)
    else:
        position = "scattered"
        objects = _scatter(rng, count, r, image_size)
    return Attributes(shape, colour, count, size, position, background, objects)


def _scatter(rng: np.random.Generator, count: int, r: float, image_size: int) -> tuple:
    """Non-overlapping centers for ``count`` objects of radius ``r`` (placed one by one)."""
    lo, hi = r + 0.5, image_size - r - 0.5
    gap = 2 * r + 1.5
    for _ in range(200):
        centers: list[tuple[float, float]] = []
        for _ in range(50 * count):
            x, y = rng.uniform(lo, hi, size=2)
            if all(math.dist((x, y), c) >= gap for c in centers):
                centers.append((float(x), float(y)))
                if len(centers) == count:
                    return tuple((x, y, float(r)) for x, y in centers)
    raise RuntimeError(f"could not place {count} objects of radius {r:.1f} in {image_size}px")  # pragma: no cover


def caption_for(attributes: Attributes, rng: np.random.Generator, keep: float = 0.6) -> str:
    """A caption that names each attribute with probability ``keep`` (shape: 0.8).

    One caption in ten names a single attribute alone ("red", "star", "small", "striped background").
    """
    a = attributes
    if rng.uniform() < 0.1:
        choice = rng.integers(4)
        return [a.colour, a.shape, a.size, f"{a.background} background"][choice]
    words = [_COUNT_WORDS[a.count]]
    if rng.uniform() < keep:
        words.append(a.size)
    if rng.uniform() < keep:
        words.append(a.colour)
    noun = a.shape if rng.uniform() < 0.8 else "shape"
    words.append(noun if a.count == 1 else _PLURALS[noun])
    if a.count == 1 and rng.uniform() < keep:
        words.append(_POSITION_PHRASES[a.position])
    if rng.uniform() < keep:
        words.append(f"on a {a.background} background")
    return " ".join(words)


def full_caption(attributes: Attributes) -> str:
    """The caption that names every attribute: "a large red star on the left on a black background".

    Several objects are always small and scattered, so their caption names neither size nor position:
    "three red stars on a black background".
    """
    a = attributes
    words = [_COUNT_WORDS[a.count]]
    if a.count == 1:
        words.append(a.size)
    words += [a.colour, a.shape if a.count == 1 else _PLURALS[a.shape]]
    if a.count == 1:
        words.append(_POSITION_PHRASES[a.position])
    words.append(f"on a {a.background} background")
    return " ".join(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        corners = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        return [(cx + r * math.cos(a), cy + r * 0.1 - r * math.sin(a)) for a in corners]
    if shape == "star":
        points = []
        for k in range(10):
            angle = math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            points.append((cx + rad * math.cos(angle), cy - rad * math.sin(angle)))
        return points
    if shape == "cross":
        w, h = r * 0.34, r * 0.95
        return [
            (cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w), (cx + h, cy + w), (cx + w, cy + w),
            (cx + w, cy + h), (cx - w, cy + h), (cx - w, cy + w), (cx - h, cy + w), (cx - h, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    return None


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An (size, size, 3) float array for a background kind."""
    jitter = rng.uniform(-8, 8)
    if kind == "white":
        img = np.full((size, size), 242.0 + jitter / 2)
    elif kind == "black":
        img = np.full((size, size), 18.0 + jitter / 2)
    elif kind == "gray":
        img = np.full((size, size), 128.0 + jitter)
    elif kind == "checkered":
        cell = max(2, size // 4)
        ox, oy = rng.integers(cell * 2, size=2)
        yy, xx = np.mgrid[0:size, 0:size]
        img = np.where(((xx + ox) // cell + (yy + oy) // cell) % 2 == 0, 200.0, 90.0) + jitter
    elif kind == "striped":
        period = max(4, size // 4)
        offset = rng.integers(period)
        yy, xx = np.mgrid[0:size, 0:size]
        img = np.where(((xx + yy + offset) % period) < period / 2, 205.0, 95.0) + jitter
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return np.repeat(img[..., None], 3, axis=2)


def render(attributes: Attributes, image_size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``attributes`` as an RGB image (4x supersampled, then box-filtered down).

    ``attributes.objects`` must be in pixels of an ``image_size`` image. ``rng`` varies the
    background's texture phase and brightness and the object's shade slightly (default: none).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    ss = 4
    big = image_size * ss
    base = _background(attributes.background, image_size, rng)
    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    for cx, cy, r in attributes.objects:
        cx, cy, r = cx * ss, cy * ss, r * ss
        poly = _polygon(attributes.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(poly, fill=255)
    mask = np.asarray(mask_img.resize((image_size, image_size), Image.BOX), dtype=np.float64)[..., None] / 255.0
    colour = np.array(PALETTE[attributes.colour], dtype=np.float64) + rng.uniform(-10, 10, size=3)
    out = base * (1.0 - mask) + colour * mask
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


class ToyDataset:
    """An indexable, deterministic, endless dataset of :class:`ToySample`.

    Args:
        seed: the dataset seed; sample ``i`` depends on ``(seed, i)`` only.
        image_size: 32 or 64 pixels (any size >= 16 works; the model uses 32).
        caption_dropout: probability of an empty caption.
        keep: probability that a caption names each optional attribute.
        backgrounds: the background kinds to draw from (default: all).
        counts: the object counts to draw from (default: 1, 2 and 3).
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 32,
        caption_dropout: float = 0.0,
        keep: float = 0.6,
        backgrounds: Sequence[str] = BACKGROUNDS,
        counts: Sequence[int] = COUNTS,
    ):
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.caption_dropout = float(caption_dropout)
        self.keep = float(keep)
        unknown = [b for b in backgrounds if b not in BACKGROUNDS] + [c for c in counts if c not in COUNTS]
        if unknown or not backgrounds or not counts:
            raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS} and counts of {COUNTS}")
        self.backgrounds = tuple(backgrounds)
        self.counts = tuple(int(c) for c in counts)

    def attributes(self, index: int) -> Attributes:
        """The ground truth of sample ``index`` (without drawing it)."""
        return sample_attributes(_rng(self.seed, index, 0), self.image_size, self.backgrounds, self.counts)

    def __getitem__(self, index: int) -> ToySample:
        if index < 0:
            raise IndexError("ToyDataset indices are non-negative")
        attributes = self.attributes(index)
        image = render(attributes, self.image_size, _rng(self.seed, index, 1))
        caption_rng = _rng(self.seed, index, 2)
        caption = (
            "" if caption_rng.uniform() < self.caption_dropout else caption_for(attributes, caption_rng, self.keep)
        )
        return ToySample(image, caption, attributes)

    def batch(self, start: int, size: int) -> tuple[np.ndarray, list[str], list[Attributes]]:
        """Samples ``start .. start+size-1`` as a uint8 array (N, H, W, 3), captions, attributes."""
        samples = [self[i] for i in range(start, start + size)]
        images = np.stack([np.asarray(s.image) for s in samples])
        return images, [s.caption for s in samples], [s.attributes for s in samples]

    def __iter__(self) -> Iterator[ToySample]:
        index = 0
        while True:
            yield self[index]
            index += 1
