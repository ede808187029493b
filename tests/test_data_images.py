"""Images of every mode come out as the right 8-bit RGB pixels, or as a DataError naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fna.data.base import DataError, read_image


def _rgb(path) -> list:
    """The pixels read_image gives, as nested ``[row][col][r, g, b]`` lists."""
    image = read_image(path)
    assert image.dtype.is_floating_point is False and image.shape[0] == 3
    return image.permute(1, 2, 0).tolist()


def _gray(*values: int) -> list:
    return [[[v, v, v] for v in values]]


def test_16bit_grayscale_png_is_scaled_by_value_range_not_clipped_to_white(tmp_path):
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    assert _rgb(tmp_path / "depth.png") == _gray(0, 1, 128, 255)


def test_16bit_grayscale_transparent_value_becomes_black(tmp_path):
    Image.fromarray(np.array([[65535, 514]], dtype=np.uint16)).save(tmp_path / "t.png", transparency=514)
    assert _rgb(tmp_path / "t.png") == _gray(255, 0)


def test_32bit_integer_grayscale_within_16bit_range_reads_as_16bit(tmp_path):
    Image.fromarray(np.array([[0, 2570, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert _rgb(tmp_path / "i.tif") == _gray(0, 10, 255)


@pytest.mark.parametrize("values", [[0, 70000], [-5, 100]])
def test_32bit_integer_grayscale_outside_16bit_range_is_an_error_naming_the_file(tmp_path, values):
    Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide\.tif: 32-bit integer image with values .*only 0\.\.65535"):
        read_image(tmp_path / "wide.tif")


def test_float_grayscale_in_unit_range_is_scaled_by_255(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 0.75, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert _rgb(tmp_path / "f.tif") == _gray(0, 64, 191, 255)


@pytest.mark.parametrize("values", [[0.0, 3.0], [-0.5, 0.5], [0.0, float("nan")]])
def test_float_grayscale_outside_unit_range_is_an_error_naming_the_file(tmp_path, values):
    Image.fromarray(np.array([values], dtype=np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(DataError, match=r"hdr\.tif: float image .*only finite values in \[0, 1\]"):
        read_image(tmp_path / "hdr.tif")


def test_cmyk_is_converted_to_rgb(tmp_path):
    im = Image.new("CMYK", (4, 1))
    for x, cmyk in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)]):
        im.putpixel((x, 0), cmyk)
    im.save(tmp_path / "print.tif")
    assert _rgb(tmp_path / "print.tif") == [[[255, 255, 255], [0, 255, 255], [255, 0, 0], [0, 0, 0]]]


def test_palette_with_transparent_index_composites_onto_black(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    assert _rgb(tmp_path / "p.png") == [[[0, 0, 0], [10, 20, 30]]]


def test_palette_with_per_index_alpha_scales_colour_by_alpha(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=bytes([51, 255]))  # index 0 at alpha 51 = 1/5
    assert _rgb(tmp_path / "p.png") == [[[40, 20, 10], [10, 20, 30]]]


def test_rgba_composites_onto_black(tmp_path):
    pixels = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 51]]], dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    assert _rgb(tmp_path / "a.png") == [[[200, 100, 50], [0, 0, 0], [40, 20, 10]]]


def test_grayscale_with_alpha_composites_onto_black(tmp_path):
    Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png") == _gray(100, 0)


@pytest.mark.parametrize("mode,pixel,rgb", [("L", 77, [77, 77, 77]), ("RGB", (1, 2, 3), [1, 2, 3]),
                                            ("1", 1, [255, 255, 255])])
def test_8bit_modes_read_unchanged(tmp_path, mode, pixel, rgb):
    im = Image.new(mode, (1, 1))
    im.putpixel((0, 0), pixel)
    im.save(tmp_path / "x.png")
    assert _rgb(tmp_path / "x.png") == [[rgb]]
