"""The new-subject form, as data: the intake table, identifier picks, base models, the advanced
settings generated from the config dataclasses, and the checks that map each library error to
the field that caused it. No web library here: the server turns these into JSON."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import inspect
import io
import re
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dreambooth.config import SECTIONS, Config, build_config, set_value
from dreambooth.errors import DreamboothError

# Form fields the page shows errors beside; advanced settings are "set:SECTION.KEY".
FIELDS = ("photos", "class_noun", "token", "model", "preset", "run", "plan")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PLAN_LOCK = threading.Lock()  # one plan at a time: fake-tensor dispatch and lazy imports are not thread-safe


@dataclass
class StartForm:
    """What the page sends when Start is pressed (every value as typed)."""

    photos: str = ""  # folder of the photos (an upload's folder, or one on this machine)
    class_noun: str = ""
    token: str = ""
    model: str = ""
    preset: str = ""
    run: str = ""  # the run directory's name under the runs folder
    overrides: dict[str, str] = field(default_factory=dict)  # advanced settings changed: key -> text

    @classmethod
    def from_json(cls, data: dict) -> "StartForm":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in (data or {}).items() if k in known}
        values["overrides"] = {str(k): str(v) for k, v in (values.get("overrides") or {}).items()}
        return cls(**{k: (v.strip() if isinstance(v, str) else v) for k, v in values.items()})


class FormErrors(DreamboothError):
    """Messages by field: what the page shows beside each one."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


# ------------------------------------------------------------------ intake


def thumbnail(image, size: int = 96) -> str:
    """A PNG data URI of ``image`` scaled to ``size`` px on its longer side."""
    small = image.copy()
    small.thumbnail((size, size))
    buf = io.BytesIO()
    small.convert("RGB" if small.mode not in ("RGB", "L") else small.mode).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def intake_table(folder: str | Path, resolution: int = 512) -> dict:
    """The photos as `dreambooth data` reads them: one row per photo (crop preview, size, what
    was done, its warnings, caption, mask) and the warnings that name no single photo.
    InputError (the CLI's message) for a folder that cannot be used."""
    from dreambooth.data import read_photos, square_crop

    intake = read_photos(folder, resolution=resolution)
    rows, claimed = [], set()
    for ph in intake.photos:
        mine = [w for w in intake.warnings if ph.path.name in w]
        claimed.update(mine)
        w, h = ph.original_size
        rows.append({"name": ph.path.name, "size": f"{w}×{h}", "mode": ph.original_mode,
                     "crop": thumbnail(square_crop(ph.image, resolution)), "notes": ph.notes,
                     "warnings": mine, "caption": ph.caption,
                     "mask": thumbnail(ph.mask) if ph.mask is not None else None})
    return {"folder": str(Path(folder)), "resolution": resolution, "rows": rows,
            "warnings": [w for w in intake.warnings if w not in claimed]}


# ------------------------------------------------------------------ identifier, models, presets


@functools.lru_cache(maxsize=16)
def model_tokenizer(model: str = ""):
    """The tokenizer `train` reads the identifier with for base model ``model`` (a folder's
    ``tokenizer/``, read without its weights), or None for CLIP's own vocabulary: the tiny models
    and single ``.safetensors`` files build theirs from it, and so does "no model chosen yet"."""
    from dreambooth.base_model import TINY_NAMES
    from dreambooth.models import WORLD_MODELS, read_part

    if not model or model in TINY_NAMES:
        return None
    folder = WORLD_MODELS.get(model) or Path(model).expanduser()
    if not (folder / "tokenizer").is_dir():
        return None
    from transformers import CLIPTokenizer  # the class models.load_folder reads tokenizer/ with, for every family

    return read_part(folder, "tokenizer", lambda: CLIPTokenizer.from_pretrained(
        folder, subfolder="tokenizer", local_files_only=True))


@functools.lru_cache(maxsize=16)
def token_suggestions(model: str = "", count: int = 8) -> dict:
    """`dreambooth tokens`' ranked picks for ``model``'s tokenizer (its vocabulary only, as
    `train` ranks them for data.token=auto: the first is what "auto" becomes). A tokenizer that
    cannot be ranked gives no picks and the library's message."""
    from dreambooth.identifier import pick_token, top_candidates

    try:
        tokenizer = model_tokenizer(model)
        picks = top_candidates(tokenizer, count=count)
        if not picks:
            pick_token(tokenizer)  # its message: what `train` says for data.token=auto
    except DreamboothError as e:
        return {"tokens": [], "note": str(e)}
    return {"tokens": [{"token": c.token, "reason": c.reason, "rank": c.rank} for c in picks], "note": ""}


def token_warnings(token: str, model: str = "") -> list[str]:
    """What `dreambooth tokens --check` says is wrong with ``token`` for ``model``'s tokenizer
    (common words, several pieces)."""
    from dreambooth.identifier import check_token

    if not token or token == "auto":
        return []
    try:
        return check_token(token, model_tokenizer(model))
    except DreamboothError as e:
        return [str(e)]


def warm_up() -> None:
    """The first plan imports diffusers and torch's fake tensors (ten seconds and more on a slow
    machine): plan the tiny preset once, in the background, while the form is filled in."""
    with contextlib.suppress(Exception):
        plan_text(StartForm(model="tiny", preset="tiny"))


def base_models(models_dir: str | Path | None) -> list[dict]:
    """Local model folders (diffusers folders and single files) under ``models_dir``, then the
    shipped world models and the tiny test models."""
    from dreambooth.base_model import TINY_NAMES
    from dreambooth.models import WORLD_MODELS

    found = []
    root = Path(models_dir).expanduser() if models_dir else None
    if root and root.is_dir():
        for p in sorted(root.iterdir()):
            if (p / "model_index.json").is_file() or p.suffix == ".safetensors":
                found.append({"name": p.name, "path": str(p.resolve()), "kind": "local"})
    found += [{"name": n, "path": n, "kind": "world"} for n in WORLD_MODELS]
    found += [{"name": n, "path": n, "kind": "tiny"} for n in TINY_NAMES]
    return found


# ------------------------------------------------------------------ advanced settings


@functools.lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """The comment after each field's line in the dataclass source: its documentation."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _text(value) -> str:
    """A value as it is typed after --set key= (YAML flow for lists)."""
    if isinstance(value, list):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_schema(preset: str | None = None) -> list[dict]:
    """Every config key by section, from the dataclasses: its type, choices, valid range, the
    documented default, the preset's value and the comment that documents it."""
    values, defaults = build_config(preset or None), Config()
    sections = []
    for section in SECTIONS:
        cls = type(getattr(defaults, section))
        hints, notes, items = typing.get_type_hints(cls), _comments(cls), []
        for f in dataclasses.fields(cls):
            name, hint = f.name, hints[f.name]
            kind = ("bool" if hint is bool else "choice" if "choices" in f.metadata
                    else "list" if typing.get_origin(hint) is list
                    else "number" if hint in (int, float) else "text")
            rng = f.metadata.get("range")
            items.append({"key": f"{section}.{name}", "kind": kind, "type": getattr(hint, "__name__", str(hint)),
                          "choices": list(f.metadata.get("choices", ())),
                          "range": rng.describe() if rng else "",
                          "default": _text(getattr(getattr(defaults, section), name)),
                          "value": _text(getattr(getattr(values, section), name)),
                          "doc": notes.get(name, "")})
        sections.append({"name": section, "fields": items})
    return sections


# ------------------------------------------------------------------ checks


def _key_of(message: str) -> str | None:
    m = re.search(r"config key '([\w.]+)'", message)
    return m.group(1) if m else None


def check_start(form: StartForm, runs_dir: Path):
    """(config, run directory, `dreambooth train` arguments) for ``form``, or FormErrors with the
    library's message beside each field at fault. Nothing is written either way."""
    from dreambooth.errors import ConfigError
    from dreambooth.plan import preflight
    from dreambooth.rundir import check_new_run
    from dreambooth.train import check_subject

    errors: dict[str, str] = {}
    try:
        build_config(form.preset or None)
    except ConfigError as e:
        errors["preset"] = str(e)
    for key, value in form.overrides.items():
        try:
            set_value(Config(), key, value)
        except ConfigError as e:
            errors[f"set:{key}"] = str(e)
    if not SAFE_NAME.match(form.run or ""):
        errors["run"] = ("name the run (letters, digits, '.', '_' and '-'; it becomes the folder "
                         f"{runs_dir}/NAME)" if not form.run else
                         f"'{form.run}' cannot be a folder name here: use letters, digits, '.', '_' and '-'")
    else:
        try:
            check_new_run(runs_dir / form.run)
        except DreamboothError as e:
            errors["run"] = str(e)
    if errors:
        raise FormErrors(errors)
    extra = {"data.images": form.photos or None, "data.class_noun": form.class_noun or None,
             "data.token": form.token or None, "model.path": form.model or None}
    try:
        cfg = build_config(form.preset or None, None, [f"{k}={v}" for k, v in form.overrides.items()], extra)
    except ConfigError as e:
        key = _key_of(str(e)) or ""
        where = {"data.class_noun": "class_noun", "data.token": "token", "model.path": "model",
                 "data.images": "photos"}.get(key, f"set:{key}" if key in form.overrides else "preset")
        raise FormErrors({where: str(e)}) from None
    try:
        check_subject(cfg)
    except DreamboothError as e:
        raise FormErrors({"photos" if not cfg.data.images else "class_noun": str(e)}) from None
    try:
        intake_table(cfg.data.images, cfg.data.resolution)
    except DreamboothError as e:
        raise FormErrors({"photos": str(e)}) from None
    try:
        preflight(cfg)
    except DreamboothError as e:
        raise FormErrors({"plan": str(e)}) from None
    run_dir = runs_dir / form.run
    args = ["train", "--images", cfg.data.images, "--class", cfg.data.class_noun, "--out", str(run_dir),
            "--no-progress"]
    for flag, value in (("--token", form.token), ("--model", form.model), ("--preset", form.preset)):
        if value:
            args += [flag, value]
    for key, value in form.overrides.items():
        args += ["--set", f"{key}={value}"]
    return cfg, run_dir, args


def plan_text(form: StartForm) -> str:
    """`dreambooth plan`'s report for the form's settings, against this machine's GPU."""
    import torch

    from dreambooth.plan import parse_budget, plan_run, report

    extra = {"model.path": form.model or None}
    cfg = build_config(form.preset or None, None, [f"{k}={v}" for k, v in form.overrides.items()], extra)
    budget = parse_budget("auto") if torch.cuda.is_available() else None
    with PLAN_LOCK:
        estimate, advice = plan_run(cfg, budget)
    text = report(cfg, estimate, budget, advice)
    if budget is None:
        text += "\n(no CUDA GPU here: training runs on the CPU)"
    return text + ("\ntime: measured from the first steps, shown as the ETA beside the progress bar"
                   f"; {cfg.train.steps} steps")
