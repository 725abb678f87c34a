"""Tiny models of the real architectures, local-folder loading, and its errors."""

import json

import pytest
import torch

from dreambooth.errors import ModelError
from dreambooth.models import build_tiny, encode_prompts, load_base_model
from dreambooth.tokenizer import clip_tokenizer, clip_vocab


def test_real_clip_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("sks").input_ids == [49406, 48136, 49407]  # as in Stable Diffusion 1.5
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    vocab, merges = clip_vocab()
    assert len(merges) == 48894 and vocab["<|endoftext|>"] == 49407


def test_tiny_is_deterministic():
    a, b = build_tiny(), build_tiny()
    for (name, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), name
    assert a.identity() == b.identity() != build_tiny("tiny-sd2").identity()


@pytest.mark.parametrize("name, kind, prediction", [
    ("tiny", "sd1", "epsilon"), ("tiny-sd2", "sd2", "v_prediction"), ("tiny-sdxl", "sdxl", "epsilon")])
def test_round_trip_through_a_diffusers_folder(tmp_path, name, kind, prediction):
    from diffusers import DiffusionPipeline

    model = build_tiny(name)
    model.save(tmp_path / "m")
    loaded = load_base_model(str(tmp_path / "m"))
    assert loaded.kind == kind and loaded.prediction_type == prediction
    for (k, p), (_, q) in zip(model.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(p, q), k
    # the same pixels from the in-memory model and from diffusers' own loader
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    mine = model.pipeline()
    mine.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo of a dog", num_inference_steps=2, height=64, width=64,
                  output_type="np")
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = mine(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (1, 64, 64, 3)
    assert abs(a - b).max() < 1e-5


def test_prompt_conditioning_shapes():
    sd1 = encode_prompts(build_tiny(), ["a dog", "a cat"])
    assert sd1["encoder_hidden_states"].shape == (2, 77, 32)
    xl = encode_prompts(build_tiny("tiny-sdxl"), ["a dog"])
    assert xl["encoder_hidden_states"].shape == (1, 77, 64)
    assert xl["added_cond_kwargs"]["text_embeds"].shape == (1, 32)
    assert xl["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_missing_path_explains_what_a_model_is(tmp_path):
    with pytest.raises(ModelError, match=r"model not found.*model_index.json.*tiny.*Nothing is downloaded"):
        load_base_model(str(tmp_path / "nope"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match=r"not a diffusers model folder.*found: notes.txt"):
        load_base_model(str(tmp_path))


def test_incomplete_model_folder_lists_what_is_missing(tmp_path):
    build_tiny().save(tmp_path / "m")
    import shutil

    shutil.rmtree(tmp_path / "m" / "vae")
    with pytest.raises(ModelError, match=r"incomplete: missing vae/"):
        load_base_model(str(tmp_path / "m"))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.onnx"  # single-file checkpoints (.safetensors) load: tests/test_export.py
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_base_model(str(f))


def test_kind_mismatch_is_an_error(tmp_path):
    build_tiny().save(tmp_path / "m")
    assert json.loads((tmp_path / "m/model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    with pytest.raises(ModelError, match="looks like sd1"):
        load_base_model(str(tmp_path / "m"), kind="sdxl")


def test_prediction_type_override():
    assert load_base_model("tiny", prediction_type="v_prediction").prediction_type == "v_prediction"
