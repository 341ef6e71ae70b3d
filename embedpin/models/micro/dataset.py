"""Procedural shapes dataset for the micro model: 64x64 RGB images with plain-words captions.

Every sample is a pure function of a ``numpy.random.Generator``, so the dataset is
reproducible from a seed. An image holds one shape (or, with ``p_two``, two) of
five kinds in eight colours, two sizes and five positions, over a solid, gradient or
striped background of another colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 18, "large": 32}
POSITIONS = {
    "in the center": (32, 32),
    "at the top left": (18, 18),
    "at the top right": (46, 18),
    "at the bottom left": (18, 46),
    "at the bottom right": (46, 46),
}
BACKGROUNDS = ("plain", "gradient", "striped")
EXTRA_WORDS = ("a", "an", "on", "and", "background", "shape", "picture", "of", "with", "the")


@dataclass(frozen=True)
class Item:
    """One foreground shape."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """Everything an image is drawn from; the caption is a function of it."""

    items: tuple[Item, ...]
    bg_colour: str
    bg_kind: str
    jitter: tuple[int, int] = (0, 0)

    @property
    def caption(self) -> str:
        fg = " and ".join(f"a {i.size} {i.colour} {i.shape} {i.position}" for i in self.items)
        if self.bg_kind == "plain":
            return f"{fg} on a plain {self.bg_colour} background"
        return f"{fg} on a {self.bg_colour} {self.bg_kind} background"

    @property
    def key(self) -> tuple:
        """The attribute combination (jitter excluded): what a held-out split is made of."""
        return (tuple((i.shape, i.colour, i.size, i.position) for i in self.items), self.bg_colour, self.bg_kind)


def is_held_out(scene: Scene) -> bool:
    """About 1 in 10 single-shape attribute combinations are kept out of training."""
    if len(scene.items) != 1:
        return False
    i = scene.items[0]
    h = (
        SHAPES.index(i.shape) * 7919
        + COLOUR_NAMES.index(i.colour) * 104729
        + list(SIZES).index(i.size) * 15485863
        + list(POSITIONS).index(i.position) * 32452843
        + COLOUR_NAMES.index(scene.bg_colour) * 49979687
        + BACKGROUNDS.index(scene.bg_kind) * 86028121
    )
    return h % 10 == 3


def random_scene(rng: np.random.Generator, p_two: float = 0.15, held_out: bool | None = False) -> Scene:
    """Draw a scene; ``held_out`` False/True restricts to train/held-out combos, None to any."""
    while True:
        n = 2 if rng.random() < p_two else 1
        positions = rng.choice(len(POSITIONS), size=n, replace=False)
        colours = rng.choice(len(COLOUR_NAMES), size=n + 1, replace=False)
        items = tuple(
            Item(
                SHAPES[rng.integers(len(SHAPES))],
                COLOUR_NAMES[colours[k]],
                list(SIZES)[rng.integers(2)] if n == 1 else "small",
                list(POSITIONS)[positions[k]],
            )
            for k in range(n)
        )
        scene = Scene(items, COLOUR_NAMES[colours[-1]], BACKGROUNDS[rng.integers(3)],
                      (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))))
        if held_out is None or is_held_out(scene) == held_out:
            return scene


def _shape_polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]]:
    r = d / 2
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        return [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(rad, ang)]
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(shape)


def _tint(rgb: np.ndarray, amount: float) -> np.ndarray:
    """Move a colour toward white (amount > 0) or black (amount < 0)."""
    return rgb + (255 - rgb) * amount if amount > 0 else rgb * (1 + amount)


def _background(scene: Scene) -> np.ndarray:
    base = np.array(COLOURS[scene.bg_colour], dtype=np.float32)
    light = sum(base) > 500
    other = _tint(base, -0.45 if light else 0.45)
    img = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    if scene.bg_kind == "plain":
        img[:] = base
    elif scene.bg_kind == "gradient":
        t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
        img[:] = base * (1 - t) + other * t
    else:
        stripe = (np.arange(SIZE) // 4) % 2 == 1
        img[:] = base
        img[:, stripe] = other
    return img


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 [64, 64, 3]."""
    im = Image.fromarray(_background(scene).round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for it in scene.items:
        cx, cy = POSITIONS[it.position]
        cx, cy = cx + scene.jitter[0], cy + scene.jitter[1]
        d = SIZES[it.size]
        if it.shape == "circle":
            draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=COLOURS[it.colour])
        else:
            draw.polygon(_shape_polygon(it.shape, cx, cy, d), fill=COLOURS[it.colour])
    return np.asarray(im)


def batch(rng: np.random.Generator, n: int, p_two: float = 0.15, held_out: bool | None = False):
    """``n`` samples: (images float32 [n, 3, 64, 64] in [0, 1], captions, scenes)."""
    scenes = [random_scene(rng, p_two, held_out) for _ in range(n)]
    imgs = np.stack([render_scene(s) for s in scenes]).astype(np.float32) / 255.0
    return imgs.transpose(0, 3, 1, 2), [s.caption for s in scenes], scenes


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = set(EXTRA_WORDS) | set(SHAPES) | set(COLOUR_NAMES) | set(SIZES) | set(BACKGROUNDS)
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)


def foreground_colour(image: np.ndarray, item: Item, jitter=(0, 0)) -> str:
    """Nearest palette colour at the shape's centre of ``image`` (uint8 or float [H, W, 3])."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() <= 1.0:
        img = img * 255
    cx, cy = POSITIONS[item.position]
    cx, cy = cx + jitter[0], cy + jitter[1]
    r = 2 if item.size == "small" else 4
    patch = img[cy - r:cy + r + 1, cx - r:cx + r + 1].reshape(-1, 3)
    med = np.median(patch, axis=0)
    pal = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
    return COLOUR_NAMES[int(np.argmin(((pal - med) ** 2).sum(1)))]


def colour_right(image: np.ndarray, scene: Scene) -> bool:
    """Whether ``image`` [H, W, 3] shows the scene's first shape in its caption's colour."""
    item = scene.items[0]
    return foreground_colour(image, item, scene.jitter) == item.colour
