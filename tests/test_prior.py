"""Class images for prior preservation: the cache, resuming, the key, user folders, latents."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dreambooth.sample
from dreambooth.config import build_config
from dreambooth.models import build_tiny
from dreambooth.prior import (class_images, class_prompt_key, encode_images, image_seed,
                              key_fields)

PROMPT = "a photo of a toy"


@pytest.fixture(scope="module")
def model():
    return build_tiny("tiny")


def make_cfg(*sets):
    return build_config("tiny", overrides=["prior.num_images=4", "prior.steps=2",
                                           "prior.batch_size=2", *sets])


def digests(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_cache_is_reused(model, tmp_path):
    cfg = make_cfg()
    first = class_images(model, cfg, PROMPT, tmp_path, progress=False)
    assert first.generated == 4
    assert [p.name for p in first.paths] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert first.folder.parent == tmp_path / "class-images"
    meta = json.loads((first.folder / "meta.json").read_text())
    assert meta["prompt"] == PROMPT and meta["solver"] == "dpmpp" and meta["steps"] == 2
    assert meta["model"] == model.identity() and meta["resolution"] == 64
    with Image.open(first.paths[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    before = digests(first.paths)
    second = class_images(model, cfg, PROMPT, tmp_path, progress=False)
    assert second.generated == 0
    assert second.paths == first.paths and digests(second.paths) == before


def test_cache_root_from_environment(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "env"))
    out = class_images(model, make_cfg("prior.num_images=1"), PROMPT, progress=False)
    assert out.folder.parent == tmp_path / "env" / "class-images" and out.generated == 1


def test_interrupted_generation_resumes_bit_identical(model, tmp_path, monkeypatch):
    cfg = make_cfg("prior.num_images=5")
    real, calls = dreambooth.sample.generate, []

    def dies_after_first_batch(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dreambooth.sample, "generate", dies_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        class_images(model, cfg, PROMPT, tmp_path / "a", progress=False)
    monkeypatch.setattr(dreambooth.sample, "generate", real)
    folder = next((tmp_path / "a" / "class-images").iterdir())
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png"]
    (folder / ".000002.png.12345.tmp").write_bytes(b"half a png")  # a write cut short by a kill

    resumed = class_images(model, cfg, PROMPT, tmp_path / "a", progress=False)
    assert resumed.generated == 3
    assert not list(folder.glob("*.tmp"))
    whole = class_images(model, cfg, PROMPT, tmp_path / "b", progress=False)
    assert whole.generated == 5
    assert digests(resumed.paths) == digests(whole.paths)


def test_progress_advances_a_batch_at_a_time(model, tmp_path, monkeypatch):
    """The bar moves by a batch's size when the batch is written: moved one image at a time, its
    first step came a whole batch late and its first ETA read batch-size times too long."""
    import tqdm.auto

    steps = []

    class Bar:
        def __init__(self, total, **kw):
            self.total = total

        def update(self, n):
            steps.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    class_images(model, make_cfg("prior.num_images=5"), PROMPT, tmp_path)  # batch size 2
    assert steps == [2, 2, 1]


def test_more_images_adds_only_missing_and_fewer_uses_first(model, tmp_path):
    three = class_images(model, make_cfg("prior.num_images=3"), PROMPT, tmp_path, progress=False)
    assert three.generated == 3
    five = class_images(model, make_cfg("prior.num_images=5"), PROMPT, tmp_path, progress=False)
    assert five.generated == 2 and five.folder == three.folder
    assert digests(five.paths[:3]) == digests(three.paths)
    two = class_images(model, make_cfg("prior.num_images=2"), PROMPT, tmp_path, progress=False)
    assert two.generated == 0 and two.paths == five.paths[:2]


def test_batch_size_does_not_change_the_key_and_seeds_are_per_image(model, tmp_path):
    a = class_images(model, make_cfg("prior.num_images=3", "prior.batch_size=1"), PROMPT,
                     tmp_path / "a", progress=False)
    b = class_images(model, make_cfg("prior.num_images=3", "prior.batch_size=3"), PROMPT,
                     tmp_path / "b", progress=False)
    assert a.folder.name == b.folder.name
    for pa, pb in zip(a.paths, b.paths):  # batched kernels round differently: one 8-bit level at most
        diff = np.abs(np.asarray(Image.open(pa), int) - np.asarray(Image.open(pb), int))
        assert diff.max() <= 2 and diff.mean() < 0.05
    assert image_seed(0, 3) == 3 and image_seed(2, 0) != image_seed(1, 0)


def test_key_changes_with_everything_that_changes_pixels():
    base_cfg, ident = make_cfg(), build_tiny("tiny").identity()
    base = class_prompt_key(key_fields(ident, base_cfg, PROMPT))
    assert base == class_prompt_key(key_fields(ident, make_cfg(), PROMPT))  # pure, stable
    # what does not change the pixels does not change the key
    assert base == class_prompt_key(key_fields(ident, make_cfg("prior.num_images=99",
                                                               "prior.batch_size=7"), PROMPT))
    changed = {
        "prompt": key_fields(ident, base_cfg, "a photo of a dog"),
        "weights": key_fields(build_tiny("tiny", seed=1).identity(), base_cfg, PROMPT),
    }
    for item in ["prior.negative_prompt=blurry", "prior.scheduler=unipc", "prior.steps=3",
                 "prior.guidance=5", "data.resolution=128", "prior.seed=1"]:
        changed[item] = key_fields(ident, make_cfg(item), PROMPT)
    keys = {name: class_prompt_key(fields) for name, fields in changed.items()}
    assert base not in keys.values(), keys
    assert len(set(keys.values())) == len(keys)


def write_photos(folder, count):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"dog{i}.png")


def test_user_class_folder_is_used_as_is_and_not_written(model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "dogs"
    write_photos(folder, 3)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(dreambooth.sample, "generate", None)  # nothing may be generated
    cfg = make_cfg(f"prior.class_images={folder}")
    out = class_images(model, cfg, PROMPT, tmp_path / "cache", progress=False)
    assert out.generated == 0 and out.folder == folder
    assert sorted(p.name for p in out.paths) == ["dog0.png", "dog1.png", "dog2.png"]
    assert "fewer than prior.num_images=4" in capsys.readouterr().out
    latents = encode_images(model, out.paths, 64, out.folder)
    assert latents.shape == (3, 4, 8, 8)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (tmp_path / "cache").exists()
    two = class_images(model, make_cfg(f"prior.class_images={folder}", "prior.num_images=2"),
                       PROMPT, tmp_path / "cache", progress=False)
    assert len(two.paths) == 2


def test_encode_images_cache(model, tmp_path):
    out = class_images(model, make_cfg(), PROMPT, tmp_path, progress=False)
    first = encode_images(model, out.paths, 64, out.folder)
    assert first.shape == (4, 4, 8, 8) and first.dtype == torch.float32
    [cache] = out.folder.glob("latents-*-64.safetensors")
    stamp = cache.stat().st_mtime_ns
    again = encode_images(model, out.paths, 64, out.folder)
    assert torch.equal(first, again) and cache.stat().st_mtime_ns == stamp
    assert torch.equal(encode_images(model, out.paths[:2], 64, out.folder), first[:2])
    assert torch.equal(encode_images(model, out.paths, 64), first)  # no cache: same numbers
    with torch.no_grad():  # the posterior mean times the scaling factor
        from dreambooth.data import to_tensor
        px = to_tensor(Image.open(out.paths[1]).convert("RGB"))[None]
        want = model.vae.encode(px).latent_dist.mean * model.vae.config.scaling_factor
    assert torch.allclose(first[1:2], want, atol=1e-5)
    other = build_tiny("tiny", seed=3)  # another VAE: another cache file, other latents
    assert not torch.equal(encode_images(other, out.paths, 64, out.folder), first)
    assert len(list(out.folder.glob("latents-*-64.safetensors"))) == 2


def test_vae_hash_is_the_same_in_every_process():
    """The latent cache is keyed by the VAE hash: it must not depend on PYTHONHASHSEED."""
    import subprocess
    import sys

    code = "from dreambooth.models import build_tiny; from dreambooth.prior import vae_hash; print(vae_hash(build_tiny().vae))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout.strip()
            for seed in ("1", "2")}
    assert len(outs) == 1, outs
