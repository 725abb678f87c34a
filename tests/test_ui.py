"""`dreambooth ui` driven in Debian's headless Chromium (playwright with the system browser; no
browser is downloaded): photos in, a trained tiny subject out, through the page alone.

Screenshots of each stage go to test-artifacts/ui/ (DREAMBOOTH_ARTIFACTS overrides); with
DREAMBOOTH_UPDATE_DOCS=1 the mid-run one also replaces docs/ui.png, the README's picture.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from painting import paint_subject

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without these, Chromium on a machine with no network stalls on its background fetches.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WEB_LIBRARIES = ("starlette", "uvicorn", "multipart", "python_multipart", "fastapi", "gradio")
STEPS = 60  # enough that a reload lands mid-run; the tiny LoRA does them in seconds
# The smallest sweep: one setting (its held-out check draws it against the run's defaults).
SWEEP = "sweep.guidance=[3] sweep.steps=[2] sweep.scheduler=[ddim] sweep.lora_scale=[1] sweep.num_images=1"


def test_no_module_outside_the_ui_package_imports_the_web_library():
    from test_repo import package_imports

    graph = package_imports()
    users = {m for m, imported in graph.items()
             if any(i.split(".")[0] in WEB_LIBRARIES for i in imported)}
    assert users == {"dreambooth.ui.server"}, users
    callers = {m for m, imported in graph.items() if not m.startswith("dreambooth.ui")
               and any(i == "dreambooth.ui" or i.startswith("dreambooth.ui.") for i in imported)}
    assert callers == {"dreambooth.commands.ui"}, callers  # the page is a layer on top, never under


# ------------------------------------------------------------------ fixtures


ROW_MATCHES_PAGE = """(() => {
  const row = document.querySelector("#runs-list tr[data-run='toy-run'] .run-step");
  const p = document.querySelector('#run-progress');
  return row && row.textContent === `${p.value}/${p.max}`;
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("DREAMBOOTH_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`dreambooth ui` in its own process, on a free port, over a fresh runs folder."""
    pytest.importorskip("starlette", reason="the ui extra is not installed: pip install -e '.[ui]'")
    tmp = tmp_path_factory.mktemp("ui")
    runs, port = tmp / "runs", free_port()
    env = {**os.environ, "DREAMBOOTH_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", "ui", "--port", str(port), "--runs", str(runs)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url + "/api/runs", timeout=5)
            break
        assert proc.poll() is None, (tmp / "server.log").read_text()
        time.sleep(0.1)
    yield {"url": url, "runs": runs, "tmp": tmp, "log": tmp / "server.log"}
    proc.terminate()
    proc.wait(30)
    for job in (runs / ".ui" / "jobs").glob("*.json"):  # workers live in their own sessions
        pid = json.loads(job.read_text()).get("pid")
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(pid, signal.SIGTERM)
    log.close()


@pytest.fixture
def page(tmp_path, server):
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium with apt; it could not here)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        page.wait_for_selector("body[data-ready='1']")
        yield page
        browser.close()


def cli_error(*argv: str) -> str:
    """The message `dreambooth ARGV` prints after 'error: '."""
    from dreambooth.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(list(argv)) == 2
    return err.getvalue().split("error: ", 1)[1].strip()


def set_setting(page, key: str, value: str) -> None:
    box = page.locator(f"[data-key='{key}']")
    if box.evaluate("e => e.tagName") == "SELECT":
        box.select_option(value)
    else:
        box.fill(value)
        box.dispatch_event("change")


def drop_files(page, target: str, files: list[Path]) -> None:
    """Drop ``files`` on ``target`` as a user drags them from a file manager: a real ``drop`` event
    whose DataTransfer holds File objects with the files' bytes."""
    payload = [{"name": f.name, "bytes": list(f.read_bytes())} for f in files]
    transfer = page.evaluate_handle("""files => {
        const dt = new DataTransfer();
        for (const f of files) dt.items.add(new File([new Uint8Array(f.bytes)], f.name));
        return dt;
    }""", payload)
    page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})


def fill_form(page, photos: list[Path] | Path, run: str, class_noun: str = "toy", preset: str = "tiny") -> None:
    """Photos (dropped on the page as files, or a folder on this machine: read in place), then the fields."""
    if isinstance(photos, Path):
        page.fill("#photos-folder", str(photos))
        page.click("#photos-folder-load")
    else:
        drop_files(page, "#photos-drop", photos)
    page.wait_for_selector(".intake-row")
    page.fill("#class_noun", class_noun)
    page.select_option("#model", "tiny")
    page.fill("#preset", preset)
    page.dispatch_event("#preset", "change")
    page.click("#advanced summary")
    page.wait_for_selector("[data-key='train.mode']")
    for key, value in {"train.mode": "lora", "train.steps": str(STEPS), "prior.num_images": "2",
                       "eval.every": str(STEPS), "eval.dino": "tiny", "eval.clip": "tiny",
                       "eval.num_images": "1", "eval.steps": "4", "eval.class_images": "1",
                       "train.checkpoint_every": "50"}.items():
        set_setting(page, key, value)
    page.click("#advanced summary")
    page.fill("#run", run)


# ------------------------------------------------------------------ photos in, a subject out


def test_photos_to_trained_subject_in_the_browser(page, server, artifacts, tmp_path):
    shot = lambda name: page.screenshot(path=str(artifacts / name), full_page=True)  # noqa: E731
    base = ThreadPoolExecutor(1).submit(base_pipeline, tmp_path / "base")  # for the download's check, meanwhile
    photos = paint_subject(tmp_path / "photos", count=5)
    fill_form(page, photos, "toy-run")
    assert page.locator(".intake-row").count() == 5
    assert page.locator("#intake img").first.get_attribute("src").startswith("data:image/png")
    page.wait_for_function("document.querySelector('#token').value !== ''")  # the picker's top suggestion
    shot("1-intake-and-form.png")

    page.click("#start")  # the plan (the first one imports for seconds) need not end first
    page.wait_for_function("location.hash === '#run=toy-run'")
    page.wait_for_function("document.querySelector('#run-progress').value > 0", timeout=120_000)
    page.wait_for_function(ROW_MATCHES_PAGE)  # the runs list shows the step the run's page shows
    shot("2-training.png")
    if os.environ.get("DREAMBOOTH_UPDATE_DOCS") == "1":
        shutil.copy(artifacts / "2-training.png", ROOT / "docs" / "ui.png")
    page.wait_for_function("document.querySelector('#plan').textContent.includes('predicted peak')")

    page.reload()  # the page keeps nothing: the run comes back from the server
    page.wait_for_function("document.querySelector('#run-name').textContent === 'toy-run'")
    page.wait_for_function("document.querySelector('#run-progress').value > 0")
    assert page.locator("#run-status").inner_text() in ("running", "done")
    shot("3-after-reload.png")

    page.wait_for_function("document.querySelector('#run-status').textContent === 'done'", timeout=240_000)
    page.wait_for_function("document.querySelector('#run-progress').value === %d" % STEPS)
    assert page.locator("#run-progress-text").inner_text() == f"step {STEPS} / {STEPS}"
    row = page.locator("#runs-list tr[data-run='toy-run']")
    assert row.locator(".run-step").inner_text() == f"{STEPS}/{STEPS}"
    assert row.locator(".run-status").inner_text() == "done"
    page.wait_for_selector(f"#grids .grid-item[data-step='{STEPS}'] img")
    assert (server["runs"] / "toy-run" / "samples" / f"step-{STEPS:06d}" / "grid.png").is_file()
    assert "step" in page.locator("#best").inner_text()
    shot("4-done.png")

    # Sample, sweep and export, queued at once: the queue runs them one after another.
    page.fill("#sample-prompts", "a photo of my toy on the beach\na {token} {class} in the snow")
    page.fill("#sample-n", "1")
    page.click("#sample-btn")
    page.fill("#sweep-dino", "tiny")
    page.fill("#sweep-clip", "tiny")
    page.fill("#sweep-set", SWEEP)
    page.click("#sweep-btn")
    page.select_option("#export-format", "lora-diffusers")
    page.click("#export-btn")
    with page.context.expect_page() as opened:  # the report, rebuilt on request, in a new tab
        page.click("#report-link")
    report = opened.value
    report.wait_for_load_state()
    assert report.url.endswith("/files/toy-run/report.html")
    assert report.locator("h1").inner_text() == "DreamBooth run: toy-run"
    assert "step" in report.locator("#chosen").inner_text()
    report.close()

    page.wait_for_selector("#samples .sample img", timeout=120_000)
    drawn = sorted((server["runs"] / "toy-run" / "samples" / "sample-1").glob("p*.png"))
    assert len(drawn) == 2
    token = page.locator("#run-config").inner_text().split('"')[1].split()[0]
    from PIL import Image

    prompts = {Image.open(p).text["prompt"] for p in drawn}
    assert prompts == {f"a photo of {token} toy on the beach", f"a {token} toy in the snow"}
    shot("5-samples.png")

    page.wait_for_selector("#sweep-out pre", timeout=120_000)
    table = page.locator("#sweep-out pre").inner_text()
    assert "ddim" in table
    assert table.strip() == (server["runs"] / "toy-run" / "sweep" / "results.md").read_text().strip()
    assert page.locator("#sweep-out img").count() == 1

    link = page.locator("#exports a.download", has_text="pytorch_lora_weights.safetensors")
    link.wait_for(timeout=120_000)
    with page.expect_download() as download:
        link.click()
    got = tmp_path / "download" / "pytorch_lora_weights.safetensors"
    download.value.save_as(got)
    shot("6-exported.png")
    check_lora_loads(got, base.result())


def base_pipeline(folder: Path):
    """The tiny base model as diffusers loads it from a folder."""
    from diffusers import StableDiffusionPipeline

    from dreambooth.models import build_tiny

    build_tiny().save(folder)
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def check_lora_loads(file: Path, pipe) -> None:
    """The downloaded file loads with diffusers' own load_lora_weights into the base pipeline,
    and its weights are the ones the UNet now holds."""
    import torch
    from safetensors.torch import load_file

    pipe.load_lora_weights(str(file.parent))
    saved = load_file(file)
    assert saved and pipe.get_list_adapters()
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved)
    key = next(k for k in saved if "lora_A" in k or "lora.down" in k)
    matches = [p for p in lora.values() if p.shape == saved[key].shape and torch.equal(p, saved[key])]
    assert matches, f"no LoRA weight of the UNet equals {key} from the download"


# ------------------------------------------------------------------ bad input: the CLI's words, nothing written


def test_bad_input_shows_the_cli_message_beside_the_field_and_writes_nothing(page, server, tmp_path, artifacts):
    runs = server["runs"]
    before = {p for p in runs.rglob("*")} - {p for p in runs.rglob("*") if p.suffix == ".log"}
    paint_subject(tmp_path / "good", count=5)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    (bad / "photo-9.jpg").write_bytes(b"this is not a JPEG")

    page.fill("#photos-folder", str(bad))
    page.click("#photos-folder-load")
    page.wait_for_function("document.querySelector('#err-photos').textContent.length > 0")
    assert page.locator("#err-photos").inner_text() == cli_error("data", str(bad))
    assert page.locator("#intake-box").is_hidden()
    page.set_input_files("#photos-input", [str(p) for p in sorted(bad.iterdir())])  # the same set, uploaded
    page.wait_for_function("document.querySelector('#err-photos').textContent.includes('not a readable image')")
    shot = lambda name: page.screenshot(path=str(artifacts / name), full_page=True)  # noqa: E731
    shot("bad-photos.png")

    fill_form(page, tmp_path / "good", "should-not-exist", preset="tinyy")
    page.wait_for_function("document.querySelector('#err-preset').textContent.length > 0")
    expected = cli_error("train", "--images", str(tmp_path / "good"), "--class", "toy", "--preset", "tinyy",
                         "--out", str(tmp_path / "cli-run"))
    assert page.locator("#err-preset").inner_text() == expected
    page.click("#start")
    page.wait_for_function("document.querySelector('#err-preset').textContent.length > 0")
    assert page.locator("#err-preset").inner_text() == expected
    shot("bad-preset.png")

    page.fill("#preset", "tiny")
    page.dispatch_event("#preset", "change")
    page.fill("#class_noun", "")
    page.click("#start")
    page.wait_for_function("document.querySelector('#err-class_noun').textContent.length > 0")
    assert page.locator("#err-class_noun").inner_text() == cli_error(
        "train", "--images", str(tmp_path / "good"), "--preset", "tiny", "--out", str(tmp_path / "cli-run"))
    assert page.locator("#err-preset").inner_text() == ""
    shot("missing-class.png")

    page.goto(page.url.split("#")[0] + "#runs")  # Compare with fewer than two runs ticked
    page.click("#compare")
    assert page.locator("#err-compare").inner_text() == "tick two runs to compare them"

    assert not (runs / "should-not-exist").exists() and not (tmp_path / "cli-run").exists()
    after = {p for p in runs.rglob("*")} - {p for p in runs.rglob("*") if p.suffix == ".log"}
    new = after - before
    assert not new, new  # no run, no job, no upload kept
