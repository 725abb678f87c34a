"""Typed run configuration: dataclasses, YAML presets, `--set key=value` overrides.

A config is built in three layers, each overriding the last:
  1. a preset from ``dreambooth/configs/NAME.yaml`` (``--preset``),
  2. a user YAML file (``--config FILE``),
  3. ``--set section.key=value`` flags (the section may be left out when the key is unique).

Every key is checked: an unknown key or a value of the wrong type fails with the list of
valid keys and the closest match. Every number has its valid range in its field's metadata
(``Range``: bounds, open or closed, and a step such as "a multiple of 8"); a value outside it
fails with the key, the bound and the value, whatever the source (a preset, a file, ``--set``,
a run's ``config.yaml``, or a ``Config`` built in code and passed to ``validate``). Nothing but
``ConfigError`` comes out of building a config, whatever the input. ``save_config`` writes the
resolved config into a run directory; ``load_config`` reads it back, so a run can be repeated
from that file alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreambooth.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"
SAMPLERS = ("dpmpp", "unipc", "ddim", "ddpm", "euler")  # euler: the flow-matching families' sampler
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; refuse to read megabytes

# Upper bounds shared by several keys. They keep a typo (an extra zero or three) from starting a
# run that cannot end, and keep every number within what torch and the schedulers accept.
NUM_TRAIN_TIMESTEPS = 1000  # every supported model's (SD 1.x/2.x/XL, tiny, world) noise schedule
MAX_SAMPLER_STEPS = NUM_TRAIN_TIMESTEPS  # diffusers schedulers refuse more steps than timesteps
MAX_TRAIN_STEPS = 10_000_000
MAX_IMAGES = 100_000
MAX_BATCH = 1024
MAX_SEED = 2**32 - 1
MAX_RESOLUTION = 4096  # pixels per side; what fits this machine is checked by training


@dataclass(frozen=True)
class Range:
    """The valid values of a number (or of every item of a list of numbers).

    ``low``/``high``: bounds (None: none); ``low_open``/``high_open``: the bound itself is
    excluded; ``multiple_of``: the value must be a multiple of it. Floats must also be finite.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None

    def describe(self) -> str:
        """'[0, 1)', '> 0', '>= 64, <= 4096, a multiple of 8', ..."""
        if self.low is not None and self.high is not None:
            text = (("(" if self.low_open else "[") + f"{_fmt(self.low)}, {_fmt(self.high)}"
                    + (")" if self.high_open else "]"))
        elif self.low is not None:
            text = (">" if self.low_open else ">=") + f" {_fmt(self.low)}"
        elif self.high is not None:
            text = ("<" if self.high_open else "<=") + f" {_fmt(self.high)}"
        else:
            text = "any finite number"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def check(self, key: str, value: int | float) -> None:
        """Raise ConfigError naming ``key``, the bound and ``value`` when ``value`` is outside."""
        def fail(what: str) -> ConfigError:
            return ConfigError(f"config key '{key}' must be {what}, got {_fmt(value)}")

        if isinstance(value, float) and not math.isfinite(value):  # NaN compares false: test first
            raise fail("a finite number")
        if self.low is not None:
            if self.low_open and value <= self.low:
                raise fail(f"greater than {_fmt(self.low)}")
            if value < self.low:
                raise fail(f"at least {_fmt(self.low)}")
        if self.high is not None:
            if self.high_open and value >= self.high:
                raise fail(f"less than {_fmt(self.high)}")
            if value > self.high:
                raise fail(f"at most {_fmt(self.high)}")
        if self.multiple_of and value % self.multiple_of:
            raise fail(f"a multiple of {self.multiple_of}")


def _fmt(x: Any) -> str:
    """A number for a message: whole numbers without '.0' or exponent, huge ints by their size."""
    if isinstance(x, int) and not isinstance(x, bool):
        if x.bit_length() > 64:  # str() of a 5000-digit int raises; no one reads 400 digits anyway
            digits = int(x.bit_length() * math.log10(2)) + 1
            return f"a {digits}-digit {'negative ' if x < 0 else ''}integer"
        return str(x)
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    if isinstance(x, float):
        return f"{x:g}"
    return _show(x)


def _show(value: Any, limit: int = 80) -> str:
    """repr() for a message, cut to ``limit`` characters (and safe for huge ints inside lists)."""
    try:
        text = repr(value)
    except Exception:  # repr of a list holding a 5000-digit int raises ValueError
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _num(default: Any, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False, multiple_of: int | None = None) -> Any:
    """A number field (or, for a list default, a list of numbers) with its valid ``Range``."""
    meta = {"range": Range(low, high, low_open, high_open, multiple_of)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


@dataclass
class ModelConfig:
    path: str = "tiny"  # a local diffusers folder, a single .safetensors file, or "tiny"
    kind: str = _choices("auto", "sd1", "sd2", "sdxl", "flux1", "sd3", default="auto")
    prediction_type: str = _choices("auto", "epsilon", "v_prediction", default="auto")
    # when path is a single-file FLUX.1 / SD 3.x transformer (BFL or SAI layout): a local diffusers
    # folder of the same family whose VAE, text encoders, tokenizers and scheduler go with it
    components: str = ""
    # (no trust_pickle: trust in a pickle checkpoint comes only from --trust-pickle on the command
    # line of this invocation, never from a file; a run's old `model.trust_pickle` is dropped when
    # read, see LEGACY_KEYS)


@dataclass
class DataConfig:
    images: str = ""  # folder of the subject's photos (only ever read)
    class_noun: str = ""  # "dog", "backpack", ...
    token: str = "auto"  # rare identifier; "auto" picks the top-ranked one for the tokenizer
    instance_prompt: str = "a photo of {token} {class}"
    class_prompt: str = "a photo of a {class}"
    # square crops of this many pixels: the VAE divides by 8; 64 is the smallest model's (tiny, world)
    resolution: int = _num(512, 64, MAX_RESOLUTION, multiple_of=8)
    # `data`: flip probability; training: > 0 adds each photo's mirror image
    flip: float = _num(0.0, 0, 1)
    captions: bool = True  # use IMAGE.txt beside an image as its prompt when present
    # use IMAGE.mask.png beside an image (white: the subject) as its loss mask when present: the
    # instance loss then counts only the subject's latent cells, not the photo's background
    masks: bool = True


@dataclass
class PriorConfig:
    enabled: bool = True
    weight: float = _num(1.0, 0)  # lambda in  loss = instance + lambda * prior
    num_images: int = _num(200, 1, MAX_IMAGES)  # (prior.enabled=false turns the prior off)
    class_images: str = ""  # a folder of the user's own class photos instead of generating
    scheduler: str = _choices(*SAMPLERS[:3], "euler", default="dpmpp")
    steps: int = _num(25, 1, MAX_SAMPLER_STEPS)
    guidance: float = _num(7.5, 0)
    negative_prompt: str = ""
    batch_size: int = _num(4, 1, MAX_BATCH)
    seed: int = _num(0, 0, MAX_SEED)
    # What the class half is trained toward. "noise": the sampled noise, as in the paper.
    # "base": the frozen base model's own prediction for the same noisy class image and prompt
    # (distillation): the same fixed point, far less variance, so the class prompt drifts less.
    target: str = _choices("noise", "base", default="noise")
    # e in (0, 1]: keep each UNet layer's change off the inputs (fraction e of their energy) that
    # the class prompt feeds it (dreambooth/nullspace.py): the world preset's option, for small
    # UNets and train.mode=full. 0: off
    null_space: float = _num(0.0, 0, 1)
    null_space_min_t: int = _num(400, 0, NUM_TRAIN_TIMESTEPS, high_open=True)  # read at t >= this


@dataclass
class TrainConfig:
    mode: str = _choices("full", "lora", default="full")
    train_text_encoder: bool = False  # SDXL: both text encoders (LoRA: lora.text_encoder_targets in each)
    # train the text encoder only for the first K steps (0: all)
    text_encoder_steps: int = _num(0, 0, MAX_TRAIN_STEPS)
    # train only the identifier's input embedding (pivotal tuning); other prompts keep their
    # exact conditioning, which helps prior preservation. Full mode; lr: text_encoder_lr
    train_token: bool = False
    steps: int = _num(800, 1, MAX_TRAIN_STEPS)
    batch_size: int = _num(1, 1, MAX_BATCH)  # instance images per step (the prior half doubles the batch)
    grad_accum: int = _num(1, 1, 10_000)
    lr: float = _num(5e-6, 0, low_open=True)  # > 0: a negative rate trains uphill, 0 trains nothing
    text_encoder_lr: float = _num(0.0, 0)  # 0: same as lr
    lr_scheduler: str = _choices("constant", "linear", "cosine", default="constant")
    warmup_steps: int = _num(0, 0, MAX_TRAIN_STEPS)
    max_grad_norm: float = _num(1.0, 0)  # 0: no clipping
    weight_decay: float = _num(1e-2, 0)
    adam_beta1: float = _num(0.9, 0, 1, high_open=True)  # torch's AdamW: 0 <= beta < 1
    adam_beta2: float = _num(0.999, 0, 1, high_open=True)
    adam_eps: float = _num(1e-8, 0, low_open=True)  # > 0: 0 divides by zero where a gradient is 0
    # adamw8bit: bitsandbytes' 8-bit AdamW (CUDA); paged_adamw8bit: the same in paged memory, which
    # the driver may evict to host memory under pressure (CUDA)
    optimizer: str = _choices("adamw", "adamw8bit", "paged_adamw8bit", default="adamw")
    # AdamW's state and update on the CPU (torchao's CPUOffloadOptimizer, CUDA): the GPU keeps the
    # weights and gradients; each step copies the gradients to host memory and the weights back
    offload_optimizer: bool = False
    mixed_precision: str = _choices("no", "fp16", "bf16", default="no")
    gradient_checkpointing: bool = False
    # move the VAE and the text encoders that do not train to the CPU once the latents and the
    # prompts' embeddings are cached (their memory is then free for training); evaluation and
    # the final samples bring them back
    offload_frozen: bool = False
    # LoRA only: store the denoiser's frozen linear weights in fewer bits while the adapters train
    # in full precision (dreambooth/quantize.py). int8: torchao (CPU or CUDA; the `quantize` extra);
    # nf4: bitsandbytes' 4-bit NormalFloat, QLoRA's (CUDA). Training only: sample, eval and the
    # exports put the LoRA on the full-precision base
    quantize_base: str = _choices("none", "int8", "nf4", default="none")
    # fsdp: split the denoiser's weights, gradients and optimizer state over the processes of
    # `accelerate launch` (accelerate's FSDP 2, each transformer/ResNet block one unit), so a full
    # fine-tune of a model no single GPU holds fits N GPUs (`dreambooth plan --gpus N`); none:
    # every process holds all of it (DDP). Full mode, the denoiser alone, eval.every=0
    shard: str = _choices("none", "fsdp", default="none")
    snr_gamma: float = _num(0.0, 0)  # min-SNR-gamma loss weighting (0: off; 5.0 is the usual value)
    noise_offset: float = _num(0.0, 0)
    seed: int = _num(0, 0, MAX_SEED)
    log_every: int = _num(1, 1, MAX_TRAIN_STEPS)
    checkpoint_every: int = _num(200, 1, MAX_TRAIN_STEPS)
    keep_checkpoints: int = _num(2, 0, 1_000_000)  # 0: keep every checkpoint


@dataclass
class LoraConfig:
    rank: int = _num(4, 1, 1024)
    alpha: float = _num(4.0, 0, low_open=True)  # the update is scaled by alpha / rank: 0 is none
    dropout: float = _num(0.0, 0, 1, high_open=True)
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # FLUX.1 / SD 3.x: attention, image and text streams (add "ff.net.0.proj", "ff.net.2", "proj_mlp",
    # "proj_out", "norm1.linear", ... for feed-forward and norm-modulation layers)
    transformer_targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
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
    num_images: int = _num(2, 1, MAX_IMAGES)
    steps: int = _num(25, 1, MAX_SAMPLER_STEPS)
    guidance: float = _num(7.5, 0)
    scheduler: str = _choices(*SAMPLERS, default="dpmpp")
    negative_prompt: str = ""
    seed: int = _num(0, 0, MAX_SEED)


@dataclass
class EvalConfig:
    # evaluate every N steps, at step 0 and at the end (0: no evaluation)
    every: int = _num(0, 0, MAX_TRAIN_STEPS)
    prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of {token} {class}",
            "a photo of {token} {class} on the beach",
            "a photo of {token} {class} in the snow",
            "a photo of {token} {class} in the city",
        ]
    )
    # per prompt, seeds seed .. seed+n-1 (the same at every evaluation)
    num_images: int = _num(2, 1, MAX_IMAGES)
    class_images: int = _num(4, 0, MAX_IMAGES)  # class-prompt images, for PRES / the world prior distance
    seed: int = _num(1000, 0, MAX_SEED)
    steps: int = _num(25, 1, MAX_SAMPLER_STEPS)
    guidance: float = _num(7.5, 0)
    scheduler: str = _choices(*SAMPLERS, default="dpmpp")
    # auto: the world probes on the world model, plus DINO/CLIP when eval.dino and eval.clip are set
    metrics: str = _choices("auto", "clip", "world", default="auto")
    dino: str = ""  # local folder of facebook/dino-vits16 ("tiny": a random in-process ViT)
    clip: str = ""  # local folder of openai/clip-vit-base-patch32 ("tiny": random in-process)
    select_best: bool = True  # final/ holds the best evaluated step instead of the last one
    prompt_floor: float = _num(0.9, 0, 1)  # candidates keep prompt fidelity >= floor x the best seen
    # stop when prompt fidelity fell K evaluations in a row, fidelity flat (0: never)
    early_stop: int = _num(0, 0, 10_000)
    flat: float = _num(0.02, 0)  # "flat": fidelity gained less than this over those K evaluations


@dataclass
class SweepConfig:
    guidance: list[float] = _num([3.0, 5.0, 7.5, 10.0], 0)
    steps: list[int] = _num([15, 25, 40], 1, MAX_SAMPLER_STEPS)
    scheduler: list[str] = field(default_factory=lambda: ["dpmpp", "unipc", "ddim"],
                                 metadata={"choices": SAMPLERS})
    lora_scale: list[float] = _num([0.6, 0.8, 1.0], 0)  # LoRA runs only
    prompts: list[str] = field(  # the prompts settings are tuned on
        default_factory=lambda: ["a photo of {token} {class} on the beach",
                                 "a photo of {token} {class} in the snow"])
    held_out: list[str] = field(  # prompts the chosen settings are checked on afterwards
        default_factory=lambda: ["a photo of {token} {class} on the water",
                                 "a photo of {token} {class} in the city"])
    num_images: int = _num(4, 1, MAX_IMAGES)  # per prompt
    # per held-out prompt (0: num_images); more seeds, a surer check
    held_out_images: int = _num(0, 0, MAX_IMAGES)
    seed: int = _num(2000, 0, MAX_SEED)


@dataclass
class FlowConfig:
    """Flow-matching families (FLUX.1, SD 3.x); the UNet families ignore this section. Defaults
    are the diffusers reference scripts' (train_dreambooth_lora_flux.py / _sd3.py) and the SD3
    paper's best timestep sampling (logit-normal, mean 0, std 1); dreambooth/flow.py has the math."""

    timestep_sampling: str = _choices("logit_normal", "uniform", "mode", default="logit_normal")
    logit_mean: float = _num(0.0, -10, 10)
    logit_std: float = _num(1.0, 0, 10, low_open=True)
    mode_scale: float = _num(1.29, -1, 3)
    weighting: str = _choices("none", "sigma_sqrt", "cosmap", default="none")  # per-sample loss weights
    shift: float = _num(0.0, 0, 100)  # the training timesteps' static shift; 0: the scheduler's own
    resolution_shift: bool = False  # FLUX.1: shift by the training resolution's mu instead (BFL's sampling)
    guidance: float = _num(1.0, 0, 100)  # FLUX.1 [dev]'s distilled-guidance input while training
    max_sequence_length: int = _num(0, 0, 512)  # T5 tokens; 0: the model's (512 FLUX.1, 256 SD 3.x)


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
    flow: FlowConfig = field(default_factory=FlowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}

# Keys that were in the config once and are read from files only to be dropped, so that old run
# directories still load: (section, key) -> (the value that meant "off", what to say when a file
# sets another). Setting one with --set is an error that says the same (``set_value``).
RESEARCH = "moved to research/ (it did not beat the preset on held-out subjects; research/README.md)"
LEGACY_KEYS: dict[tuple[str, str], tuple[Any, str]] = {
    ("model", "trust_pickle"): (False, "ignored: trust in a pickle checkpoint comes only from "
                                       "--trust-pickle on the command line, never from a file"),
    ("data", "crop"): ("center", "ignored: photos are center-cropped (data.flip adds mirror images)"),
    ("prior", "orthogonal_probes"): (0, f"ignored: the orthogonal-probe hold {RESEARCH}"),
    ("prior", "null_space_weighting"): ("inputs", f"ignored: the output-weighted null space {RESEARCH}"),
    ("train", "timestep_bias"): (0.0, f"ignored: the timestep bias {RESEARCH}"),
    ("train", "timestep_bias_min"): (500, f"ignored: the timestep bias {RESEARCH}"),
    **{(section, key): (off, "ignored: subject guidance moved to research/subject_guidance (not "
                             "kept: research/world/results.md, sessions 27-28)")
       for section, key, off in (("sample", "subject_guidance", 0.0), ("sample", "subject_guidance_below", 400),
                                 ("eval", "subject_guidance", 0.0), ("eval", "subject_guidance_below", 400),
                                 ("sweep", "subject_guidance", [0.0]))},
}
# Keys that were renamed: read from files under their new name.
RENAMED_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("prior", "solver"): ("prior", "scheduler"),  # the same name as sample/eval.scheduler
    ("prior", "orthogonal_min_t"): ("prior", "null_space_min_t"),
    ("sweep", "schedulers"): ("sweep", "scheduler"),  # the names of sample and eval
    ("sweep", "lora_scales"): ("sweep", "lora_scale"),  # as `dreambooth sample --lora-scale`
}


@functools.lru_cache(maxsize=None)
def _section_class(section: str) -> type:
    return typing.get_type_hints(Config)[section]


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_section_class(section))}


def valid_keys() -> list[str]:
    """Every settable key, as ``section.key``."""
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def _unknown(key: str, section_like: bool = False) -> ConfigError:
    """Unknown key: the closest match (a section when ``section_like``) and every valid key."""
    keys = valid_keys()
    leaf_names = {k.split(".")[1]: k for k in keys}
    section = difflib.get_close_matches(key, SECTIONS, n=1, cutoff=0.6) if section_like else []
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5) or [
        leaf_names[m] for m in difflib.get_close_matches(key.split(".")[-1], leaf_names, n=1)
    ]
    hint = (f" Did you mean section '{section[0]}'?" if section
            else f" Did you mean '{close[0]}'?" if close else "")
    return ConfigError(
        f"unknown config key {_show(key)}.{hint}\nValid keys: " + ", ".join(keys)
    )


def resolve_key(key: str) -> tuple[str, str]:
    """'train.lr' -> ('train', 'lr'); a bare 'lr' is accepted when exactly one section has it."""
    if not isinstance(key, str):
        raise _unknown(_show(key))
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


def _parse_yaml(text: str) -> Any:
    """YAML text (a file, or a command-line value such as "1e-4", "true", "[a, b]") as Python.
    Raises ValueError when it is not YAML: PyYAML raises more than YAMLError on some text
    ("2020-13-45" is a date with month 13: ValueError; "!!timestamp x": AttributeError; deep
    nesting: RecursionError)."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - any failure of the parser means "not YAML"
        raise ValueError(str(e)) from None


def _coerce(key: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or explain why not."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {_show(value)}")

    if isinstance(value, str) and hint is not str:
        try:  # command-line strings: parse them as YAML scalars/lists ("1e-4", "true", "[a, b]")
            value = _parse_yaml(value) if value.strip() else value
        except ValueError:
            if typing.get_origin(hint) is not list:
                raise bad(_type_name(hint)) from None
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
            _in_range(key, f, value)  # before float(): a 400-digit int overflows it
            return float(value)
        raise bad("a number")
    if hint is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        try:
            value = str(value)
        except ValueError:  # an int of more than 4300 digits
            raise bad("a string") from None
        _check_choice(key, f, value)
        return value
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if not isinstance(value, list):
            raise bad(f"a list of {item.__name__}")
        return [_coerce(f"{key}[{i}]", f, v, item) for i, v in enumerate(value)]
    raise bad(str(hint))  # pragma: no cover - every field type is handled above


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


def _check_choice(key: str, f: dataclasses.Field, value: str) -> None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint_txt = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"config key '{key}' must be one of {', '.join(choices)}; got {_show(value)}.{hint_txt}"
        )


def _in_range(key: str, f: dataclasses.Field, value: int | float) -> int | float:
    rng = f.metadata.get("range")
    if rng is None:  # every number has one (tests/test_config.py checks); a float must be finite
        rng = Range()
    rng.check(key, value)
    if isinstance(value, int) and value.bit_length() > 1023:  # beyond any float: inf
        raise ConfigError(f"config key '{key}' must be a finite number, got {_fmt(value)}")
    return value


def _check(key: str, f: dataclasses.Field, value: Any, hint: Any) -> None:
    """``validate``'s check of one value already in a Config: its type, choices and range."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {_show(value)}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint in (int, float):
        ok = (int, float) if hint is float else int
        if not isinstance(value, ok) or isinstance(value, bool):
            raise bad(_type_name(hint))
        _in_range(key, f, value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        _check_choice(key, f, value)
    elif typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise bad(f"a list of {item.__name__}")
        for i, v in enumerate(value):
            _check(f"{key}[{i}]", f, v, item)
    else:  # pragma: no cover - every field type is handled above
        raise bad(str(hint))


def validate(cfg: Config) -> Config:
    """Check every value of ``cfg`` (types, choices, ranges) against its field; return ``cfg``.

    ``build_config``, ``load_config`` and ``config_from_dict`` end with it; call it on a Config
    built or changed in code before using it.
    """
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a Config, got {type(cfg).__name__}")
    for section in SECTIONS:
        cls = _section_class(section)
        sub = getattr(cfg, section)
        if not isinstance(sub, cls):
            raise ConfigError(f"config section '{section}' must be a {cls.__name__}, "
                              f"got {type(sub).__name__}")
        hints = _hints(cls)
        for name, f in _section_fields(section).items():
            _check(f"{section}.{name}", f, getattr(sub, name), hints[name])
    return _check_combinations(cfg)


def _check_combinations(cfg: Config) -> Config:
    """Settings that are valid alone but not together."""
    if cfg.train.mode == "lora" and cfg.train.train_token:
        raise ConfigError("train.train_token is for full fine-tuning: a LoRA final/ does not carry the "
                          "text encoder's embeddings. Use train.train_text_encoder (LoRA on the text "
                          "encoder) with train.mode=lora")
    if cfg.train.quantize_base != "none" and cfg.train.mode != "lora":
        raise ConfigError(f"train.quantize_base={cfg.train.quantize_base} stores the frozen base weights in "
                          f"fewer bits, and a {cfg.train.mode} fine-tune trains them all: set train.mode=lora "
                          "(the base stays frozen) or train.quantize_base=none")
    if cfg.train.mode == "lora" and cfg.prior.null_space:
        raise ConfigError(f"prior.null_space={cfg.prior.null_space:g} holds the UNet's own weights while "
                          "the whole UNet trains: it needs train.mode=full (set prior.null_space=0 for LoRA)")
    if cfg.train.shard == "fsdp":
        _check_sharding(cfg)
    if cfg.train.offload_optimizer:
        _check_offload_optimizer(cfg)
    return cfg


def _check_offload_optimizer(cfg: Config) -> None:
    """``train.offload_optimizer`` runs plain AdamW on host copies of the weights, which it copies
    back over the GPU's after each step (dreambooth/trainable.py)."""
    t, fix = cfg.train, "or train.offload_optimizer=false"
    if t.optimizer != "adamw":
        raise ConfigError(f"train.offload_optimizer=true runs AdamW's state on the CPU, and train.optimizer="
                          f"{t.optimizer} keeps an 8-bit state on the GPU: set train.optimizer=adamw {fix}")
    if t.shard == "fsdp":
        raise ConfigError("train.offload_optimizer=true is for one GPU: train.shard=fsdp already splits the "
                          f"optimizer state over the GPUs; set train.shard=none {fix}")
    if t.mixed_precision == "fp16":
        raise ConfigError("train.offload_optimizer=true copies the gradients to the CPU before fp16's loss "
                          f"scale is taken off them: set train.mixed_precision=bf16 (or no) {fix}")
    if cfg.prior.null_space:
        raise ConfigError("train.offload_optimizer=true copies the CPU's weights over the GPU's after each step, "
                          "which undoes prior.null_space's projection of them: set prior.null_space=0 " + fix)


def _check_sharding(cfg: Config) -> None:
    """``train.shard=fsdp`` shards one module, the denoiser, trained in full, and every process
    runs each of its forward passes (an evaluation's samples on the main process alone cannot)."""
    off = [f"{key}={value}" for key, value, fine in (
        ("train.mode", cfg.train.mode, "full"), ("train.train_text_encoder", cfg.train.train_text_encoder, False),
        ("train.train_token", cfg.train.train_token, False), ("eval.every", cfg.eval.every, 0),
        ("prior.null_space", cfg.prior.null_space, 0)) if value != fine]
    if off:
        raise ConfigError(f"train.shard=fsdp shards the denoiser of a full fine-tune and trains it alone, "
                          f"without evaluation during training; this config has {', '.join(off)}. Set "
                          "train.mode=full, train.train_text_encoder=false, train.train_token=false, "
                          "eval.every=0 (then `dreambooth eval RUN_DIR`) and prior.null_space=0, or train.shard=none")


def _retired(key: str) -> tuple[str, str] | None:
    """(section, key) of a legacy key written as ``key`` ("section.key" or a bare unique name)."""
    owner, _, name = key.rpartition(".")
    found = [s for s, k in LEGACY_KEYS if k == name and owner in ("", s)]
    return (found[0], name) if len(found) == 1 else None


def set_value(cfg: Config, key: str, value: Any) -> None:
    retired = _retired(key) if isinstance(key, str) else None
    live = isinstance(key, str) and any(key in _section_fields(s) for s in SECTIONS)
    if retired is not None and not live:
        raise ConfigError(f"'{key}' is not a config key any more: {LEGACY_KEYS[retired][1]}")
    if isinstance(key, str) and tuple(key.split(".", 1)) in RENAMED_KEYS:
        key = ".".join(RENAMED_KEYS[tuple(key.split(".", 1))])
    section, name = resolve_key(key)
    sub = getattr(cfg, section)
    f = _section_fields(section)[name]
    hint = _hints(type(sub))[name]
    setattr(sub, name, _coerce(f"{section}.{name}", f, value, hint))


def _drop_legacy(section: str, key: str, value: Any, source: str) -> bool:
    """True when ``section.key`` is a legacy key (then dropped; a note when a file set it to
    anything but its old "off" value)."""
    if (section, key) not in LEGACY_KEYS:
        return False
    off, note = LEGACY_KEYS[(section, key)]
    if value is not None and value != off:
        print(f"{source}: {section}.{key} is {note}", file=sys.stderr)
    return True


def merge_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> None:
    """Apply a nested ``{section: {key: value}}`` mapping (as in a YAML file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(section, str):
            raise _unknown(_show(section))
        if section not in SECTIONS:  # a flat "key: value" or "section.key: value" at top level
            retired = _retired(section)
            if retired and _drop_legacy(*retired, values, source):
                continue
            renamed = tuple(section.split(".", 1)) in RENAMED_KEYS
            try:
                renamed or resolve_key(section)
            except ConfigError:
                raise _unknown(section, section_like=isinstance(values, dict)) from None
            set_value(cfg, section, values)
            continue
        if values is None:  # "train:" with every key under it commented out
            continue
        if not isinstance(values, dict):
            names = ", ".join(f"{section}.{k}" for k in _section_fields(section))
            raise ConfigError(f"{source}: section '{section}' must be a mapping of its keys "
                              f"({names}), got {_show(values)}")
        for key, value in values.items():
            if isinstance(key, str) and _drop_legacy(section, key, value, source):
                continue
            set_value(cfg, f"{section}.{key}", value)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; ConfigError naming the file when it cannot be read as one
    (missing, a directory, unreadable, too large, binary or not UTF-8, not YAML)."""
    path = Path(path)
    try:
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a regular file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {path.stat().st_size} bytes: too large for a "
                              f"config (at most {MAX_CONFIG_BYTES}); is it the right file?")
        raw = path.read_bytes()
    except PermissionError:
        raise ConfigError(f"cannot read config file {path}: permission denied") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not a UTF-8 text file (byte {raw[e.start]:#04x} "
                          f"at offset {e.start}); is it a binary file?") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} holds NUL bytes: a binary file, not YAML")
    try:
        return _parse_yaml(text)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None


def _document(data: Any) -> Any:
    """An empty YAML file (or one of comments only) is an empty config; "0" or "[]" is no config."""
    return {} if data is None else data


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
        if "/" in preset or "\\" in preset or not path.is_file():
            names = list_presets()
            close = difflib.get_close_matches(preset, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown preset {_show(preset)}.{hint} Presets: {', '.join(names)}")
        merge_dict(cfg, _document(read_yaml(path)), source=str(path))
    if config_file:
        merge_dict(cfg, _document(read_yaml(Path(config_file))), source=config_file)
    for key, value in (extra or {}).items():
        if value is not None:
            set_value(cfg, key, value)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def apply_overrides(cfg: Config, overrides: list[str] | None, section: str | None = None) -> None:
    """Apply ``--set key=value`` items; a bare key goes to ``section`` when one is given."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {_show(item)}")
        key = key.strip()
        set_value(cfg, f"{section}.{key}" if section and "." not in key else key, value)


def save_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML, atomically: a kill leaves no empty or half config.yaml."""
    from dreambooth.files import atomic_file

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_file(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_config(path: Path) -> Config:
    cfg = Config()
    merge_dict(cfg, _document(read_yaml(path)), source=str(path))
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    merge_dict(cfg, _document(data))
    return validate(cfg)
