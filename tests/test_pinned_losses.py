"""Pinned losses: four steps of each training mode on the tiny model, compared with numbers
written here (as torchtune's recipe tests do). A change to the training math fails at once, even
when every run still learns. The numbers were recorded on commit f06e87e, before train() became
setup / step / loop; a change that is meant to alter the math updates them and says so."""

import json

import pytest
import torch

from dreambooth.config import build_config
from dreambooth.train import train

pytestmark = pytest.mark.usefixtures("isolated_cache")

MODES = {
    "full": [],
    "full+text-encoder": ["train.train_text_encoder=true"],
    "lora": ["train.mode=lora", "train.lr=1e-3"],
    "lora+text-encoder": ["train.mode=lora", "train.lr=1e-3", "train.train_text_encoder=true"],
    "full+base-target": ["prior.target=base"],
}

# per step: [loss, instance_loss, prior_loss]
EXPECTED = {
    "full": [
        [2.3045328, 1.0936210, 1.2109118],
        [2.0658689, 0.9225734, 1.1432954],
        [2.5948880, 1.3307099, 1.2641780],
        [2.1806877, 1.1105639, 1.0701238]],
    "full+text-encoder": [
        [2.3045328, 1.0936210, 1.2109118],
        [2.0656104, 0.9230373, 1.1425732],
        [2.5959334, 1.3303295, 1.2656040],
        [2.1798508, 1.1102455, 1.0696054]],
    "lora": [
        [2.3045328, 1.0936210, 1.2109118],
        [2.0871191, 0.9332058, 1.1539131],
        [2.6524777, 1.3592365, 1.2932413],
        [2.2388601, 1.1397703, 1.0990900]],
    "lora+text-encoder": [
        [2.3045328, 1.0936210, 1.2109118],
        [2.0872028, 0.9336087, 1.1535941],
        [2.6529763, 1.3589604, 1.2940159],
        [2.2375612, 1.1391671, 1.0983940]],
    "full+base-target": [
        [1.0936210, 1.0936210, 0.0000000],
        [0.9248210, 0.9245403, 0.0002806],
        [1.3411305, 1.3388803, 0.0022502],
        [1.1262319, 1.1226823, 0.0035496]],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_losses_are_pinned(mode, painted_photos, tmp_path):
    cfg = build_config("tiny", overrides=[
        f"data.images={painted_photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=2",
        "prior.steps=2", "train.steps=4", "train.checkpoint_every=100", "train.lr=1e-4", *MODES[mode]])
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [[r["loss"], r["instance_loss"], r["prior_loss"]] for r in rows]
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64),
                               torch.tensor(EXPECTED[mode], dtype=torch.float64), rtol=1e-5, atol=1e-5)
