"""What this package writes is read the same by clients on transformers 4.x, not only by the
transformers 5 it runs on.

transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` level and a CLIP tokenizer as
``tokenizer.json`` only; transformers 4.x then leaves the text encoder at random weights (with
only a warning) and cannot build the slow ``CLIPTokenizer`` the model index names, and diffusers
0.32 fails on a LoRA whose text-encoder names lack the level. So:

* in this environment, saved folders and LoRA files carry the names 4.x reads, and still load
  here to the identical weights and image;
* in a second, small environment (transformers 4.54.1 + diffusers 0.32.1, pip-installed once
  with ``--no-deps`` into a cached folder and put in front of this venv's torch, numpy, ...), a
  script that does not import this package loads a full run's ``final/``, a LoRA run's
  ``final/`` LoRA (on the text encoder too) on the base folder, and a ``merged`` export with
  plain diffusers, and draws the image this environment draws of the same model.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.checkpoint import load_run_model
from dreambooth.config import build_config
from dreambooth.export import export_run
from dreambooth.lora import collect_lora, diffusers_lora_layers
from dreambooth.models import build_tiny, load_base_model
from dreambooth.train import train
from painting import paint_subject
from test_export import lora_model

PROMPT = "a photo of waj toy"
STEPS, GUIDANCE, TOLERANCE = 4, 7.5, 2  # the images: DDIM, 4 steps, 64 px; max pixel levels apart
# The old environment: a transformers 4.x and the diffusers release of its time, with the
# tokenizers / huggingface_hub versions they need, and peft / accelerate of the same time
# (load_lora_weights needs peft; this venv's newer ones expect transformers 5).
OLD_ENV = {"transformers": "4.54.1", "diffusers": "0.32.1", "tokenizers": "0.21.4",
           "huggingface_hub": "0.34.4", "peft": "0.17.1", "accelerate": "1.10.1"}
CACHE = Path(os.environ.get("DREAMBOOTH_CACHE") or Path.home() / ".cache" / "dreambooth")
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "ConnectTimeout", "ReadTimeout",
                  "Temporary failure in name resolution", "Name or service not known",
                  "Network is unreachable", "Connection refused", "ProxyError", "SSLError",
                  "(from versions: none)")


def nested(key: str) -> str:
    """A CLIP text-encoder weight name with the ``text_model.`` level (what transformers 4.x
    reads); written out here, not imported, so the test stands apart from the code it checks."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


# ---------------------------------------------------------------- this environment


def safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        assert (f.metadata() or {}).get("format") == "pt", path  # transformers 4.x needs it
        return list(f.keys())


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_saved_folder_has_names_transformers_4_reads(name, tmp_path):
    """BaseModel.save (final/ of full runs, diffusers and merged exports, the world model):
    every CLIP weight under ``text_model.`` (and ``text_projection`` at the top), vocab.json and
    merges.txt beside tokenizer.json; transformers 5 reads it back to identical weights and ids."""
    model = build_tiny(name)
    folder = model.save(tmp_path / "m")
    encoders = ["text_encoder"] + (["text_encoder_2"] if name == "tiny-sdxl" else [])
    for enc in encoders:
        keys = safetensors_keys(folder / enc / "model.safetensors")
        nested_names = [k.startswith("text_model.") or k == "text_projection.weight" for k in keys]
        assert keys and all(nested_names), keys[:3]
        assert ("text_projection.weight" in keys) == (enc == "text_encoder_2")
    for tok in ["tokenizer"] + (["tokenizer_2"] if name == "tiny-sdxl" else []):
        vocab = json.loads((folder / tok / "vocab.json").read_text())
        merges = (folder / tok / "merges.txt").read_text().splitlines()
        assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["sks</w>"] == 48136
        assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    back = load_base_model(str(folder))
    for enc in encoders:
        before, after = getattr(model, enc).state_dict(), getattr(back, enc).state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), enc
    for tok in ("tokenizer", "tokenizer_2"):
        if getattr(model, tok) is not None:
            a, b = getattr(model, tok), getattr(back, tok)
            assert a(PROMPT).input_ids == b(PROMPT).input_ids and a.pad_token == b.pad_token
    # save is idempotent over its own output's names (a folder saved twice reads the same)
    back.save(tmp_path / "again")
    for enc in encoders:
        assert safetensors_keys(tmp_path / "again" / enc / "model.safetensors") == \
            safetensors_keys(folder / enc / "model.safetensors")


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_diffusers_lora_names_text_encoder_layers_under_text_model(name, tmp_path):
    """The diffusers-format LoRA (final/ of LoRA runs, --format lora-diffusers) names
    text-encoder layers ``text_encoder.text_model.encoder.layers.N...``, the same path the kohya
    names spell with underscores, and diffusers 0.42 on transformers 5 still loads every layer."""
    from dreambooth.kohya import kohya_names

    model = lora_model(name)
    layers = collect_lora(model)
    parts = diffusers_lora_layers(layers)
    type(model.pipeline()).save_lora_weights(
        tmp_path, **{f"{c}_lora_layers": sd for c, sd in parts.items()}, safe_serialization=True)
    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors")).keys()
    te_keys = [k for k in keys if not k.startswith("unet.")]
    paths = {k.split(".lora")[0] for k in te_keys}  # "text_encoder.text_model.encoder.layers.0..."
    assert te_keys and all(p.split(".", 1)[1].startswith("text_model.encoder.layers.") for p in paths), \
        te_keys[:3]
    # one rule for both formats: the diffusers path, dots as underscores, is the kohya name's tail
    kohya_tails = {kname.split("_", 2)[2] for key, kname in kohya_names(layers, model.kind).items()
                   if not key.startswith("unet.")}
    assert {p.split(".", 1)[1].replace(".", "_") for p in paths} == kohya_tails
    fresh = build_tiny(name)
    fresh.pipeline().load_lora_weights(str(tmp_path))
    loaded = collect_lora(fresh)
    assert loaded.keys() == layers.keys()
    for k, layer in layers.items():
        assert torch.equal(loaded[k].down, layer.down)
        assert torch.allclose(loaded[k].up * loaded[k].alpha / 4, layer.up * layer.alpha / 4, atol=1e-7)
    assert draw(fresh.pipeline()).tolist() == draw(model.pipeline()).tolist()


def draw(pipe) -> np.ndarray:
    """The comparison image (DDIM, fixed seed), uint8 as int16; the old-env script does the same."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    return np.round(out * 255).astype(np.int16)


# ---------------------------------------------------------------- the transformers 4.x environment


def old_env_dir() -> Path:
    tag = "-".join(f"{k}{v}" for k, v in OLD_ENV.items() if k in ("transformers", "diffusers"))
    return CACHE / f"compat-{tag}-py{sys.version_info[0]}{sys.version_info[1]}"


@pytest.fixture(scope="module")
def old_env() -> Path:
    """The old packages, installed once (no dependencies: torch etc. come from this venv)."""
    target = old_env_dir()
    if (target / ".complete").is_file():
        return target
    pins = [f"{k}=={v}" for k, v in OLD_ENV.items()]
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
                        "--target", str(tmp), *pins], capture_output=True, text=True, timeout=1200)
    if r.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        out = (r.stdout + r.stderr).strip()
        if any(e in out for e in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package registry to install {' '.join(pins)}: "
                        + out.splitlines()[-1][:300])
        pytest.fail(f"pip install {' '.join(pins)} failed:\n{out[-3000:]}")
    if any(p.name.startswith("torch") for p in tmp.iterdir()):
        pytest.fail(f"the old environment in {tmp} must not hold its own torch")
    (tmp / ".complete").write_text(json.dumps(pins) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same install first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Runs under the old packages with this venv's python, torch, numpy, pillow, safetensors: plain
# diffusers, never this package (an import of it is refused).
OLD_SCRIPT = textwrap.dedent('''
    import json, sys, traceback

    class NoDreambooth:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dreambooth":
                raise ImportError("the old-environment script must not import the dreambooth package")

    sys.meta_path.insert(0, NoDreambooth())
    # this venv's torchao (the quantize extra) is newer than the old peft's torchao dispatch
    # expects; a user of that peft would not have it, so the old environment does not see it
    sys.modules["torchao"] = None
    import transformers.utils.import_utils as iu
    iu._kernels_available = False  # this venv's `kernels` expects huggingface_hub 1.x
    import torch, numpy as np, transformers, diffusers
    from diffusers import DDIMScheduler, DiffusionPipeline
    from safetensors.torch import save_file

    jobs, out_dir = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    torch.set_num_threads(1)
    report = {"transformers": transformers.__version__, "diffusers": diffusers.__version__,
              "transformers_file": transformers.__file__, "jobs": {}}
    for job in jobs:
        try:
            pipe = DiffusionPipeline.from_pretrained(job["folder"], local_files_only=True)
            if job.get("lora"):
                pipe.load_lora_weights(job["lora"], weight_name="pytorch_lora_weights.safetensors")
            tensors = {}
            for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
                enc, tok = getattr(pipe, enc_name, None), getattr(pipe, tok_name, None)
                if enc is None:
                    continue
                ids = tok(job["prompt"], padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
                with torch.no_grad():
                    tensors[f"{enc_name}/hidden"] = enc(ids)[0].contiguous()
                tensors[f"{enc_name}/ids"] = ids
                if not job.get("lora"):
                    for k, v in enc.state_dict().items():
                        if not k.endswith("position_ids"):
                            tensors[f"{enc_name}/weights/{k}"] = v.contiguous()
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            image = pipe(job["prompt"], num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                         height=64, width=64, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images[0]
            tensors["image"] = torch.from_numpy(np.ascontiguousarray(np.round(image * 255).astype(np.int16)))
            save_file(tensors, f"{out_dir}/{job['name']}.safetensors")
            report["jobs"][job["name"]] = {"ok": True}
        except Exception:
            report["jobs"][job["name"]] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    report["imported_dreambooth"] = any(m.split(".")[0] == "dreambooth" for m in sys.modules)
    open(f"{out_dir}/report.json", "w").write(json.dumps(report, indent=1))
''')


def run_old_env(env_dir: Path, jobs: list[dict], work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "old_env.py").write_text(OLD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(env_dir), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TRANSFORMERS_VERBOSITY="warning", HF_HUB_DISABLE_PROGRESS_BARS="1")
    r = subprocess.run([sys.executable, str(work / "old_env.py"), str(work / "jobs.json"), str(work)],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (work / "report.json").is_file(), r.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    report["log"] = r.stderr
    assert report["transformers"] == OLD_ENV["transformers"], report  # the old one, not this venv's
    assert report["diffusers"] == OLD_ENV["diffusers"] and not report["imported_dreambooth"]
    return report


ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def expected(model, weights: bool) -> dict:
    """What the old-env script records of a model, drawn here under transformers 5: token ids,
    each text encoder's output on them (and its weights, under the names 4.x reads), the image."""
    out = {}
    for enc_name, tok_name in ENCODERS:
        enc, tok = getattr(model, enc_name), getattr(model, tok_name)
        if enc is None:
            continue
        ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out[f"{enc_name}/hidden"] = enc(ids)[0]
        out[f"{enc_name}/ids"] = ids
        if weights:
            out.update({f"{enc_name}/weights/{nested(k)}": v for k, v in enc.state_dict().items()
                        if not k.endswith("position_ids")})
    out["image"] = torch.from_numpy(draw(model.pipeline()))
    return out


@pytest.fixture(scope="module")
def old_env_results(old_env, tmp_path_factory):
    """Tiny runs on a base model saved as a diffusers folder (a full run and a LoRA run, both
    training the text encoder) and a merged export; a tiny SDXL LoRA (both text encoders)
    written as a LoRA file and as a fused folder. The old environment loads each and draws;
    ``expected`` holds what this environment reads of the same model."""
    from dreambooth.export import write_diffusers, write_lora_diffusers

    root = tmp_path_factory.mktemp("compat")
    base = build_tiny().save(root / "base")
    photos = paint_subject(root / "photos", count=3)[0].parent
    common = [f"model.path={base}", f"data.images={photos}", "data.class_noun=toy", "data.token=waj",
              "prior.num_images=2", "prior.steps=2", "train.steps=3", "train.checkpoint_every=3",
              "train.train_text_encoder=true"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_CACHE", str(root / "cache"))
        train(build_config("tiny", overrides=common), root / "full", progress=False)
        train(build_config("tiny", overrides=common + ["train.mode=lora", "train.lr=1e-2", "lora.rank=4",
                                                       "lora.alpha=8"]), root / "lora", progress=False)
        export_run(root / "lora", "merged", root / "merged", log=lambda _: None)
    full, _ = load_run_model(root / "full")
    lora, _ = load_run_model(root / "lora")
    merged = load_base_model(str(root / "merged"))
    want = {"full-final": expected(full, weights=True), "lora-final": expected(lora, weights=False),
            "merged": expected(merged, weights=True)}
    # the runs trained their text encoders: equal weights below mean the run's were read
    base_te = {nested(k): v for k, v in build_tiny().text_encoder.state_dict().items()}
    for name in ("full-final", "merged"):
        assert any(not torch.equal(v, base_te[k.split("/", 2)[2]]) for k, v in want[name].items()
                   if k.startswith("text_encoder/weights/")), name
    want["merged"]["image"] = want["lora-final"]["image"]  # fused at scale 1: the run's own image
    xl_base = build_tiny("tiny-sdxl").save(root / "base-xl")
    xl = lora_model("tiny-sdxl")
    write_lora_diffusers(xl, root / "lora-xl", torch.float32)
    want["sdxl-lora"] = expected(xl, weights=False)
    write_diffusers(xl, root / "fused-xl", torch.float32)  # fuses the LoRA in place, then saves
    want["sdxl-folder"] = expected(xl, weights=True)

    job = dict(prompt=PROMPT, steps=STEPS, guidance=GUIDANCE)
    jobs = [dict(job, name="full-final", folder=str(root / "full" / "final")),
            dict(job, name="lora-final", folder=str(base), lora=str(root / "lora" / "final")),
            dict(job, name="merged", folder=str(root / "merged")),
            dict(job, name="sdxl-lora", folder=str(xl_base), lora=str(root / "lora-xl")),
            dict(job, name="sdxl-folder", folder=str(root / "fused-xl"))]
    report = run_old_env(old_env, jobs, root / "old-env")
    return root, report, want


def check_old_env(results, name: str, encoders=("text_encoder",)) -> None:
    """The old environment loaded ``name``, tokenized the prompt alike, holds the same text
    encoder weights (this catches "random weights with only a warning") and outputs, and drew
    the image this environment draws of the same model within TOLERANCE levels."""
    root, report, want = results
    job = report["jobs"][name]
    assert job["ok"], f"transformers {OLD_ENV['transformers']} / diffusers {OLD_ENV['diffusers']} " \
                      f"could not load '{name}':\n{job.get('error')}\n{report['log'][-3000:]}"
    old, new = load_file(str(root / "old-env" / f"{name}.safetensors")), want[name]
    for enc in encoders:
        assert torch.equal(old[f"{enc}/ids"], new[f"{enc}/ids"]), enc
        weights = {k for k in new if k.startswith(f"{enc}/weights/")}
        assert weights == {k for k in old if k.startswith(f"{enc}/weights/")}, enc
        different = [k for k in weights if not torch.equal(old[k], new[k])]
        assert not different, f"{len(different)} weights of {enc} differ, e.g. {sorted(different)[:3]}"
        gap = (old[f"{enc}/hidden"] - new[f"{enc}/hidden"]).abs().max().item()
        assert gap <= 1e-5, (enc, gap)
    diff = int((old["image"] - new["image"]).abs().max())
    assert diff <= TOLERANCE, f"{name}: the old environment's image is {diff} levels off"


def test_transformers_4_loads_a_full_runs_final_folder(old_env_results):
    check_old_env(old_env_results, "full-final")


def test_transformers_4_loads_a_lora_runs_final_lora_with_text_encoder_layers(old_env_results):
    root = old_env_results[0]
    keys = load_file(str(root / "lora" / "final" / "pytorch_lora_weights.safetensors")).keys()
    assert any(k.startswith("text_encoder.") for k in keys)  # the text-encoder names are exercised
    check_old_env(old_env_results, "lora-final")


def test_transformers_4_loads_a_merged_export(old_env_results):
    check_old_env(old_env_results, "merged")


def test_transformers_4_loads_sdxl_folder_and_lora_with_both_text_encoders(old_env_results):
    both = ("text_encoder", "text_encoder_2")
    check_old_env(old_env_results, "sdxl-lora", both)
    check_old_env(old_env_results, "sdxl-folder", both)
