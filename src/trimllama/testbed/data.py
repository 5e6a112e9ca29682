"""Procedural scenes and questions for the fidelity testbed.

Every image is a textured, noisy background with a few small coloured shapes.
Image sizes are exact multiples of the tile size, so that the Mllama image
processor splits them into 1, 2, 3 or 4 tiles without resampling:

    (rows, cols) in {(1, 1), (1, 2), (2, 1), (1, 3), (2, 2)}

Everything is deterministic given a seed (``random.Random`` + ``numpy``
generators seeded from it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

TILE_SIZE = 112  # must equal the image processor's size / vision image_size
PATCH_SIZE = 8

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 70, 215),
    "yellow": (230, 210, 35),
    "purple": (145, 45, 185),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COUNTS: tuple[str, ...] = ("0", "1", "2", "3", "4")

# (rows, cols) of tiles; 1, 2, 2, 3, 4 tiles
TILE_LAYOUTS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (1, 3), (2, 2))

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "relation")

# the full answer set of each type (used to compute chance / majority rates)
ANSWERS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "count": COUNTS,
    "relation": SHAPES,
}

OBJ_MIN, OBJ_MAX = 12, 16  # object size in pixels (tile is 112 px)


@dataclass
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels (x1/y1 exclusive)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass
class Question:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[SceneObject] = field(default_factory=list)
    # indices into ``objects`` of the objects the answer depends on
    target_indices: list[int] = field(default_factory=list)
    tiles: tuple[int, int] = (1, 1)  # (rows, cols)
    # per-pixel object index map (0 = background, i + 1 = objects[i]), uint8 H x W
    label_map: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def target_boxes(self) -> list[tuple[int, int, int, int]]:
        return [self.objects[i].box for i in self.target_indices]


# --------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation textured background with blotches, stripes and pixel noise."""
    base = rng.uniform(95, 160)
    tint = rng.uniform(-12, 12, size=3)
    gh, gw = max(2, h // 16), max(2, w // 16)
    coarse = rng.normal(0, 14, size=(gh, gw, 1)) + rng.normal(0, 5, size=(gh, gw, 3))
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((w, h), Image.BILINEAR), dtype=np.float32) - 128
    img = base + tint[None, None, :] + smooth
    # faint stripes
    if rng.random() < 0.5:
        period = rng.uniform(6, 20)
        phase = rng.uniform(0, 2 * np.pi)
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period + phase)
        img = img + rng.uniform(3, 9) * stripes[..., None]
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    s = x1 - x0
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        m = max(1, round(s * 0.08))
        draw.rectangle([x0 + m, y0 + m, x1 - 1 - m, y1 - 1 - m], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + s / 2.0, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "cross":
        t = max(3, round(s / 3.0))
        c0 = x0 + (s - t) // 2
        r0 = y0 + (s - t) // 2
        draw.rectangle([c0, y0, c0 + t - 1, y1 - 1], fill=fill)
        draw.rectangle([x0, r0, x1 - 1, r0 + t - 1], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def render(objects: list[SceneObject], tiles: tuple[int, int], np_rng: np.random.Generator):
    """Render objects onto a background. Returns (PIL image, label map)."""
    h, w = tiles[0] * TILE_SIZE, tiles[1] * TILE_SIZE
    bg = _background(np_rng, h, w)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    labels = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    ldraw = ImageDraw.Draw(labels)
    for i, ob in enumerate(objects):
        base = np.array(COLORS[ob.color], dtype=np.float32)
        col = tuple(int(v) for v in np.clip(base + np_rng.uniform(-18, 18, size=3), 0, 255))
        _draw_shape(draw, ob.shape, ob.box, col)
        _draw_shape(ldraw, ob.shape, ob.box, i + 1)
    arr = np.asarray(canvas, dtype=np.float32)
    arr = arr + np_rng.normal(0, 7, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img, np.asarray(labels, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- placement


def _free(box, placed, gap=3) -> bool:
    x0, y0, x1, y1 = box
    for b in placed:
        if not (x1 + gap <= b[0] or b[2] + gap <= x0 or y1 + gap <= b[1] or b[3] + gap <= y0):
            return False
    return True


def _random_box(rng: random.Random, tiles, placed, xmin=0, xmax=None, size=None, tries=200):
    """A box fully inside one tile (2 px margin), not touching ``placed``."""
    w = tiles[1] * TILE_SIZE
    xmax = w if xmax is None else xmax
    for _ in range(tries):
        s = size or rng.randint(OBJ_MIN, OBJ_MAX)
        tr, tc = rng.randrange(tiles[0]), rng.randrange(tiles[1])
        lo_x = max(tc * TILE_SIZE + 2, xmin)
        hi_x = min((tc + 1) * TILE_SIZE - 2 - s, xmax - s)
        if hi_x < lo_x:
            continue
        x0 = rng.randint(lo_x, hi_x)
        y0 = rng.randint(tr * TILE_SIZE + 2, (tr + 1) * TILE_SIZE - 2 - s)
        box = (x0, y0, x0 + s, y0 + s)
        if _free(box, placed):
            return box
    return None


def _n_distractors(rng: random.Random, n_tiles: int, lo: int = 1) -> int:
    return rng.randint(lo, min(2 + n_tiles, 5))


# --------------------------------------------------------------------------- question makers


def _make_color(rng: random.Random, tiles):
    shape = rng.choice(SHAPES)
    color = rng.choice(COLOR_NAMES)
    objs = []
    box = _random_box(rng, tiles, [])
    objs.append(SceneObject(shape, color, box))
    others = [s for s in SHAPES if s != shape]
    for _ in range(_n_distractors(rng, tiles[0] * tiles[1])):
        b = _random_box(rng, tiles, [o.box for o in objs])
        if b is None:
            break
        objs.append(SceneObject(rng.choice(others), rng.choice(COLOR_NAMES), b))
    return f"what color is the {shape} ?", color, objs, [0]


def _make_shape(rng: random.Random, tiles):
    shape = rng.choice(SHAPES)
    color = rng.choice(COLOR_NAMES)
    objs = [SceneObject(shape, color, _random_box(rng, tiles, []))]
    others = [c for c in COLOR_NAMES if c != color]
    for _ in range(_n_distractors(rng, tiles[0] * tiles[1])):
        b = _random_box(rng, tiles, [o.box for o in objs])
        if b is None:
            break
        objs.append(SceneObject(rng.choice(SHAPES), rng.choice(others), b))
    return f"what shape is the {color} one ?", shape, objs, [0]


def _make_count(rng: random.Random, tiles, max_count: int = 4):
    color = rng.choice(COLOR_NAMES)
    n = rng.randint(0, max_count)
    objs: list[SceneObject] = []
    for _ in range(n):
        b = _random_box(rng, tiles, [o.box for o in objs], tries=1000)
        assert b is not None
        objs.append(SceneObject(rng.choice(SHAPES), color, b))
    others = [c for c in COLOR_NAMES if c != color]
    for _ in range(_n_distractors(rng, tiles[0] * tiles[1], lo=1 if n else 2)):
        b = _random_box(rng, tiles, [o.box for o in objs])
        if b is None:
            break
        objs.append(SceneObject(rng.choice(SHAPES), rng.choice(others), b))
    return f"how many {color} shapes are there ?", str(n), objs, list(range(n))


def _make_relation(rng: random.Random, tiles):
    """Anchor of a unique colour; exactly one object to its left, at the same height and
    close by; every other object lies entirely to the right of the anchor."""
    w = tiles[1] * TILE_SIZE
    color = rng.choice(COLOR_NAMES)
    others = [c for c in COLOR_NAMES if c != color]
    answer = rng.choice(SHAPES)
    for _ in range(500):
        s_a = rng.randint(OBJ_MIN, OBJ_MAX)
        s_l = rng.randint(OBJ_MIN, OBJ_MAX)
        gap = rng.randint(3, 10)
        tr, tc = rng.randrange(tiles[0]), rng.randrange(tiles[1])
        # left object and anchor in the same tile
        lo = tc * TILE_SIZE + 2
        hi = (tc + 1) * TILE_SIZE - 2 - (s_l + gap + s_a)
        if hi < lo:
            continue
        xl = rng.randint(lo, hi)
        y_c = rng.randint(tr * TILE_SIZE + 2 + OBJ_MAX // 2, (tr + 1) * TILE_SIZE - 2 - OBJ_MAX // 2)
        yl = y_c - s_l // 2 + rng.randint(-2, 2)
        ya = y_c - s_a // 2 + rng.randint(-2, 2)
        yl = min(max(yl, tr * TILE_SIZE + 2), (tr + 1) * TILE_SIZE - 2 - s_l)
        ya = min(max(ya, tr * TILE_SIZE + 2), (tr + 1) * TILE_SIZE - 2 - s_a)
        left_box = (xl, yl, xl + s_l, yl + s_l)
        xa = xl + s_l + gap
        anchor_box = (xa, ya, xa + s_a, ya + s_a)
        # need room for at least one object to the right of the anchor
        if w - (xa + s_a) < OBJ_MAX + 8 and rng.random() < 0.7:
            continue
        break
    objs = [
        SceneObject(answer, rng.choice(others), left_box),
        SceneObject(rng.choice(SHAPES), color, anchor_box),
    ]
    right_min = anchor_box[2] + 2
    for _ in range(_n_distractors(rng, tiles[0] * tiles[1], lo=0 if w - right_min < 40 else 1)):
        b = _random_box(rng, tiles, [o.box for o in objs], xmin=right_min)
        if b is None:
            break
        objs.append(SceneObject(rng.choice(SHAPES), rng.choice(others), b))
    return f"what shape is left of the {color} one ?", answer, objs, [0, 1]


_MAKERS = {
    "color": _make_color,
    "shape": _make_shape,
    "count": _make_count,
    "relation": _make_relation,
}


def make_question(rng: random.Random, qtype: str, tiles: tuple[int, int] | None = None) -> Question:
    if tiles is None:
        tiles = rng.choice(TILE_LAYOUTS)
    q, a, objs, tgt = _MAKERS[qtype](rng, tiles)
    # shuffle drawing order but keep target indices consistent
    order = list(range(len(objs)))
    rng.shuffle(order)
    objs2 = [objs[i] for i in order]
    tgt2 = sorted(order.index(i) for i in tgt)
    np_rng = np.random.default_rng(rng.getrandbits(63))
    img, labels = render(objs2, tiles, np_rng)
    return Question(image=img, question=q, answer=a, qtype=qtype, objects=objs2,
                    target_indices=tgt2, tiles=tiles, label_map=labels)


def make_questions(n: int, seed: int, qtypes: tuple[str, ...] | None = None,
                   weights: tuple[float, ...] | None = None) -> list[Question]:
    """``n`` questions, deterministic in ``seed``.

    Without ``weights`` the question types cycle (balanced); tile layouts are random.
    """
    qtypes = tuple(qtypes or QUESTION_TYPES)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if weights is None:
            qt = qtypes[i % len(qtypes)]
        else:
            qt = rng.choices(qtypes, weights=weights)[0]
        out.append(make_question(rng, qt))
    return out


def patch_labels(q: Question, tile_size: int = TILE_SIZE, patch_size: int = PATCH_SIZE,
                 max_tiles: int = 4, min_frac: float = 0.2):
    """Per-token colour, shape and object-centre class for the vision tokens of ``q``'s image.

    Returns three int64 arrays of shape (max_tiles, 1 + (tile/patch)**2): class 0 is background
    (and the class token); colour classes are 1..len(COLOR_NAMES) and shape classes 1..len(SHAPES)
    for the object covering most of the patch (at least ``min_frac`` of it); the centre class is the
    colour class of the object whose box centre lies in the patch (one token per object, what a count
    can read). -100 for padding tiles (ignored). Tile order is row-major, as in the Mllama processor.
    """
    g = tile_size // patch_size
    n_tok = 1 + g * g
    col = np.full((max_tiles, n_tok), -100, dtype=np.int64)
    shp = np.full((max_tiles, n_tok), -100, dtype=np.int64)
    ctr = np.full((max_tiles, n_tok), -100, dtype=np.int64)
    lm = q.label_map
    rows, cols = q.tiles
    col_ids = np.array([0] + [COLOR_NAMES.index(o.color) + 1 for o in q.objects])
    shp_ids = np.array([0] + [SHAPES.index(o.shape) + 1 for o in q.objects])
    n_obj = len(q.objects)
    for r in range(rows):
        for c in range(cols):
            t = r * cols + c
            tile = lm[r * tile_size:(r + 1) * tile_size, c * tile_size:(c + 1) * tile_size]
            p = tile.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)
            counts = np.stack([(p == k).sum(1) for k in range(1, n_obj + 1)], 1) if n_obj else np.zeros((g * g, 0))
            best = np.zeros(g * g, dtype=np.int64)
            if n_obj:
                arg = counts.argmax(1)
                ok = counts.max(1) >= min_frac * patch_size * patch_size
                best[ok] = arg[ok] + 1
            col[t, :] = 0
            shp[t, :] = 0
            ctr[t, :] = 0
            col[t, 1:] = col_ids[best]
            shp[t, 1:] = shp_ids[best]
    for ob in q.objects:
        cx, cy = ob.center
        r, c = int(cy) // tile_size, int(cx) // tile_size
        py, px = (int(cy) % tile_size) // patch_size, (int(cx) % tile_size) // patch_size
        ctr[r * cols + c, 1 + py * g + px] = COLOR_NAMES.index(ob.color) + 1
    return col, shp, ctr


# --------------------------------------------------------------------------- two-turn conversations


@dataclass
class Conversation:
    """Two questions about one image: `first` about one object, `second` (of any type) about others.

    Both share the image; `second.target_indices` never include the object `first` asks about.
    """

    first: Question
    second: Question

    @property
    def qtype(self) -> str:
        """The second question's type (what a conversation is reported under)."""
        return self.second.qtype


def first_question(rng: random.Random, scene: Question) -> Question | None:
    """A colour or shape question about an object the second question does not depend on, unique by the
    attribute it is named by; None if the scene has no such object."""
    candidates = []
    for index, ob in enumerate(scene.objects):
        if index in scene.target_indices:
            continue
        if sum(o.shape == ob.shape for o in scene.objects) == 1:
            candidates.append(("color", f"what color is the {ob.shape} ?", ob.color, index))
        if sum(o.color == ob.color for o in scene.objects) == 1:
            candidates.append(("shape", f"what shape is the {ob.color} one ?", ob.shape, index))
    if not candidates:
        return None
    qtype, text, answer, index = rng.choice(candidates)
    return Question(image=scene.image, question=text, answer=answer, qtype=qtype, objects=scene.objects,
                    target_indices=[index], tiles=scene.tiles, label_map=scene.label_map)


def make_conversations(n: int, seed: int, qtypes: tuple[str, ...] | None = None) -> list[Conversation]:
    """``n`` two-turn conversations, deterministic in ``seed``; the second question's types cycle.

    The scene is drawn for the second question (as `make_question` does); the first asks the colour or
    shape of another object, named by an attribute no other object shares. Scenes without one are redrawn.
    """
    qtypes = tuple(qtypes or QUESTION_TYPES)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        second = make_question(rng, qtypes[len(out) % len(qtypes)])
        first = first_question(rng, second)
        if first is not None:
            out.append(Conversation(first=first, second=second))
    return out
