"""Photo intake: every bad input gets one clear line and exit 2; modes, EXIF and crops are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.cli import main
from dreambooth.data import (
    contact_sheet, dhash, hamming, read_photos, square_crop, to_rgb, to_tensor,
)
from dreambooth.errors import InputError


def noise(size=(96, 96), seed=0, mode="RGB") -> Image.Image:
    rs = np.random.RandomState(seed)
    a = rs.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def scene(size=(160, 120)) -> Image.Image:
    """A smooth, structured picture (gradients), so a resaved copy hashes close to it."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    a = np.stack([x * 255, y * 255, np.sin(6 * x * y) * 127 + 128], -1).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def half_red(size=(120, 80)) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return im


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def noise_folder(tmp_path: Path) -> Path:
    """tmp_path/photos holding a.jpg and b.png of random noise."""
    d = tmp_path / "photos"
    d.mkdir()
    noise(seed=1).save(d / "a.jpg")
    noise(seed=2).save(d / "b.png")
    return d


@pytest.fixture
def photos(tmp_path) -> Path:
    return noise_folder(tmp_path)


# --- bad input: one line each, exit 2, no traceback ----------------------------------------


def check_error(capsys, folder, *needles):
    code, out, err = run_cli(capsys, folder)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_folder(capsys, tmp_path):
    check_error(capsys, tmp_path / "nope", "not found", "nope", "check the path")


def test_path_is_a_file(capsys, tmp_path):
    f = tmp_path / "one.jpg"
    noise().save(f)
    check_error(capsys, f, "one.jpg", "is a file, not a folder", "pass the folder")


def test_empty_folder(capsys, tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    check_error(capsys, tmp_path, "no photos found", "JPEG, PNG")


@pytest.mark.parametrize(
    "name, content, needles",
    [
        ("zero.jpg", b"", ["zero.jpg", "empty file", "remove it"]),
        ("junk.png", b"this is not a png at all" * 20, ["junk.png", "not a readable image", "re-export"]),
        ("notes.txt", b"hello", ["notes.txt", "no photo named", "move it out"]),
        ("scan.pdf", b"%PDF-1.4\n", ["scan.pdf", "not a photo", "move it out"]),
    ],
)
def test_bad_file(capsys, photos, name, content, needles):
    (photos / name).write_bytes(content)
    err = check_error(capsys, photos, *needles)
    assert len(err.strip().splitlines()) == 1  # one clear line


def test_truncated_jpeg(capsys, photos):
    data = (photos / "a.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(data[: len(data) // 2])
    check_error(capsys, photos, "cut.jpg", "truncated or corrupt", "copy it again")


def test_too_small(capsys, photos):
    noise((200, 40)).save(photos / "tiny.png")
    check_error(capsys, photos, "tiny.png", "200×40", "too small", "larger photo")


def test_every_bad_file_is_listed(capsys, photos):
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "scan.pdf").write_bytes(b"%PDF")
    noise((50, 50)).save(photos / "tiny.png")
    err = check_error(capsys, photos, "3 files", "zero.jpg", "scan.pdf", "tiny.png")
    assert len(err.strip().splitlines()) == 4  # a heading and one line per file


def test_sheet_inside_photo_folder_refused(capsys, photos):
    before = snapshot(photos)
    code, _, err = run_cli(capsys, photos, "--sheet", photos / "sheet.png")
    assert code == 2 and "inside the photo folder" in err and "somewhere else" in err
    assert snapshot(photos) == before


def test_bad_flags(capsys, photos):
    assert run_cli(capsys, photos, "--resolution", "100")[0] == 2


# --- the happy path ------------------------------------------------------------------------


def test_cli_table_sheet_and_folder_untouched(capsys, photos, tmp_path):
    (photos / "a.txt").write_text("a photo of sks dog on grass\n")
    (photos / ".hidden.jpg").write_bytes(b"")  # hidden: ignored silently
    before = snapshot(photos)
    sheet = tmp_path / "out" / "sheet.png"
    code, out, err = run_cli(capsys, photos, "--resolution", "64", "--sheet", sheet)
    assert code == 0, err
    assert "a.jpg" in out and "b.png" in out and "center-crop 64" in out
    assert "2 photos ready" in out and "1 with captions" in out
    assert snapshot(photos) == before
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 128
    code, _, _ = run_cli(capsys, photos, "--resolution", "64")  # no --sheet: nothing written
    assert code == 0 and snapshot(photos) == before and sorted(sheet.parent.iterdir()) == [sheet]


def test_mask_read_beside_its_photo(photos):
    Image.new("L", (96, 96), 0).save(photos / "a.mask.png")  # empty: refused
    with pytest.raises(InputError, match=r"a\.mask\.png: the mask is empty"):
        read_photos(photos, resolution=64)
    m = Image.new("L", (96, 96), 0)
    m.paste(255, (10, 10, 40, 40))
    m.save(photos / "a.mask.png")
    by_name = {p.path.name: p for p in read_photos(photos, resolution=64).photos}
    assert set(by_name) == {"a.jpg", "b.png"}  # the mask is not read as a photo
    assert by_name["a.jpg"].mask.mode == "L" and by_name["a.jpg"].mask.getbbox() == (10, 10, 40, 40)
    assert "mask" in by_name["a.jpg"].notes and by_name["b.png"].mask is None
    cutout = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # a cut-out: transparency marks the rest
    cutout.paste((200, 30, 40, 255), (50, 20, 90, 60))
    cutout.save(photos / "b.mask.png")
    assert read_photos(photos, resolution=64).photos[1].mask.getbbox() == (50, 20, 90, 60)


def test_bad_masks_are_named_with_the_fix(photos):
    Image.new("L", (50, 96), 255).save(photos / "b.mask.png")
    Image.new("L", (96, 96), 255).save(photos / "c.mask.png")
    with pytest.raises(InputError) as e:
        read_photos(photos, resolution=64)
    text = str(e.value)
    assert "b.mask.png: the mask is 50×96 px but its photo is 96×96" in text
    assert "c.mask.png: mask with no photo named 'c" in text


def test_caption_read(photos):
    (photos / "b.txt").write_text("  sks dog asleep  \n", encoding="utf-8")
    by_name = {p.path.name: p for p in read_photos(photos, resolution=64).photos}
    assert by_name["b.png"].caption == "sks dog asleep"
    assert by_name["a.jpg"].caption is None


@pytest.mark.parametrize("orientation, red_at", [(6, "top"), (8, "bottom"), (3, "right")])
def test_exif_orientation(tmp_path, orientation, red_at):
    exif = Image.Exif()
    exif[0x0112] = orientation
    half_red().save(tmp_path / "p.jpg", exif=exif, quality=95)
    (photo,) = read_photos(tmp_path, resolution=64).photos
    im = photo.image
    assert photo.original_size == (120, 80)
    assert im.mode == "RGB" and im.size == ((80, 120) if orientation in (6, 8) else (120, 80))
    w, h = im.size
    probe = {"top": (w // 2, 10), "bottom": (w // 2, h - 10), "right": (w - 10, h // 2)}[red_at]
    r, g, b = im.getpixel(probe)
    assert r > 200 and b < 60, (probe, (r, g, b))
    assert any(n.startswith("exif-rotated") for n in photo.notes)


def test_mpo_with_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    half_red().save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[noise((120, 80))], exif=exif)
    with Image.open(tmp_path / "phone.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2
    (photo,) = read_photos(tmp_path, resolution=64).photos
    assert photo.image.mode == "RGB" and photo.image.size == (80, 120)
    assert photo.image.getpixel((40, 10))[0] > 200
    assert "MPO: first frame" in photo.notes and "exif-rotated 90°" in photo.notes


# --- modes ---------------------------------------------------------------------------------


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((80, 80, 4), np.uint8)
    a[:, :40] = (255, 0, 0, 255)  # left: opaque red; right: fully transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    (photo,) = read_photos(tmp_path, resolution=64).photos
    assert photo.original_mode == "RGBA" and photo.image.mode == "RGB"
    assert photo.image.getpixel((10, 10)) == (255, 0, 0)
    assert photo.image.getpixel((70, 10)) == (255, 255, 255)
    assert "RGBA→RGB on white" in photo.notes


def test_16bit_gray_scaled_to_8bit(tmp_path):
    Image.new("I;16", (80, 80), 40000).save(tmp_path / "g16.png")
    (photo,) = read_photos(tmp_path, resolution=64).photos
    assert photo.original_mode.startswith("I")
    assert photo.image.getpixel((5, 5)) == (156, 156, 156)  # round(40000 / 257)


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("I", (4, 4), 65535), 255),
        (Image.new("I", (4, 4), 100), 100),
        (Image.new("F", (4, 4), 0.5), 128),
        (Image.new("F", (4, 4), 200.0), 200),
    ],
)
def test_32bit_modes(image, expected):
    rgb, notes = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (expected,) * 3 and notes


def test_cmyk_p_la_l_and_1(tmp_path):
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    pal = Image.new("P", (80, 80), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    la = Image.new("LA", (80, 80), (0, 0))  # transparent black
    la.save(tmp_path / "la.png")
    Image.new("L", (80, 80), 77).save(tmp_path / "gray.bmp")
    Image.new("1", (80, 80), 1).save(tmp_path / "bw.png")
    noise((80, 80)).save(tmp_path / "w.webp", lossless=True)
    by_name = {p.path.name: p for p in read_photos(tmp_path, resolution=64).photos}
    assert all(p.image.mode == "RGB" for p in by_name.values())
    r, g, b = by_name["cmyk.jpg"].image.getpixel((40, 40))
    assert r > 200 and g < 60 and b < 60 and "CMYK→RGB" in by_name["cmyk.jpg"].notes
    assert by_name["pal.png"].image.getpixel((0, 0)) == (0, 255, 0)
    assert by_name["la.png"].image.getpixel((0, 0)) == (255, 255, 255)
    assert by_name["gray.bmp"].image.getpixel((0, 0)) == (77, 77, 77)
    assert by_name["bw.png"].image.getpixel((0, 0)) == (255, 255, 255)
    assert by_name["w.webp"].original_mode == "RGB"


# --- warnings ------------------------------------------------------------------------------


def test_under_resolution_warning(tmp_path):
    noise((300, 200)).save(tmp_path / "small.png")
    intake = read_photos(tmp_path, resolution=512)
    assert any("small.png" in w and "upscaled" in w for w in intake.warnings)
    assert read_photos(tmp_path, resolution=128).warnings == []


def test_near_duplicate_warning(capsys, tmp_path):
    scene().save(tmp_path / "one.png")
    scene().resize((150, 112)).save(tmp_path / "two.jpg", quality=80)
    noise((160, 120), seed=3).save(tmp_path / "other.png")
    code, out, err = run_cli(capsys, tmp_path, "--resolution", "64")
    assert code == 0
    dup = [line for line in err.splitlines() if "near-duplicates" in line]
    assert len(dup) == 1 and "one.png" in dup[0] and "two.jpg" in dup[0]


def test_dhash_and_hamming():
    assert hamming(0b1011, 0b0001) == 2
    a, b = dhash(scene()), dhash(scene().resize((100, 75)))
    assert hamming(a, b) <= 4 and hamming(a, dhash(noise(seed=9))) > 10
    assert dhash(scene(), size=16).bit_length() <= 256


def test_many_images_warning(tmp_path):
    for i in range(51):
        noise((64, 64), seed=i).save(tmp_path / f"{i:02d}.png")
    warnings = read_photos(tmp_path, resolution=64).warnings
    assert any(w.startswith("51 photos") for w in warnings)
    assert not any("near-duplicates" in w for w in warnings)


# --- crops, sheet, tensors -----------------------------------------------------------------


def test_center_crop():
    out = square_crop(half_red((200, 100)), 64)
    assert out.size == (64, 64)
    assert out.getpixel((5, 32))[0] > 200 and out.getpixel((58, 32))[2] > 200  # red | blue


def test_flip_mirrors_the_crop():
    flipped = square_crop(half_red(), 64, flip=True)
    assert flipped.getpixel((5, 32))[2] > 200  # blue now on the left


def test_contact_sheet_and_tensor():
    images, labels = [noise((64, 64), seed=i) for i in range(5)], [f"{i}.jpg" for i in range(5)]
    sheet = contact_sheet(images, labels, cell=64)
    assert sheet.mode == "RGB" and sheet.width >= 3 * 64 and sheet.height >= 2 * 64
    t = to_tensor(Image.new("RGB", (8, 4), (255, 0, 128)))
    assert tuple(t.shape) == (3, 4, 8) and t.dtype.is_floating_point
    assert t[0].max() == 1.0 and t[1].min() == -1.0 and abs(float(t[2, 0, 0]) - 0.0039) < 1e-3


def test_library_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no photos found"):
        read_photos(tmp_path)


# --- real photos ---------------------------------------------------------------------------


def test_dreambench_photos(dreambench, capsys, tmp_path):
    for subject in ("dog", "bear_plushie"):
        folder = dreambench / subject
        intake = read_photos(folder, resolution=512)
        assert intake.photos and all(p.image.mode == "RGB" for p in intake.photos)
        for p in intake.photos:
            with Image.open(p.path) as raw:
                orientation = raw.getexif().get(0x0112, 1)
                swapped = orientation in (5, 6, 7, 8)
                assert p.image.size == (raw.size[::-1] if swapped else raw.size)
    formats = {Image.open(p).format for p in (dreambench / "bear_plushie").glob("*.jpg")}
    assert "MPO" in formats
    before = snapshot(dreambench / "bear_plushie")
    code, out, _ = run_cli(capsys, dreambench / "bear_plushie", "--sheet", tmp_path / "s.png")
    assert code == 0 and "MPO: first frame" in out and (tmp_path / "s.png").is_file()
    assert snapshot(dreambench / "bear_plushie") == before
