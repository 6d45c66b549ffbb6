// kd_fracture app page: vanilla JS, same-origin requests only; server text is inserted with textContent.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
    return e;
  };
  const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
  const decision = (d) => el("span", { class: d === "abnormal" ? "abnormal" : "normal" }, d);
  let info = null;

  // ---- tabs
  const tabs = { predict: $("tab-predict"), runs: $("tab-runs") };
  function show(name) {
    for (const [key, btn] of Object.entries(tabs)) {
      btn.setAttribute("aria-selected", String(key === name));
      $(key).hidden = key !== name;
    }
    if (name === "runs" && !$("runs-table").childElementCount) loadRuns();
  }
  tabs.predict.addEventListener("click", () => show("predict"));
  tabs.runs.addEventListener("click", () => show("runs"));

  async function getJSON(url, options) {
    const r = await fetch(url, options);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.detail) ? String(body.detail) : `${r.status} ${r.statusText}`);
    return body;
  }

  // ---- info
  async function loadInfo() {
    try {
      info = await getJSON("/api/info");
      const models = Object.values(info.models).map((m) =>
        `${m.description}, threshold ${fmt(m.threshold)} (${m.threshold_source})`).join(" · ");
      $("run").textContent = `${info.run} — ${models} — ${info.device}`;
      $("disclaimer").textContent = info.disclaimer;
      $("limits").textContent = `Limits: ${(info.limits.max_upload_bytes / 1048576).toFixed(1)} MB per upload, ` +
        `${(info.limits.max_pixels / 1e6).toFixed(1)} megapixels per image, ${info.limits.max_files} files.`;
      $("notes").replaceChildren(...info.notes.map((n) => el("div", { class: "note" }, n)));
    } catch (e) {
      $("run").textContent = `cannot read /api/info: ${e.message}`;
    }
  }

  // ---- predict
  const previews = [];
  $("form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const files = $("files").files;
    if (!files.length) { $("status").textContent = "choose one or more images first"; return; }
    const data = new FormData();
    for (const f of files) data.append("files", f, f.name);
    previews.splice(0).forEach((u) => URL.revokeObjectURL(u));
    const local = Array.from(files).map((f) => {
      if (!/^image\/(png|jpeg)$/.test(f.type)) return null;
      const u = URL.createObjectURL(f); previews.push(u); return u;
    });
    $("go").disabled = true;
    $("status").textContent = `predicting ${files.length} file(s)…`;
    $("study").replaceChildren(); $("results").replaceChildren();
    const t0 = performance.now();
    try {
      const res = await getJSON("/api/predict", { method: "POST", body: data });
      $("status").textContent = `${res.n_predicted} of ${res.n_files} file(s) predicted in ` +
        `${((performance.now() - t0) / 1000).toFixed(2)} s`;
      render(res, local);
    } catch (e) {
      $("status").replaceChildren(el("span", { class: "error" }, `error: ${e.message}`));
    } finally {
      $("go").disabled = false;
    }
  });

  function render(res, local) {
    const roles = Object.keys(res.models);
    if (roles.length) {
      const head = el("tr", {}, ...["model", "study probability", "decision", "threshold", "images",
        "predict (ms)", "Grad-CAM (ms)"].map((h) => el("th", {}, h)));
      const rows = roles.map((r) => {
        const m = res.models[r];
        return el("tr", {}, el("td", {}, m.description), el("td", { class: "num" }, fmt(m.study.prob)),
          el("td", {}, decision(m.study.decision)), el("td", { class: "num" }, fmt(m.threshold)),
          el("td", { class: "num" }, m.study.n_images), el("td", { class: "num" }, fmt(m.latency_ms.predict, 1)),
          el("td", { class: "num" }, fmt(m.latency_ms.gradcam, 1)));
      });
      $("study").replaceChildren(el("div", { class: "panel" },
        el("strong", {}, "Study level (mean of the images' probabilities, abnormal if ≥ the model's threshold)"),
        el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
    }
    const notes = res.notes.map((n) => el("div", { class: "note" }, n));
    if (notes.length) $("study").append(el("div", { class: "panel" }, ...notes));
    $("results").replaceChildren(...res.files.map((f, i) => card(f, roles, local[i])));
  }

  function card(f, roles, preview) {
    const c = el("div", { class: "card" }, el("h3", {}, f.name));
    if (!f.ok) { c.append(el("div", { class: "error" }, f.error)); return c; }
    const side = el("div", { class: "side" });
    if (preview) side.append(el("div", {}, el("h4", {}, "upload"), el("img", { src: preview, alt: "uploaded image" })));
    for (const r of roles) {
      const p = f[r];
      const box = el("div", {}, el("h4", {}, r));
      if (p.overlay) box.append(el("img", { src: p.overlay, alt: `${r} Grad-CAM` }));
      box.append(el("div", { class: "kv" }, el("span", {}, "prob"), fmt(p.prob), " ", decision(p.decision)));
      if (p.spread && Object.keys(p.fold_probs).length > 1) {
        box.append(el("div", { class: "kv" }, el("span", {}, "folds"),
          `${fmt(p.spread.min)}–${fmt(p.spread.max)} (sd ${fmt(p.spread.std)})`));
      }
      side.append(box);
    }
    c.append(side, el("div", { class: "note" }, `${f.width} × ${f.height} px`));
    return c;
  }

  // ---- runs
  $("refresh").addEventListener("click", () => loadRuns());
  async function loadRuns() {
    $("runs-table").replaceChildren(el("div", { class: "muted" }, "reading runs…"));
    try {
      const res = await getJSON("/api/runs");
      $("runs-root").textContent = `runs under ${res.root}`;
      const head = el("tr", {}, ...["run", "model", "CV κ (mean ± sd)", "CV AUROC", "holdout κ [95% CI]",
        "holdout AUROC", "threshold", "report", "Optuna study"].map((h) => el("th", {}, h)));
      const rows = res.runs.map((r) => {
        const cv = r.cv || {}, ho = r.holdout || {};
        const link = r.report ? el("a", { href: r.report, target: "_blank", rel: "noopener" }, "report.html") : "–";
        const name = el("td", {}, r.path, r.path && res.current.endsWith(r.path) ? " (served)" : "");
        const study = r.dashboard  // the dashboard is its own server: the link works once the command has started it
          ? el("td", {}, el("a", { href: r.dashboard.url, target: "_blank", rel: "noopener",
                                   title: `start it with: ${r.dashboard.command}` }, "dashboard"),
               el("div", { class: "muted" }, r.dashboard.command))
          : el("td", {}, "–");
        return el("tr", {}, name, el("td", {}, r.model || "–"),
          el("td", { class: "num" }, r.cv ? `${fmt(cv.kappa)} ± ${fmt(cv.kappa_std)}` : "–"),
          el("td", { class: "num" }, fmt(cv.auroc)),
          el("td", { class: "num" }, r.holdout ? `${fmt(ho.kappa)} [${fmt(ho.kappa_low)}, ${fmt(ho.kappa_high)}]` : "–"),
          el("td", { class: "num" }, fmt(ho.auroc)), el("td", { class: "num" }, fmt(ho.threshold)),
          el("td", {}, link), study);
      });
      $("runs-table").replaceChildren(rows.length
        ? el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))
        : el("div", { class: "muted" }, "no runs found"));
    } catch (e) {
      $("runs-table").replaceChildren(el("div", { class: "error" }, `error: ${e.message}`));
    }
  }

  loadInfo();
})();
