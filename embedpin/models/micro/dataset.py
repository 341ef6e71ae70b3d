"""Procedural shapes dataset for the micro model: 64x64 RGB images with plain-words captions.

Every sample is a pure function of a ``numpy.random.Generator``, so the dataset is
reproducible from a seed. An image holds one shape (or, with ``p_two``, two) of
five kinds in eight colours, two sizes and five positions, over a solid, gradient or
striped background of another colour.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def _background_colours(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The background's colour and its stripe / gradient partner (darker if it is light)."""
    base = np.array(COLOURS[scene.bg_colour], dtype=np.float32)
    return base, _tint(base, -0.45 if sum(base) > 500 else 0.45)


def _background(scene: Scene) -> np.ndarray:
    base, other = _background_colours(scene)
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


def _draw_item(draw: ImageDraw.ImageDraw, it: Item, jitter: tuple[int, int], fill) -> None:
    cx, cy = POSITIONS[it.position]
    cx, cy = cx + jitter[0], cy + jitter[1]
    d = SIZES[it.size]
    if it.shape == "circle":
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill)
    else:
        draw.polygon(_shape_polygon(it.shape, cx, cy, d), fill=fill)


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 [64, 64, 3]."""
    im = Image.fromarray(_background(scene).round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for it in scene.items:
        _draw_item(draw, it, scene.jitter, COLOURS[it.colour])
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


def _as_255(image: np.ndarray) -> np.ndarray:
    """An image (uint8, or float in [0, 1]) as float32 in [0, 255]."""
    img = np.asarray(image, dtype=np.float32)
    return img * 255 if img.max() <= 1.0 else img


def foreground_colour(image: np.ndarray, item: Item, jitter=(0, 0)) -> str:
    """Nearest palette colour at the shape's centre of ``image`` (uint8 or float [H, W, 3])."""
    img = _as_255(image)
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


def _item_mask(item: Item, jitter: tuple[int, int]) -> np.ndarray:
    """Where ``item`` is drawn: bool [64, 64]."""
    im = Image.new("L", (SIZE, SIZE))
    _draw_item(ImageDraw.Draw(im), item, jitter, 255)
    return np.asarray(im) > 127


def _foreground(image: np.ndarray, scene: Scene) -> np.ndarray:
    """Pixels nearer the first item's colour than the background's colour range: bool [H, W]
    (the background spans the segment from its colour to its stripe / gradient tint)."""
    img = _as_255(image)
    base, other = _background_colours(scene)
    seg = other - base
    t = np.clip(((img - base) @ seg) / (seg @ seg), 0, 1)[..., None]
    d_bg = np.linalg.norm(img - (base + t * seg), axis=-1)
    d_fg = np.linalg.norm(img - np.array(COLOURS[scene.items[0].colour], dtype=np.float32), axis=-1)
    return d_fg < d_bg


def shape_by_template(image: np.ndarray, scene: Scene, slack: int = 6) -> str | None:
    """The shape kind whose silhouette, at the first item's size and drawn within ``slack``
    pixels of its position, best overlaps (IoU) the pixels of the item's colour in ``image``
    (uint8 or float [H, W, 3]; None where no pixel has that colour): a procedural shape
    check that needs no CLIP."""
    fg = _foreground(image, scene)
    item, (jx, jy) = scene.items[0], scene.jitter

    def iou(shape: str, dy: int, dx: int) -> float:
        t = _item_mask(replace(item, shape=shape), (jx + dx, jy + dy))
        return (t & fg).sum() / max(1, (t | fg).sum())

    offsets = range(-slack, slack + 1)
    score, shape = max(((iou(k, dy, dx), k) for k in SHAPES for dy in offsets for dx in offsets),
                       key=lambda c: c[0])  # the first of equals, in SHAPES order
    return shape if score > 0 else None
