"""The tiny world: a procedural, seeded image generator with many compositional classes.

A class is a combination of two factors, a **shape** (18) and an interior **pattern** (12), so
there are 216 classes. Everything else is nuisance variation drawn independently per image:
rotation, scale, position, aspect, pattern phase, two foreground colours, a mottled two-colour
background, 0–2 small distractor shapes, contrast/brightness jitter and pixel noise. Colour is
never a class cue.

The classes are split into **pre-training** classes (on which compolab pre-trains its small ViT,
θ0 of the tiny preset) and **downstream** classes (the class-incremental benchmark). Both splits
contain every shape and every pattern, but never the same combination: transfer needs reusable
shape and texture features, the property a pre-trained backbone is supposed to bring.

Generation is pure numpy, vectorised per shape / pattern group and chunked with per-chunk seeds,
so the same seed always gives bit-identical images (≈ 50k 32×32 images in ~10 s on one core).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compolab.errors import ConfigError
from compolab.io import atomic_write

__all__ = [
    "SHAPES",
    "PATTERNS",
    "ALL_CLASSES",
    "WorldSplit",
    "class_name",
    "world_split",
    "generate",
    "cached_generate",
    "cache_dir",
]

SHAPES: tuple[str, ...] = (
    "circle", "ellipse", "square", "rectangle", "triangle", "pentagon", "hexagon", "star5",
    "star4", "cross", "ring", "crescent", "heart", "arrow", "semicircle", "squarering",
    "ell", "bowtie",
)  # fmt: skip
PATTERNS: tuple[str, ...] = (
    "solid", "stripes", "checker", "dots", "rings", "spokes", "grid", "waves", "halves",
    "gradient", "bullseye", "blotches",
)  # fmt: skip
#: Every (shape, pattern) pair, shape-major: 18 × 12 = 216 classes.
ALL_CLASSES: tuple[tuple[int, int], ...] = tuple(
    (s, p) for s in range(len(SHAPES)) for p in range(len(PATTERNS))
)


def class_name(c: tuple[int, int]) -> str:
    """Human-readable name of a (shape, pattern) class, e.g. ``"star5/dots"``."""
    return f"{SHAPES[c[0]]}/{PATTERNS[c[1]]}"


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class WorldSplit:
    """Pre-training and downstream classes of the tiny world (disjoint combinations)."""

    pretrain: tuple[tuple[int, int], ...]
    downstream: tuple[tuple[int, int], ...]


def world_split(num_downstream: int = 100, seed: int = 0) -> WorldSplit:
    """Split the 216 classes into pre-training and downstream classes.

    Combinations with an odd ``shape + pattern`` form the downstream pool (108), the even ones the
    pre-training pool; ``num_downstream`` of the odd ones (a seeded choice) are kept downstream and
    the others join pre-training. Every shape and pattern occurs on both sides.

    Args:
        num_downstream: Number of downstream classes (1–108).
        seed: Seed of the choice; the downstream order is also this seeded permutation, which is
            the fixed class order of the tiny benchmarks.

    Returns:
        The split; ``downstream`` is in benchmark class order.
    """
    odd = [c for c in ALL_CLASSES if (c[0] + c[1]) % 2 == 1]
    if not 1 <= num_downstream <= len(odd):
        raise ConfigError(f"num_downstream must be in 1..{len(odd)}, got {num_downstream}")
    order = np.random.default_rng([seed, 777]).permutation(len(odd))
    downstream = tuple(odd[i] for i in order[:num_downstream])
    pretrain = tuple(c for c in ALL_CLASSES if c not in set(downstream))
    return WorldSplit(pretrain=pretrain, downstream=downstream)


# --------------------------------------------------------------------------- geometry


def _ngon(theta: np.ndarray, n: int) -> np.ndarray:
    """Boundary radius of a regular n-gon with circumradius 1, at angle ``theta``."""
    k = 2 * np.pi / n
    return np.cos(np.pi / n) / np.cos(np.mod(theta, k) - np.pi / n)


def _shape_sdf(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (object-radius units, negative inside) of a shape."""
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    au, av = np.abs(u), np.abs(v)
    name = SHAPES[shape]
    if name == "circle":
        return r - 0.95
    if name == "ellipse":
        return 0.45 * np.sqrt(u * u + (v / 0.45) ** 2) - 0.45
    if name == "square":
        return np.maximum(au, av) - 0.75
    if name == "rectangle":
        return np.maximum(au - 0.95, av - 0.4)
    if name == "triangle":
        return r - _ngon(th + np.pi / 2, 3)
    if name == "pentagon":
        return r - 0.95 * _ngon(th + np.pi / 2, 5)
    if name == "hexagon":
        return r - 0.95 * _ngon(th, 6)
    if name == "star5":
        return r - (0.62 + 0.38 * np.cos(5 * th))
    if name == "star4":
        return r - (0.45 + 0.55 * np.abs(np.cos(2 * th)) ** 3)
    if name == "cross":
        return np.minimum(np.maximum(au - 0.95, av - 0.3), np.maximum(au - 0.3, av - 0.95))
    if name == "ring":
        return np.abs(r - 0.7) - 0.25
    if name == "crescent":
        return np.maximum(r - 0.95, 0.8 - np.sqrt((u - 0.45) ** 2 + v * v))
    if name == "heart":
        x, y = 1.1 * u, -1.1 * v + 0.25
        return 0.9 * np.cbrt((x * x + y * y - 0.6) ** 3 - 1.2 * x * x * y**3)
    if name == "arrow":
        shaft = np.maximum(av - 0.17, np.abs(u + 0.3) - 0.55)
        head = np.maximum(0.15 - u, 0.8 * (av - 0.75 * (0.95 - u)))
        return np.minimum(shaft, head)
    if name == "semicircle":
        return np.maximum(r - 0.95, -v - 0.2)
    if name == "squarering":
        return np.abs(np.maximum(au, av) - 0.62) - 0.2
    if name == "ell":
        upright = np.maximum(np.abs(u + 0.55) - 0.3, av - 0.9)
        foot = np.maximum(au - 0.85, np.abs(v - 0.6) - 0.3)
        return np.minimum(upright, foot)
    if name == "bowtie":
        return np.maximum(au - 0.9, 0.8 * (av - 0.85 * au - 0.05))
    raise AssertionError(name)


def _soft(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.clip(3 * z, -1, 1)


def _pattern_mix(pattern: int, u, v, phase) -> np.ndarray:
    """Mix factor in [0, 1] between the two foreground colours, in the object's own frame."""
    two_pi = 2 * np.pi
    r = np.sqrt(u * u + v * v)
    name = PATTERNS[pattern]
    if name == "solid":
        return np.zeros_like(u)
    if name == "stripes":
        return _soft(np.sin(two_pi * (2.2 * u + phase)))
    if name == "checker":
        return _soft(np.sin(two_pi * 1.6 * u + phase) * np.sin(two_pi * 1.6 * v + phase))
    if name == "dots":
        fu, fv = np.mod(2.5 * u + phase, 1) - 0.5, np.mod(2.5 * v + phase, 1) - 0.5
        return _soft(6 * (0.28 - np.sqrt(fu * fu + fv * fv)))
    if name == "rings":
        return _soft(np.sin(two_pi * 2.5 * r + phase))
    if name == "spokes":
        return _soft(np.sin(6 * np.arctan2(v, u) + phase))
    if name == "grid":
        gu = _soft(8 * (np.abs(np.mod(2.5 * u + phase, 1) - 0.5) - 0.36))
        gv = _soft(8 * (np.abs(np.mod(2.5 * v + phase, 1) - 0.5) - 0.36))
        return 1 - (1 - gu) * (1 - gv)
    if name == "waves":
        return _soft(np.sin(two_pi * (2.0 * u + 0.35 * np.sin(two_pi * 1.2 * v) + phase)))
    if name == "halves":
        return _soft(4 * u)
    if name == "gradient":
        return np.clip(0.5 + 0.6 * u, 0, 1)
    if name == "bullseye":
        return _soft(4 * (0.35 - r))
    if name == "blotches":
        return _soft(
            np.sin(3.1 * u + 5 * phase) * np.sin(2.3 * v - 3 * phase) + 0.6 * np.sin(4.7 * (u + v) + phase)
        )
    raise AssertionError(name)


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV → RGB; inputs broadcast, output has a trailing axis of 3."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    )  # (6, ..., 3)
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0].astype(np.float32)


# --------------------------------------------------------------------------- synthesis


def _blur_wrap(x: np.ndarray) -> np.ndarray:
    k = np.array([1, 4, 6, 4, 1], np.float32) / 16
    for axis in (1, 2):
        x = sum(w * np.roll(x, s, axis=axis) for w, s in zip(k, range(-2, 3), strict=True))
    return x


def _generate_chunk(
    classes: list[tuple[int, int]], labels: np.ndarray, seed, size: int, clutter: bool
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(labels)
    cls = np.asarray(classes)[labels]  # (n, 2)
    f32 = np.float32
    grid = (np.arange(size, dtype=f32) + 0.5)[None]  # (1, S)
    # pose
    rot = rng.uniform(0, 2 * np.pi, n).astype(f32)
    scale = (rng.uniform(0.22, 0.38, n) * size).astype(f32)
    cx, cy = (size / 2 + rng.uniform(-0.18, 0.18, (2, n)) * size).astype(f32)
    aspect = rng.uniform(0.85, 1.15, n).astype(f32)
    phase = rng.uniform(0, 1, n).astype(f32)
    dx = (grid - cx[:, None])[:, None, :]  # (n, 1, S) varies along x (columns)
    dy = (grid - cy[:, None])[:, :, None]  # (n, S, 1)
    c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    sc, a = scale[:, None, None], aspect[:, None, None]
    u = (c * dx + s * dy) / sc * a
    v = (-s * dx + c * dy) / sc / a
    sdf = np.empty((n, size, size), f32)
    mix = np.empty((n, size, size), f32)
    for k in np.unique(cls[:, 0]):
        idx = np.nonzero(cls[:, 0] == k)[0]
        sdf[idx] = _shape_sdf(int(k), u[idx], v[idx])
    for k in np.unique(cls[:, 1]):
        idx = np.nonzero(cls[:, 1] == k)[0]
        mix[idx] = _pattern_mix(int(k), u[idx], v[idx], phase[idx, None, None])
    alpha = np.clip(0.5 - sdf * sc, 0, 1)[..., None]
    # colours: A bright, B hue-shifted by 90–270° and darker
    ha = rng.uniform(0, 1, n)
    col_a = _hsv_to_rgb(ha, rng.uniform(0.55, 1, n), rng.uniform(0.7, 1, n))
    col_b = _hsv_to_rgb(ha + rng.uniform(0.25, 0.75, n), rng.uniform(0.4, 1, n),
                        rng.uniform(0.15, 0.55, n))  # fmt: skip
    fg = col_a[:, None, None] * (1 - mix[..., None]) + col_b[:, None, None] * mix[..., None]
    # background: two muted colours blended along a ramp plus low-frequency noise
    hb = rng.uniform(0, 1, n)
    bg0 = _hsv_to_rgb(hb, rng.uniform(0, 0.5, n), rng.uniform(0.2, 0.9, n))
    bg1 = _hsv_to_rgb(hb + 0.1, rng.uniform(0, 0.5, n), rng.uniform(0.2, 0.9, n))
    ang = rng.uniform(0, 2 * np.pi, n).astype(f32)[:, None, None]
    ramp = np.cos(ang) * grid[:, None, :] + np.sin(ang) * grid[:, :, None]  # (n, S, S)
    lo, hi = ramp.min((1, 2), keepdims=True), ramp.max((1, 2), keepdims=True)
    ramp = (ramp - lo) / (hi - lo)
    noise = rng.standard_normal((n, 4, 4)).astype(f32)
    rep = -(-size // 4)
    noise = _blur_wrap(np.repeat(np.repeat(noise, rep, 1), rep, 2)[:, :size, :size])
    m = np.clip(ramp + noise * (0.15 * rng.uniform(0, 1, n).astype(f32))[:, None, None], 0, 1)
    img = bg0[:, None, None] * (1 - m[..., None]) + bg1[:, None, None] * m[..., None]
    if clutter:  # distractors are drawn before the object, so they lie behind it
        for _ in range(2):
            on = rng.uniform(0, 1, n) < 0.5
            kind = rng.integers(0, len(SHAPES), n)
            rad = (rng.uniform(0.08, 0.14, n) * size).astype(f32)
            px, py = rng.uniform(0, size, (2, n)).astype(f32)
            col = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0.2, 1, n))
            for k in np.unique(kind[on]):
                idx = np.nonzero(on & (kind == k))[0]
                du = (grid - px[idx, None])[:, None, :] / rad[idx, None, None]
                dv = (grid - py[idx, None])[:, :, None] / rad[idx, None, None]
                d = _shape_sdf(int(k), du + 0 * dv, dv + 0 * du)
                al = np.clip(0.5 - d * rad[idx, None, None], 0, 1)[..., None]
                img[idx] = img[idx] * (1 - al) + col[idx, None, None] * al
    img = img * (1 - alpha) + fg * alpha
    # global jitter and pixel noise
    img = (img - 0.5) * rng.uniform(0.7, 1.2, n).astype(f32)[:, None, None, None] + 0.5
    img = img + rng.uniform(-0.1, 0.1, n).astype(f32)[:, None, None, None]
    sigma = rng.uniform(0, 0.06, n).astype(f32)[:, None, None, None]
    img = img + sigma * rng.standard_normal(img.shape, dtype=f32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def generate(
    classes: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    n: int,
    seed: int,
    *,
    size: int = 32,
    clutter: bool = True,
    labels: np.ndarray | None = None,
    chunk: int = 2500,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` images of the given classes, bit-identically for a given seed.

    Args:
        classes: The (shape, pattern) pairs; a label is an index into this list.
        n: Number of images (≥ 0).
        seed: Seed; the same seed and arguments give the same bytes.
        size: Side of the square RGB images in pixels (≥ 8).
        clutter: Draw 0–2 distractor shapes behind the object.
        labels: Optional labels to draw (length ``n``); uniform over ``classes`` otherwise.
        chunk: Images per independently seeded chunk.

    Returns:
        ``(images, labels)``: ``uint8`` array of shape ``(n, size, size, 3)`` and ``int64`` labels.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if size < 8:
        raise ConfigError(f"size must be >= 8 pixels, got {size}")
    if len(classes) == 0:
        raise ConfigError("classes must not be empty")
    classes = [tuple(c) for c in classes]
    if labels is None:
        labels = np.random.default_rng([seed, 12345]).integers(0, len(classes), n)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ConfigError(f"labels must have shape ({n},), got {labels.shape}")
    images = np.empty((n, size, size, 3), np.uint8)
    for k, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        images[start:stop] = _generate_chunk(classes, labels[start:stop], [seed, k], size, clutter)
    return images, labels


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Folder of generated data: ``$COMPOLAB_CACHE`` or ``~/.cache/compolab``."""
    return Path(os.environ.get("COMPOLAB_CACHE", Path.home() / ".cache" / "compolab"))


@dataclass(frozen=True)
class _Request:
    classes: tuple[tuple[int, int], ...]
    n: int
    seed: int
    size: int
    clutter: bool
    labels_sha: str
    version: int = 1


def cached_generate(
    classes, n: int, seed: int, *, size: int = 32, clutter: bool = True, labels=None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`generate`, cached on disk as ``.npy`` files (loaded with ``allow_pickle=False``)."""
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    labels_sha = "" if lab is None else hashlib.sha256(lab.tobytes()).hexdigest()
    req = _Request(tuple(map(tuple, classes)), n, seed, size, clutter, labels_sha)
    key = hashlib.sha256(json.dumps(asdict(req)).encode()).hexdigest()[:20]
    folder = cache_dir() / "world"
    img_path, lab_path = folder / f"{key}.images.npy", folder / f"{key}.labels.npy"
    if img_path.exists() and lab_path.exists():
        try:
            images = np.load(img_path, allow_pickle=False)
            out_labels = np.load(lab_path, allow_pickle=False)
            if images.shape == (n, size, size, 3) and out_labels.shape == (n,):
                return images, out_labels
        except (ValueError, OSError):
            pass  # a damaged cache entry is simply regenerated
    images, out_labels = generate(req.classes, n, seed, size=size, clutter=clutter, labels=lab)
    folder.mkdir(parents=True, exist_ok=True)
    for path, arr in ((img_path, images), (lab_path, out_labels)):
        atomic_write(path, lambda p, arr=arr: np.save(p, arr, allow_pickle=False))
    return images, out_labels
