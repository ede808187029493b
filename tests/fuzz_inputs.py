"""Hypothesis strategies for what users hand to fna, and the check that each input either works (and is
consistent) or raises one clear :class:`~fna.errors.FnaError`.

Four kinds (:data:`KINDS`): architecture JSON files, net_config text, COCO json with its images, and
segmentation ``folder`` layouts with their mask PNGs. Each strategy starts from a valid input and applies
a few structural mutations (a value replaced by any JSON value, a key dropped or added) and text or byte
mutations (truncation, deep nesting, 5000-digit numbers, invalid UTF-8, crafted PNG headers), so that
valid inputs, nearly valid ones and garbage are all drawn. A plain module shared by ``tests/test_fuzz.py``
(a fast, derandomized run) and ``bench/soak.py`` (many more examples).

:func:`outcome` runs a kind's check on an input: ``"ok"`` when it works and passes the consistency
checks, ``"error"`` for one clear :class:`FnaError`; :class:`Unclear` (an FnaError message that is empty
or spans lines), :class:`Inconsistent` (a working input whose result contradicts itself) or any other
exception propagate.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from PIL import Image

from fna.arch import Arch, load_arch, parse_op
from fna.data import IGNORE_INDEX, open_detection, open_segmentation
from fna.errors import FnaError


class Unclear(AssertionError):
    """An :class:`FnaError` whose message is not one non-empty line."""


class Inconsistent(AssertionError):
    """An input that works but gives a result contradicting itself (a round trip that changes it...)."""


def expect(condition: bool, what: str) -> None:
    """:class:`Inconsistent` with ``what`` unless ``condition``."""
    if not condition:
        raise Inconsistent(what)


def clear_message(message: str) -> None:
    """:class:`Unclear` unless ``message`` is one non-empty line without a traceback."""
    if not message.strip() or any(c in message for c in "\n\r\x0b\x0c\x85\u2028\u2029") or "Traceback" in message:
        raise Unclear(f"not one clear line: {message[:300]!r}")


def outcome(check: Callable[[Any], None], value: Any) -> str:
    """``"ok"`` when ``check(value)`` passes, ``"error"`` when it raises one clear :class:`FnaError`."""
    try:
        check(value)
    except FnaError as e:
        clear_message(str(e))
        return "error"
    return "ok"


# -- values and mutations ------------------------------------------------------------------------------

TEXT = st.text(max_size=12)
OP_NAMES = st.builds(lambda k, e: f"k{k}_e{e}", st.sampled_from([1, 3, 5, 7, 9]), st.integers(1, 8))
OPISH = st.one_of(OP_NAMES, st.just("skip"), st.from_regex(r"\Ak\d{1,2}_e\d{1,2}\Z"),
                  st.sampled_from(["conv_2d_1x1", "k3_e", "K3_E6", " k3_e6", "k3_e6 ", "k\u0663_e6", "k3-e6"]))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([0, 1, -1, 2, 3, 32, 255, 256, 65535, 65536, 2 ** 31, 2 ** 63, 10 ** 30]),
    st.floats(), st.sampled_from([0.5, 24.0, 24.5, 1e-5, -0.0, 1e300, float("inf"), float("nan")]),
    TEXT, OPISH, st.sampled_from(["", " 24 ", "24", "-1", "1e3", "\u0663", "relu", "relu6", "a\nb", "x" * 300]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.one_of(TEXT, st.sampled_from(["id", "stages", "ops", "bbox"])),
                                             inner, max_size=3), max_leaves=6)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON-like value, the root ``()`` first."""
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy, max_mutations: int = 3) -> Any:
    """A value of ``base`` with up to ``max_mutations`` edits: replace, drop, add or duplicate an entry."""
    obj = _copy(draw(base))
    for _ in range(draw(st.sampled_from([0, 0, 0, *range(1, max_mutations + 1)]))):  # half the draws unmutated
        path = draw(st.sampled_from(_paths(obj)))
        how = draw(st.sampled_from(["replace", "replace", "drop", "add", "duplicate"]))
        if not path:
            if how == "replace":
                obj = draw(JSON_VALUES)
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if how == "replace":
            parent[key] = draw(JSON_VALUES)
        elif how == "drop":
            del parent[key]
        elif how == "duplicate" and isinstance(parent, list):
            parent.insert(key, _copy(parent[key]))
        elif how == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(TEXT, st.sampled_from(["dilation", "iscrowd", "area", "extra"])))] = draw(JSON_VALUES)
        elif how == "add" and isinstance(parent, list):
            parent.append(draw(JSON_VALUES))
    return obj


@st.composite
def spoiled_text(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as UTF-8 bytes, mostly as it is, else truncated, spliced, deeply nested, with a huge number, ..."""
    how = draw(st.sampled_from(["as is"] * 14 + ["truncate", "insert", "deep", "huge number", "invalid utf-8",
                                                "bom", "empty", "binary", "nul"]))
    if how == "truncate":
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.one_of(TEXT, st.sampled_from(["{", "}", "[", "]", ",", '"', ":", "|", "'", "\\"])))\
            + text[at:]
    elif how == "deep":
        depth = draw(st.sampled_from([50, 1000, 20000, 200000]))
        text = draw(st.sampled_from(['{"stages": ', '{"images": ', "[[32, 16], ", ""])) + "[" * depth + "]" * depth \
            + draw(st.sampled_from(["}", "]", ""]))
    elif how == "huge number":
        numbers = [m.span() for m in re.finditer(r"\d+", text)]
        digits = "9" * draw(st.integers(4301, 6000))
        if numbers:
            a, b = draw(st.sampled_from(numbers))
            text = text[:a] + digits + text[b:]
        else:
            text += digits
    elif how == "invalid utf-8":
        data = text.encode()
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80"])) + data[at:]
    elif how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    elif how == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n\n"]))
    elif how == "binary":
        return draw(st.binary(max_size=64))
    elif how == "nul":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + "\x00" + text[at:]
    return text.encode()


# -- architectures -------------------------------------------------------------------------------------

@st.composite
def arch_dicts(draw: st.DrawFn) -> dict:
    """A valid architecture as a JSON-ready dict (stages that chain, skips only where shapes are kept)."""
    stem = draw(st.integers(1, 48))
    c_in, stages = stem, []
    for _ in range(draw(st.integers(1, 5))):
        c_out = draw(st.one_of(st.just(c_in), st.integers(1, 48)))
        stride = draw(st.sampled_from([1, 2]))
        first = st.one_of(OP_NAMES, st.just("skip")) if c_in == c_out and stride == 1 else OP_NAMES
        ops = [draw(first), *draw(st.lists(st.one_of(OP_NAMES, st.just("skip")), max_size=3))]
        stage = {"c_in": c_in, "c_out": c_out, "stride": stride, "ops": ops}
        if draw(st.booleans()):
            stage["dilation"] = draw(st.integers(1, 4))
        stages.append(stage)
        c_in = c_out
    d: dict[str, Any] = {"stages": stages, "stem_channels": stem}
    optional = {"stem_stride": st.sampled_from([1, 2]), "final_channels": st.integers(0, 2048),
                "activation": st.sampled_from(["relu6", "relu"]), "bn_eps": st.floats(1e-6, 0.1),
                "in_channels": st.just(3), "name": TEXT}
    for key, values in optional.items():
        if draw(st.booleans()):
            d[key] = draw(values)
    return d


@st.composite
def arch_json_files(draw: st.DrawFn) -> bytes:
    """The bytes of an architecture JSON file (sometimes wrapped as a run file's ``{"arch": ...}``)."""
    d = draw(mutated(arch_dicts()))
    if draw(st.integers(0, 4)) == 0:
        d = {"arch": d, "metric": 0.5}
    return draw(spoiled_text(json.dumps(d, indent=draw(st.sampled_from([None, 2])))))


@st.composite
def net_config_texts(draw: st.DrawFn) -> bytes:
    """The bytes of a net_config text: ``[[c_in, c_out], [ops], stride]`` entries joined by ``|``."""
    d = draw(arch_dicts())
    entries = [[[s["c_in"], s["c_out"]], s["ops"], s["stride"]] for s in d["stages"]]
    if draw(st.booleans()):
        entries.append([[entries[-1][0][1], draw(st.integers(0, 2048))], ["conv_2d_1x1"], 1])
    entries = draw(mutated(st.just(entries)))
    items = entries if isinstance(entries, list) else [entries]
    sep = draw(st.sampled_from(["|\n", "|", " | ", "|\r\n", "||"]))
    return draw(spoiled_text(sep.join(str(e) for e in items)))


def check_arch(arch: Arch) -> None:
    """An architecture that loaded: a string name, valid ops, lossless JSON and net_config round trips."""
    expect(isinstance(arch.name, str), f"name {arch.name!r} is not a string")
    for stage in arch.stages:
        for op in stage.ops:
            parse_op(op)
    again = Arch.from_dict(json.loads(arch.to_json()))
    expect(again == arch and again.name == arch.name, "to_json/from_dict changed the architecture")
    text = Arch.from_net_config(arch.to_net_config(), final_channels=arch.final_channels)
    expect([(s.c_in, s.c_out, s.stride, s.ops) for s in text.stages]
           == [(s.c_in, s.c_out, s.stride, s.ops) for s in arch.stages] and text.stem_channels == arch.stem_channels,
           "to_net_config/from_net_config changed the stages")
    canonical = arch.canonical()
    expect([s.depth for s in canonical.stages] == [s.depth for s in arch.stages]
           and [s.ops[:s.depth] for s in canonical.stages] == [tuple(o for o in s.ops if o != "skip")
                                                               for s in arch.stages], "canonical() changed the layers")
    arch.describe()


def check_arch_file(data: bytes) -> None:
    """``load_arch`` on a file holding ``data``; a result must pass :func:`check_arch`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "arch.json"
        path.write_bytes(data)
        arch = load_arch(path)
    check_arch(arch)


def check_arch_object(obj: Any) -> None:
    """``Arch.from_dict`` on a (mutated) JSON value; a result must pass :func:`check_arch`."""
    check_arch(Arch.from_dict(obj))


def check_net_config(data: bytes) -> None:
    """``Arch.from_net_config`` on the text; a result must round-trip and load the same from a file."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None:
        arch = Arch.from_net_config(text)
        check_arch(arch)
        expect(Arch.from_net_config(arch.to_net_config(), final_channels=arch.final_channels) == arch,
               "net_config round trip changed the architecture")
    if data.lstrip().startswith(b"{"):
        return  # a file starting with '{' is read as JSON
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "arch.txt"
        path.write_bytes(data)
        loaded = load_arch(path)
    check_arch(loaded)
    expect(text is None or "\r" in text or loaded == arch, "load_arch and from_net_config disagree")


# -- images and masks ----------------------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG with a well-formed (CRC-correct) header claiming any size and pixel format, and ``idat`` as data."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(array: np.ndarray, mode: str, fmt: str, palette_transparency: bool = False) -> bytes:
    """``array`` as an image file of ``mode`` in ``fmt`` (PNG, TIFF, JPEG, BMP)."""
    if mode == "1":
        im = Image.fromarray(array.astype(bool))
    elif mode == "I;16":
        im = Image.fromarray(array.astype(np.uint16))
    elif mode == "I":
        im = Image.fromarray(array.astype(np.int32))
    elif mode == "F":
        im = Image.fromarray(array.astype(np.float32))
    elif mode == "P":
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), array.astype(np.uint8).tobytes())
        im.putpalette([v for i in range(256) for v in (i, i, i)])
        if palette_transparency:
            im.info["transparency"] = 0
    else:
        im = Image.fromarray(array.astype(np.uint8)).convert(mode) if array.ndim == 2 \
            else Image.fromarray(array.astype(np.uint8))
        if im.mode != mode:
            im = im.convert(mode)
    out = io.BytesIO()
    if fmt == "JPEG" and mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    im.save(out, fmt, **({"transparency": 0} if palette_transparency and fmt == "PNG" else {}))
    return out.getvalue()


FILE_MODES = {"PNG": ["L", "RGB", "RGBA", "LA", "P", "1", "I;16"], "TIFF": ["I", "F", "CMYK", "I;16", "RGB"],
              "JPEG": ["L", "RGB", "CMYK"], "BMP": ["RGB", "L"]}


@st.composite
def broken_image(draw: st.DrawFn, width: int, height: int) -> bytes:
    """Bytes that are not a good image: garbage, a truncated PNG, or a crafted header (huge, zero, odd depth)."""
    how = draw(st.sampled_from(["garbage", "truncated", "header"]))
    if how == "garbage":
        return draw(st.binary(max_size=48))
    if how == "truncated":
        data = encode(np.zeros((height, width), np.uint8), "L", "PNG")
        return data[:draw(st.integers(0, len(data) - 1))]
    size = st.one_of(st.integers(0, 16), st.sampled_from([20000, 65535, 2 ** 31 - 1]))
    return crafted_png(draw(size), draw(size), draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0])),
                       draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])), draw(st.binary(max_size=32)))


@st.composite
def image_files(draw: st.DrawFn, width: int, height: int) -> bytes | None:
    """An image file ``width``×``height`` of a random format and mode, or a broken one, or ``None`` (missing)."""
    how = draw(st.sampled_from(["good"] * 12 + ["broken", "missing"]))
    if how == "missing":
        return None
    if how == "broken":
        return draw(broken_image(width, height))
    fmt = draw(st.sampled_from(["PNG", "PNG", "PNG", "TIFF", "JPEG", "BMP"]))
    mode = draw(st.sampled_from(FILE_MODES[fmt]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if mode == "F":
        values = rng.choice(np.array([0.0, 0.25, 1.0, -0.5, 2.0, np.nan], np.float32), size=(height, width),
                            p=[0.4, 0.3, 0.2, 0.04, 0.03, 0.03])
        return encode(values, "F", fmt)
    if mode in ("I", "I;16"):
        top = 65535 if mode == "I;16" or draw(st.booleans()) else 2 ** 20
        low = -3 if mode == "I" and draw(st.booleans()) else 0
        return encode(rng.integers(low, top + 1, (height, width)), mode, fmt)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2}.get(mode, 0)
    shape = (height, width, channels) if channels else (height, width)
    array = rng.integers(0, 256, shape)
    if mode == "LA":
        return encode(array[..., 0], "LA", fmt)
    if mode == "CMYK":
        out = io.BytesIO()
        Image.fromarray(array.astype(np.uint8), "CMYK").save(out, fmt)
        return out.getvalue()
    return encode(array, mode, fmt, palette_transparency=mode == "P" and draw(st.booleans()))


def write_files(root: Path, files: dict[str, bytes | None]) -> None:
    """Write ``files`` (relative path → bytes; ``None`` is left missing) under ``root``."""
    for rel, data in files.items():
        if data is not None:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


# -- COCO detection ------------------------------------------------------------------------------------

SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


@dataclass
class CocoCase:
    """An ``annotations/instances_train.json`` (bytes) and the image files under ``images/train/``."""

    annotation: bytes
    images: dict[str, bytes | None] = field(default_factory=dict)
    skip_bad: bool = False


@st.composite
def coco_cases(draw: st.DrawFn) -> CocoCase:
    """A COCO split with 0–4 categories, 0–3 images and 0–6 boxes, mutated as JSON and as text."""
    cat_ids = draw(st.lists(st.integers(0, 9), min_size=draw(st.sampled_from([1, 1, 1, 0])), max_size=4,
                            unique=draw(st.integers(0, 4)) > 0))
    categories = [{"id": c, "name": draw(st.one_of(st.sampled_from(["cat", "dog", "box"]), TEXT)),
                   "supercategory": "x"} for c in cat_ids]
    images, files = [], {}
    for i in range(draw(st.sampled_from([1, 1, 2, 2, 3, 0]))):
        w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        odd_names = [f"im{i}.jpg", f"sub/im{i}.png", "x" * 300, "../outside.png", "im0.png"]
        name = draw(st.sampled_from([f"im{i}.png"] * 6 + odd_names) | TEXT) if draw(st.integers(0, 4)) else f"im{i}.png"
        if SAFE_NAME.fullmatch(name.replace("sub/", "")) and name not in files:
            files[name] = draw(image_files(w, h))
        stated_w, stated_h = (w, h) if draw(st.integers(0, 11)) else (draw(st.integers(0, 13)),
                                                                       draw(st.integers(0, 13)))
        images.append({"id": i + 1 if draw(st.integers(0, 5)) else draw(st.integers(0, 4)), "file_name": name,
                       "width": stated_w, "height": stated_h})
    annotations = []
    for k in range(draw(st.integers(0, 6))):
        image = draw(st.sampled_from(images)) if images else {"id": 1, "width": 8, "height": 8}
        w, h = max(image["width"], 1), max(image["height"], 1)
        x, y = draw(st.floats(0, w - 0.5)), draw(st.floats(0, h - 0.5))
        bbox = [x, y, draw(st.floats(0.5, w - x)), draw(st.floats(0.5, h - y))] if x + 0.5 <= w and y + 0.5 <= h \
            else [0, 0, 1, 1]
        if draw(st.integers(0, 9)) == 0:  # a box that may be empty, outside or not finite
            odd = st.one_of(st.integers(-3, 15), st.floats(-3, 15), st.sampled_from([float("nan"), float("inf")]))
            bbox[draw(st.integers(0, 3))] = draw(odd)
        annotations.append({"id": k, "image_id": image["id"] if draw(st.integers(0, 19)) else draw(st.integers(0, 5)),
                            "category_id": draw(st.sampled_from(cat_ids)) if cat_ids and draw(st.integers(0, 19))
                            else draw(st.integers(0, 10)), "bbox": bbox,
                            "iscrowd": draw(st.sampled_from([0, 0, 0, 1])), "area": 1.0})
    doc = draw(mutated(st.just({"images": images, "annotations": annotations, "categories": categories})))
    return CocoCase(draw(spoiled_text(json.dumps(doc))), files, draw(st.booleans()))


def check_coco(case: CocoCase) -> None:
    """``open_detection(root, "coco", "train")``, ``verify()`` and every item: targets must fit their images."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "train").mkdir(parents=True)
        write_files(root / "images" / "train", case.images)
        write_files(root / "annotations", {"instances_train.json": case.annotation})
        ds = open_detection(root, "coco", "train", skip_bad=case.skip_bad)
        ds.verify()
        expect(len(set(ds.label_to_cat_id)) == ds.num_classes == len(ds.class_names),
               f"labels do not map one to one to category ids {ds.label_to_cat_id}")
        expect(len(set(ds.image_ids)) == len(ds), f"image ids repeat: {ds.image_ids}")
        if not case.skip_bad:  # nothing was skipped, so every image entry is an item
            entries = json.loads(case.annotation)["images"]
            expect(len(ds) == len(entries), f"{len(entries)} image entries but {len(ds)} items")
        for i in range(len(ds)):
            image, target = ds[i]
            item = ds.items[i]
            expect(image.dtype == torch.uint8 and tuple(image.shape) == (3, item.height, item.width),
                   f"image {tuple(image.shape)} {image.dtype} vs stated {item.width}x{item.height}")
            boxes, labels = target["boxes"], target["labels"]
            expect(boxes.shape == (len(labels), 4) and len(target["iscrowd"]) == len(labels), "target lengths differ")
            expect(bool(torch.isfinite(boxes).all()) and bool((boxes[:, 2:] > boxes[:, :2]).all())
                   and bool((boxes[:, :2] >= 0).all()) and bool((boxes[:, 2] <= item.width).all())
                   and bool((boxes[:, 3] <= item.height).all()), f"boxes outside the image: {boxes.tolist()}")
            expect(bool(((labels >= 0) & (labels < ds.num_classes)).all()), f"labels {labels.tolist()} out of range")
            expect(target["image_id"] == ds.image_ids[i], "image_id differs from image_ids")
        for path, reason in ds.skipped:
            clear_message(f"{path}: {reason}")


# -- segmentation folders ------------------------------------------------------------------------------

MASK_MODES = ["L", "L", "L", "P", "1", "I;16", "I", "F", "RGB", "LA", "RGBA"]


@dataclass
class SegCase:
    """A ``folder`` layout: ``classes.txt``, ``images/train/*`` and ``masks/train/*.png``, plus the ids each
    mask was written with where its mode stores them exactly (``expected``, by stem)."""

    files: dict[str, bytes | None]
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)  # stems whose mask must not load (non-integer float ids)
    num_classes: int = 0
    skip_bad: bool = False


@st.composite
def mask_file(draw: st.DrawFn, width: int, height: int,
              num_classes: int) -> tuple[bytes | None, np.ndarray | str | None]:
    """A mask file of a random mode holding valid ids, 255 and sometimes others; and its ids where the file
    stores them exactly (``"refused"`` where they are not whole numbers)."""
    how = draw(st.sampled_from(["good"] * 8 + ["broken", "missing"]))
    if how == "missing":
        return None, None
    if how == "broken":
        return draw(broken_image(width, height)), None
    mode = draw(st.sampled_from(MASK_MODES))
    if draw(st.integers(0, 5)) == 0:
        width, height = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    pool = list(range(max(num_classes, 1))) + [IGNORE_INDEX]
    if draw(st.integers(0, 3)) == 0:
        pool += draw(st.lists(st.sampled_from([num_classes, num_classes + 1, 254, 256, 1000, 65535, -1]),
                              min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    ids = rng.choice(np.array(pool), size=(height, width))
    if mode in ("L", "P", "RGB", "LA", "RGBA"):
        ids = ids % 256
    elif mode == "1":
        ids = ids % 2
    elif mode == "I;16":
        ids = ids % 65536
    if mode == "F":  # a TIFF named .png: Pillow reads files by content
        if draw(st.booleans()):
            ids = ids.astype(np.float64)
            ids.flat[draw(st.integers(0, ids.size - 1))] += draw(st.sampled_from([0.5, 0.25, float("nan")]))
            return encode(ids, "F", "TIFF"), "refused"
        return encode(ids, "F", "TIFF"), ids
    if mode == "I":
        return encode(ids, "I", "TIFF"), ids
    if mode in ("RGB", "RGBA", "LA"):
        return encode(np.repeat(ids[..., None], {"RGB": 3, "RGBA": 4, "LA": 2}[mode], axis=2) if mode != "LA"
                      else ids, mode, "PNG"), None
    return encode(ids, mode, "PNG"), ids


@st.composite
def seg_cases(draw: st.DrawFn) -> SegCase:
    """A segmentation folder with 1–6 classes (or a broken classes.txt) and 1–3 image/mask pairs."""
    num_classes = draw(st.integers(1, 6))
    names = "\n".join(f"class{i}" for i in range(num_classes)) + "\n"
    pick = draw(st.integers(0, 9))
    classes = "\n".join(f"c{i}" for i in range(300)).encode() if pick == 9 \
        else draw(spoiled_text(names)) if pick > 6 else names.encode()
    files: dict[str, bytes | None] = {"classes.txt": classes}
    expected, refused = {}, set()
    for i in range(draw(st.integers(1, 3))):
        w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        suffix = draw(st.sampled_from([".png", ".png", ".jpg", ".bmp", ".tif"]))
        stem = f"s{i}"
        files[f"images/train/{stem}{suffix}"] = draw(image_files(w, h))  # its content, not its suffix, decides
        mask, ids = draw(mask_file(w, h, num_classes))
        files[f"masks/train/{stem}.png"] = mask
        if isinstance(ids, str):
            refused.add(stem)
        elif ids is not None:
            expected[stem] = ids
    return SegCase(files, expected, refused, num_classes, draw(st.booleans()))


def check_seg(case: SegCase) -> None:
    """``open_segmentation(root, "folder", "train").verify()`` and every item: masks must hold the ids written."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_files(root, case.files)
        ds = open_segmentation(root, "folder", "train", skip_bad=case.skip_bad)
        ds.verify()
        for i in range(len(ds)):
            image, mask = ds[i]
            image_path, mask_path = ds.items[i]
            expect(image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, f"image {image.shape}")
            expect(mask.dtype == torch.int64 and tuple(mask.shape) == tuple(image.shape[1:]),
                   f"mask {tuple(mask.shape)} {mask.dtype} for image {tuple(image.shape)}")
            valid = set(range(ds.num_classes)) | {IGNORE_INDEX}
            expect(set(mask.unique().tolist()) <= valid, f"mask ids {mask.unique().tolist()} outside {sorted(valid)}")
            expect(mask_path.stem not in case.refused, f"{mask_path.name}: a mask with non-integer ids loaded")
            if mask_path.stem in case.expected:
                expect(np.array_equal(mask.numpy(), case.expected[mask_path.stem]),
                       f"{mask_path.name}: loaded ids differ from the ids written")
        for path, reason in ds.skipped:
            clear_message(f"{path}: {reason}")


# -- the kinds -----------------------------------------------------------------------------------------

KINDS: dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]] = {
    "arch json": (arch_json_files(), check_arch_file),
    "arch dict": (mutated(arch_dicts()), check_arch_object),
    "net_config": (net_config_texts(), check_net_config),
    "coco json": (coco_cases(), check_coco),
    "seg masks": (seg_cases(), check_seg),
}
