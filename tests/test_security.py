"""No code runs from a run folder or a model folder: checkpoints hold no pickle, and trust in a
pickle comes only from this invocation's --trust-pickle, never from a file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.errors import ModelError
from dreambooth.models import build_tiny, load_base_model
from dreambooth.train import train


class Payload:
    """Unpickling this writes ``path``: the proof that a file ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def evil_pickle(path: Path, marker: Path, extra=None) -> None:
    torch.save({"payload": Payload(marker), **(extra or {})}, path)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def photos(painted_photos):
    return painted_photos


def tiny_cfg(photos, *sets):
    return build_config("tiny", overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=2",
        "prior.steps=2", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", *sets])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ checkpoint state without pickle


def test_state_tree_round_trips_exactly():
    """Optimizer, scheduler and RNG states come back equal, types included, through JSON + tensors."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
    p.grad = torch.ones(3, 2)
    opt.step()
    tree = {"optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "odd": {1: (float("nan"), -0.0),
            "x": [np.float32(2.5), np.int64(3), None, True]}}
    tensors = {}
    data = json.loads(json.dumps(ckpt.encode_tree(tree, tensors), allow_nan=False))
    back = ckpt.decode_tree(data, tensors)
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    state = back["optimizer"]["state"][0]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, k
    assert back["rng"]["python"] == tree["rng"]["python"]
    assert torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    got, want = back["rng"]["numpy"], tree["rng"]["numpy"]
    assert got[0] == want[0] and np.array_equal(got[1], want[1]) and got[1].dtype == want[1].dtype
    assert got[2:] == want[2:]
    assert np.isnan(back["odd"][1][0]) and str(back["odd"][1][1]) == "-0.0"
    assert back["odd"]["x"] == [2.5, 3, None, True]
    with pytest.raises(TypeError, match="cannot store a Payload"):
        ckpt.encode_tree({"x": Payload("/nonexistent")}, {})
    with pytest.raises(ValueError, match="unexpected entry"):
        ckpt.decode_tree({"__pickle__": "x"}, {})


def test_checkpoints_hold_no_pickle_and_a_planted_one_is_never_read(photos, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(photos), run, progress=False, stop_after=2)
    step = run / "checkpoints" / "step-000002"
    names = sorted(p.name for p in step.iterdir())
    assert names == ["config.yaml", "state.json", "state.safetensors", "trainable.safetensors"]
    for name in names:  # none of them is a pickle (a zip or a pickle protocol header)
        head = (step / name).read_bytes()[:2]
        assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), name
    marker = tmp_path / "pwned"
    for name in ckpt.PICKLES:  # what an attacker would plant in a shared run folder
        evil_pickle(step / name, marker)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not marker.exists()


def test_an_old_pickle_checkpoint_is_refused_unread(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(photos), run, progress=False, stop_after=2)
    step = run / "checkpoints" / "step-000002"
    (step / "state.safetensors").unlink()
    marker = tmp_path / "pwned"
    for name in ckpt.PICKLES:
        evil_pickle(step / name, marker)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "older dreambooth as pickle files" in err and "unpickling can run code" in err
    assert "Move" in err and "checkpoints aside" in err
    assert not marker.exists()
    after = snapshot(run)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


# ------------------------------------------------------------------ trust from the command line only


@pytest.fixture
def lora_run_on_pickle(photos, tmp_path):
    """A finished LoRA run whose config.yaml (and final/config.yaml) point model.path at a pickle
    .ckpt and say trust_pickle: true, as a shared run folder could."""
    run = tmp_path / "run"
    train(tiny_cfg(photos, "train.mode=lora", "train.steps=2"), run, progress=False)
    marker = tmp_path / "pwned"
    evil = tmp_path / "base.ckpt"
    evil_pickle(evil, marker)
    for path in (run / "config.yaml", run / "final" / "config.yaml"):
        data = yaml.safe_load(path.read_text())
        data["model"].update(path=str(evil), trust_pickle=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    (run / "final" / ckpt.FINAL_SUMS).unlink()  # the edit is the attacker's, not a damaged file
    return run, marker


@pytest.mark.parametrize("argv", [
    ["sample", "{run}", "--prompt", "a photo of my toy", "--no-progress"],
    ["export", "{run}", "--format", "lora-kohya"],
    ["eval", "{run}", "--dino", "tiny", "--clip", "tiny"],
    ["train", "--resume", "{run}", "--no-progress"],
], ids=["sample", "export", "eval", "train-resume"])
def test_a_run_config_cannot_grant_pickle_trust(lora_run_on_pickle, argv, capsys):
    run, marker = lora_run_on_pickle
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "pickle checkpoint" in err and "--trust-pickle" in err, err
    assert "Traceback" not in err and not marker.exists()


def pickle_folder(tmp_path: Path, payload_marker: Path | None = None) -> Path:
    """A tiny diffusers folder whose UNet weights are a pickle .bin (optionally booby-trapped)."""
    folder = tmp_path / "model"
    build_tiny().save(folder)
    unet = folder / "unet"
    weights = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    extra = {} if payload_marker is None else {"payload": Payload(payload_marker)}
    torch.save({**weights, **extra}, unet / "diffusion_pytorch_model.bin")
    return folder


def test_pickle_weights_in_a_model_folder_are_refused_with_the_reason(photos, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = pickle_folder(tmp_path, marker)
    with pytest.raises(ModelError, match=r"unet/diffusion_pytorch_model.bin as pickle.*can run code.*--trust-pickle"):
        load_base_model(str(folder))
    out = tmp_path / "run"
    assert main(["train", "--images", str(photos), "--class", "toy", "--model", str(folder),
                 "--preset", "tiny", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "as pickle" in err and "Traceback" not in err and not marker.exists()
    assert not out.exists()


def test_trusted_pickle_weights_load_when_asked_on_the_command_line(tmp_path):
    folder = pickle_folder(tmp_path)
    model = load_base_model(str(folder), trust_pickle=True)
    reference = build_tiny()
    for k, v in reference.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[k], v), k


def test_a_lora_final_without_safetensors_is_refused(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(photos, "train.mode=lora", "train.steps=2"), run, progress=False)
    final = run / "final"
    weights = load_file(str(final / "pytorch_lora_weights.safetensors"))
    (final / "pytorch_lora_weights.safetensors").unlink()
    (final / ckpt.FINAL_SUMS).unlink()
    marker = tmp_path / "pwned"
    torch.save({**weights, "payload": Payload(marker)}, final / "pytorch_lora_weights.bin")
    assert main(["sample", str(run), "--prompt", "a photo of my toy", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds no pytorch_lora_weights.safetensors" in err and "only read from .safetensors" in err
    assert not marker.exists() and "Traceback" not in err
