"""The user's files and the run's own: nothing is written into the photos, one process writes a
run, exports appear whole or not at all, torn and damaged files are survived or named, and a
full disk is a plain message with the previous checkpoint intact."""

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.export import ExportError, export_run
from dreambooth.train import TrainingError, train


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def photos(painted_photos):
    return painted_photos


def sets(photos, *more):
    return [f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=2",
            "prior.steps=2", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", *more]


def cfg_of(photos, *more):
    return build_config("tiny", overrides=sets(photos, *more))


def digest(folder: Path) -> dict:
    """Every file under ``folder`` with its sha256: what "nothing changed" is checked against
    (the lock file says who holds the run: it changes with its holder)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train_args(photos, out, *more):
    return ["train", "--images", str(photos), "--class", "toy", "--preset", "tiny", "--out", str(out),
            "--no-progress", *[a for m in sets(photos, *more)[3:] for a in ("--set", m)]]


# ------------------------------------------------------------------ the photo folder is only read


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_in_the_photo_folder_is_refused(photos, where, capsys):
    before = digest(photos)
    out = photos if where == "same" else photos / "run"
    assert main(train_args(photos, out)) == 2
    err = capsys.readouterr().err
    assert "is inside the photo folder" in err and "Choose a folder outside it" in err
    assert digest(photos) == before and not (photos / "run").exists()


@pytest.fixture
def lora_run(photos, tmp_path):
    run = tmp_path / "run"
    train(cfg_of(photos, "train.mode=lora", "train.steps=2"), run, progress=False)
    return run


def test_export_and_sample_into_the_photo_folder_are_refused(lora_run, photos, capsys):
    before = digest(photos)
    assert main(["export", str(lora_run), "--format", "lora-kohya", "--out", str(photos / "x.safetensors")]) == 2
    assert "is inside the photo folder" in capsys.readouterr().err
    assert main(["sample", str(lora_run), "--prompt", "my toy", "--out", str(photos / "s"), "--no-progress"]) == 2
    assert "is inside the photo folder" in capsys.readouterr().err
    assert digest(photos) == before


# ------------------------------------------------------------------ one writer per run


HOLDER = textwrap.dedent("""
    import sys, time
    from dreambooth.rundir import writer_lock
    with writer_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_writer_is_refused_with_the_holder_pid(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(photos), run, progress=False, stop_after=2)
    before = digest(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {holder.pid}" in err and "one process writes a run" in err
        assert digest(run) == before  # no trimmed log, no empty checkpoint folder
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder's lock goes with it
        holder.wait()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "final").is_dir()


def test_a_new_run_takes_the_lock_too(photos, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_args(photos, out)) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ exports appear whole


def test_a_full_disk_during_export_leaves_nothing_and_a_retry_works(lora_run, tmp_path, monkeypatch):
    from dreambooth import export

    real = export.WRITERS["lora-kohya"]

    def full_disk(model, out, dtype):
        Path(out).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setitem(export.WRITERS, "lora-kohya", full_disk)
    out = tmp_path / "exports" / "dog.safetensors"
    with pytest.raises(ExportError, match=r"no space left on device while writing .*dog.safetensors; "
                                          r"nothing there was replaced: free space and export again"):
        export_run(lora_run, "lora-kohya", out, log=lambda _: None)
    assert sorted(os.listdir(out.parent)) == []
    monkeypatch.setitem(export.WRITERS, "lora-kohya", real)
    result = export_run(lora_run, "lora-kohya", out, log=lambda _: None)
    assert result.info["verified"] and sorted(os.listdir(out.parent)) == ["dog.export.json", "dog.safetensors"]


def test_a_killed_export_leaves_only_a_hidden_leftover_that_the_next_one_clears(lora_run, tmp_path):
    out = tmp_path / "exports" / "lora"
    leftover = out.parent / ".tmp-lora-999999999"  # a dead process's half-written folder
    leftover.mkdir(parents=True)
    (leftover / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    assert not out.exists()
    export_run(lora_run, "lora-diffusers", out, log=lambda _: None)
    assert sorted(os.listdir(out.parent)) == ["lora"] and (out / "export.json").is_file()


# ------------------------------------------------------------------ torn and damaged files


def test_a_torn_last_log_line_is_skipped_and_resume_rewrites_the_log(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(photos), run, progress=False, stop_after=2)
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "loss": 0.1')  # a write cut short
    assert main(["report", str(run)]) == 0
    assert "skipped its torn last line 3" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_damaged_line_before_the_last_names_the_file_and_line(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(photos), run, progress=False, stop_after=2)
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{garbage", *lines[1:]]) + "\n")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{log}: line 1 is damaged" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-state", "garble-state-json"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(photos, tmp_path, damage, capsys):
    straight = tmp_path / "straight"
    train(cfg_of(photos, "train.steps=6"), straight, progress=False)
    run = tmp_path / "run"
    train(cfg_of(photos, "train.steps=6"), run, progress=False, stop_after=4)
    newest = run / "checkpoints" / "step-000004"
    if damage == "truncate-weights":
        data = (newest / "trainable.safetensors").read_bytes()
        (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete-state":
        (newest / "state.safetensors").unlink()
    else:
        (newest / "state.json").write_text('{"step": 4, "tree": ')
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "resuming from" in out and "step-000002" in out
    assert_same(final_weights(straight), final_weights(run))


def test_every_checkpoint_damaged_is_an_error_naming_the_files(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(photos), run, progress=False, stop_after=2)
    weights = run / "checkpoints" / "step-000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: truncated or changed" in err and "checkpoints aside" in err


@pytest.mark.parametrize("argv", [
    ["sample", "{run}", "--prompt", "my toy", "--no-progress"],
    ["export", "{run}", "--format", "diffusers"],
    ["eval", "{run}", "--dino", "tiny", "--clip", "tiny"],
], ids=["sample", "export", "eval"])
def test_a_damaged_final_is_named(photos, tmp_path, argv, capsys):
    run = tmp_path / "run"
    train(cfg_of(photos, "train.steps=2"), run, progress=False)
    unet = run / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{unet}: truncated or changed" in err and f"train --resume {run}" in err
    assert "Traceback" not in err


def test_a_damaged_final_without_checksums_names_the_part(photos, tmp_path, capsys):
    """final/ folders written before checksums were kept: the loader's failure names the part."""
    run = tmp_path / "run"
    train(cfg_of(photos, "train.steps=2"), run, progress=False)
    (run / "final" / ckpt.FINAL_SUMS).unlink()
    vae = run / "final" / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(b"\x00" * 64)
    assert main(["sample", str(run), "--prompt", "my toy", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'final' / 'vae'} cannot be read" in err and "Traceback" not in err


def test_resuming_a_finished_run_prints_the_real_loss(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(photos), run, progress=False)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert f"done: step 4, loss {last:.4f}" in out and "nan" not in out


# ------------------------------------------------------------------ a full disk


def run_forked(fn) -> tuple[int, str]:
    """Run ``fn()`` (returning an exit code) in a forked child; (exit code, what it wrote to stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stderr into the pipe, never return into pytest
        code = 70
        try:
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = fn()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def with_file_size_limit(limit: int, argv: list[str]):
    """``main(argv)`` with writes beyond ``limit`` bytes per file failing as a full disk would."""
    def child() -> int:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return main(argv)
    return child


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(photos, tmp_path):
    straight = tmp_path / "straight"
    train(cfg_of(photos), straight, progress=False)
    run = tmp_path / "run"
    train(cfg_of(photos), run, progress=False, stop_after=2)
    before = digest(run / "checkpoints")
    code, err = run_forked(with_file_size_limit(200_000, ["train", "--resume", str(run), "--no-progress"]))
    assert code == 2, err
    assert "while writing" in err and "step-000004" in err and "nothing there was replaced" in err
    assert "the previous checkpoint (step-000002) is intact" in err
    assert f"dreambooth train --resume {run}" in err and "Traceback" not in err
    assert digest(run / "checkpoints") == before  # no partial step-000004, no leftovers
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same(final_weights(straight), final_weights(run))


def test_a_full_disk_during_final_is_a_plain_message(photos, tmp_path, monkeypatch, capsys):
    import dreambooth.models as models

    def full(self, folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(models.BaseModel, "save", full)
    with pytest.raises(TrainingError, match=r"no space left on device while writing .*final; nothing there "
                                            r"was replaced; the previous checkpoint \(step-000004\) is intact"):
        train(cfg_of(photos), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "final").exists()
    assert not list((tmp_path / "run").glob(".tmp-*"))


# ------------------------------------------------------------------ captions are text


def test_captions_with_other_braces_are_kept_as_written(photos, tmp_path):
    from dreambooth.data import read_photos
    from dreambooth.batch import instance_source
    from dreambooth.models import build_tiny

    names = sorted(photos.glob("*.png"))
    (photos / f"{names[0].stem}.txt").write_text("{a red ball} {0} a photo of {token} {class} {")
    (photos / f"{names[1].stem}.txt").write_text("{token}{class} %s {{class}}")
    cfg = cfg_of(photos)
    prompts = instance_source(cfg, build_tiny(), read_photos(photos, 64)).prompts
    assert prompts[:2] == ["{a red ball} {0} a photo of waj toy {", "wajtoy %s {toy}"]
    assert train(cfg, tmp_path / "run", progress=False).step == 4
