"""`--model FILE.safetensors` for FLUX.1 and SD 3.x: a single-file transformer in the original BFL /
SAI layout, with the rest of its pipeline from `model.components` (a local diffusers folder of the
family), loads to the same images as the folder it came from, and trains."""

import numpy as np
import pytest

from dreambooth.errors import ModelError
from dreambooth.models import load_base_model
from dreambooth.sample import generate
from dreambooth.transformer_files import save_transformer_file
from dreambooth.tiny import build_tiny


@pytest.fixture(scope="module", params=["tiny-flux1", "tiny-sd3"])
def exported(request, tmp_path_factory):
    """(tiny model, its diffusers folder without transformer weights, its single transformer file)."""
    import shutil

    root = tmp_path_factory.mktemp(request.param)
    model = build_tiny(request.param, seed=3)
    model.save(root / "pipe")
    shutil.rmtree(root / "pipe" / "transformer")  # the file brings it; the folder's is never read
    return model, root / "pipe", save_transformer_file(model.transformer, root / "t.safetensors")


def pixels(model):
    image = generate(model, ["a photo of a dog"], [0], steps=2, guidance=2.0, scheduler="euler")[0]
    return np.asarray(image, dtype=np.int16)


def test_single_file_transformer_with_components_draws_the_same_image(exported):
    model, folder, file = exported
    loaded = load_base_model(str(file), components=str(folder))
    assert loaded.kind == model.kind and loaded.source == str(file)
    for k, v in model.transformer.state_dict().items():
        assert (loaded.transformer.state_dict()[k] == v).all(), k
    assert np.abs(pixels(loaded) - pixels(model)).max() == 0


def test_single_file_transformer_without_components_says_what_to_set(exported):
    _, _, file = exported
    with pytest.raises(ModelError, match="model.components=FOLDER"):
        load_base_model(str(file))


def test_components_of_the_other_family_is_refused(exported, tmp_path):
    model, _, file = exported
    other = build_tiny("tiny-sd3" if model.kind == "flux1" else "tiny-flux1")
    other.save(tmp_path / "other")
    with pytest.raises(ModelError, match="looks like"):
        load_base_model(str(file), components=str(tmp_path / "other"))


def test_trains_from_a_single_file(exported, tmp_path):
    from dreambooth.config import build_config
    from dreambooth.train import train
    from tests.painting import paint_subject

    model, folder, file = exported
    paint_subject(tmp_path / "photos", 3)
    preset = "tiny-flux1" if model.kind == "flux1" else "tiny-sd3"
    cfg = build_config(preset, overrides=["train.steps=2", "prior.num_images=2"], extra={
        "model.path": str(file), "model.components": str(folder), "data.images": str(tmp_path / "photos"),
        "data.class_noun": "dog"})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2 and np.isfinite(result.loss)
    assert "components:" in (tmp_path / "run" / "config.yaml").read_text()
