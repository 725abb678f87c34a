"""The flow-matching world model (dreambooth/world/flux.py): its T5 vocabulary, a toy pretraining
that writes a FluxPipeline folder and resumes exactly after a kill, the worker shares of its loss,
true classifier-free guidance for a FLUX.1 transformer without a guidance input, and (when
shipped) `--model world-flux`: the base-model probe check and the quick flux demo."""

import json

import numpy as np
import pytest
import torch

from dreambooth import checkpoint as ckpt
from dreambooth.models import WORLD_FLUX_MODEL, WORLD_MODEL
from dreambooth.world import flux as wf
from dreambooth.world import pretrain as pt

pytestmark = pytest.mark.skipif(not (WORLD_MODEL / "model_index.json").is_file(),
                                reason="the flow world model is built on the shipped world model's VAE and CLIP")
shipped = pytest.mark.skipif(not (WORLD_FLUX_MODEL / "model_index.json").is_file(),
                             reason=f"no flow world model shipped in {WORLD_FLUX_MODEL}")
SMALL = dict(steps=4, polish_steps=0, batch=4, pool=16, checkpoint_every=2, warmup=1, hidden=32, double_layers=1,
             single_layers=1, t5_hidden=16, t5_layers=1)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux") / "w"
    wf.pretrain(out, wf.FluxPretrainConfig(**SMALL))
    return out


def test_t5_vocabulary_has_the_world_words_and_spells_out_the_rest():
    tok = wf.t5_tokenizer(24)
    caption = "a photo of a red striped star with a cross on the beach"
    assert tok.tokenize(caption) == ["▁" + w for w in caption.split()]
    assert tok.tokenize("a photo of zwx star") == ["▁a", "▁photo", "▁of", "▁", "z", "w", "x", "▁star"]
    assert len(tok("a photo of a white striped kite with a band on a plain background").input_ids) <= 24
    assert tok.convert_tokens_to_ids("<unk>") == 2 and tok("é").input_ids[-2:] == [2, 1]


def test_toy_pretraining_writes_a_flux_pipeline(toy_run):
    from diffusers import FluxPipeline

    made = json.loads((toy_run / "made.json").read_text())
    assert made["workers"] == 1 and np.isfinite(made["final_loss"])
    pipe = FluxPipeline.from_pretrained(toy_run / "model", local_files_only=True)
    from safetensors.torch import load_file

    weights = load_file(toy_run / "model/transformer/diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}  # shipped in fp16
    assert not pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer_2.model_max_length == 24
    clip, shipped_clip = (load_file(d / "text_encoder/model.safetensors") for d in (toy_run / "model", WORLD_MODEL))
    assert clip.keys() == shipped_clip.keys() and all(torch.equal(clip[k], shipped_clip[k]) for k in clip)  # frozen


def test_killed_flux_pretraining_resumes_exactly(toy_run, tmp_path, monkeypatch):
    real_save = ckpt.save_checkpoint

    def save_then_die(run_dir, step, **kw):
        real_save(run_dir, step, **kw)
        if step == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        wf.pretrain(tmp_path / "split", wf.FluxPretrainConfig(**SMALL))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    wf.pretrain(tmp_path / "split", wf.FluxPretrainConfig(**SMALL))
    a, b = (ckpt.load_weights(ckpt.latest_checkpoint(d / "transformer")) for d in (toy_run, tmp_path / "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    partial = wf.load_partial(toy_run)
    for k, v in partial.transformer.state_dict().items():
        assert torch.equal(v, a[f"transformer.{k}"]), k


def test_flow_loss_worker_shares_sum_to_the_batch(monkeypatch):
    cfg = wf.FluxPretrainConfig(**{**SMALL, "batch": 5, "caption_dropout": 0.5})
    model = wf.architecture(cfg)
    pool = wf.flow_pool(model, cfg)
    params = [p for m in wf.trained_modules(model).values() for p in m.parameters()]

    def run(as_worker):
        monkeypatch.setattr(pt, "worker", lambda: as_worker)
        for p in params:
            p.grad = None
        loss = wf.flow_loss(model, pool, cfg, 11)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    whole, grads = run((0, 1))
    shares = [run((rank, 2)) for rank in (0, 1)]
    assert sum(s[0] for s in shares) == pytest.approx(whole, rel=1e-5)
    for g, g0, g1 in zip(grads, shares[0][1], shares[1][1]):
        assert torch.allclose(g0 + g1, g, rtol=1e-4, atol=1e-7)


def test_flux_without_a_guidance_input_samples_with_true_cfg(toy_run):
    """guidance > 1 runs a second pass on the negative prompt (images change with it and with the
    scale); FLUX.1 [dev] (a guidance input) never does."""
    from dreambooth.models import load_base_model
    from dreambooth.sample import generate

    model = load_base_model(str(toy_run / "model"))
    assert model.resolution == 64

    def draw(**kw):
        return np.asarray(generate(model, ["a photo of a red star"], [0], steps=3, scheduler="euler", **kw)[0], np.int16)

    plain, guided = draw(guidance=1.0), draw(guidance=4.0)
    assert np.abs(plain - guided).max() > 0
    assert np.abs(guided - draw(guidance=4.0, negative_prompt="a photo of a box")).max() > 0
    assert np.abs(plain - draw(guidance=1.0, negative_prompt="a photo of a box")).max() == 0


@shipped
def test_shipped_flow_world_model_loads_and_records_how_it_was_made():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(WORLD_FLUX_MODEL, local_files_only=True)
    made = json.loads((WORLD_FLUX_MODEL / "made.json").read_text())
    assert {"command", "config", "final_loss", "seconds"} <= set(made)
    assert "--family flux1" in made["command"] and not pipe.transformer.config.guidance_embeds
    assert sum(f.stat().st_size for f in WORLD_FLUX_MODEL.rglob("*") if f.is_file()) <= 40 * 2**20


@shipped
def test_flow_world_class_prompts_pass_a_quick_probe_check():
    """The shipped flow model draws the color and background a caption asks for, and the shape
    less often (200 images in docs/world.md: shape 74.5%, color 98.5%, background 100%; the 90%
    bar is missed on shape). Here 24 images at 15 steps (shape 0.75, color 1.0, background 1.0
    when measured), with a margin for other CPUs' float rounding."""
    import random

    from dreambooth.models import load_base_model
    from dreambooth.sample import generate
    from dreambooth.world.probe import load_probe
    from dreambooth.world.render import caption, is_held_out, random_scene

    rng = random.Random("base-accuracy:7")
    scenes = [s for s in (random_scene(rng) for _ in range(40)) if not is_held_out(s)][:24]
    images = generate(load_base_model("world-flux"), [caption(s) for s in scenes], list(range(7, 31)),
                      steps=15, guidance=5.0, scheduler="euler", batch_size=24)
    readings = load_probe().read(images)
    acc = {f: sum(r[f] == getattr(s, f) for r, s in zip(readings, scenes)) / len(scenes)
           for f in ("shape", "color", "background")}
    assert acc["shape"] >= 0.6 and acc["color"] >= 0.9 and acc["background"] >= 0.9, acc


@shipped
def test_quick_flux_demo(tmp_path, monkeypatch, capsys):
    from dreambooth.cli import main

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--family", "flux1", "--steps", "10", "--quick"]) == 0
    assert "probe scores: subject fidelity" in capsys.readouterr().out
    config = (tmp_path / "demo/run/config.yaml").read_text()
    assert "path: world-flux" in config and "max_sequence_length: 24" in config
    scores = json.loads((tmp_path / "demo/run/world-scores.json").read_text())
    assert 0 <= scores["prior_distance"] <= 1


def test_world_command_takes_a_family(tmp_path, capsys):
    from dreambooth.cli import main

    assert main(["world", "pretrain", "--family", "sd3", "--out", str(tmp_path / "w")]) == 2
    assert "--family sd3: choose sd1 or flux1" in capsys.readouterr().err
    assert main(["demo", "--family", "sd3", "--out", str(tmp_path / "d")]) == 2
    assert "--family sd3: choose one of sd1, flux1" in capsys.readouterr().err


def test_polish_stage_goes_on_from_the_first(toy_run, tmp_path):
    out = tmp_path / "polished"
    wf.pretrain(out, wf.FluxPretrainConfig(**{**SMALL, "polish_steps": 2}))
    made = json.loads((out / "made.json").read_text())
    assert set(made["stage_seconds"]) == {"transformer", "polish"}
    first, again = (ckpt.load_weights(ckpt.latest_checkpoint(d / "transformer")) for d in (toy_run, out))
    assert all(torch.equal(first[k], again[k]) for k in first)  # the first stage as without polish
    polished = ckpt.load_weights(ckpt.latest_checkpoint(out / "polish"))
    assert any(not torch.equal(first[k], polished[k]) for k in first)
    partial = wf.load_partial(out)  # the newest stage's weights
    for k, v in partial.transformer.state_dict().items():
        assert torch.equal(v, polished[f"transformer.{k}"]), k


@shipped
def test_the_code_builds_the_shipped_t5_vocabulary():
    """Pretraining reproduces the shipped model only if the tokenizer it builds gives the same ids."""
    from transformers import T5TokenizerFast

    shipped_tok = T5TokenizerFast.from_pretrained(WORLD_FLUX_MODEL, subfolder="tokenizer_2")
    assert shipped_tok.get_vocab() == wf.t5_tokenizer(24).get_vocab()
