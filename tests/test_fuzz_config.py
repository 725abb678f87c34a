"""Property-based fuzzing of the config parser: whatever the keys, values, YAML documents,
`--set` strings or bytes of a `--config` file, building a config ends in a valid Config or in a
ConfigError, never another exception. A Config that comes out is in range (``validate``) and
survives a round trip through its own config.yaml. Reproducible: derandomized, no database."""

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreambooth.config import Config, build_config, config_from_dict, set_value, valid_keys
from dreambooth.errors import ConfigError

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = valid_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
NAMES = sorted({k.split(".")[1] for k in KEYS})
LEGACY = ["trust_pickle", "model.trust_pickle"]
TRICKY_TEXT = [  # values that once broke, or might break, a parser or a range check
    ".nan", "nan", "NaN", "-.nan", "inf", "-inf", ".inf", "-.Inf", "1e400", "-1e400", "1e-400",
    "9" * 400, "-" + "9" * 400, "9" * 5000, "0x10", "0o17", "0b101", "1_000", "1:30", "190:20:30",
    ".5", "5.", "-0", "+1", "1e3", "1.0e+3", "null", "~", "", " ", "true", "no", "on", "y",
    "[1, 2]", "[]", "[[1]]", "[1, [2]]", "{a: 1}", "{}", "[", "]", "{", "}", "[a {token}, b]",
    "2020-13-45", "2020-01-01", "2001-12-14t21:59:43.10-05:00", "!!timestamp x", "!!int x",
    "!!float x", "!!binary x", "!!bool x", "!!python/object/apply:os.system [true]",
    "!!python/name:os.system", "&a [*a]", "*a", "&a", "---", "...", "- a", "? a", "a: b", "|", ">",
    "'", '"', "%YAML 1.1", "@", "`", "!", "#", "=", "a=b", "\x00", "\t", "\ufeff", "\u2028", "é",
    "[" * 1200, "{" * 1200, "- " * 1200, "dpmpp", "lora", "full", "0", "1", "-1", "64", "65",
    "4096", "4104", "1000", "999", "0.5", "1.5",
]
NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: f"{x:g}"),
)
CHOICE_WORDS = ["dpmpp", "unipc", "ddim", "ddpm", "lora", "full", "center", "random", "base", "noise",
                "auto", "sd1", "epsilon", "cosine", "adamw", "bf16", "inputs", "world", "clip", "tiny"]
PLAUSIBLE = st.one_of(  # values a user would write: most are valid, so configs do get built
    st.integers(min_value=0, max_value=2000), st.floats(min_value=0, max_value=1), st.booleans(),
    st.sampled_from(CHOICE_WORDS), st.sampled_from([64, 128, 512, 1e-4, 5e-6, 7.5, 0.999, 1e-8]),
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=3),
    st.lists(st.sampled_from(["to_q", "a photo of {token} {class}", "dpmpp"]), max_size=3))
PLAUSIBLE_TEXT = PLAUSIBLE.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()
                               .removesuffix("\n...").strip())
VALUE_TEXT = st.one_of(PLAUSIBLE_TEXT, PLAUSIBLE_TEXT, st.sampled_from(TRICKY_TEXT), NUMBER_TEXT,
                       st.text(max_size=40),
                       st.lists(st.one_of(st.sampled_from(TRICKY_TEXT), NUMBER_TEXT), max_size=4)
                       .map(lambda xs: "[" + ", ".join(xs) + "]"))
KEY_TEXT = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS),
                     st.sampled_from(NAMES), st.sampled_from(SECTIONS),
                     st.sampled_from(LEGACY), st.text(max_size=20),
                     st.tuples(st.sampled_from(SECTIONS), st.text(max_size=10)).map(".".join))
SCALARS = st.one_of(
    PLAUSIBLE, PLAUSIBLE, st.none(), st.booleans(), st.integers(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(TRICKY_TEXT), st.sampled_from([10**400, -(10**400), 2**64, float("nan"), -0.0]),
)
NASTY = st.sampled_from([  # Python values a YAML file or code can hand over
    float("nan"), float("inf"), -float("inf"), 10**400, -(10**400), 2**64, -0.0, 1e308, 5e-324,
    None, [], {}, [float("nan")], [10**400], [None], [[1]], {"a": 1}, True, "nan", "1e400", b"\xff",
    (1, 2), {1, 2}, object(),
])
HASHABLE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                     st.sampled_from(TRICKY_TEXT))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), HASHABLE), inner,
                                                 max_size=3)), max_leaves=12)
ANY_KEY = st.one_of(KEY_TEXT, HASHABLE)
SECTION_BODY = st.dictionaries(st.one_of(st.sampled_from(NAMES), ANY_KEY), VALUES, max_size=5)
DOCUMENTS = st.one_of(
    st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(NAMES), PLAUSIBLE,
                                                               max_size=4), max_size=4),
    st.dictionaries(st.sampled_from(KEYS + NAMES), PLAUSIBLE, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(SECTIONS), ANY_KEY),
                    st.one_of(SECTION_BODY, VALUES), max_size=5),
    VALUES,
)


def check(cfg):
    """What a config that was built must be: valid, and the same after its config.yaml."""
    from dreambooth.config import validate

    assert isinstance(cfg, Config)
    validate(cfg)
    for key in KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for v in value if isinstance(value, list) else [value]:
            assert not (isinstance(v, float) and not math.isfinite(v)), (key, value)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))) == cfg


def build_or_refuse(build):
    try:
        cfg = build()
    except ConfigError:
        return None
    check(cfg)
    return cfg


@FUZZ
@given(st.lists(st.one_of(st.tuples(KEY_TEXT, st.one_of(st.sampled_from(TRICKY_TEXT), VALUE_TEXT))
                          .map("=".join), st.text(max_size=30)), min_size=1, max_size=3))
def test_fuzz_set_strings(items):
    build_or_refuse(lambda: build_config(overrides=items))


@FUZZ
@given(st.sampled_from(KEYS), VALUE_TEXT)
def test_fuzz_set_every_key(key, value):
    """Every key (not only the ones a random draw finds) with tricky text."""
    build_or_refuse(lambda: build_config(overrides=[f"{key}={value}"]))


@FUZZ
@given(DOCUMENTS)
def test_fuzz_yaml_documents(data):
    build_or_refuse(lambda: config_from_dict(data))


@FUZZ
@given(st.sampled_from(KEYS + LEGACY), st.one_of(NASTY, SCALARS, VALUES))
def test_fuzz_python_values_of_every_key(key, value):
    def build():
        cfg = Config()
        set_value(cfg, key, value)
        return cfg

    build_or_refuse(build)
    build_or_refuse(lambda: config_from_dict({key: value}))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


@FUZZ
@given(DOCUMENTS)
def test_fuzz_yaml_files(config_file, data):
    try:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, ValueError, OverflowError):  # not every draw is representable
        return
    config_file.write_text(text, encoding="utf-8")
    build_or_refuse(lambda: build_config(config_file=str(config_file)))


YAML_TOKENS = ["train", "lr", "steps", "data", "resolution", "sweep", "guidance", ":", ": ", "\n",
               "  ", "- ", "[", "]", "{", "}", ",", "1", "0", "-1", "65", ".nan", ".inf", "1e400",
               "null", "true", "'", '"', "&a ", "*a", "!!int ", "!!float ", "!!timestamp ", "? ",
               "#", "---\n", "2020-13-45", "9" * 30, "\t", "\x00", "\xff", "é"]


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.lists(st.sampled_from(YAML_TOKENS), max_size=40)
                 .map(lambda ts: "".join(ts).encode("utf-8", "surrogatepass"))))
def test_fuzz_config_file_bytes(config_file, raw):
    config_file.write_bytes(raw)
    build_or_refuse(lambda: build_config(config_file=str(config_file)))


def valid_values(key):
    """A strategy of the values ``key`` accepts, from its type, choices and range metadata."""
    import dataclasses
    import typing

    section, name = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    is_list = typing.get_origin(hint) is list
    item = typing.get_args(hint)[0] if is_list else hint
    if item is bool:
        one = st.booleans()
    elif item is str:
        choices = f.metadata.get("choices")
        one = st.sampled_from(choices) if choices else st.text(max_size=20)
    else:
        rng = f.metadata["range"]
        if item is int:
            low = int(rng.low) + (1 if rng.low_open else 0)
            high = int(rng.high) - (1 if rng.high_open else 0)
            m = rng.multiple_of or 1
            one = st.integers(min_value=-(-low // m), max_value=high // m).map(lambda k: k * m)
        else:
            one = st.floats(min_value=rng.low, max_value=rng.high, exclude_min=rng.low_open,
                            exclude_max=rng.high_open, allow_nan=False, allow_infinity=False)
    return (st.lists(one, max_size=4) if is_list else one), item, is_list


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_fuzz_valid_values_are_accepted_from_a_file_a_dict_and_set(config_file, data):
    """Every value inside its key's type and range is accepted, from each source, unchanged, and
    the run's config.yaml gives it back: the ranges refuse nothing they describe as valid."""
    from dreambooth.config import load_config, save_config

    keys = data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True))
    doc, sets = {}, []
    for key in keys:
        strategy, item, is_list = valid_values(key)
        value = data.draw(strategy, label=key)
        section, name = key.split(".")
        doc.setdefault(section, {})[name] = value
        if item is not str:  # --set gives a string key its text as is; lists of text are YAML
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            sets.append(f"{key}={text}")
    train = doc.get("train", {})
    if train.get("quantize_base", "none") != "none" and train.get("mode") != "lora":
        train["quantize_base"] = "none"  # valid alone; a full fine-tune refuses it (config._check_combinations)
    cfg = config_from_dict(doc)
    for section, values in doc.items():
        for name, value in values.items():
            assert getattr(getattr(cfg, section), name) == value, (section, name)
    save_config(cfg, config_file)  # (load_config validates what it reads)
    assert load_config(config_file) == cfg
    from_set = build_config(overrides=sets)
    for item in sets:
        key = item.partition("=")[0]
        section, name = key.split(".")
        assert getattr(getattr(from_set, section), name) == getattr(getattr(cfg, section), name), item
