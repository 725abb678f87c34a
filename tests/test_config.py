import dataclasses
import math
import re
import typing

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


@pytest.mark.parametrize("key, value, low, ok", [("sample.guidance", "-1", "0", "0"),
                                                 ("sample.steps", "0", "1", "1"),
                                                 ("eval.guidance", "-0.5", "0", "0"),
                                                 ("sweep.steps", "[10, 0]", "1", "[10, 1]"),
                                                 ("sweep.guidance", "[0, -2.5]", "0", "[0, 2.5]")])
def test_numbers_below_their_minimum_are_refused(key, value, low, ok):
    with pytest.raises(ConfigError, match=rf"'{key}(\[1\])?' must be at least {low}"):
        build_config("tiny", overrides=[f"{key}={value}"])
    build_config("tiny", overrides=[f"{key}={ok}"])  # the minimum itself is accepted


# --- ranges: every number has one, checked from every source -------------------------------------


def number_fields():
    """(key, field, item type, is a list) of every int/float field of every section, found by
    walking the dataclasses themselves (not the module's own list), so a new field is included."""
    out = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            is_list = typing.get_origin(hint) is list
            item = typing.get_args(hint)[0] if is_list else hint
            if item in (int, float):
                out.append((f"{section.name}.{f.name}", f, item, is_list))
    return out


def num(x):
    """A bound as the messages write it."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def test_every_number_has_a_valid_range_in_its_metadata():
    from dreambooth.config import Range, validate

    fields = number_fields()
    assert len(fields) >= 50  # the walk finds them (58 when written)
    missing = [key for key, f, _, _ in fields if not isinstance(f.metadata.get("range"), Range)]
    assert not missing, f"numbers without a valid range in their field metadata: {missing}"
    for key, f, item, _ in fields:
        rng = f.metadata["range"]
        assert rng.low is not None, f"{key}: every number here has a lower bound"
        if item is int:
            assert rng.high is not None, f"{key}: an integer needs an upper bound (huge ints)"
        if rng.high is not None:
            assert rng.low < rng.high, key
    validate(Config())  # every default lies in its range


def cases_at_the_bounds(rng, item):
    """(value, refusal message or None) just inside and just outside each bound of ``rng``."""
    step = 1 if item is int else 1e-6
    out = []
    if rng.low is not None:
        out.append((rng.low, f"must be greater than {num(rng.low)}" if rng.low_open else None))
        if not rng.low_open:
            out.append((rng.low - step, f"must be at least {num(rng.low)}"))
    if rng.high is not None:
        out.append((rng.high, f"must be less than {num(rng.high)}" if rng.high_open else None))
        out.append((rng.high + step, f"must be {'less than' if rng.high_open else 'at most'} "
                                     f"{num(rng.high)}"))
    if rng.multiple_of:
        out.append((rng.low + 1, f"must be a multiple of {rng.multiple_of}"))
        out.append((rng.low + rng.multiple_of, None))
    return [(v, m) for v, m in out if v == v]


def test_every_range_is_enforced_at_its_bounds():
    for key, f, item, is_list in number_fields():
        rng = f.metadata.get("range")
        assert rng is not None, f"{key} has no range"
        for value, refusal in cases_at_the_bounds(rng, item):
            text = repr(value) if item is float else str(int(value))
            item_set = f"{key}=[{text}]" if is_list else f"{key}={text}"
            if refusal is None:
                build_config(overrides=[item_set])
                continue
            with pytest.raises(ConfigError) as e:
                build_config(overrides=[item_set])
            msg = str(e.value)
            assert msg.startswith(f"config key '{key}{'[0]' if is_list else ''}' {refusal}, got "), msg


@pytest.mark.parametrize("item, message", [
    # the cases
    ("train.steps=0", "config key 'train.steps' must be at least 1, got 0"),
    ("train.lr=-1e-4", "config key 'train.lr' must be greater than 0, got -0.0001"),
    ("train.checkpoint_every=0", "config key 'train.checkpoint_every' must be at least 1, got 0"),
    ("data.resolution=65", "config key 'data.resolution' must be a multiple of 8, got 65"),
    ("data.resolution=100000", "config key 'data.resolution' must be at most 4096, got 100000"),
    # and their neighbours
    ("train.lr=0", "'train.lr' must be greater than 0, got 0"),
    ("train.adam_eps=0", "'train.adam_eps' must be greater than 0"),
    ("train.adam_beta1=1", "'train.adam_beta1' must be less than 1, got 1"),
    ("train.adam_beta2=-0.1", "'train.adam_beta2' must be at least 0"),
    ("lora.dropout=1", "'lora.dropout' must be less than 1"),
    ("lora.alpha=0", "'lora.alpha' must be greater than 0"),
    ("lora.rank=0", "'lora.rank' must be at least 1"),
    ("data.flip=1.5", "'data.flip' must be at most 1, got 1.5"),
    ("data.resolution=32", "'data.resolution' must be at least 64"),
    ("eval.prompt_floor=1.01", "'eval.prompt_floor' must be at most 1"),
    ("train.log_every=0", "'train.log_every' must be at least 1"),
    ("train.batch_size=0", "'train.batch_size' must be at least 1"),
    ("train.grad_accum=0", "'train.grad_accum' must be at least 1"),
    ("train.keep_checkpoints=-1", "'train.keep_checkpoints' must be at least 0"),
    ("train.warmup_steps=-1", "'train.warmup_steps' must be at least 0"),
    ("prior.num_images=0", "'prior.num_images' must be at least 1"),
    ("prior.batch_size=0", "'prior.batch_size' must be at least 1"),
    ("prior.weight=-1", "'prior.weight' must be at least 0"),
    ("prior.null_space=1.5", "'prior.null_space' must be at most 1"),
    ("prior.null_space_min_t=1000", "'prior.null_space_min_t' must be less than 1000"),
    ("prior.orthogonal_min_t=-1", "'prior.null_space_min_t' must be at least 0"),
    ("eval.steps=1001", "'eval.steps' must be at most 1000"),
    ("train.seed=-1", "'train.seed' must be at least 0"),
    ("sweep.seed=4294967296", "'sweep.seed' must be at most 4294967295"),
    ("prior.steps=1001", "'prior.steps' must be at most 1000"),
    ("sweep.lora_scales=[1, -0.5]", "'sweep.lora_scale[1]' must be at least 0"),  # renamed
    ("eval.every=-1", "'eval.every' must be at least 0"),
    ("train.max_grad_norm=-1", "'train.max_grad_norm' must be at least 0"),
])
def test_numbers_outside_their_range_are_refused_with_key_bound_and_value(item, message):
    with pytest.raises(ConfigError) as e:
        build_config("tiny", overrides=[item])
    assert message in str(e.value)


def test_ranges_are_checked_from_every_source(tmp_path, monkeypatch):
    from dreambooth import config as config_module
    from dreambooth.config import TrainConfig, config_from_dict, validate

    expected = "config key 'train.steps' must be at least 1, got 0"
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  steps: 0\n")
    sources = {
        "--config": lambda: build_config(config_file=str(f)),
        "--set": lambda: build_config(overrides=["train.steps=0"]),
        "a flag": lambda: build_config(extra={"train.steps": 0}),
        "a run's config.yaml": lambda: load_config(f),
        "a dict (resume)": lambda: config_from_dict({"train": {"steps": 0}}),
        "a Config built in code": lambda: validate(Config(train=TrainConfig(steps=0))),
    }
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bad.yaml").write_text("train: {steps: 0}\n")
    sources["a preset"] = lambda: (monkeypatch.setattr(config_module, "PRESET_DIR", presets),
                                   build_config("bad"))
    for name, build in sources.items():
        with pytest.raises(ConfigError) as e:
            build()
        assert expected in str(e.value), name


@pytest.mark.parametrize("text", [".nan", "nan", "NaN", ".inf", "inf", "-.inf", "-inf", "1e400", "-1e999"])
def test_nan_and_infinity_never_pass_a_range_check(text):
    from dreambooth.config import validate

    floats = [(key, is_list) for key, _, item, is_list in number_fields() if item is float]
    assert floats
    for key, is_list in floats:
        with pytest.raises(ConfigError, match="must be a finite number"):
            build_config(overrides=[f"{key}=[{text}]" if is_list else f"{key}={text}"])
        section, name = key.split(".")
        value = float(text.replace(".", "")) if text.endswith(("nan", "inf")) else float(text)
        with pytest.raises(ConfigError, match="must be a finite number"):
            load_yaml_dict({section: {name: [value] if is_list else value}})
        cfg = Config()
        setattr(getattr(cfg, section), name, [value] if is_list else value)
        with pytest.raises(ConfigError, match="must be a finite number"):
            validate(cfg)


def load_yaml_dict(data):
    from dreambooth.config import config_from_dict

    return config_from_dict(yaml.safe_load(yaml.safe_dump(data)))


def test_huge_integers_are_refused_with_their_size():
    from dreambooth.config import config_from_dict

    for key, _, item, is_list in number_fields():
        section, name = key.split(".")
        for big in (10**400, -10**400):
            with pytest.raises(ConfigError) as e:
                config_from_dict({section: {name: [big] if is_list else big}})
            assert "401-digit" in str(e.value) and key in str(e.value)
            with pytest.raises(ConfigError, match=re.escape(key)):
                build_config(overrides=[f"{key}={big}"])
    with pytest.raises(ConfigError, match="expects a number"):  # beyond Python's int-from-text limit
        build_config(overrides=["train.lr=" + "9" * 5000])


WRONG_SHAPES = [
    ("train.steps", {"a": 1}, "expects an integer, got {'a': 1}"),
    ("train.lr", [1, 2], "expects a number, got [1, 2]"),
    ("train.lr", None, "expects a number, got None"),
    ("train.steps", None, "expects an integer, got None"),
    ("data.flip", True, "expects a number, got True"),
    ("prior.enabled", 1, "expects true or false, got 1"),
    ("data.token", {"a": 1}, "expects a string"),
    ("data.token", [1], "expects a string"),
    ("sweep.steps", {"a": 1}, "expects a list of int"),
    ("sweep.steps", [[1]], "'sweep.steps[0]' expects an integer, got [1]"),
    ("sweep.guidance", [None], "'sweep.guidance[0]' expects a number, got None"),
    ("lora.unet_targets", [{"a": 1}], "'lora.unet_targets[0]' expects a string"),
    ("train.steps", 2.5, "expects an integer, got 2.5"),
    ("train.steps", float("inf"), "expects an integer, got inf"),
]


def test_values_of_the_wrong_shape_are_config_errors_from_every_source():
    from dreambooth.config import config_from_dict, validate

    for key, value, message in WRONG_SHAPES:
        section, name = key.split(".")
        with pytest.raises(ConfigError) as e:
            config_from_dict({section: {name: value}})
        assert message in str(e.value), key
        if key != "data.token":  # --set gives a string key its text as is: "{a: 1}" is a string
            with pytest.raises(ConfigError):  # the same through YAML text and --set
                build_config(overrides=[f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        cfg = Config()  # and in a Config built in code
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=r"expects (an|a|true)"):
            validate(cfg)


# --- unknown keys, unreadable files ---------------------------------------------------------------

UNKNOWN_KEY_PATHS = [
    ("--set bare key", lambda d: build_config(overrides=["qqqqzz=1"])),
    ("--set section.key", lambda d: build_config(overrides=["train.qqqqzz=1"])),
    ("--set unknown section", lambda d: build_config(overrides=["qqq.zzz=1"])),
    ("--set empty key", lambda d: build_config(overrides=["=1"])),
    ("eval's bare --set", lambda d: __import__("dreambooth.config", fromlist=["x"]).apply_overrides(
        Config(), ["qqqqzz=1"], "eval")),
    ("YAML top-level key", lambda d: build_config(config_file=d("qqqqzz: 1\n"))),
    ("YAML top-level key with a mapping", lambda d: build_config(config_file=d("qqqqzz: {a: 1}\n"))),
    ("YAML key in a section", lambda d: build_config(config_file=d("train:\n  qqqqzz: 1\n"))),
    ("YAML unknown section", lambda d: build_config(config_file=d("qqq:\n  lr: 1\n"))),
    ("YAML dotted key", lambda d: build_config(config_file=d("train.qqqqzz: 1\n"))),
    ("YAML integer key", lambda d: build_config(config_file=d("1: 2\n"))),
    ("YAML null key", lambda d: build_config(config_file=d("? null\n: 2\n"))),
    ("YAML boolean key", lambda d: build_config(config_file=d("yes: 2\n"))),
    ("YAML integer key in a section", lambda d: build_config(config_file=d("train: {1: 2}\n"))),
]


def test_every_unknown_key_path_lists_the_valid_keys(tmp_path):
    def doc(text):
        f = tmp_path / "c.yaml"
        f.write_text(text)
        return str(f)

    for where, build in UNKNOWN_KEY_PATHS:
        with pytest.raises(ConfigError) as e:
            build(doc)
        msg = str(e.value)
        assert msg.startswith("unknown config key "), (where, msg)
        listed = msg.split("Valid keys: ", 1)[1].split(", ")
        assert listed == valid_keys(), where


def test_a_misspelt_section_suggests_the_section_and_a_mapping_under_a_key_says_the_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'. Did you mean section 'train'"):
        build_config(config_file=str(f))
    f.write_text("lr: {a: 1}\n")  # a known bare key: its type is what is wrong, not its name
    with pytest.raises(ConfigError, match=r"config key 'train.lr' expects a number, got \{'a': 1\}"):
        build_config(config_file=str(f))
    f.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"section 'train' must be a mapping of its keys \(train.mode, "):
        build_config(config_file=str(f))
    f.write_text("train:\n  # lr: 1\n")  # a section with every key commented out is empty
    assert build_config(config_file=str(f)) == Config()


@pytest.mark.parametrize("name, content, message", [
    ("binary.yaml", bytes(range(256)), "is not a UTF-8 text file"),
    ("latin1.yaml", "train:\n  mode: lóra\n".encode("latin-1"),
     "is not a UTF-8 text file (byte 0xf3 at offset 16)"),
    ("nul.yaml", b"train:\n  steps: 1\x00\n", "holds NUL bytes"),
    ("png.yaml", b"\x89PNG\r\n\x1a\n" + bytes(64), "is not a UTF-8 text file"),
    ("date.yaml", b"data:\n  token: 2020-13-45\n", "is not valid YAML: month must be in 1..12"),
    ("tag.yaml", b"train:\n  lr: !!timestamp x\n", "is not valid YAML"),
    ("deep.yaml", b"[" * 800 + b"]" * 800, "is not valid YAML: nested too deeply"),
])
def test_unreadable_config_files_end_in_a_config_error_naming_the_file(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        build_config(config_file=str(f))
    assert message in str(e.value) and str(f) in str(e.value)


def test_directories_devices_unreadable_and_huge_files_name_the_file(tmp_path, monkeypatch):
    from pathlib import Path

    from dreambooth import config as config_module

    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        build_config(config_file=str(tmp_path))
    with pytest.raises(ConfigError, match="config file /dev/null is not a regular file"):
        build_config(config_file="/dev/null")  # and /dev/zero is never read to the end
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        build_config(config_file=str(tmp_path / "nope.yaml"))
    for text, message in [("!!python/object/apply:os.system [echo hi]\n", "is not valid YAML"),
                          ("- 1\n- 2\n", "expected a mapping of sections, got list")]:
        (tmp_path / "other.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            build_config(config_file=str(tmp_path / "other.yaml"))
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (config_module.MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"config file {big} is .* bytes: too large"):
        build_config(config_file=str(big))
    locked = tmp_path / "locked.yaml"
    locked.write_text("train: {steps: 3}\n")

    def denied(self):  # chmod 000 is no refusal for root, so refuse the read itself
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=f"cannot read config file {locked}: permission denied"):
        build_config(config_file=str(locked))


def test_cli_reports_a_binary_config_file_in_one_line(capsys, tmp_path):
    f = tmp_path / "photo.yaml"
    f.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # a JPEG given as --config
    code = main(["train", "--images", str(tmp_path), "--class", "dog", "--out", str(tmp_path / "r"),
                 "--config", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: config file {f} is not a UTF-8 text file")
    assert "Traceback" not in err


# --- trust_pickle: never from a file --------------------------------------------------------------

def test_trust_pickle_is_not_a_config_key_and_old_runs_still_load(tmp_path, capsys):
    from dreambooth.config import config_from_dict

    assert not any(k.endswith("trust_pickle") for k in valid_keys())
    assert "trust_pickle" not in yaml.safe_dump(Config().to_dict())
    run = tmp_path / "config.yaml"  # a run directory's config.yaml from before the change
    old = Config().to_dict()
    old["model"]["trust_pickle"] = False
    run.write_text(yaml.safe_dump(old, sort_keys=False))
    assert load_config(run) == Config()
    assert config_from_dict(yaml.safe_load(run.read_text())) == Config()  # train --resume's path
    assert capsys.readouterr().err == ""  # false: dropped silently
    old["model"]["trust_pickle"] = True  # a file cannot grant trust: dropped, with one line
    run.write_text(yaml.safe_dump(old, sort_keys=False))
    cfg = load_config(run)
    assert cfg == Config() and not getattr(cfg.model, "trust_pickle", False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "model.trust_pickle is ignored" in err[0] and "--trust-pickle" in err[0]
    f = tmp_path / "mine.yaml"
    for text in ("model: {trust_pickle: true}\n", "trust_pickle: true\n", "model.trust_pickle: true\n"):
        f.write_text(text)
        assert build_config(config_file=str(f)) == Config(), text
        assert "is ignored" in capsys.readouterr().err
    for item in ("model.trust_pickle=true", "trust_pickle=true"):  # the command line has a flag for it
        with pytest.raises(ConfigError, match="not a config key any more: .* only from --trust-pickle"):
            build_config(overrides=[item])


def test_validate_checks_a_config_built_in_code():
    from dreambooth.config import DataConfig, SweepConfig, TrainConfig, validate

    assert validate(Config()) == Config()
    for cfg, message in [
        (Config(data=DataConfig(resolution=100)), "'data.resolution' must be a multiple of 8, got 100"),
        (Config(train=TrainConfig(lr=-1.0)), "'train.lr' must be greater than 0, got -1"),
        (Config(train=TrainConfig(steps="5")), "'train.steps' expects an integer, got '5'"),
        (Config(train=TrainConfig(mode="lorra")), "'train.mode' must be one of full, lora"),
        (Config(sweep=SweepConfig(steps=[10, 0])), "'sweep.steps[1]' must be at least 1, got 0"),
        (Config(sweep=SweepConfig(guidance=[math.nan])), "'sweep.guidance[0]' must be a finite number"),
        (Config(train=TrainConfig(steps=True)), "'train.steps' expects an integer, got True"),
        (Config(train=DataConfig()), "config section 'train' must be a TrainConfig, got DataConfig"),
    ]:
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        assert message in str(e.value)


def test_subject_guidance_keys_are_legacy_and_sweep_lists_use_the_sample_names(tmp_path, capsys):
    """Old run folders (every key written, subject guidance off) load silently; one that set
    subject guidance loads with a note; --set of it says where it went; sweep.schedulers and
    sweep.lora_scales are read as sweep.scheduler and sweep.lora_scale."""
    old = {"sample": {"subject_guidance": 0.0, "subject_guidance_below": 400},
           "eval": {"subject_guidance": 0.0, "subject_guidance_below": 400},
           "sweep": {"subject_guidance": [0.0], "schedulers": ["ddim"], "lora_scales": [0.5]}}
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(old))
    cfg = load_config(f)
    assert cfg.sweep.scheduler == ["ddim"] and cfg.sweep.lora_scale == [0.5]
    assert capsys.readouterr().err == ""
    old["sample"]["subject_guidance"] = 2.5
    f.write_text(yaml.safe_dump(old))
    load_config(f)
    assert "sample.subject_guidance is ignored: subject guidance moved to research/subject_guidance" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a config key any more: .*research/subject_guidance"):
        build_config(overrides=["sweep.subject_guidance=[0,2.5]"])
