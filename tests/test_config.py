import pytest
import yaml

from dreambooth.cli import main
from dreambooth.config import (Config, build_config, list_presets, load_config, save_config,
                               valid_keys)
from dreambooth.errors import ConfigError


def test_defaults_and_every_preset_load():
    assert Config().train.mode == "full"
    assert set(list_presets()) >= {"tiny", "sd15-full", "sd15-lora", "sd21-full", "sdxl-lora"}
    for name in list_presets():
        build_config(name)
    assert build_config("sd21-full").model.prediction_type == "v_prediction"
    assert build_config("sdxl-lora").train.mode == "lora"


def test_layers_override_in_order(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  lr: 2.0e-4\n  steps: 50\n")
    cfg = build_config("sd15-lora", str(f), ["lr=3e-4", "prior.weight=0.5", "data.flip=0.5",
                                              "lora.unet_targets=to_q,to_v"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 50 and cfg.train.mode == "lora"
    assert cfg.prior.weight == 0.5 and cfg.data.flip == 0.5
    assert cfg.lora.unet_targets == ["to_q", "to_v"]


def test_unknown_key_lists_valid_keys_and_closest_match():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.learning_rat=1"])
    msg = str(e.value)
    assert "unknown config key 'train.learning_rat'" in msg
    assert "Valid keys:" in msg and "train.lr" in msg
    with pytest.raises(ConfigError, match="Did you mean 'train.steps'"):
        build_config(overrides=["train.step=3"])


def test_unknown_section_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        build_config(config_file=str(f))


@pytest.mark.parametrize("item, message", [
    ("train.steps=abc", "expects an integer"),
    ("train.lr=fast", "expects a number"),
    ("prior.enabled=maybe", "expects true or false"),
    ("train.mode=lorra", "Did you mean 'lora'"),
    ("steps=3", "ambiguous"),
    ("train.steps", "expects key=value"),
])
def test_bad_values(item, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[item])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="Did you mean 'sd15-lora'"):
        build_config("sd15-lroa")


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config("sd15-lora", overrides=["data.token=waj", "data.class_noun=dog", "train.seed=1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {f"{s}.{k}" for s, v in data.items() for k in v} == set(valid_keys())


def test_cli_reports_config_errors_without_traceback(capsys, tmp_path):
    code = main(["train", "--images", str(tmp_path), "--class", "dog", "--out", str(tmp_path / "r"),
                 "--set", "train.lr=x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: config key 'train.lr' expects a number")
    assert "Traceback" not in err


@pytest.mark.parametrize("key, value, low, ok", [("sample.subject_guidance", "-1", "0", "0"),
                                                 ("sample.steps", "0", "1", "1"),
                                                 ("eval.guidance", "-0.5", "0", "0"),
                                                 ("sweep.steps", "[10, 0]", "1", "[10, 1]"),
                                                 ("sweep.subject_guidance", "[0, -2.5]", "0", "[0, 2.5]")])
def test_numbers_below_their_minimum_are_refused(key, value, low, ok):
    with pytest.raises(ConfigError, match=rf"'{key}(\[1\])?' must be at least {low}"):
        build_config("tiny", overrides=[f"{key}={value}"])
    build_config("tiny", overrides=[f"{key}={ok}"])  # the minimum itself is accepted
