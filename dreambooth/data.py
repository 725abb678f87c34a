"""Photo intake: read a folder of a user's photos into upright RGB images, check them, crop them.

``read_photos`` only ever reads the folder. It returns every usable photo with what was done to
it (EXIF rotation, mode conversion) and a list of warnings, or raises one ``InputError`` that
names every bad file on its own line with what to do about it. Cropping, the contact sheet and
the tensor conversion are small pure functions used by the ``data`` command and the trainer.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from dreambooth.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".mpo"}
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}  # plus any hidden ".name"
MIN_SIDE = 64
HASH_SIZE = 16  # 16x16 dHash: 8x8 calls distinct poses on a plain background duplicates
NEAR_DUPLICATE_BITS = 10  # Hamming distance (of 256 bits) at or under which two photos match
KINDS = "JPEG, PNG, WebP, BMP or MPO"
EXIF_NOTES = {
    2: "exif-mirrored", 3: "exif-rotated 180°", 4: "exif-flipped vertically",
    5: "exif-transposed", 6: "exif-rotated 90°", 7: "exif-transversed", 8: "exif-rotated 270°",
}


@dataclass
class Photo:
    path: Path
    image: Image.Image  # RGB, upright, NOT yet cropped
    caption: str | None
    notes: list[str] = field(default_factory=list)  # what was done, e.g. ["exif-rotated 90°"]
    original_size: tuple[int, int] = (0, 0)  # (width, height) as stored in the file
    original_mode: str = ""
    mask: Image.Image | None = None  # "L", upright, the photo's size: from PHOTO.mask.png beside it


@dataclass
class Intake:
    photos: list[Photo]
    warnings: list[str]


# --- conversion -----------------------------------------------------------------------------


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """I;16 / I / F grayscale -> L, scaling by the range the values were stored in."""
    a = np.asarray(image).astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if image.mode.startswith("I;16"):
        a = a / 257.0  # 65535 -> 255
    elif image.mode == "F" and top <= 1.0:
        a = a * 255.0  # floats in [0, 1]
    elif top > 65535:
        lo = float(a.min())
        a = (a - lo) * 255.0 / (top - lo)  # unknown range: stretch
    elif top > 255:
        a = a / 257.0  # 16-bit values held in a 32-bit image
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any Pillow mode -> RGB. Transparency is composited on white. Returns (image, notes)."""
    mode = image.mode
    if mode == "RGB":
        return image, []
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), [f"{mode}→RGB on white"]
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_8bit(image).convert("RGB"), [f"{mode}→8-bit RGB"]
    return image.convert("RGB"), [f"{mode}→RGB"]


def _mp(pixels: int) -> str:
    """Megapixels, rounded for a message: "96", "179", "0.012"."""
    return f"{pixels / 1e6:.0f}" if pixels >= 10**7 else f"{pixels / 1e6:.2g}"


def _unreadable(path: Path, e: Exception, what: str = "image") -> str:
    """One line naming why an image file (``what``: "image" or "mask") could not be decoded."""
    if isinstance(e, PermissionError):
        return (f"{path}: permission denied — you cannot read this file; `chmod u+r` it if it is "
                "yours, or copy it to a folder of your own")
    if isinstance(e, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message; the size is not kept
        size = f"{_mp(int(found.group(1)))} megapixels" if found else "too many pixels"
        limit = _mp(2 * (Image.MAX_IMAGE_PIXELS or 0))
        return (f"{path}: the {what} is {size}, more than the {limit} megapixels that are decoded "
                "safely — scale it down (4000 px on the longer side is plenty), or remove it")
    if what == "mask":
        return f"{path}: not a readable mask image ({e}) — save it again as PNG, or remove it"
    if isinstance(e, UnidentifiedImageError):
        return (f"{path}: not a readable image (corrupt, or not really {path.suffix}) — "
                "re-export it as JPEG or PNG, or remove it")
    return f"{path}: truncated or corrupt image ({e}) — copy it again or re-export it, or remove it"


# Pillow raises these (and only these, as far as fuzzing found) on a file it cannot decode.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# QUIET: Python warnings are silenced while a user's file is decoded. Pillow warns about photos
# over 89 megapixels (``_warnings`` says that in one line of our own) and about damaged metadata
# tags, which it skips; printed, either is a Python warning with a source line, not advice.


def _load(path: Path) -> tuple[Photo | None, str | None]:
    """Open one photo. Returns (photo, None) or (None, one line saying what is wrong)."""
    if path.stat().st_size == 0:
        return None, f"{path}: empty file (0 bytes) — copy it again from the camera, or remove it"
    try:
        with warnings.catch_warnings():  # see QUIET
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                size, mode, fmt = im.size, im.mode, im.format
                if fmt not in IMAGE_FORMATS:
                    return None, f"{path}: is a {fmt} image — save it as {KINDS}, or remove it"
                if min(size) < MIN_SIDE:
                    return None, (f"{path}: {size[0]}×{size[1]} px is too small (under {MIN_SIDE} px "
                                  "on the shorter side) — use a larger photo, or remove it")
                im.load()
                orientation = im.getexif().get(0x0112, 1)
                upright = ImageOps.exif_transpose(im)
    except DECODE_ERRORS as e:
        return None, _unreadable(path, e)
    notes = ["MPO: first frame"] if fmt == "MPO" else []
    if orientation in EXIF_NOTES:
        notes.append(EXIF_NOTES[orientation])
    rgb, conv = to_rgb(upright)
    return Photo(path, rgb, None, notes + conv, size, mode), None


def load_photo(path: str | Path) -> Photo:
    """One image file as an upright RGB ``Photo`` (no caption); InputError saying what to do when
    it cannot be used."""
    photo, problem = _load(Path(path))
    if problem:
        raise InputError(problem)
    return photo


def _load_mask(path: Path, size: tuple[int, int]) -> tuple[Image.Image | None, str | None]:
    """PHOTO.mask.png as an upright "L" image of the (upright) photo's ``size``, or a problem."""
    try:
        with warnings.catch_warnings():  # see QUIET
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if sorted(im.size) != sorted(size):  # refused before decoding: EXIF only swaps
                    return None, _mask_size_problem(path, im.size, size)
                im.load()
                upright = ImageOps.exif_transpose(im)
    except DECODE_ERRORS as e:
        return None, _unreadable(path, e, "mask")
    mask = upright.getchannel("A") if upright.mode in ("RGBA", "LA") else upright.convert("L")
    if mask.size != size:
        return None, _mask_size_problem(path, mask.size, size)
    if mask.getextrema()[1] < 128:
        return None, (f"{path}: the mask is empty (no pixel is white) — paint the subject white "
                      "and the rest black, or remove the mask")
    return mask, None


def _mask_size_problem(path: Path, mask: tuple[int, int], photo: tuple[int, int]) -> str:
    return (f"{path}: the mask is {mask[0]}×{mask[1]} px but its photo is {photo[0]}×{photo[1]} "
            "(upright) — save the mask at the photo's size")


def mask_owner(path: Path) -> str | None:
    """For PHOTO.mask.png (any image suffix), a loss mask and not a photo itself: the stem of
    the photo it belongs to, "PHOTO". None for any other file."""
    if path.suffix.lower() in IMAGE_SUFFIXES and path.stem.lower().endswith(".mask"):
        return path.stem[:-len(".mask")]
    return None


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        return None, f"{path}: caption is not UTF-8 text — save it as UTF-8"
    except PermissionError:
        return None, (f"{path}: permission denied — you cannot read this caption; `chmod u+r` it "
                      "if it is yours, or copy it to a folder of your own")
    except OSError as e:
        return None, f"{path}: caption cannot be read ({e.strerror}) — copy it again, or remove it"
    return (text or None), None


# --- the folder -----------------------------------------------------------------------------


def read_photos(folder: str | Path, resolution: int = 512, max_images_warn: int = 50) -> Intake:
    """Read every photo in ``folder`` (not recursive). Raises InputError listing every bad file.

    Only regular files are read (links to them are followed). Sub-folders, pipes, sockets,
    devices and links that loop are skipped with a warning naming them; a link whose target is
    missing or out of reach is an error, since a photo meant to be there would silently be left
    out. Hidden files and system clutter (Thumbs.db, desktop.ini) are ignored without a word."""
    folder = Path(folder).expanduser()
    files, skipped, problems = _list_folder(folder)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and mask_owner(p) is None]
    stems = {p.stem for p in images}
    captions = {p.stem: p for p in files if p.suffix.lower() == ".txt" and p.stem in stems}
    masks = {owner: p for p in files if (owner := mask_owner(p)) in stems}
    problems += _strays(files, stems)
    photos = []
    for p in images:
        photo, problem = _load(p)
        if problem:
            problems.append(problem)
            continue
        if p.stem in captions:
            photo.caption, problem = _read_caption(captions[p.stem])
            if problem:
                problems.append(problem)
        if p.stem in masks:
            photo.mask, problem = _load_mask(masks[p.stem], photo.image.size)
            if problem:
                problems.append(problem)
            else:
                photo.notes.append("mask")
        photos.append(photo)
    if problems:
        head = f"{len(problems)} files in {folder} cannot be used:\n" if len(problems) > 1 else ""
        raise InputError(head + "\n".join(problems))
    if not photos:
        raise InputError(f"no photos found in {folder} — put {KINDS} files in it")
    return Intake(photos, skipped + _warnings(photos, resolution, max_images_warn))


def _folder_names(folder: Path) -> list[str]:
    """The names in ``folder``, sorted; InputError when it is missing, not a folder or denied."""
    try:
        st = os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"photo folder not found: {folder} — check the path") from None
    except PermissionError:
        raise InputError(f"{folder}: permission denied — a folder on the way to it cannot be entered "
                         "by you (no execute permission); fix that folder's permissions, or copy "
                         "the photos to a folder of your own") from None
    except OSError as e:  # e.g. a link that loops
        raise InputError(f"{folder}: cannot be opened ({e.strerror}) — check the path") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{folder} is a file, not a folder — pass the folder that holds the photos")
    try:
        return sorted(os.listdir(folder))
    except PermissionError:
        raise InputError(f"{folder}: permission denied — you cannot list this folder (no read "
                         "permission); `chmod u+rx` it if it is yours, or copy the photos to a folder "
                         "of your own") from None


def _list_folder(folder: Path) -> tuple[list[Path], list[str], list[str]]:
    """(regular files, warnings for skipped entries, problems) of ``folder``. Entries are only
    ever stat-ed here, never opened: opening a pipe would block."""
    files, skipped, problems = [], [], []
    for name in _folder_names(folder):
        if name.startswith(".") or name.lower() in IGNORED_NAMES:
            continue
        p = folder / name
        try:
            is_link = stat.S_ISLNK(os.lstat(p).st_mode)
        except FileNotFoundError:  # removed since the listing
            continue
        except PermissionError:
            raise InputError(f"{folder}: permission denied — the files in this folder cannot be opened "
                             "(no execute permission); `chmod u+rx` it if it is yours, or copy the "
                             "photos to a folder of your own") from None
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            if e.errno == errno.ELOOP:
                skipped.append(f"{name}: skipped — a symbolic link that loops back on itself, "
                               "not a photo")
            elif is_link:
                problems.append(_bad_link(p, e))
            else:
                problems.append(f"{p}: cannot be read ({e.strerror}) — copy it again, or remove it")
            continue
        if stat.S_ISREG(mode):
            files.append(p)
        else:
            skipped.append(f"{name}: skipped — {_kind(mode)}")
    return files, skipped, problems


def _kind(mode: int) -> str:
    """Why an entry that is not a regular file is skipped, for its warning line."""
    if stat.S_ISDIR(mode):
        return "a folder (sub-folders are not read: move photos out of it to use them)"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a photo file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a photo file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a photo file"
    return "not a regular file"


def _bad_link(p: Path, e: OSError) -> str:
    """The problem line for a link that os.stat cannot follow (``e``), loops aside."""
    target = os.readlink(p)
    if isinstance(e, FileNotFoundError):
        return (f"{p}: broken link (to {target}, which does not exist) — copy the photo itself into "
                "the folder, or remove the link")
    if isinstance(e, PermissionError):
        return (f"{p}: permission denied — it links to {target}, which you cannot reach; copy the "
                "photo itself into the folder, or remove the link")
    return (f"{p}: link to {target} cannot be followed ({e.strerror}) — copy the photo itself into "
            "the folder, or remove the link")


def _strays(files: list[Path], stems: set[str]) -> list[str]:
    """A problem for each file that is neither a photo nor a caption or mask of one."""
    problems = []
    for p in files:
        if (owner := mask_owner(p)) is not None and owner not in stems:
            problems.append(f"{p}: mask with no photo named '{owner}.jpg/.png/…' beside it — "
                            "name it PHOTO.mask.png after its photo, or move it out")
        elif p.suffix.lower() == ".txt" and p.stem not in stems:
            problems.append(f"{p}: text file with no photo named '{p.stem}.jpg/.png/…' beside it — "
                            "name it after its photo to use it as a caption, or move it out")
        elif p.suffix.lower() not in IMAGE_SUFFIXES | {".txt"}:
            problems.append(f"{p}: not a photo ({p.suffix or 'no extension'}) — only {KINDS} "
                            "files are read; move it out of the folder")
    return problems


def _warnings(photos: list[Photo], resolution: int, max_images_warn: int) -> list[str]:
    lines = []
    if len(photos) > max_images_warn:
        lines.append(f"{len(photos)} photos: DreamBooth usually needs 3–20; more than "
                     f"{max_images_warn} slows training and rarely helps — keep the best ones")
    limit = Image.MAX_IMAGE_PIXELS
    for ph in photos:
        w, h = ph.image.size
        if limit and w * h > limit:  # Pillow's own warning is silenced in _load
            lines.append(f"{ph.path.name} is {w}×{h} ({_mp(w * h)} megapixels): reading it "
                         f"takes about {w * h * 3 // 2**20} MB of memory, and training scales it "
                         f"down to {resolution} px — a copy 4000 px on the longer side is plenty")
        if min(w, h) < resolution:
            lines.append(f"{ph.path.name} is {w}×{h} (shorter side under {resolution}): it will be "
                         "upscaled and look soft — use a larger photo if you have one")
    hashes = [dhash(ph.image, HASH_SIZE) for ph in photos]
    for i in range(len(photos)):
        for j in range(i + 1, len(photos)):
            d = hamming(hashes[i], hashes[j])
            if d <= NEAR_DUPLICATE_BITS:
                lines.append(f"{photos[i].path.name} and {photos[j].path.name} look like near-duplicates "
                             f"(hash distance {d}) — keep one so the model does not overfit that shot")
    return lines


# --- pure image functions -------------------------------------------------------------------


def dhash(image: Image.Image, size: int = 8) -> int:
    """Difference hash: size*size bits, each 'is this pixel brighter than its right neighbour'."""
    small = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def square_crop(image: Image.Image, resolution: int, flip: bool = False) -> Image.Image:
    """Square ``resolution`` crop, as training encodes a photo: the shorter side is scaled to
    ``resolution`` (Lanczos) and the middle of the longer side is cut; ``flip``: mirrored."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    out = image.resize((resolution, resolution), Image.Resampling.LANCZOS,
                       box=(left, top, left + side, top + side), reducing_gap=3.0)
    return ImageOps.mirror(out) if flip else out


def contact_sheet(images: list[Image.Image], labels: list[str], cell: int = 128) -> Image.Image:
    """A white grid of thumbnails, each with its label underneath."""
    cols = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / cols))
    label_h, pad = 16, 4
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + label_h + pad) + pad), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = pad + (i % cols) * (cell + pad), pad + (i // cols) * (cell + label_h + pad)
        thumb = im.convert("RGB")
        thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        while len(label) > 4 and draw.textlength(label, font=font) > cell:
            label = label[:-2] + "…"
        draw.text((x, y + cell + 2), label, fill="black", font=font)
    return sheet


def to_tensor(image: Image.Image):
    """RGB PIL image -> float tensor, shape (3, H, W), values in [-1, 1]."""
    import torch

    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def arrays_to_tensor(images: np.ndarray):
    """uint8 RGB images (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1], as ``to_tensor``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
