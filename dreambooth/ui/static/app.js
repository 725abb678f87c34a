// The page: reads and writes through the JSON routes of dreambooth/ui/server.py. No state of
// its own beyond the form being filled in: after a reload, everything comes back from the server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
};
const file = (rel) => "/files/" + rel.split("/").map(encodeURIComponent).join("/");

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ errors: { form: `${r.status} ${r.statusText}` } }));
  return { ok: r.ok, data };
}

const state = { topToken: "", photos: "", schema: [], edited: {}, runTouched: false, openRun: null, compare: [], openCompare: null,
  jobsActive: false };

// ---------------------------------------------------------------- the new-subject form

function clearErrors() {
  document.querySelectorAll(".error").forEach((e) => { if (!e.closest("#run-view")) e.textContent = ""; });
}

function showErrors(errors) {
  for (const [key, msg] of Object.entries(errors)) {
    let box = key.startsWith("set:") ? document.querySelector(`.error[data-for="${key.slice(4)}"]`) : $("#err-" + key);
    if (key.startsWith("set:")) $("#advanced").open = true;
    (box || $("#err-form")).textContent = msg;
  }
}

function value(key) {  // an advanced setting's current text
  if (key in state.edited) return state.edited[key];
  for (const s of state.schema) for (const f of s.fields) if (f.key === key) return f.value;
  return "";
}

function renderIntake(data) {
  const body = $("#intake tbody");
  body.replaceChildren();
  for (const r of data.rows) {
    body.append(el("tr", { class: "intake-row" },
      el("td", {}, el("img", { src: r.crop, alt: "crop of " + r.name })),
      el("td", {}, r.mask ? el("img", { src: r.mask, alt: "mask" }) : "-"),
      el("td", { text: r.name }),
      el("td", { text: `${r.size} ${r.mode}` }),
      el("td", { text: [...r.notes, `center-crop ${data.resolution}`].join(", ") }),
      el("td", { text: r.caption || "-" }),
      el("td", { class: "warnings", text: r.warnings.join("\n") })));
  }
  $("#intake-warnings").replaceChildren(...data.warnings.map((w) => el("li", { text: w })));
  $("#intake-box").hidden = false;
}

async function intakeDone(result) {
  clearErrors();
  if (!result.ok) {
    state.photos = "";
    $("#intake-box").hidden = true;
    showErrors(result.data.errors);
    return;
  }
  state.photos = result.data.folder;
  renderIntake(result.data);
  refreshPlan();
}

async function rereadIntake() {  // the crops at the resolution now chosen
  if (state.photos) intakeDone(await api("/api/photos/folder", { folder: state.photos, resolution: value("data.resolution") }));
}

async function uploadPhotos(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("photos", f, f.name);
  form.append("resolution", value("data.resolution") || "512");
  $("#err-photos").textContent = "reading " + files.length + " files…";
  const r = await fetch("/api/photos", { method: "POST", body: form });
  await intakeDone({ ok: r.ok, data: await r.json() });
}

function renderAdvanced() {
  const box = $("#advanced-body");
  box.replaceChildren();
  for (const section of state.schema) {
    box.append(el("div", { class: "section-title", text: section.name }));
    for (const f of section.fields) {
      const current = value(f.key);
      let input;
      if (f.kind === "bool") {
        input = el("select", {}, el("option", { text: "true" }), el("option", { text: "false" }));
        input.value = current;
      } else if (f.kind === "choice") {
        input = el("select", {}, ...f.choices.map((c) => el("option", { text: c })));
        input.value = current;
      } else {
        input = el("input", { value: current, type: "text" });
      }
      input.dataset.key = f.key;
      const row = el("div", { class: "setting" + (f.key in state.edited ? " changed" : "") },
        el("label", {}, el("code", { text: f.key })),
        input,
        el("div", { class: "doc" },
          `${f.type}${f.range ? ", " + f.range : ""}; default ${f.default}` + (f.value !== f.default ? `, preset ${f.value}` : "") + (f.doc ? ". " + f.doc : ""),
          el("div", { class: "error", "data-for": f.key })));
      input.addEventListener("change", () => {
        if (input.value === f.value) delete state.edited[f.key]; else state.edited[f.key] = input.value;
        row.classList.toggle("changed", f.key in state.edited);
        if (f.key === "data.resolution") rereadIntake();
        refreshPlan();
      });
      box.append(row);
    }
  }
}

async function loadSchema() {
  const preset = $("#preset").value.trim();
  const r = await api("/api/schema?preset=" + encodeURIComponent(preset));
  $("#err-preset").textContent = "";
  if (!r.ok) { showErrors(r.data.errors); return; }
  const before = value("data.resolution");
  state.schema = r.data.sections;
  renderAdvanced();
  if (value("data.resolution") !== before) rereadIntake();
  refreshPlan();
}

function formData() {
  return { photos: state.photos, class_noun: $("#class_noun").value, token: $("#token").value,
    model: $("#model").value, preset: $("#preset").value, run: $("#run").value, overrides: state.edited };
}

let planTimer = null, planBusy = false, planAgain = false;
function refreshPlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(runPlan, 400);
}

async function runPlan() {  // one plan at a time; a change meanwhile asks once more when it ends
  if (planBusy) { planAgain = true; return; }
  planBusy = true; planAgain = false;
  $("#plan").textContent = "planning…";
  const r = await api("/api/plan", formData());
  planBusy = false;
  if (planAgain) { runPlan(); return; }  // this answer is for settings no longer on the form
  $("#err-plan").textContent = "";
  if (r.ok) $("#plan").textContent = r.data.text; else { $("#plan").textContent = ""; showErrors(r.data.errors); }
}

async function checkToken() {
  const r = await api("/api/token?token=" + encodeURIComponent($("#token").value.trim()) + "&model=" + encodeURIComponent($("#model").value));
  $("#warn-token").replaceChildren(...(r.data.warnings || []).map((w) => el("li", { text: "warning: " + w })));
}

function showTokens(o) {  // `dreambooth tokens`' picks for the chosen model's tokenizer; the first fills the field
  $("#token-list").replaceChildren(...o.tokens.map((t) => el("option", { value: t.token })));
  $("#token-suggestions").replaceChildren(...o.tokens.map((t) =>
    el("span", { title: t.reason, text: `${t.rank}. ${t.token}`, onclick: () => { $("#token").value = t.token; checkToken(); suggestRunName(); } })));
  $("#token-note").textContent = o.note || "";
  const field = $("#token");
  if (!field.value || field.value === state.topToken) field.value = o.tokens.length ? o.tokens[0].token : "";  // not one typed in
  state.topToken = o.tokens.length ? o.tokens[0].token : "";
}

async function modelTokens() {
  const model = $("#model").value;
  const r = await api("/api/tokens?model=" + encodeURIComponent(model));
  if (r.ok && model === $("#model").value) { showTokens(r.data); checkToken(); suggestRunName(); }
}

function suggestRunName() {
  if (state.runTouched) return;
  const parts = [$("#class_noun").value.trim(), $("#token").value.trim()].filter(Boolean);
  $("#run").value = parts.join("-").replace(/[^A-Za-z0-9._-]/g, "-");
}

async function start() {
  clearErrors();
  $("#start").disabled = true;
  const r = await api("/api/start", formData());
  $("#start").disabled = false;
  if (!r.ok) { showErrors(r.data.errors); return; }
  location.hash = "#run=" + encodeURIComponent(r.data.run);
}

async function setupForm() {
  const r = await api("/api/options");
  const o = r.data;
  $("#preset-list").replaceChildren(...o.presets.map((p) => el("option", { value: p })));
  $("#model").replaceChildren(...o.models.map((m) => el("option", { value: m.path, text: `${m.name} (${m.kind})` })));
  modelTokens();  // the identifier picks for the model selected first
  $("#run-where").textContent = "in " + o.runs_dir;
  $("#photos-input").addEventListener("change", (e) => uploadPhotos([...e.target.files]));
  const drop = $("#photos-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); uploadPhotos([...e.dataTransfer.files]); });
  $("#photos-folder-load").addEventListener("click", async () =>
    intakeDone(await api("/api/photos/folder", { folder: $("#photos-folder").value, resolution: value("data.resolution") })));
  $("#preset").addEventListener("change", loadSchema);
  $("#model").addEventListener("change", () => { refreshPlan(); modelTokens(); });
  $("#token").addEventListener("change", () => { checkToken(); suggestRunName(); });
  $("#class_noun").addEventListener("input", suggestRunName);
  $("#run").addEventListener("input", () => { state.runTouched = true; });
  $("#plan-refresh").addEventListener("click", refreshPlan);
  $("#start").addEventListener("click", start);
  await loadSchema();
}

// ---------------------------------------------------------------- runs

const fmtTime = (s) => { s = Math.round(s); const m = Math.floor(s / 60); return `${m}:${String(s % 60).padStart(2, "0")}`; };
const fmtMetrics = (m) => Object.entries(m || {}).filter(([, v]) => v !== undefined && v !== null)
  .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : v}`).join(", ");
const headline = (m) => fmtMetrics({ fidelity: (m || {}).fidelity, prompt_fidelity: (m || {}).prompt_fidelity });

async function refreshRuns() {
  const r = await api("/api/runs");
  const body = $("#runs-list tbody");
  body.replaceChildren();
  for (const run of r.data.runs) {
    const tick = el("input", { type: "checkbox", class: "compare-tick" });
    tick.checked = state.compare.includes(run.name);
    tick.addEventListener("click", (e) => {  // the two ticked last, in the order ticked
      e.stopPropagation();
      state.compare = state.compare.filter((n) => n !== run.name);
      if (tick.checked) state.compare = [...state.compare, run.name].slice(-2);
      document.querySelectorAll(".compare-tick").forEach((t) => { t.checked = state.compare.includes(t.closest("tr").dataset.run); });
    });
    const row = el("tr", { class: "run-row" + (run.name === state.openRun ? " selected" : ""), "data-run": run.name,
      onclick: () => { location.hash = "#run=" + encodeURIComponent(run.name); } },
      el("td", {}, tick),
      el("td", {}, run.thumb ? el("img", { src: file(run.thumb), alt: "" }) : ""),
      el("td", { text: run.name }),
      el("td", {}, el("span", { class: "badge run-status " + run.status, text: run.status })),
      el("td", { class: "run-step", text: run.steps ? `${run.step}/${run.steps}` : "-" }),
      el("td", { class: "hint", text: headline(run.best || run.metrics) }));
    body.append(row);
  }
  const active = r.data.jobs.filter((j) => j.state === "running" || j.state === "queued");
  state.jobsActive = active.length > 0;
  $("#queue").textContent = active.length ? active.map((j) => `${j.kind} ${j.run}: ${j.state}`).join(" · ") : "no jobs running";
}

function drawLoss(points) {
  const svg = $("#loss-curve");
  const w = 420, h = 160, pad = 24;
  svg.replaceChildren();
  if (points.length < 2) return;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (x - x0) / (x1 - x0 || 1) * (w - 2 * pad);
  const sy = (y) => h - pad - (y - y0) / (y1 - y0 || 1) * (h - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#3056d3"); line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  for (const [x, y, t] of [[pad, 14, y1.toFixed(3)], [pad, h - 6, y0.toFixed(3)], [w - pad - 40, h - 6, "step " + x1]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x); label.setAttribute("y", y); label.setAttribute("font-size", "11"); label.textContent = t;
    svg.append(label);
  }
}

function gridItem(g, caption) {
  return el("div", { class: "grid-item", "data-step": g.step },
    el("img", { src: file(g.grid), alt: "validation grid at step " + g.step }),
    el("div", { class: "hint", text: caption }));
}

function renderRun(d) {
  $("#run-name").textContent = d.name;
  const badge = $("#run-status");
  badge.textContent = d.status; badge.className = "badge " + d.status;
  const c = d.config;
  $("#run-config").textContent = c ? `"${c.token} ${c.class_noun}" on ${c.model}, ${c.mode} at ${c.resolution} px` : "";
  const p = d.progress || { step: 0, steps: null, loss: [], evals: [] };
  $("#run-progress").max = p.steps || 1;
  $("#run-progress").value = p.step;
  let text = p.steps ? `step ${p.step} / ${p.steps}` : "";
  if (d.status === "running" && p.step === 0) text = "preparing: loading the model, drawing class images…";
  else if (d.status === "running" && p.eta_s !== null) text += ` · ETA ${fmtTime(p.eta_s)}`;
  $("#run-progress-text").textContent = text;
  const row = document.querySelector(`#runs-list tr[data-run="${CSS.escape(d.name)}"]`);
  if (row) {  // the list's row from the same reading, so the two never disagree
    row.querySelector(".run-step").textContent = p.steps ? `${p.step}/${p.steps}` : "-";
    const b = row.querySelector(".run-status");
    b.textContent = d.status; b.className = "badge run-status " + d.status;
  }
  $("#stop").hidden = !(d.status === "running" || d.status === "queued");
  $("#resume").hidden = !(d.status === "stopped" || (d.status === "failed" && c));
  $("#run-error").textContent = d.status === "failed" && d.error ? d.error : "";
  $("#report-link").hidden = !c;
  $("#report-link").href = `/api/runs/${encodeURIComponent(d.name)}/report`;
  drawLoss(p.loss);
  const best = d.best;
  $("#best").textContent = best ? `step ${best.step}: ${headline(best)}` + (best.why ? ` — ${best.why}` : "")
    : d.status === "done" ? "the last step (no evaluation chose another)" : "—";
  const have = new Set([...document.querySelectorAll("#grids .grid-item")].map((e) => e.dataset.step));
  for (const g of d.grids) {  // newest first; images already shown stay as they are
    const caption = `step ${g.step}: ${headline({ ...(p.evals.find((e) => e.step === g.step) || {}), ...g.scores })}`;
    if (have.has(String(g.step))) $(`#grids .grid-item[data-step="${g.step}"] .hint`).textContent = caption;
    else $("#grids").prepend(gridItem(g, caption));
  }
  $("#samples").replaceChildren(...d.samples.map((s) => el("div", { class: "grid-item sample" },
    el("img", { src: file(s.sheet), alt: "samples " + s.name }), el("div", { class: "hint", text: `${s.name}: ${s.images.length} images` }))));
  $("#sweep-out").replaceChildren(...(d.sweep.grid ? [el("img", { src: file(d.sweep.grid), alt: "sweep grid" })] : []),
    ...(d.sweep.table ? [el("pre", { text: d.sweep.table })] : []));
  $("#exports").replaceChildren(...d.exports.map((x) => el("li", { class: "export" },
    `${x.format} (${x.dtype}, ${x.checkpoint}): ${x.verified ? "verified" : "NOT verified"}, max pixel difference ${x.max_pixel_diff} — `,
    ...x.files.map((f) => el("a", { class: "download", href: file(f), download: f.split("/").pop(), text: f.split("/").pop() + " " })),
    x.folder ? el("a", { class: "download-zip", href: file(x.path), text: " (all, as .zip)" }) : null)));
  $("#run-jobs").replaceChildren(...d.jobs.slice().reverse().map((j) => el("li", { class: "job " + j.state },
    `${j.kind}: ${j.state}` + (j.error ? ` — ${j.error}` : ""))));
  for (const kind of ["sample", "sweep", "export"]) {
    const last = d.jobs.filter((j) => j.kind === kind).pop();
    const box = $("#err-" + kind);
    if (last && last.state === "failed") box.textContent = last.error;
    else if (last && (last.state === "running" || last.state === "queued")) box.textContent = "";
  }
  $("#run-log").textContent = d.log;
}

async function refreshRun() {
  if (!state.openRun) return;
  const r = await api("/api/runs/" + encodeURIComponent(state.openRun));
  if (r.ok && r.data.name === state.openRun) renderRun(r.data);
}

async function runAction(action, body, errBox) {
  if (errBox) $(errBox).textContent = "";
  const r = await api(`/api/runs/${encodeURIComponent(state.openRun)}/${action}`, body || {});
  if (!r.ok && errBox) $(errBox).textContent = Object.values(r.data.errors).join("\n");
  await refreshRun();
}

async function compare() {  // one `dreambooth sample` job per run, the same prompts and seed
  $("#err-compare").textContent = "";
  if (state.compare.length < 2) { $("#err-compare").textContent = "tick two runs to compare them"; return; }
  const r = await api("/api/compare", { runs: state.compare, prompts: $("#compare-prompts").value,
    n: $("#compare-n").value, seed: $("#compare-seed").value });
  if (!r.ok) { $("#err-compare").textContent = Object.values(r.data.errors).join("\n"); return; }
  location.hash = "#compare=" + encodeURIComponent(r.data.id);
}

function renderCompare(d) {
  const [a, b] = d.sides.map((s) => s.run);
  const drawing = d.sides.some((s) => s.state === "queued" || s.state === "running");
  const seeds = d.n > 1 ? `seeds ${d.seed}–${d.seed + d.n - 1}` : `seed ${d.seed}`;
  const note = drawing ? `drawing both runs at the same ${d.prompts.length} prompts, ${seeds}…`
    : d.same ? `the same ${d.prompts.length} prompts at ${seeds} (read back from each image): comparable cell by cell`
    : "the two did not draw the same prompts and seeds (see the jobs' errors)";
  $("#compare-view").replaceChildren(
    el("h2", { text: `${a} vs ${b}` }),
    el("div", { id: "compare-note", class: d.same || drawing ? "hint" : "warnings", text: note }),
    el("ol", { class: "hint" }, ...d.prompts.map((p) => el("li", { text: p }))),
    el("div", { class: "compare-cols" }, ...d.sides.map((s) => {
      const first = s.images[0];
      const how = first ? `${first.settings.scheduler}, ${first.settings.steps} steps, guidance ${first.settings.guidance}; identifier ${first.token}` : "";
      return el("div", { class: "compare-side", "data-run": s.run, "data-state": s.state },
        el("h3", {}, el("a", { href: "#run=" + encodeURIComponent(s.run), text: s.run }), ` (sample: ${s.state})`),
        el("div", { class: "hint", text: how }),
        s.sheet ? el("img", { class: "compare-sheet", src: file(s.sheet), alt: `${s.run} at the shared prompts` }) : null,
        s.error ? el("div", { class: "error", text: s.error }) : null);
    })));
  $("#compare-view").hidden = false;
  return drawing;
}

async function refreshCompare() {
  if (!state.openCompare) return;
  const id = state.openCompare;
  const r = await api("/api/compare/" + encodeURIComponent(id));
  if (id !== state.openCompare) return;
  if (!r.ok) { $("#compare-view").replaceChildren(el("div", { class: "error", text: Object.values(r.data.errors).join("\n") })); $("#compare-view").hidden = false; return; }
  if (renderCompare(r.data)) setTimeout(refreshCompare, 1000);
}

// ---------------------------------------------------------------- routing

function route() {
  const hash = decodeURIComponent(location.hash || "#new");
  const onRuns = hash.startsWith("#run") || hash.startsWith("#compare=");
  $("#new-view").hidden = onRuns;
  $("#runs-view").hidden = !onRuns;
  $("#tab-new").classList.toggle("active", !onRuns);
  $("#tab-runs").classList.toggle("active", onRuns);
  const name = hash.startsWith("#run=") ? hash.slice(5) : null;
  if (name !== state.openRun) $("#grids").replaceChildren();
  state.openRun = name;
  state.openCompare = hash.startsWith("#compare=") ? hash.slice(9) : null;
  $("#run-view").hidden = !name;
  $("#compare-view").hidden = true;
  refreshRuns();
  refreshRun();
  refreshCompare();
}

async function main() {
  $("#stop").addEventListener("click", () => runAction("stop"));
  $("#resume").addEventListener("click", () => runAction("resume"));
  $("#sample-btn").addEventListener("click", () => runAction("sample",
    { prompts: $("#sample-prompts").value, n: $("#sample-n").value, seed: $("#sample-seed").value }, "#err-sample"));
  $("#sweep-btn").addEventListener("click", () => runAction("sweep",
    { dino: $("#sweep-dino").value, clip: $("#sweep-clip").value, overrides: $("#sweep-set").value }, "#err-sweep"));
  $("#export-btn").addEventListener("click", () => runAction("export",
    { format: $("#export-format").value, dtype: $("#export-dtype").value }, "#err-export"));
  $("#compare").addEventListener("click", compare);
  window.addEventListener("hashchange", route);
  route();
  setInterval(refreshRun, 1000);
  const listLoop = async () => {  // every second while a job runs, so its row keeps up; else every 3 s
    await refreshRuns().catch(() => {});
    setTimeout(listLoop, state.jobsActive ? 1000 : 3000);
  };
  setTimeout(listLoop, 1000);
  await setupForm();
  document.body.dataset.ready = "1";
}

main();
