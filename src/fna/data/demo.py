"""The built-in demo dataset: coloured, textured shapes over real photos, generated from a seed.

Five classes (:data:`CLASSES`) of shapes with varied size, rotation, colour and texture, partially
occluding each other and cut by the image border, over crops of photos and textures bundled with
scikit-image (no download). Every object has an exact instance mask (its visible pixels), so the
semantic mask and the boxes follow from the masks exactly.

:func:`write_demo` writes the COCO-json + mask-PNG layout that :func:`~fna.data.open_detection`
(``coco``) and :class:`~fna.data.FolderSegmentation` read::

    classes.txt                          background + the 5 shape classes (segmentation ids 0..5)
    images/{train,val}/{split}_00000.png
    masks/{train,val}/{split}_00000.png   semantic ids: 0 background, 1..5 the shapes
    annotations/instances_{train,val}.json   COCO: RLE masks, bbox, area, iscrowd 0, categories 1..5
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from fna.data.base import DataError

CLASSES = ("circle", "rectangle", "triangle", "star", "cross")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
          "coins", "moon")
TEXTURES = ("brick", "grass", "gravel")
SPLITS = ("train", "val")
MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its own pixels visible


@dataclass
class DemoSample:
    """One generated image ``uint8 [H, W, 3]`` with its objects' class ids (0..4) and visible masks."""

    image: np.ndarray
    classes: list[int]
    masks: list[np.ndarray]

    def semantic_mask(self) -> np.ndarray:
        """``uint8 [H, W]``: 0 background, ``class + 1`` where an object is visible."""
        out = np.zeros(self.image.shape[:2], dtype=np.uint8)
        for c, m in zip(self.classes, self.masks):
            out[m] = c + 1
        return out


@lru_cache(maxsize=1)
def _sources() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The bundled scikit-image photos (RGB uint8) and textures (gray float in [0, 1])."""
    from skimage import data

    photos = []
    for name in PHOTOS:
        im = getattr(data, name)()
        photos.append(np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im[..., :3])
    textures = [getattr(data, name)().astype(np.float32) / 255.0 for name in TEXTURES]
    return photos, textures


def _crop_resized(rng: np.random.Generator, src: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random square-ish crop of ``src`` (30–100% of its short side) resized to ``h``×``w``."""
    side = int(min(src.shape[:2]) * rng.uniform(0.3, 1.0))
    y = int(rng.integers(0, src.shape[0] - side + 1))
    x = int(rng.integers(0, src.shape[1] - side + 1))
    crop = src[y:y + side, x:x + side]
    out = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
    return out[:, ::-1] if rng.random() < 0.5 else out


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
    return np.array(rgb, dtype=np.float32) * 255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo crop, or a texture crop tinted with a random colour, as float ``[H, W, 3]``."""
    photos, textures = _sources()
    k = int(rng.integers(0, len(photos) + len(textures)))
    if k < len(photos):
        return _crop_resized(rng, photos[k], h, w).astype(np.float32)
    tex = _crop_resized(rng, textures[k - len(photos)], h, w)
    return (0.35 + 0.65 * tex[..., None]) * _random_colour(rng)


def _fill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An object's surface as float ``[H, W, 3]``: flat + noise, stripes, a gradient or a tinted texture."""
    colour = _random_colour(rng)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return colour + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    other = _random_colour(rng)
    if kind == 1:
        stripes = (np.floor(t / rng.uniform(2.5, 6.0)) % 2)[..., None]
        return colour * (1 - stripes) + other * stripes
    if kind == 2:
        a = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
        return colour * (1 - a) + other * a
    tex = _crop_resized(rng, _sources()[1][int(rng.integers(0, len(TEXTURES)))], h, w)
    return (0.4 + 0.6 * tex[..., None]) * colour


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
             ) -> list[tuple[float, float]]:
    """Vertices of a shape of class ``cls`` (not the circle) around ``(cx, cy)`` with radius ``r``."""
    if cls == 1:  # rectangle with aspect 0.45–1
        a = rng.uniform(0.45, 1.0)
        pts = [(-1, -a), (1, -a), (1, a), (-1, a)]
    elif cls == 2:  # triangle, vertices jittered
        pts = [(np.cos(t) * s, np.sin(t) * s)
               for t, s in zip(np.arange(3) * 2 * np.pi / 3, rng.uniform(0.85, 1.15, 3))]
    elif cls == 3:  # five-pointed star
        pts = [(np.cos(t) * s, np.sin(t) * s)
               for t, s in zip(np.arange(10) * np.pi / 5, [1.0, 0.45] * 5)]
    else:  # cross (plus sign) with arm half-width 0.3
        q = 0.3
        pts = [(q, -1), (q, -q), (1, -q), (1, q), (q, q), (q, 1), (-q, 1), (-q, q), (-1, q), (-1, -q),
               (-q, -q), (-q, -1)]
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shape_mask(cls: int, h: int, w: int, rng: np.random.Generator,
                radius: tuple[float, float] = (0.1, 0.25)) -> np.ndarray:
    """A random shape of class ``cls`` as a boolean ``[H, W]`` mask (may be cut by the border); its radius is
    a fraction in ``radius`` of the image's short side."""
    r = rng.uniform(*radius) * min(h, w)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if cls == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    else:
        draw.polygon(_polygon(cls, cx, cy, r, rng.uniform(0, 2 * np.pi), rng), fill=1)
    return np.asarray(canvas, dtype=bool)


def make_sample(rng: np.random.Generator, size: tuple[int, int] = (128, 128), max_objects: int = 6,
                min_objects: int = 2, n_classes: int = len(CLASSES), radius: tuple[float, float] = (0.1, 0.25)
                ) -> DemoSample:
    """One image with ``min_objects``..``max_objects`` objects of the first ``n_classes`` classes, radius a
    fraction in ``radius`` of the short side; each keeps at least half of its pixels visible."""
    h, w = size
    min_pixels = max(16, h * w // 400)
    image = _background(rng, h, w)
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    classes: list[int] = []
    target = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(8 * target):
        if len(classes) == target:
            break
        cls = int(rng.integers(0, n_classes))
        mask = _shape_mask(cls, h, w, rng, radius)
        if mask.sum() < min_pixels:
            continue
        covered = [v & ~mask for v in visible]
        if any(c.sum() < max(min_pixels, MIN_VISIBLE * f.sum()) for c, f in zip(covered, full)):
            continue
        image[mask] = _fill(rng, h, w)[mask]
        classes.append(cls)
        full.append(mask)
        visible = covered + [mask]
    return DemoSample(np.clip(np.rint(image), 0, 255).astype(np.uint8), classes, visible)


def _coco_annotations(sample: DemoSample, image_id: int, first_id: int) -> list[dict]:
    """COCO annotations (RLE, area, bbox from the mask) of one sample's objects."""
    anns = []
    for k, (cls, m) in enumerate(zip(sample.classes, sample.masks)):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"id": first_id + k, "image_id": image_id, "category_id": cls + 1,
                     "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
                     "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "iscrowd": 0})
    return anns


def write_demo(root: str | Path, n_train: int = 200, n_val: int = 50, size: int | tuple[int, int] = 128,
               seed: int = 0, n_classes: int = len(CLASSES), objects: tuple[int, int] = (2, 6),
               radius: tuple[float, float] = (0.1, 0.25)) -> dict[str, int]:
    """Write the demo dataset under ``root`` (layout in the module doc); same arguments, same bytes.

    ``n_classes`` (the first of :data:`CLASSES`), ``objects`` (fewest, most per image) and ``radius``
    (fractions of the short side) shape the task: :data:`fna.demo.DEMO_DATA` is the demo's choice.
    Image ``i`` of a split depends only on ``(seed, split, i, size)`` and those. Earlier demo images in
    ``root`` are replaced. Returns image and object counts.
    """
    if not 1 <= n_classes <= len(CLASSES) or not 1 <= objects[0] <= objects[1] or not 0 < radius[0] <= radius[1]:
        raise DataError(root, f"bad demo settings: n_classes {n_classes} (1..{len(CLASSES)}), objects {objects}, "
                              f"radius {radius}")
    names = CLASSES[:n_classes]
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(root, "exists and is not a folder")
    size = (size, size) if isinstance(size, int) else tuple(size)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(("background", *names)) + "\n")
    counts = {}
    for split_code, (split, n) in enumerate(zip(SPLITS, (n_train, n_val))):
        for sub in ("images", "masks"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
            for stale in (root / sub / split).glob(f"{split}_*.png"):  # from an earlier, larger demo
                stale.unlink()
        images, annotations = [], []
        for i in range(n):
            sample = make_sample(np.random.default_rng([seed, split_code, i]), size, objects[1], objects[0],
                                 n_classes, radius)
            name = f"{split}_{i:05d}.png"
            Image.fromarray(sample.image).save(root / "images" / split / name)
            Image.fromarray(sample.semantic_mask()).save(root / "masks" / split / name)
            images.append({"id": i + 1, "file_name": name, "width": size[1], "height": size[0]})
            annotations += _coco_annotations(sample, i + 1, len(annotations) + 1)
        coco = {"info": {"description": "fna demo shapes", "seed": seed},
                "images": images, "annotations": annotations,
                "categories": [{"id": c + 1, "name": name, "supercategory": "shape"}
                               for c, name in enumerate(names)]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        counts[f"{split}_images"], counts[f"{split}_objects"] = n, len(annotations)
    return counts
