"""Property-based fuzzing of the photo loader: whatever bytes or image a photo file holds,
``read_photos`` returns upright RGB photos or raises ``InputError`` (one line per file, saying what
to do), never anything else, and no Python warning escapes to the user's terminal.

Derandomized (a fixed sequence of examples, no example database), so CI is reproducible; each
test takes a few seconds on one CPU core.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dreambooth.data import read_photos
from dreambooth.errors import InputError

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = [".jpg", ".png", ".webp", ".bmp"]
# What each format we read can store (checked against Pillow 13: PNG cannot save I, F or PA, JPEG
# saves 1 as L, WebP converts any mode on saving); TIFF is not read, so its extra modes (F, I, PA,
# YCbCr, ...) must come back as a clean "is a TIFF image" InputError.
MODES = {
    "PNG": ["1", "L", "LA", "P", "P+t", "RGB", "RGBA", "I;16"],
    "JPEG": ["1", "L", "RGB", "CMYK", "YCbCr"],
    "WEBP": ["L", "LA", "P", "RGB", "RGBA", "CMYK"],
    "BMP": ["1", "L", "P", "RGB", "RGBA"],
    "TIFF": ["F", "I", "I;16", "PA", "YCbCr", "CMYK", "LA"],
}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".png"}
EXIF_FORMATS = {"PNG", "JPEG", "WEBP", "TIFF"}


def make_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels in ``mode`` ("P+t": a palette image with a transparent index)."""
    rs = np.random.RandomState(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rs.randint(0, 65536, (h, w)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rs.randint(-2**20, 2**20, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rs.uniform(-5, 300, (h, w)).astype(np.float32))
    rgba = Image.fromarray(rs.randint(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P+t":
        im = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 0
        return im
    if mode in ("P", "PA"):
        return rgba.convert(mode, palette=Image.Palette.ADAPTIVE)
    return rgba.convert(mode)


def encode(im: Image.Image, fmt: str, orientation: int | None) -> bytes:
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    if fmt == "WEBP":
        kwargs["lossless"] = True
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def intake(name: str, data: bytes):
    """read_photos on a folder holding just ``name``: (intake or None, the InputError or None).
    Asserts that no warning escaped and that the file was only read."""
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = Path(d) / name
        path.write_bytes(data)
        try:
            result, error = read_photos(d, resolution=64), None
        except InputError as e:
            result, error = None, e
        assert path.read_bytes() == data
    assert not caught, [str(w.message) for w in caught]
    if error is not None:
        assert str(error).startswith(str(path)) and " — " in str(error), str(error)
        assert "\n" not in str(error)
    return result, error


# A valid seed image per format, so mutations reach the decoders past their magic numbers.
SEEDS = {fmt: encode(make_image(mode, (72, 66), 0), fmt, 6 if fmt in EXIF_FORMATS else None)
         for fmt, mode in [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "P"),
                           ("TIFF", "RGB")]}


@st.composite
def damage(draw) -> tuple[str, str, tuple[tuple[int, int], ...], int | None]:
    """(format of the seed image, suffix, byte edits (index, value), length to cut it to)."""
    fmt = draw(st.sampled_from(sorted(SEEDS)))
    n = len(SEEDS[fmt])
    # Most edits land in the first 200 bytes, where the headers are.
    index = st.one_of(st.integers(0, min(n, 200) - 1), st.integers(0, n - 1))
    edits = draw(st.lists(st.tuples(index, st.integers(0, 255)), min_size=1, max_size=8))
    cut = draw(st.one_of(st.none(), st.integers(0, n)))
    return fmt, draw(st.sampled_from(SUFFIXES)), tuple(edits), cut


def damaged(fmt: str, edits: tuple[tuple[int, int], ...], cut: int | None) -> bytes:
    data = bytearray(SEEDS[fmt])
    for i, value in edits:
        data[i] = value
    return bytes(data[:cut])


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=600))
def test_random_bytes_are_returned_or_refused_with_input_error(suffix, data):
    result, _ = intake("photo" + suffix, data)
    if result is not None:
        assert all(p.image.mode == "RGB" for p in result.photos)


@FUZZ
@given(case=damage())
def test_damaged_images_are_returned_or_refused_with_input_error(case):
    fmt, suffix, edits, cut = case
    result, _ = intake("photo" + suffix, damaged(fmt, edits, cut))
    if result is not None:
        (photo,) = result.photos
        assert photo.image.mode == "RGB" and min(photo.image.size) >= 64


@st.composite
def valid_images(draw):
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    side = st.one_of(st.integers(1, 5), st.integers(60, 70), st.integers(64, 97))  # tiny, edge, fine
    size = (draw(side), draw(side))
    orientation = draw(st.one_of(st.none(), st.integers(1, 8))) if fmt in EXIF_FORMATS else None
    return fmt, mode, size, orientation, draw(st.integers(0, 2**16))


@FUZZ
@given(case=valid_images())
def test_valid_images_of_any_mode_size_and_orientation(case):
    fmt, mode, (w, h), orientation, seed = case
    data = encode(make_image(mode, (w, h), seed), fmt, orientation)
    result, error = intake("photo" + SUFFIX[fmt], data)
    if fmt == "TIFF":
        assert error is not None and "is a TIFF image" in str(error)
        return
    if min(w, h) < 64:
        assert error is not None and "too small" in str(error)
        return
    assert error is None, str(error)
    (photo,) = result.photos
    assert photo.original_size == (w, h)
    assert photo.image.mode == "RGB"
    assert photo.image.size == ((h, w) if orientation in (5, 6, 7, 8) else (w, h))
    if orientation in (6, 8):
        assert any(n.startswith("exif-rotated") for n in photo.notes)
