"""What every dataset shares: :class:`DataError`, reading images and masks, and skip-or-raise.

Validation happens in two places. At construction a dataset checks what is cheap: files exist,
annotations parse and make sense (category ids, box sizes and bounds against the size the annotation
states). At load time it checks what needs the pixels: the image decodes, the mask is single-channel,
has the image's size and holds only known ids. :meth:`ItemDataset.verify` runs the load-time checks
on every item up front (what an evaluator should do, so no bad item is ever replaced by another).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

from fna.errors import FnaError

log = logging.getLogger("fna.data")

IGNORE_INDEX = 255  # mask id that neither trains nor counts in evaluation
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the seeds' input normalisation (RGB in [0, 1])
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``), so it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DataError(FnaError):
    """A dataset file or annotation is missing or wrong; the message names it (on one line, whatever the name)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = one_line(str(path)), one_line(reason)  # for display, like the message
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple:  # pickles (from a DataLoader worker) by its two arguments
        return type(self), (self.path, self.reason)


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT = 65535


def read_image(path: Path) -> tv_tensors.Image:
    """An RGB image as ``uint8 [3, H, W]``; :class:`DataError` if it is missing or does not decode.

    See :func:`to_rgb8` for how modes other than 8-bit RGB are turned into 8-bit RGB.
    """
    try:
        with Image.open(path) as im:
            pixels = to_rgb8(im, path)
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(path, f"unreadable image ({e})") from None
    return tv_tensors.Image(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))


def to_rgb8(im: Image.Image, path: str | Path = "image") -> np.ndarray:
    """``uint8 [H, W, 3]`` pixels of ``im``, by a rule per mode.

    * 16-bit grayscale (``I;16*``, e.g. 16-bit PNG): value / 257, rounded (65535 → 255).
    * 32-bit integer grayscale (``I``): read as 16-bit when every value is in 0..65535 (what a 16-bit
      file holds), else :class:`DataError` (the range cannot be told).
    * float grayscale (``F``): values in [0, 1] times 255, rounded; other values (or NaN) are a
      :class:`DataError`.
    * transparency (an alpha band, or a ``transparency`` entry as in palette PNGs with tRNS): composited
      onto black, ``colour · alpha / 255``. A 16-bit grayscale pixel equal to its file's transparent value
      becomes black.
    * everything else (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``...): Pillow's conversion to RGB.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.int64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT):
            raise DataError(path, f"32-bit integer image with values {values.min()}..{values.max()}: only "
                                  f"0..{SIXTEEN_BIT} (16-bit) can be read; convert it to 8- or 16-bit")
        gray = (values + 128) // 257
        transparent = im.info.get("transparency")
        if isinstance(transparent, int):
            gray[values == transparent] = 0
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise DataError(path, f"float image with values {np.nanmin(values):g}..{np.nanmax(values):g}: only "
                                  "finite values in [0, 1] can be read; convert it to 8- or 16-bit")
        return np.repeat(np.rint(values * 255).astype(np.uint8)[..., None], 3, axis=2)
    try:
        if mode in ALPHA_MODES or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
            return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ValueError as e:
        raise DataError(path, f"image mode {mode} cannot be converted to RGB ({e})") from None


def read_label_png(path: Path) -> np.ndarray:
    """The raw ids of a single-channel (``L``, ``P`` or 16-bit) label PNG as ``int64 [H, W]``."""
    try:
        with Image.open(path) as im:
            if len(im.getbands()) != 1:
                raise DataError(path, f"mask must be single-channel (L or P mode), got mode {im.mode}")
            values = np.asarray(im)
    except FileNotFoundError:
        raise DataError(path, "mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(path, f"unreadable mask ({e})") from None
    if values.dtype.kind == "f" and not (np.isfinite(values).all() and (values == np.round(values)).all()):
        raise DataError(path, f"float mask (mode {im.mode}) with values that are not whole numbers; ids are integers")
    return values.astype(np.int64)


def require_file(path: Path, what: str) -> DataError | None:
    """A :class:`DataError` when ``path`` is not a file (for the construction-time existence checks)."""
    try:
        return None if path.is_file() else DataError(path, f"{what} not found")
    except OSError as e:  # e.g. a name longer than the file system allows
        return DataError(path, f"{what} cannot be looked up ({e.strerror})")


class ItemDataset(Dataset, ABC):
    """A list of ``items`` loaded one at a time by :meth:`load`, with skip-or-raise on bad items.

    ``skip_bad=False``: the first bad item raises :class:`DataError`. ``skip_bad=True``: bad items are
    recorded in ``skipped`` as ``(path, reason)``; at construction they are left out, at load time the
    next good item is returned instead (and logged; records made in DataLoader worker processes stay in
    those processes, so call :meth:`verify` first when the full list matters).
    """

    def __init__(self, root: Path, transforms: Callable | None, skip_bad: bool) -> None:
        self.root = Path(root)
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.items: list[Any] = []

    def reject(self, error: DataError) -> None:
        """Raise ``error``, or record it when skipping bad items."""
        if not self.skip_bad:
            raise error
        log.warning("skipping %s: %s", error.path, error.reason)
        self.skipped.append((error.path, error.reason))

    def keep_good(self, candidates: list[tuple[Any, DataError | None]]) -> None:
        """Set ``items`` to the candidates without an error, rejecting the others; error if none is left."""
        for item, error in candidates:
            if error is None:
                self.items.append(item)
            else:
                self.reject(error)
        if not self.items:
            raise DataError(self.root, "no usable items" if candidates else "no items found")

    @abstractmethod
    def load(self, item: Any) -> tuple[Any, Any]:
        """The untransformed sample of one item; raises :class:`DataError` on bad pixels."""

    def verify(self) -> ItemDataset:
        """Run the load-time checks on every item now, dropping (or raising on) the bad ones."""
        good = []
        for item in self.items:
            try:
                self.load(item)
                good.append(item)
            except DataError as e:
                self.reject(e)
        self.items = good
        return self

    def __len__(self) -> int:
        return len(self.items)

    def untransformed(self, index: int) -> tuple[Any, Any]:
        """Item ``index`` loaded, without ``transforms`` (the next good item instead of a bad one when
        skipping)."""
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(index)
        for k in range(len(self.items)):
            try:
                return self.load(self.items[(index + k) % len(self.items)])
            except DataError as e:
                self.reject(e)
        raise DataError(self.root, "every item failed to load")

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        sample = self.untransformed(index)
        return self.transforms(*sample) if self.transforms is not None else sample


def as_tensor_mask(ids: np.ndarray) -> tv_tensors.Mask:
    """``int64 [H, W]`` array → :class:`tv_tensors.Mask`."""
    return tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))


