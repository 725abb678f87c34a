"""Photo intake faults: each names its real cause in one line ("PATH: what is wrong — what to do"),
`dreambooth data` exits 2 on errors (0 with a warning line for what it skipped), no traceback or
Python warning reaches the user, and the photo folder is only ever read (every entry hashed
before and after)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.cli import main
from dreambooth.data import read_photos
from dreambooth.errors import InputError
from test_data import noise, noise_folder

NOBODY = 65534


@pytest.fixture
def photos(tmp_path) -> Path:
    return noise_folder(tmp_path)


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature, an IHDR claiming ``width``×``height`` and IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` as it is, links not followed and pipes never opened:
    (kind, mode bits, mtime, sha256 of a regular file's bytes or a link's target)."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            else:
                digest = None
            state[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                 st.st_mtime_ns, digest)
    return state


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# --- size limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, what", [("a.mask.png", "mask"), ("huge.png", "image")])
def test_header_over_the_pixel_limit_names_the_size(capsys, photos, name, what):
    """A 20000×20000 header: a traceback for a mask, "truncated or corrupt" for a photo, before."""
    (photos / name).write_bytes(png_header(20000, 20000))
    before = tree_state(photos)
    code, _, err = run_cli(capsys, photos, "--resolution", "64")
    check_error(code, err, name, f"the {what} is 400 megapixels", "more than the 179 megapixels",
                "scale it down")
    assert "corrupt" not in err and len(err.strip().splitlines()) == 1
    assert tree_state(photos) == before


def test_photo_over_the_warning_limit_is_one_line_of_ours(photos, monkeypatch):
    """Pillow's DecompressionBombWarning (here at a lowered limit, so the photo stays small) is
    not raised at the caller: read_photos says it in one warning line of its own."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    noise((120, 100), seed=3).save(photos / "big.png")  # 12000 pixels: over 10000, under 20000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        intake = read_photos(photos, resolution=64)
    assert [str(w.message) for w in caught] == []
    assert len(intake.photos) == 3
    (line,) = [w for w in intake.warnings if "megapixels" in w]
    assert line.startswith("big.png is 120×100 (0.012 megapixels)") and "plenty" in line
    noise((200, 150), seed=4).save(photos / "bigger.png")  # 30000: over twice the limit
    with pytest.raises(InputError, match=r"bigger\.png: the image is 0\.03 megapixels, more than "
                                         r"the 0\.02 megapixels"):
        read_photos(photos, resolution=64)


def test_96_megapixel_photo_prints_one_line(tmp_path):
    """The real thing, as a user runs it (a subprocess, so Python's own warning printing is what
    the user would see): one line of ours, not Pillow's warning and its source line. A solid
    12000×8000 grayscale JPEG: 1 MB on disk, about 600 MB of memory while it is read."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (12000, 8000), 90).save(folder / "wide.jpg", quality=50)
    noise(seed=5).save(folder / "b.png")
    before = tree_state(folder)
    script = "import sys; from dreambooth.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", script, "data", str(folder), "--resolution", "64"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"})
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr and "warnings.warn" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if "wide.jpg" in line]
    assert lines == [line for line in run.stderr.splitlines() if line.strip()], run.stderr
    assert len(lines) == 1 and lines[0].startswith("warning: wide.jpg is 12000×8000 (96 megapixels)")
    assert "2 photos ready" in run.stdout
    assert tree_state(folder) == before


# --- entries that are not files ------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX pipes and links")
def test_loop_pipe_and_folder_are_skipped_with_a_warning(capsys, photos, tmp_path):
    os.symlink("loop.jpg", photos / "loop.jpg")  # points at itself
    os.mkfifo(photos / "pipe.jpg")
    (photos / "x.jpg").mkdir()
    noise(seed=6).save(photos / "x.jpg" / "inner.jpg")
    noise(seed=7).save(tmp_path / "elsewhere.jpg")
    os.symlink(tmp_path / "elsewhere.jpg", photos / "linked.jpg")  # a link to a photo: read
    before = tree_state(photos)
    opened = threading.Event()  # set if anything opens the pipe for reading

    def writer():
        fd = os.open(photos / "pipe.jpg", os.O_WRONLY)  # blocks until a reader opens it
        opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        code, out, err = run_cli(capsys, photos, "--resolution", "64")
    finally:
        was_opened = opened.is_set()
        while thread.is_alive():  # a reader lets the writer's open return
            fd = os.open(photos / "pipe.jpg", os.O_RDONLY | os.O_NONBLOCK)
            thread.join(0.05)
            os.close(fd)
    assert not was_opened, "the pipe was opened"
    assert code == 0, err
    assert "3 photos ready" in out and "linked.jpg" in out and "inner.jpg" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines), err
    by_name = {line.split()[1].rstrip(":"): line for line in lines}
    assert "skipped" in by_name["loop.jpg"] and "loops" in by_name["loop.jpg"]
    assert "skipped" in by_name["pipe.jpg"] and "pipe" in by_name["pipe.jpg"].split(":", 2)[2]
    assert "skipped" in by_name["x.jpg"] and "a folder" in by_name["x.jpg"]
    assert tree_state(photos) == before


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
@pytest.mark.parametrize("sheet", [False, True])
def test_photo_folder_that_is_a_looping_link(capsys, tmp_path, sheet):
    os.symlink("loop", tmp_path / "loop")
    extra = ["--sheet", tmp_path / "sheet.png"] if sheet else []
    code, _, err = run_cli(capsys, tmp_path / "loop", *extra)
    check_error(code, err, "loop: a symbolic link that loops back on itself", "pass the real folder")
    assert sorted(os.listdir(tmp_path)) == ["loop"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_broken_link_is_an_error(capsys, photos):
    """A link whose target is gone is an error, not a skip: a photo the user put there would
    otherwise be left out of training without a word."""
    os.symlink("/nonexistent/dog-3.jpg", photos / "c.jpg")
    before = tree_state(photos)
    code, _, err = run_cli(capsys, photos, "--resolution", "64")
    check_error(code, err, "c.jpg: broken link", "/nonexistent/dog-3.jpg", "does not exist",
                "remove the link")
    assert tree_state(photos) == before


# --- permissions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """Runs `dreambooth data` once in this process, so that every module it needs is imported
    before a child drops to an unprivileged user (who cannot read an interpreter under /root)."""
    d = tmp_path_factory.mktemp("warm")
    noise(seed=8).save(d / "a.jpg")
    noise(seed=9).save(d / "b.png")
    (d / "a.txt").write_text("a photo of sks dog", encoding="utf-8")
    Image.new("L", (96, 96), 255).save(d / "a.mask.png")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["data", str(d), "--resolution", "64"]) == 0
        assert main(["data", str(d / "nope")]) == 2


def run_unprivileged(*argv) -> tuple[int, str, str]:
    """`dreambooth data ARGV` in a forked child that file permissions apply to: as root (which
    ignores them) the child drops to nobody first. Returns (exit code, stdout, stderr); an
    exception escaping main() comes back as code -1 with its traceback as stderr."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        result = [-1, "", ""]
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                try:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                except OSError as e:  # no CAP_SETUID, or no such user in this namespace
                    result = [-2, "", f"cannot drop to an unprivileged user ({e})"]
                    raise
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    result = [main(["data", *map(str, argv)]), "", ""]
                except BaseException:
                    result = [-1, "", traceback.format_exc()]
            result[1:] = [out.getvalue(), err.getvalue() + result[2]]
        except BaseException:
            pass
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_end, json.dumps(result).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        payload = f.read()
    os.waitpid(pid, 0)
    code, out, err = json.loads(payload)
    if code == -2:
        pytest.skip(err)
    return code, out, err


@pytest.fixture
def open_tree(warmed):
    """A folder under the system temp dir that an unprivileged user can enter (pytest's own
    tmp_path sits under a 0700 folder); every mode is restored before it is removed."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    root = Path(tempfile.mkdtemp(prefix="intake-faults-"))
    root.chmod(0o755)
    (root / "photos").mkdir(mode=0o755)
    (root / "photos").chmod(0o755)
    noise(seed=1).save(root / "photos" / "a.jpg")
    noise(seed=2).save(root / "photos" / "b.png")
    for p in (root / "photos" / "a.jpg", root / "photos" / "b.png"):
        p.chmod(0o644)
    yield root
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(root)


def denied(open_tree: Path, target: str, mode: int, *needles: str, absent=("corrupt",)) -> None:
    """Takes ``mode`` away on open_tree/``target``, runs the command as someone it applies to,
    checks the message, then gives the mode back and checks that nothing changed."""
    folder = open_tree / "photos"
    path = open_tree / target
    old = stat.S_IMODE(path.stat().st_mode)
    before = tree_state(open_tree)
    path.chmod(mode)
    try:
        code, _, err = run_unprivileged(folder, "--resolution", "64")
    finally:
        path.chmod(old)
    check_error(code, err, *needles)
    for word in absent:
        assert word not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert tree_state(open_tree) == before


def test_folder_without_read_permission(open_tree):
    denied(open_tree, "photos", 0o311, "photos: permission denied", "cannot list this folder",
           "no read permission", "chmod u+rx")


def test_folder_without_execute_permission(open_tree):
    denied(open_tree, "photos", 0o666, "photos: permission denied",
           "files in this folder cannot be opened", "no execute permission", "chmod u+rx")


def test_parent_folder_without_execute_permission(open_tree):
    denied(open_tree, ".", 0o666, "photos: permission denied", "a folder on the way to it",
           absent=("not found",))


@pytest.mark.parametrize("name, needle", [("a.jpg", "this file"), ("a.txt", "this caption"),
                                          ("a.mask.png", "this file")])
def test_unreadable_file_is_permission_denied_not_corrupt(open_tree, name, needle):
    folder = open_tree / "photos"
    (folder / "a.txt").write_text("a photo of sks dog", encoding="utf-8")
    Image.new("L", (96, 96), 255).save(folder / "a.mask.png")
    for p in folder.iterdir():
        p.chmod(0o644)
    denied(open_tree, f"photos/{name}", 0o200, f"{name}: permission denied",
           f"you cannot read {needle}", "chmod u+r")
