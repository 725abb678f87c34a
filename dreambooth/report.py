"""RUN_DIR/report.html: one self-contained page about a run, opened from disk with no server.

What it shows, all read from the run directory: the subject, the chosen checkpoint and why
(best.json), loss curves and metric curves (matplotlib PNGs), a table of every evaluation, the
image grid of each evaluated step (samples/step-N/grid.png), and the resolved config. Images are
embedded as data: URIs, so the file can be moved or mailed on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from dreambooth.runlog import evaluations, read_metrics

CURVE_METRICS = ("fidelity", "prompt_fidelity", "dino", "clip_i", "clip_t", "pres", "div",
                 "subject_fidelity", "factor_match", "prior_distance")
# the world metrics' names in runs evaluated before they were renamed (world_prompt: prompt_fidelity)
OLD_NAMES = {"world_match": "factor_match", "world_subject": "subject_fidelity", "world_prior": "prior_distance"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def loss_figure(rows: list[dict]) -> bytes | None:
    """PNG of the loss curves (None when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if "loss" in r and r.get("kind") is None]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key in ("loss", "instance_loss", "prior_loss"):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts and any(v for _, v in pts):
            ax.plot(*zip(*pts), label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title("training loss")
    ax.legend()
    png = _png(fig)
    plt.close(fig)
    return png


def metric_figure(evals: list[dict], chosen: int | None) -> bytes | None:
    """PNG of every evaluated metric against the step, the chosen step dashed (None: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVE_METRICS if any(isinstance(e.get(k), (int, float)) for e in evals)]
    if not evals or not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(e["step"], e[key]) for e in evals if isinstance(e.get(key), (int, float))]
        ax.plot(*zip(*pts), marker="o", markersize=3, linewidth=1)
        if chosen is not None:
            ax.axvline(chosen, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("evaluation (dashed: chosen step)", fontsize=10)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html from what the run directory holds; return its path."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [{OLD_NAMES.get(k, k): v for k, v in e.items()} for e in evaluations(rows)]
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else None
    chosen = best["step"] if best else None
    data, train = cfg.get("data", {}), cfg.get("train", {})
    last = max((r["step"] for r in rows if "step" in r and r.get("step") is not None), default=0)

    parts = [f"<h1>DreamBooth run: {html.escape(run_dir.resolve().name)}</h1>",
             "<table class='kv'>"]
    for k, v in (("model", cfg.get("model", {}).get("path")), ("subject photos", data.get("images")),
                 ("identifier", data.get("token")), ("class", data.get("class_noun")),
                 ("mode", train.get("mode")), ("steps", f"{last} of {train.get('steps')}"),
                 ("prior preservation", cfg.get("prior", {}).get("enabled"))):
        parts.append(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Chosen checkpoint</h2>")
    if best:
        parts.append(f"<p id='chosen'>final/ holds <b>step {best['step']}</b>: {html.escape(best['why'])}."
                     + (" Training stopped early." if best.get("stopped_early") else "") + "</p>")
    else:
        parts.append("<p id='chosen'>final/ holds the last step (no evaluation ran: set eval.every "
                     "to evaluate during training and choose the best step).</p>")

    parts.append("<h2>Curves</h2>")
    for png, alt in ((loss_figure(rows), "loss curve"), (metric_figure(evals, chosen), "metric curves")):
        if png:
            parts.append(f"<img class='plot' alt='{alt}' src='{_data_uri(png)}'>")

    if evals:
        keys = [k for k in CURVE_METRICS if any(k in e for e in evals)]
        parts.append("<h2>Evaluations</h2><table class='grid'><tr><th>step</th>"
                     + "".join(f"<th>{k}</th>" for k in keys) + "<th>seconds</th></tr>")
        for e in evals:
            mark = " class='chosen'" if e["step"] == chosen else ""
            parts.append(f"<tr{mark}><td>{e['step']}</td>" + "".join(
                f"<td>{_fmt(e.get(k, ''))}</td>" for k in keys) + f"<td>{_fmt(e.get('eval_seconds', ''))}</td></tr>")
        parts.append("</table>")
        parts.append("<h2>Images per evaluated step</h2>")
        for e in evals:
            grid = run_dir / "samples" / e["name"] / "grid.png"
            if grid.is_file():
                star = " (chosen)" if e["step"] == chosen else ""
                parts.append(f"<h3>step {e['step']}{star}</h3><img class='samples' "
                             f"alt='samples at step {e['step']}' src='{_data_uri(grid.read_bytes())}'>")
    sheet = run_dir / "samples" / "final" / "grid.png"  # `dreambooth demo`'s samples
    if sheet.is_file():
        parts.append(f"<h2>Final samples</h2><img class='samples' alt='final samples' src='{_data_uri(sheet.read_bytes())}'>")

    parts.append("<h2>Config</h2><pre>" + html.escape(yaml.safe_dump(cfg, sort_keys=False)) + "</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>DreamBooth report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
            "font-size:13px;text-align:left}tr.chosen{background:#fde2e2}img.plot,img.samples"
            "{max-width:100%;display:block;margin:.5em 0}pre{background:#f6f6f6;padding:1em;"
            "font-size:12px}</style></head><body>" + "\n".join(parts) + "</body></html>")
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
