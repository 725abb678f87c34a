"""The world: 64x64 scenes of one object on a background, with factors we can read back.

A scene is a pure function of a :class:`Scene` (no global randomness): an object of some
``shape``, ``color`` and surface ``pattern``, maybe carrying a small ``mark``, drawn at
``size`` (bounding-box side, as a fraction of the image width) with its center at ``(x, y)``
(fractions of the image, y down) on a ``background`` whose details (horizon height, tints,
clouds, buildings, waves, flakes) come from the integer ``variant``.

Every object has a dark outline, so no color disappears into any background (a white ball in
the snow, a green one on the grass). Marks are drawn in black *and* white (a core with a halo of
the other), so each stays readable on every color and pattern; they sit at a per-shape anchor
inside the body and move with the object.

Held-out rule (what the base model never sees in pretraining): the (shape, color, pattern)
triples of :data:`SUBJECTS` never occur in :func:`sample_pretraining`, with any mark or
background. Marks do occur there (on 20% of scenes by default). Captions can name them ("... star
with a cross ..."), as real captions name what they see: the pretraining's last stage does, so
that the base model knows marks as words, as Stable Diffusion knows "a white patch on the
chest". It has still never seen any mark on a held-out triple, so a DreamBooth token has to learn
its subject's whole look, mark included, from the photos (whose captions never name it).
Pretraining captions drop the color, the pattern and the background independently (30% each),
so the class prompt "a photo of a star" is a caption the base model has seen, meaning "a star of
any look, anywhere".
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("ball", "box", "star", "heart", "moon", "bell", "cup", "kite")
COLORS = {  # name -> RGB; each name is one CLIP token
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (45, 165, 55),
    "blue": (35, 75, 215),
    "purple": (130, 45, 175),
    "pink": (250, 135, 195),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
MARKS = ("none", "dot", "cross", "band", "eyes")
BACKGROUNDS = ("beach", "snow", "grass", "city", "water", "plain")
BACKGROUND_PHRASES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "city": "in the city",
    "water": "on the water",
    "plain": "on a plain background",
}
MARK_PHRASES = {"dot": "with a dot", "cross": "with a cross", "band": "with a band",
                "eyes": "with eyes"}
SIZE_RANGE = (0.45, 0.7)  # object bounding-box side / image width (29-45 px at 64 px)
# The probe reads a wider range, so that it can judge any object a model draws.
PROBE_SIZE_RANGE = (0.35, 0.75)
MARGIN = 0.03  # the object (outline included) stays this far inside the image
OUTLINE = (20, 20, 20)
PRETRAIN_MARK_RATE = 0.2
PRETRAIN_DROP = 0.3  # chance that a pretraining caption leaves out color / pattern / background
MARK_SCALE = 0.42  # mark diameter / object side: 1.5-2.4 cells of the 16x16 latent grid
SUPER = 4  # object layers are drawn at 4x and box-filtered down (anti-aliasing)

# Where marks sit, in the object's unit bounding box: inside the thick part of each body.
MARK_ANCHOR = {"ball": (0.5, 0.5), "box": (0.5, 0.5), "star": (0.5, 0.55), "heart": (0.5, 0.42),
               "moon": (0.18, 0.5), "bell": (0.5, 0.55), "cup": (0.41, 0.55), "kite": (0.5, 0.42)}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    pattern: str = "plain"
    mark: str = "none"
    background: str = "plain"
    size: float = 0.375
    x: float = 0.5
    y: float = 0.5
    variant: int = 0  # seeds the background's details (horizon, tints, clouds, waves, ...)

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("pattern", PATTERNS),
                              ("mark", MARKS), ("background", BACKGROUNDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Scene {name}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Subject:
    """A specific object: its class (shape) plus the look that makes it *this* one."""

    shape: str
    color: str
    pattern: str
    mark: str

    @property
    def name(self) -> str:
        return "-".join((self.color, self.pattern, self.shape, self.mark))

    def scene(self, **pose) -> Scene:
        return Scene(self.shape, self.color, self.pattern, self.mark, **pose)

    def photos(self, n: int = 5, seed: int = 0, backgrounds=None) -> list[tuple[Image.Image, Scene]]:
        """n "photos" of this subject: sizes spread over the whole range, random positions, and
        backgrounds taken in turn from ``backgrounds`` (default :data:`PHOTO_BACKGROUNDS`, which
        leaves beach, snow and water as new contexts for evaluation prompts)."""
        if n < 1:
            raise ValueError(f"photos(n={n}): ask for at least one photo (DreamBooth uses 3-7)")
        rng = random.Random(f"photos:{self.name}:{seed}")
        backgrounds = list(backgrounds or PHOTO_BACKGROUNDS)
        rng.shuffle(backgrounds)
        lo, hi = SIZE_RANGE
        sizes = [lo + (hi - lo) * (i + rng.random()) / n for i in range(n)]  # stratified
        rng.shuffle(sizes)
        out = []
        for i, size in enumerate(sizes):
            scene = random_scene(rng, shape=self.shape, color=self.color, pattern=self.pattern,
                                 mark=self.mark, background=backgrounds[i % len(backgrounds)],
                                 size=size)
            out.append((render(scene), scene))
        return out


    def save_photos(self, folder, n: int = 5, seed: int = 0, captions: bool = False,
                    masks: bool = False) -> list:
        """Write :meth:`photos` into ``folder`` as photo-0.png, photo-1.png, ...; return the paths.
        ``captions``: also photo-N.txt naming the background ("a photo of {token} {class} on
        the grass"), as a user would caption photos so the identifier need not carry the scene.
        ``masks``: also photo-N.mask.png, white where the object is (:func:`object_mask`), which
        training reads as the instance loss mask (``data.masks``)."""
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (image, scene) in enumerate(self.photos(n, seed)):
            paths.append(folder / f"photo-{i}.png")
            image.save(paths[-1])
            if masks:
                Image.fromarray(object_mask(scene, image.size[0]).astype(np.uint8) * 255, "L").save(
                    folder / f"photo-{i}.mask.png")
            if captions:
                paths[-1].with_suffix(".txt").write_text(
                    "a photo of {token} {class} " + BACKGROUND_PHRASES[scene.background] + "\n")
        return paths


PHOTO_BACKGROUNDS = ("plain", "grass", "city")
# The evaluation subjects. Their (shape, color, pattern) never appear in pretraining.
SUBJECTS = (
    Subject("ball", "blue", "dotted", "cross"),
    Subject("box", "red", "checkered", "dot"),
    Subject("star", "yellow", "striped", "band"),
    Subject("heart", "pink", "dotted", "eyes"),
    Subject("moon", "purple", "plain", "dot"),
    Subject("bell", "orange", "striped", "cross"),
    Subject("cup", "green", "checkered", "eyes"),
    Subject("kite", "white", "striped", "band"),
)
HELD_OUT = frozenset((s.shape, s.color, s.pattern) for s in SUBJECTS)


def held_out_subjects() -> list[Subject]:
    """The evaluation subjects; see the module docstring for the rule."""
    return list(SUBJECTS)


def is_held_out(scene: Scene) -> bool:
    return (scene.shape, scene.color, scene.pattern) in HELD_OUT


# ---------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, token: str | None = None, omit=()) -> str:
    """DreamBench-style caption: "a photo of a red striped star on the beach".

    A plain pattern is never named ("a photo of a red star in the snow"). With ``token`` the
    subject's look is not spelled out, as in DreamBooth prompts: "a photo of sks star on the
    beach". ``omit`` leaves out any of "color", "pattern", "mark", "background". A mark is named
    after the shape ("a photo of a red star with a cross on the beach"), except with ``token``.
    """
    unknown = set(omit) - {"color", "pattern", "mark", "background"}
    if unknown:
        raise ValueError(f"caption(omit=...) got {sorted(unknown)}; "
                         "use color, pattern, mark, background")
    if token is not None:
        text = f"a photo of {token} {scene.shape}"
    else:
        words = [scene.color] if "color" not in omit else []
        if scene.pattern != "plain" and "pattern" not in omit:
            words.append(scene.pattern)
        words.append(scene.shape)
        text = f"a photo of {_article(words[0])} {' '.join(words)}"
        if scene.mark != "none" and "mark" not in omit:
            text += " " + MARK_PHRASES[scene.mark]
    if "background" not in omit:
        text += " " + BACKGROUND_PHRASES[scene.background]
    return text


# ---------------------------------------------------------------- sampling

def random_scene(rng: random.Random, size_range: tuple[float, float] = SIZE_RANGE, **fixed) -> Scene:
    """A scene with every factor drawn uniformly except those given; ``mark`` defaults to "none"
    (ordinary objects). Position keeps the whole object inside the image."""
    names = {f.name for f in fields(Scene)}
    bad = set(fixed) - names
    if bad:
        raise ValueError(f"random_scene got unknown factors {sorted(bad)}; known: {sorted(names)}")
    shape = fixed.get("shape") or rng.choice(SHAPES)
    color = fixed.get("color") or rng.choice(tuple(COLORS))
    pattern = fixed.get("pattern") or rng.choice(PATTERNS)
    background = fixed.get("background") or rng.choice(BACKGROUNDS)
    size = fixed.get("size") or rng.uniform(*size_range)
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    x = fixed["x"] if "x" in fixed else rng.uniform(lo, hi)
    y = fixed["y"] if "y" in fixed else rng.uniform(lo, hi)
    variant = fixed["variant"] if "variant" in fixed else rng.randrange(2**31)
    return Scene(shape, color, pattern, fixed.get("mark", "none"), background, size, x, y, variant)


def sample_pretraining(n: int, seed: int, size: int = 64, mark_rate: float = PRETRAIN_MARK_RATE,
                       drop: float = PRETRAIN_DROP, size_range: tuple[float, float] = SIZE_RANGE,
                       mark_named: float = 0.0, rows: range | None = None,
                       ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes of the pretraining distribution: uint8 images (n, size, size, 3), captions, scenes.

    Factors are uniform, held-out (shape, color, pattern) triples are redrawn, ``mark_rate`` of
    scenes carry a random mark, which the caption names with chance ``mark_named``, and each of
    color, pattern and background is left out of the caption with chance ``drop``. Whether a mark
    is named comes from a second stream, so the images are those of ``mark_named=0``. ``rows``
    keeps only those of the n scenes (the same ones; only they are rendered, the costly part).
    """
    rng = random.Random(f"pretrain:{seed}")
    naming = random.Random(f"pretrain-mark-names:{seed}")
    keep = range(n) if rows is None else rows
    images = np.empty((len(keep), size, size, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        mark = rng.choice(MARKS[1:]) if rng.random() < mark_rate else "none"
        scene = random_scene(rng, size_range, mark=mark)
        while is_held_out(scene):
            scene = random_scene(rng, size_range, mark=mark)
        omit = [f for f in ("color", "pattern", "background") if rng.random() < drop]
        if naming.random() >= mark_named:
            omit.append("mark")
        if i in keep:
            images[len(scenes)] = render_array(scene, size)
            captions.append(caption(scene, omit=omit))
            scenes.append(scene)
    return images, captions, scenes


def mark_mask(scene: Scene, image: np.ndarray | None = None) -> np.ndarray:
    """Where ``scene``'s mark changes the picture: a bool (size, size) mask, empty without one."""
    image = render_array(scene) if image is None else image
    if scene.mark == "none":
        return np.zeros(image.shape[:2], bool)
    bare = render_array(replace(scene, mark="none"), image.shape[0]).astype(np.int16)
    return np.abs(image.astype(np.int16) - bare).max(-1) > 8


def sample_scenes(n: int, seed: int, size_range: tuple[float, float] = PROBE_SIZE_RANGE,
                  **fixed) -> list[Scene]:
    """n scenes with every factor uniform (marks included, held-out triples too): probe data."""
    rng = random.Random(f"scenes:{seed}")
    out = []
    for _ in range(n):
        extra = {} if "mark" in fixed else {"mark": rng.choice(MARKS)}
        out.append(random_scene(rng, size_range, **extra, **fixed))
    return out


# ---------------------------------------------------------------- object layers

def _unit_polygon(points, box):
    """Map points in the unit square onto box = (x0, y0, side) in hi-res pixels."""
    x0, y0, side = box
    return [(x0 + u * side, y0 + v * side) for u, v in points]


def _fit(points):
    """Scale and center a polygon so its bounding box fills the unit square (aspect kept)."""
    us, vs = [p[0] for p in points], [p[1] for p in points]
    w, h = max(us) - min(us), max(vs) - min(vs)
    k = 1.0 / max(w, h)
    cu, cv = (max(us) + min(us)) / 2, (max(vs) + min(vs)) / 2
    return [(0.5 + (u - cu) * k, 0.5 + (v - cv) * k) for u, v in points]


_STAR = _fit([(math.cos(math.radians(-90 + 36 * i)) * (0.5 if i % 2 == 0 else 0.21),
               math.sin(math.radians(-90 + 36 * i)) * (0.5 if i % 2 == 0 else 0.21)) for i in range(10)])
_HEART = _fit([(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                         - math.cos(4 * t)))
               for t in np.linspace(0, 2 * math.pi, 72, endpoint=False)])
_BELL = ([(0.5 + 0.25 * math.cos(math.radians(a)), 0.3 - 0.25 * math.sin(math.radians(a)))
          for a in range(180, -1, -15)]
         + [(0.77, 0.58), (0.95, 0.84), (0.05, 0.84), (0.23, 0.58)])
_KITE = [(0.5, 0.0), (0.88, 0.38), (0.5, 1.0), (0.12, 0.38)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box) -> None:
    x0, y0, s = box
    ell = lambda u0, v0, u1, v1, fill=255: draw.ellipse(  # noqa: E731
        (x0 + u0 * s, y0 + v0 * s, x0 + u1 * s, y0 + v1 * s), fill=fill)
    if shape == "ball":
        ell(0, 0, 1, 1)
    elif shape == "box":
        draw.rectangle((x0 + 0.05 * s, y0 + 0.05 * s, x0 + 0.95 * s, y0 + 0.95 * s), fill=255)
    elif shape == "star":
        draw.polygon(_unit_polygon(_STAR, box), fill=255)
    elif shape == "heart":
        draw.polygon(_unit_polygon(_HEART, box), fill=255)
    elif shape == "moon":
        ell(0, 0, 1, 1)
        ell(0.34, -0.02, 1.22, 0.86, fill=0)
    elif shape == "bell":
        draw.polygon(_unit_polygon(_BELL, box), fill=255)
        ell(0.4, 0.78, 0.6, 0.98)
    elif shape == "cup":
        ell(0.58, 0.32, 0.96, 0.78)
        ell(0.68, 0.44, 0.86, 0.66, fill=0)
        draw.polygon(_unit_polygon([(0.08, 0.2), (0.74, 0.2), (0.64, 0.96), (0.18, 0.96)], box), fill=255)
    elif shape == "kite":
        draw.polygon(_unit_polygon(_KITE, box), fill=255)


def _geometry(s: int) -> tuple[int, int, int]:
    """(outline width, padding, patch side) in output pixels for an object of side s."""
    ow = max(1, round(s / 16))
    pad = ow + 1
    return ow, pad, s + 2 * pad


def _down(hi: np.ndarray) -> np.ndarray:
    """Box-filter a (SUPER*P, SUPER*P) array in [0, 255] to (P, P) in [0, 1]."""
    p = hi.shape[0] // SUPER
    return hi.reshape(p, SUPER, p, SUPER).mean(axis=(1, 3), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def _shape_layers(shape: str, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(body alpha, body+outline alpha), each (P, P) float32 in [0, 1]."""
    ow, pad, p = _geometry(s)
    img = Image.new("L", (p * SUPER, p * SUPER), 0)
    _draw_shape(ImageDraw.Draw(img), shape, (pad * SUPER, pad * SUPER, s * SUPER))
    grown = img.filter(ImageFilter.MaxFilter(2 * ow * SUPER + 1))
    return _down(np.asarray(img)), _down(np.asarray(grown))


@functools.lru_cache(maxsize=None)
def _pattern_layer(pattern: str, s: int) -> np.ndarray:
    """Where the secondary color shows, (P, P) float32 in [0, 1]; scales with the object."""
    _, pad, p = _geometry(s)
    c = (np.arange(p * SUPER, dtype=np.float32) + 0.5) / SUPER - pad  # output px from box corner
    u, v = np.meshgrid(c, c)
    if pattern == "plain":
        hi = np.zeros_like(u)
    elif pattern == "striped":  # diagonal stripes, 3.5 per side
        period = s / 3.5 * math.sqrt(2)
        hi = ((u + v) % period < period / 2).astype(np.float32)
    elif pattern == "checkered":
        cell = s / 4
        hi = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif pattern == "dotted":  # offset rows of dots
        cell = s / 3.2
        row = np.floor(v / cell)
        du = (u + (row % 2) * cell / 2) % cell - cell / 2
        dv = v % cell - cell / 2
        hi = (du * du + dv * dv < (0.3 * cell) ** 2).astype(np.float32)
    else:
        raise ValueError(pattern)
    return _down(hi * 255)


@functools.lru_cache(maxsize=None)
def _mark_layer(mark: str, shape: str, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, premultiplied gray value), each (P, P) float32 in [0, 1]."""
    _, pad, p = _geometry(s)
    a_img = Image.new("L", (p * SUPER, p * SUPER), 0)
    v_img = Image.new("L", (p * SUPER, p * SUPER), 0)
    da, dv = ImageDraw.Draw(a_img), ImageDraw.Draw(v_img)
    au, av = MARK_ANCHOR[shape]
    cx, cy = (pad + au * s) * SUPER, (pad + av * s) * SUPER
    m = max(7.0, MARK_SCALE * s) * SUPER  # mark diameter in hi-res px
    halo = SUPER  # one output pixel

    def disc(x, y, r, core_white):
        for d, fill in ((da, 255), (dv, 0 if core_white else 255)):
            d.ellipse((x - r - halo, y - r - halo, x + r + halo, y + r + halo), fill=fill)
        for d, fill in ((da, 255), (dv, 255 if core_white else 0)):
            d.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    if mark == "dot":  # white disc, black rim
        disc(cx, cy, m / 2 - halo, core_white=True)
    elif mark == "eyes":  # two black dots, white halo
        r = max(2.0, 0.11 * s) * SUPER
        for sx in (-1, 1):
            disc(cx + sx * 1.25 * (r + halo), cy, r, core_white=False)
    elif mark == "cross":  # black X, white halo
        h, w = m / 2 - halo / 2, max(2.0, s / 11) * SUPER
        for d, fill, width in ((da, 255, w + 2 * halo), (dv, 255, w + 2 * halo), (da, 255, w), (dv, 0, w)):
            d.line((cx - h, cy - h, cx + h, cy + h), fill=fill, width=round(width))
            d.line((cx - h, cy + h, cx + h, cy - h), fill=fill, width=round(width))
    elif mark == "band":  # black horizontal band with white edges, across the body
        hb = max(2.0, 0.12 * s) * SUPER
        da.rectangle((0, cy - hb - halo, p * SUPER, cy + hb + halo), fill=255)
        dv.rectangle((0, cy - hb - halo, p * SUPER, cy + hb + halo), fill=255)
        dv.rectangle((0, cy - hb, p * SUPER, cy + hb), fill=0)
    elif mark != "none":
        raise ValueError(mark)
    alpha, value = _down(np.asarray(a_img)), _down(np.asarray(v_img))
    if mark == "band":
        body = _shape_layers(shape, s)[0]
        alpha, value = alpha * body, value * body
    return alpha, value


def _secondary(rgb) -> np.ndarray:
    """The pattern color: a darker shade of light colors, a lighter tint of dark ones."""
    c = np.asarray(rgb, np.float32)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.5 if lum > 140 else c + (255 - c) * 0.55


# ---------------------------------------------------------------- backgrounds

def _vgrad(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    row = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(row, (h, w, 3))


def _tint(rng: random.Random, rgb, amount: int = 12):
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)


def _sky(rng, n):
    top = _tint(rng, (95, 150, 225), 15)
    return top, _tint(rng, (185, 215, 245), 10)


def _background(name: str, variant: int, n: int) -> np.ndarray:
    """An (n, n, 3) float32 image of background ``name``; details depend on ``variant``."""
    rng = random.Random(f"{name}:{variant}")
    img = np.empty((n, n, 3), np.float32)
    draw_ops = []  # (method, args, kwargs) drawn with PIL afterwards
    f = n / 64.0
    if name == "plain":
        base = rng.choice([(236, 236, 236), (242, 234, 222), (226, 233, 242), (236, 228, 236)])
        base = _tint(rng, base, 6)
        img[:] = _vgrad(n, n, base, tuple(c - 14 for c in base))
    elif name in ("beach", "grass", "snow", "city"):
        top, bottom = _sky(rng, n) if name != "snow" else (
            _tint(rng, (190, 202, 218), 8), _tint(rng, (222, 228, 236), 6))
        horizon = int(n * rng.uniform(0.38, 0.58))
        img[:horizon] = _vgrad(horizon, n, top, bottom)
        if name == "beach":
            shore = horizon + int(n * rng.uniform(0.1, 0.18))
            img[horizon:shore] = _vgrad(shore - horizon, n, _tint(rng, (30, 105, 160), 12),
                                        _tint(rng, (55, 150, 180), 12))
            img[shore:] = _vgrad(n - shore, n, _tint(rng, (232, 205, 150), 10), _tint(rng, (210, 180, 125), 10))
            for _ in range(rng.randint(1, 3)):  # foam and wave glints
                y0 = rng.randint(horizon + 1, shore - 1)
                x0 = rng.uniform(0, n * 0.8)
                draw_ops.append(("line", ((x0, y0, x0 + n * rng.uniform(0.1, 0.25), y0),), {"fill": (200, 230, 240)}))
            draw_ops.append(("line", ((0, shore, n, shore),), {"fill": (245, 245, 238), "width": max(1, round(f))}))
            if rng.random() < 0.5:  # sun
                sx, sy, r = rng.uniform(0.1, 0.9) * n, rng.uniform(0.05, 0.2) * n, 3.5 * f
                draw_ops.append(("ellipse", ((sx - r, sy - r, sx + r, sy + r),), {"fill": (252, 236, 150)}))
        elif name == "grass":
            img[horizon:] = _vgrad(n - horizon, n, _tint(rng, (90, 170, 60), 15), _tint(rng, (45, 125, 35), 12))
            dark = _tint(rng, (30, 95, 25), 8)
            for _ in range(rng.randint(14, 24)):  # blades
                x0, y0 = rng.uniform(0, n), rng.uniform(horizon + 2 * f, n)
                draw_ops.append(("line", ((x0, y0, x0 + rng.uniform(-1.5, 1.5) * f, y0 - 3 * f),), {"fill": dark}))
        elif name == "snow":
            ground = _tint(rng, (244, 246, 250), 4)
            hill = _tint(rng, (170, 182, 200), 10)
            pts = [(0, horizon)] + [(x, horizon - rng.uniform(2, 10) * f) for x in np.linspace(0, n, 5)] + [(n, horizon)]
            draw_ops.append(("polygon", (pts,), {"fill": hill}))
            img[horizon:] = _vgrad(n - horizon, n, ground, _tint(rng, (225, 230, 240), 4))
            draw_ops.append(("rectangle", ((0, horizon, n, n),), {"fill": ground}))
            for _ in range(rng.randint(10, 18)):  # flakes
                x0, y0 = rng.uniform(0, n), rng.uniform(0, n)
                r = rng.uniform(0.6, 1.1) * f
                draw_ops.append(("ellipse", ((x0 - r, y0 - r, x0 + r, y0 + r),), {"fill": (255, 255, 255)}))
        elif name == "city":
            street = int(n * rng.uniform(0.82, 0.92))
            img[horizon:] = _vgrad(n - horizon, n, bottom, bottom)
            x0 = -rng.uniform(0, 6) * f
            while x0 < n:
                w = rng.uniform(7, 14) * f
                top_y = rng.uniform(0.12, 0.5) * n
                g = rng.randint(95, 150)
                body = (g, g + rng.randint(-4, 4), g + rng.randint(0, 10))
                draw_ops.append(("rectangle", ((x0, top_y, x0 + w, n),), {"fill": body}))
                win = _tint(rng, (235, 220, 140), 10)
                for wy in np.arange(top_y + 3 * f, street - 3 * f, 5 * f):
                    for wx in np.arange(x0 + 2 * f, x0 + w - 2 * f, 4 * f):
                        if rng.random() < 0.35:
                            draw_ops.append(("rectangle", ((wx, wy, wx + f, wy + f),), {"fill": win}))
                x0 += w + rng.uniform(0, 3) * f
            draw_ops.append(("rectangle", ((0, street, n, n),), {"fill": _tint(rng, (70, 70, 76), 6)}))
    elif name == "water":
        sky = int(n * rng.uniform(0.0, 0.2))
        if sky:
            img[:sky] = _vgrad(sky, n, *_sky(rng, n))
        img[sky:] = _vgrad(n - sky, n, _tint(rng, (60, 130, 200), 15), _tint(rng, (20, 65, 140), 12))
        light = _tint(rng, (150, 200, 235), 10)
        for _ in range(rng.randint(12, 20)):  # wave crests
            x0, y0 = rng.uniform(-4, n), rng.uniform(sky + 2, n)
            w = rng.uniform(4, 9) * f
            draw_ops.append(("arc", ((x0, y0, x0 + w, y0 + w * 0.6), 200, 340), {"fill": light, "width": max(1, round(f))}))
    else:
        raise ValueError(name)
    if draw_ops:
        pil = Image.fromarray(img.astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for method, args, kwargs in draw_ops:
            getattr(draw, method)(*args, **kwargs)
        img = np.asarray(pil, dtype=np.float32).copy()
    return img


# ---------------------------------------------------------------- rendering

def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a uint8 array (size, size, 3)."""
    img = _background(scene.background, scene.variant, size)
    s, top, left, p = _placement(scene, size)
    body, grown = _shape_layers(scene.shape, s)
    pat = _pattern_layer(scene.pattern, s)
    mark_a, mark_v = _mark_layer(scene.mark, scene.shape, s)
    base = np.asarray(COLORS[scene.color], np.float32)
    rgb = base + (_secondary(base) - base) * pat[..., None]
    region = img[top:top + p, left:left + p]
    g, b = grown[..., None], body[..., None]
    region = region * (1 - g) + np.asarray(OUTLINE, np.float32) * g
    region = region * (1 - b) + rgb * b
    region = region * (1 - mark_a[..., None]) + 255.0 * mark_v[..., None]
    img[top:top + p, left:left + p] = region
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _placement(scene: Scene, size: int) -> tuple[int, int, int, int]:
    """(object side, top, left, patch side) of the object's patch in a size x size picture."""
    s = max(4, round(scene.size * size))
    _, pad, p = _geometry(s)
    left = min(max(round(scene.x * size - s / 2) - pad, 0), size - p)
    top = min(max(round(scene.y * size - s / 2) - pad, 0), size - p)
    return s, top, left, p


def object_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """Where the object (body, outline, pattern, mark) covers any part of a pixel: a bool
    (size, size) mask. Outside it the picture is the background alone."""
    s, top, left, p = _placement(scene, size)
    _, grown = _shape_layers(scene.shape, s)
    mark_a, _ = _mark_layer(scene.mark, scene.shape, s)
    out = np.zeros((size, size), bool)
    out[top:top + p, left:left + p] = (grown > 0) | (mark_a > 0)
    return out


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB PIL image, size x size."""
    return Image.fromarray(render_array(scene, size), "RGB")
