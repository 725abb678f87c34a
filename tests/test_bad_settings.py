"""Bad settings and odd command lines end in one clear line and exit 2, before any work: no run
folder is left behind and the photos are untouched."""

import hashlib

import pytest

from dreambooth.cli import main


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def photos(painted_photos):
    return painted_photos


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


def train_argv(photos, out, *sets):
    argv = ["train", "--images", str(photos), "--class", "toy", "--preset", "tiny", "--out", str(out),
            "--no-progress", "--set", "prior.num_images=2", "--set", "prior.steps=2"]
    return argv + [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("setting, message", [
    ("train.steps=0", "'train.steps' must be at least 1, got 0"),
    ("train.lr=-1e-4", "'train.lr' must be greater than 0"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be at least 1, got 0"),
    ("data.resolution=65", "'data.resolution' must be a multiple of 8"),
    ("data.resolution=100000", "'data.resolution' must be at most"),
    ("train.lr=nan", "'train.lr'"),
])
def test_out_of_range_settings_are_refused_before_any_work(photos, tmp_path, setting, message, capsys):
    before, out = digest(photos), tmp_path / "run"
    assert main(train_argv(photos, out, setting)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "cache").exists() and digest(photos) == before


def test_a_resolution_the_machine_cannot_encode_is_refused_before_the_run_folder(photos, tmp_path,
                                                                                  monkeypatch, capsys):
    from dreambooth import train as recipe

    monkeypatch.setattr(recipe, "free_bytes", lambda: 2**30)  # a machine with 1 GiB free
    out = tmp_path / "run"
    assert main(train_argv(photos, out, "data.resolution=4096")) == 2
    err = capsys.readouterr().err
    assert "data.resolution=4096 (encoding one photo at this size): 4.0 GiB" in err
    assert "1.0 GiB free" in err and "Lower data.resolution" in err
    assert not out.exists()


def test_an_unknown_key_without_a_close_match_lists_the_valid_keys(photos, tmp_path, capsys):
    assert main(train_argv(photos, tmp_path / "run", "zzzqqq=1")) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'zzzqqq'" in err and "Valid keys: model.path" in err and "train.lr" in err
    assert "Did you mean" not in err


def test_a_binary_config_file_is_a_message(photos, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\x00\xff\xfe\x89PNG\r\n")
    argv = train_argv(photos, tmp_path / "run") + ["--config", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_name_that_is_not_a_step_is_a_message(photos, tmp_path, capsys):
    from dreambooth.config import build_config
    from dreambooth.train import train

    run = tmp_path / "run"
    train(build_config("tiny", overrides=[f"data.images={photos}", "data.class_noun=toy", "train.steps=2",
                                          "train.checkpoint_every=2", "prior.num_images=2", "prior.steps=2"]),
          run, progress=False)
    for name in ("step-abc", "step-", "-3", "step-٣"):
        assert main(["export", str(run), "--checkpoint", name]) == 2
        err = capsys.readouterr().err
        assert f"no checkpoint '{name}' in {run}; it has: final, best, step-000002" in err, err


def test_demo_out_onto_a_file_is_a_message(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["demo", "--out", str(target), "--model", "tiny"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_a_non_utf8_token_check_is_a_message(capsys):
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")  # what a shell hands Python for such bytes
    assert main(["tokens", "--check", bad]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err


def test_a_run_folder_the_user_cannot_write_is_a_message(photos, tmp_path, capsys, monkeypatch):
    """An OSError from the machine (here: a read-only parent) is one line, not a traceback."""
    import dreambooth.rundir as rundir

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(rundir.Path, "mkdir", refuse)
    assert main(train_argv(photos, tmp_path / "run", "train.steps=2")) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'run'}: Permission denied\n"


@pytest.mark.parametrize("settings, message", [
    (["train.optimizer=adamw8bit"], "keeps an 8-bit state on the GPU: set train.optimizer=adamw or train.offload_optimizer=false"),
    (["train.optimizer=paged_adamw8bit"], "train.optimizer=paged_adamw8bit keeps an 8-bit state on the GPU"),
    (["train.shard=fsdp"], "is for one GPU: train.shard=fsdp already splits the optimizer state over the GPUs; "
                           "set train.shard=none or train.offload_optimizer=false"),
    (["train.mixed_precision=fp16"], "set train.mixed_precision=bf16 (or no) or train.offload_optimizer=false"),
    (["prior.null_space=0.5"], "undoes prior.null_space's projection of them: set prior.null_space=0"),
])
def test_offload_optimizer_with_what_it_cannot_run_beside_is_refused(photos, tmp_path, settings, message, capsys):
    out = tmp_path / "run"
    assert main(train_argv(photos, out, "train.offload_optimizer=true", *settings)) == 2
    err = capsys.readouterr().err
    assert "train.offload_optimizer=true" in err and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for a machine without CUDA")
@pytest.mark.parametrize("setting, message", [
    ("train.offload_optimizer=true", "train.offload_optimizer=true moves AdamW's state from a CUDA GPU to host "
                                     "memory (torchao); on CPU the state is in host memory already: "
                                     "set train.offload_optimizer=false"),
    ("train.optimizer=paged_adamw8bit", "train.optimizer=paged_adamw8bit needs a CUDA GPU (bitsandbytes); "
                                        "use train.optimizer=adamw on CPU"),
    ("train.optimizer=adamw8bit", "train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); "
                                  "use train.optimizer=adamw on CPU"),
])
def test_gpu_only_optimizers_are_refused_on_cpu_before_anything_is_written(photos, tmp_path, setting, message,
                                                                            capsys):
    """train.check_run asks trainable.check_optimizer before the run directory is made."""
    assert main(train_argv(photos, tmp_path / "run", setting, "train.steps=2")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
