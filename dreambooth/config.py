"""Typed run configuration: dataclasses, YAML presets, `--set key=value` overrides.

A config is built in three layers, each overriding the last:
  1. a preset from ``dreambooth/configs/NAME.yaml`` (``--preset``),
  2. a user YAML file (``--config FILE``),
  3. ``--set section.key=value`` flags (the section may be left out when the key is unique).

Every key is checked: an unknown key or a value of the wrong type fails with the list of
valid keys and the closest match. ``save_config`` writes the resolved config into a run
directory; ``load_config`` reads it back, so a run can be repeated from that file alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreambooth.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


def _choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


def _at_least(low: float, default: Any) -> Any:
    """A number (or, for a list field, every item) that must be >= low."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"min": low})
    return field(default=default, metadata={"min": low})


@dataclass
class ModelConfig:
    path: str = "tiny"  # a local diffusers folder, a single .safetensors file, or "tiny"
    kind: str = _choices("auto", "sd1", "sd2", "sdxl", default="auto")
    prediction_type: str = _choices("auto", "epsilon", "v_prediction", default="auto")
    trust_pickle: bool = False  # allow .ckpt/.pt/.bin checkpoints (unpickling can run code)


@dataclass
class DataConfig:
    images: str = ""  # folder of the subject's photos (only ever read)
    class_noun: str = ""  # "dog", "backpack", ...
    token: str = "auto"  # rare identifier; "auto" picks the top-ranked one for the tokenizer
    instance_prompt: str = "a photo of {token} {class}"
    class_prompt: str = "a photo of a {class}"
    resolution: int = 512
    crop: str = _choices("center", "random", default="center")
    flip: float = 0.0  # `data`: flip probability; training: > 0 adds each photo's mirror image
    captions: bool = True  # use IMAGE.txt beside an image as its prompt when present
    # use IMAGE.mask.png beside an image (white: the subject) as its loss mask when present: the
    # instance loss then counts only the subject's latent cells, not the photo's background
    masks: bool = True


@dataclass
class PriorConfig:
    enabled: bool = True
    weight: float = 1.0  # lambda in  loss = instance + lambda * prior
    num_images: int = 200
    class_images: str = ""  # a folder of the user's own class photos instead of generating
    solver: str = _choices("dpmpp", "unipc", "ddim", default="dpmpp")
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str = ""
    batch_size: int = 4
    seed: int = 0
    # What the class half is trained toward. "noise": the sampled noise, as in the paper.
    # "base": the frozen base model's own prediction for the same noisy class image and prompt
    # (distillation): the same fixed point, far less variance, so the class prompt drifts less.
    target: str = _choices("noise", "base", default="noise")
    # K > 0: keep the UNet's change off K probes of the class prompt's output gradients, one basis
    # per weight tensor (dreambooth/orthogonal.py). Full mode; memory K x UNet weights x 4 bytes
    orthogonal_probes: int = 0
    orthogonal_min_t: int = 400  # the probes' (and null_space's) noisy class images have t >= this
    # e in (0, 1]: keep each UNet layer's change off the inputs (fraction e of their energy) that
    # the class prompt feeds it (dreambooth/nullspace.py). Full mode; t >= orthogonal_min_t
    null_space: float = 0.0
    # which inputs carry the energy e: "inputs" counts every input row alike; "outputs" weighs
    # each by how much the UNet's output depends on that row's output (a random projection's gradient)
    null_space_weighting: str = _choices("inputs", "outputs", default="inputs")


@dataclass
class TrainConfig:
    mode: str = _choices("full", "lora", default="full")
    train_text_encoder: bool = False  # SDXL: both text encoders (LoRA: lora.text_encoder_targets in each)
    text_encoder_steps: int = 0  # train the text encoder only for the first K steps (0: all)
    # train only the identifier's input embedding (pivotal tuning); other prompts keep their
    # exact conditioning, which helps prior preservation. Full mode; lr: text_encoder_lr
    train_token: bool = False
    steps: int = 800
    batch_size: int = 1  # instance images per step (the prior half doubles the batch)
    grad_accum: int = 1
    lr: float = 5e-6
    text_encoder_lr: float = 0.0  # 0: same as lr
    lr_scheduler: str = _choices("constant", "linear", "cosine", default="constant")
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    optimizer: str = _choices("adamw", "adamw8bit", default="adamw")
    mixed_precision: str = _choices("no", "fp16", "bf16", default="no")
    gradient_checkpointing: bool = False
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (0: off; 5.0 is the usual value)
    noise_offset: float = 0.0
    # b in (0, 1]: a fraction b of the samples (photos and class images alike) draw their timestep
    # from [timestep_bias_min, T) instead of [0, T): more of the training where layouts, patterns'
    # lattices and marks are decided (high noise). 0: uniform, as in the paper. On the world model
    # 0.5 from 500 learned no more of the subject and moved the class prompt more (docs/world.md)
    timestep_bias: float = 0.0
    timestep_bias_min: int = 500
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 2


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


@dataclass
class SampleConfig:
    prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of {token} {class}",
            "a photo of {token} {class} on the beach",
            "a photo of {token} {class} in the snow",
            "a photo of a {class}",
        ]
    )
    num_images: int = _at_least(1, 2)
    steps: int = _at_least(1, 25)
    guidance: float = _at_least(0, 7.5)
    scheduler: str = _choices("dpmpp", "unipc", "ddim", "ddpm", default="dpmpp")
    negative_prompt: str = ""
    seed: int = 0
    # > 0: also guide along what the identifier adds to each prompt, below this timestep
    # (sample.generate's subject guidance; SD 1.x/2.x; docs/world.md, "Subject guidance at low noise")
    subject_guidance: float = _at_least(0, 0.0)
    subject_guidance_below: int = _at_least(0, 400)


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps, at step 0 and at the end (0: no evaluation)
    prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of {token} {class}",
            "a photo of {token} {class} on the beach",
            "a photo of {token} {class} in the snow",
            "a photo of {token} {class} in the city",
        ]
    )
    num_images: int = 2  # per prompt, seeds seed .. seed+n-1 (the same at every evaluation)
    class_images: int = 4  # class-prompt images, for PRES / the world prior distance
    seed: int = 1000
    steps: int = _at_least(1, 25)
    guidance: float = _at_least(0, 7.5)
    scheduler: str = _choices("dpmpp", "unipc", "ddim", "ddpm", default="dpmpp")
    # auto: the world probes on the world model, plus DINO/CLIP when eval.dino and eval.clip are set
    metrics: str = _choices("auto", "clip", "world", default="auto")
    dino: str = ""  # local folder of facebook/dino-vits16 ("tiny": a random in-process ViT)
    clip: str = ""  # local folder of openai/clip-vit-base-patch32 ("tiny": random in-process)
    select_best: bool = True  # final/ holds the best evaluated step instead of the last one
    subject_guidance: float = _at_least(0, 0.0)  # as sample.subject_guidance, for the validation samples
    subject_guidance_below: int = _at_least(0, 400)
    prompt_floor: float = 0.9  # candidates keep prompt fidelity >= floor x the best seen
    early_stop: int = 0  # stop when prompt fidelity fell K evaluations in a row, fidelity flat
    flat: float = 0.02  # "flat": fidelity gained less than this over those K evaluations


@dataclass
class SweepConfig:
    guidance: list[float] = _at_least(0, [3.0, 5.0, 7.5, 10.0])
    steps: list[int] = _at_least(1, [15, 25, 40])
    schedulers: list[str] = field(default_factory=lambda: ["dpmpp", "unipc", "ddim"])
    lora_scales: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0])  # LoRA runs only
    # sample.generate's subject guidance h, below sample.subject_guidance_below; e.g. [0, 2.5]
    # (each h > 0 adds a third UNet pass at low noise; SD 1.x/2.x)
    subject_guidance: list[float] = _at_least(0, [0.0])
    prompts: list[str] = field(  # the prompts settings are tuned on
        default_factory=lambda: ["a photo of {token} {class} on the beach",
                                 "a photo of {token} {class} in the snow"])
    held_out: list[str] = field(  # prompts the chosen settings are checked on afterwards
        default_factory=lambda: ["a photo of {token} {class} on the water",
                                 "a photo of {token} {class} in the city"])
    num_images: int = 4  # per prompt
    held_out_images: int = 0  # per held-out prompt (0: num_images); more seeds, a surer check
    seed: int = 2000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = typing.get_type_hints(Config)[section]
    return {f.name: f for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """Every settable key, as ``section.key``."""
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def _unknown(key: str) -> ConfigError:
    keys = valid_keys()
    leaf_names = {k.split(".")[1]: k for k in keys}
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5) or [
        leaf_names[m] for m in difflib.get_close_matches(key.split(".")[-1], leaf_names, n=1)
    ]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{key}'.{hint}\nValid keys: " + ", ".join(keys)
    )


def resolve_key(key: str) -> tuple[str, str]:
    """'train.lr' -> ('train', 'lr'); a bare 'lr' is accepted when exactly one section has it."""
    if "." in key:
        section, _, name = key.partition(".")
        if section in SECTIONS and name in _section_fields(section):
            return section, name
        raise _unknown(key)
    owners = [s for s in SECTIONS if key in _section_fields(s)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(
            f"config key '{key}' is ambiguous: write one of "
            + ", ".join(f"{s}.{key}" for s in owners)
        )
    raise _unknown(key)


def _coerce(key: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or explain why not."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {value!r}")

    if isinstance(value, str) and hint is not str:
        try:  # command-line strings: parse them as YAML scalars/lists ("1e-4", "true", "[a, b]")
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            if typing.get_origin(hint) is not list:
                raise bad(str(hint)) from None
            value = value.strip().removeprefix("[").removesuffix("]")  # "[a {token}, b]"
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return _in_range(key, f, value)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _in_range(key, f, float(value))
        raise bad("a number")
    if hint is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        value = str(value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint_txt = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(choices)}; got '{value}'.{hint_txt}"
            )
        return value
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and item is not str:
            value = [value]
        if not isinstance(value, list):
            raise bad(f"a list of {item.__name__}")
        return [_coerce(f"{key}[{i}]", f, v, item) for i, v in enumerate(value)]
    raise bad(str(hint))  # pragma: no cover - every field type is handled above


def _in_range(key: str, f: dataclasses.Field, value: float) -> float:
    low = f.metadata.get("min")
    if low is not None and value < low:
        raise ConfigError(f"config key '{key}' must be at least {low:g}, got {value:g}")
    return value


def set_value(cfg: Config, key: str, value: Any) -> None:
    section, name = resolve_key(key)
    sub = getattr(cfg, section)
    f = _section_fields(section)[name]
    hint = typing.get_type_hints(type(sub))[name]
    setattr(sub, name, _coerce(f"{section}.{name}", f, value, hint))


def merge_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> None:
    """Apply a nested ``{section: {key: value}}`` mapping (as in a YAML file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            if not isinstance(values, dict):  # a flat "key: value" at top level
                set_value(cfg, section, values)
                continue
            raise _unknown(section)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return data


def build_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    """Defaults <- preset <- config file <- ``extra`` (explicit CLI flags) <- ``--set`` overrides."""
    cfg = Config()
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            names = list_presets()
            close = difflib.get_close_matches(preset, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown preset '{preset}'.{hint} Presets: {', '.join(names)}")
        merge_dict(cfg, read_yaml(path), source=str(path))
    if config_file:
        merge_dict(cfg, read_yaml(Path(config_file)), source=config_file)
    for key, value in (extra or {}).items():
        if value is not None:
            set_value(cfg, key, value)
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | None, section: str | None = None) -> None:
    """Apply ``--set key=value`` items; a bare key goes to ``section`` when one is given."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key = key.strip()
        set_value(cfg, f"{section}.{key}" if section and "." not in key else key, value)


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: Path) -> Config:
    cfg = Config()
    merge_dict(cfg, read_yaml(path), source=str(path))
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    merge_dict(cfg, data)
    return cfg
