"""report.html: one self-contained page per run directory, rendered with jinja2 from the files the run holds.

Three page kinds, each written next to the run's summary.md (docs/design.md §4):
- a cv run (`runs/<dataset>/<model>/`) and every distilled variant (`<run>/distill/<study>/final/<variant>/`, the
  same shape): the setup, the headline numbers, the fold, holdout and per-body-part tables and every plot in plots/;
- a distillation study (`<run>/distill/<study>/`): the setup, each variant's search (best trial, its parameters and
  the Optuna plots), tables/teacher_vs_student.csv, tables/paired_vs_no_kd.csv and links to the variants' pages;
- an evaluate output folder (`RUN/evaluate/<dataset>/`): the headline numbers, its metrics, per-body-part and members
  tables and plots.

The page needs nothing but itself: CSS is inline, every PNG is a base64 data URI, there are no scripts, fonts or
other network assets; links point only at files inside the run folder (relative). Everything is read back from the
folder's own files, so a page can be (re)made for any finished folder: `write_run_report(path)`. Numbers are shown
to 3 decimals; table cells are autoescaped.
"""
from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import jinja2
import pandas as pd
import yaml

from kd_fracture import __version__, io
from kd_fracture.report import tables

REPORT = "report.html"
TEMPLATES = Path(__file__).parent / "templates"
DIGITS = 3
PHANTOM_TEXT = "synthetic phantom (not real radiographs)"
PLOT_ORDER = ("roc", "pr", "calibration", "confusion", "curves", "sample_predictions", "gradcam_examples")
"""Plots in this order first (the order summary.md names them), any other PNG of plots/ after them by name."""
COUNT_COLUMNS = {"fold", "members", "trial", "epoch", "latency_threads", "support"}
"""Besides n_*: columns whose whole numbers are counts, shown without decimals."""
CI_METRICS = ("kappa", "auroc", "f1")
NO_VALUE = "—"


# ----------------------------------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True)
class Table:
    """What the `table` macro draws: header labels, rows of display strings, and which columns are numbers."""

    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    name: str
    src: str
    caption: str = ""


@dataclass
class Section:
    heading: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt(value: Any, digits: int = DIGITS, count: bool = False) -> str:
    """One cell: NaN/None → "—", whole numbers of count columns without decimals, other numbers to `digits`."""
    if value is None or isinstance(value, str):
        return NO_VALUE if value is None else value
    kind = getattr(getattr(value, "dtype", None), "kind", "")  # numpy scalars
    if isinstance(value, bool) or kind == "b":
        return str(bool(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return NO_VALUE
    if isinstance(value, int) or kind in ("i", "u") or (count and number.is_integer()):
        return str(int(number))
    return f"{number:.{digits}f}"


def ci_cell(value: Any, low: Any, high: Any) -> str:
    """value [low, high], or the value alone when the interval is missing."""
    if any(_missing(v) for v in (low, high)) or _missing(value):
        return fmt(value)
    return tables.ci_text(float(value), float(low), float(high), DIGITS)


def label(column: str) -> str:
    """Header text of a CSV column: κ for kappa, AUROC for auroc, …, the @0.5 suffix kept."""
    base, at, cut = str(column).partition("@")
    level = ""
    for prefix in ("study_", "image_"):
        if base.startswith(prefix) and base[len(prefix):] in tables.METRIC_LABELS:
            level, base = prefix.replace("_", " "), base[len(prefix):]
    text = tables.METRIC_LABELS.get(base, base.replace("_", " "))
    return f"{level}{text}{at}{cut}"


def table(df: pd.DataFrame, caption: str = "", labels: bool = True) -> Table:
    """A DataFrame as display strings (numbers to 3 decimals); the cells stay text, escaped by the template."""
    columns = [str(c) for c in df.columns]
    counts = [c.startswith("n_") or c in COUNT_COLUMNS for c in columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    rows = [[fmt(v, count=counts[i]) for i, v in enumerate(row)] for row in df.itertuples(index=False, name=None)]
    return Table([label(c) if labels else c for c in columns], rows, numeric, caption)


def with_ci(df: pd.DataFrame, metrics: Iterable[str] = CI_METRICS) -> pd.DataFrame:
    """`<m>` → "value [low, high]" text where `<m>_low`/`<m>_high` columns exist (those columns dropped)."""
    df = df.copy()
    for m in metrics:
        lo, hi = f"{m}_low", f"{m}_high"
        if m in df and lo in df and hi in df:
            df[m] = [ci_cell(v, a, b) for v, a, b in zip(df[m], df[lo], df[hi])]
            df = df.drop(columns=[lo, hi])
    return df


def image(path: Path, caption: str = "") -> Image:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return Image(Path(path).stem.replace("_", " "), f"data:image/png;base64,{data}", caption)


def plot_images(folder: Path) -> list[Image]:
    """Every PNG in `folder` (PLOT_ORDER first), embedded."""
    order = {name: i for i, name in enumerate(PLOT_ORDER)}
    paths = sorted(Path(folder).glob("*.png"), key=lambda p: (order.get(p.stem, len(order)), p.name))
    return [image(p) for p in paths]


def links(root: Path, candidates: Iterable[str]) -> list[dict]:
    """Relative links to those of `candidates` (paths or globs under root) that exist."""
    out: list[dict] = []
    for pattern in candidates:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in {link["href"] for link in out}:
                out.append({"href": rel, "text": rel})
    return out


def read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if Path(path).is_file() else None


def read_yaml(path: Path) -> dict:
    return (yaml.safe_load(Path(path).read_text()) or {}) if Path(path).is_file() else {}


def _missing(value: Any) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _get(mapping: dict, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


# ----------------------------------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                              autoescape=jinja2.select_autoescape(["html", "j2"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(version=__version__, **context)


def _write(folder: Path, text: str) -> Path:
    return io.write_text(Path(folder) / REPORT, text)


# ----------------------------------------------------------------------------------------------------------------------
# a cv run (and a distilled variant, the same shape)


def holdout_lookup(holdout: pd.DataFrame | None, model: str = "fold_ensemble") -> dict[str, tuple]:
    """metric → (value, ci_low, ci_high) of one model of a holdout-shaped long table."""
    if holdout is None:
        return {}
    rows = holdout[holdout["model"] == model] if "model" in holdout else holdout
    return {r.metric: (r.value, r.ci_low, r.ci_high) for r in rows.itertuples()}


def headline(values: dict[str, tuple], cv: pd.DataFrame | None = None, what: str = "Holdout") -> list[dict]:
    """The summary numbers: CV κ/AUROC mean ± std over folds, then the holdout-shaped figures with their CIs."""
    items = []
    if cv is not None and "fold" in cv:
        folds = cv[~cv["fold"].astype(str).isin(["mean", "std"])]
        items += [{"label": "CV study κ (mean ± std over folds)", "value": tables.mean_pm_std(folds["kappa"])},
                  {"label": "CV study AUROC (mean ± std over folds)", "value": tables.mean_pm_std(folds["auroc"])}]

    def ci(metric: str) -> str:
        return ci_cell(*values[metric]) if metric in values else NO_VALUE

    items += [{"label": f"{what} study κ [95% CI]", "value": ci("study_kappa")},
              {"label": f"{what} study AUROC [95% CI]", "value": ci("study_auroc")},
              {"label": f"{what} κ at 0.5", "value": fmt(values.get("study_kappa@0.5", (None,))[0])},
              {"label": f"{what} Brier / ECE / AUPRC",
               "value": " / ".join(fmt(values.get(f"study_{m}", (None,))[0]) for m in ("brier", "ece", "auprc"))}]
    return items


def holdout_display(holdout: pd.DataFrame) -> pd.DataFrame:
    """The long holdout table with readable metric names and the CI as one "[low, high]" column."""
    return pd.DataFrame({
        **({"model": holdout["model"]} if "model" in holdout else {}),
        "metric": [label(m) for m in holdout["metric"]],
        "value": holdout["value"],
        "95% CI": [NO_VALUE if _missing(lo) or _missing(hi) else f"[{fmt(lo)}, {fmt(hi)}]"
                   for lo, hi in zip(holdout["ci_low"], holdout["ci_high"])],
    })


def run_context(path: Path) -> dict:
    path = Path(path).absolute()  # "." has no name and no parents
    cfg = read_yaml(path / "config.yaml")
    model = _get(cfg, "model.name", path.name)
    folds = _get(cfg, "data.folds")
    variant = path.parent.name == "final"  # <run>/distill/<study>/final/<variant>/
    what = f"{folds}-fold patient-grouped cross-validation" if folds else "cross-validation"
    title = f"{path.name} ({model}) — {what}" if variant else f"{model} — {what}"
    cv = read_csv(path / "tables" / "cv_folds.csv")
    holdout = read_csv(path / "tables" / "holdout.csv")
    values = holdout_lookup(holdout)
    facts = [{"label": "Run folder", "value": str(path)},
             {"label": "Data", "value": _get(cfg, "data.root") or PHANTOM_TEXT},
             {"label": "Image size", "value": fmt(_get(cfg, "data.img_size"))},
             {"label": "Seeds", "value": f"training seed {fmt(_get(cfg, 'train.seed'))}, "
                                         f"fold seed {fmt(_get(cfg, 'data.fold_seed'))}"}]
    if variant:
        facts.insert(1, {"label": "Distilled variant", "value": f"{path.name} of study {path.parent.parent.name}"})
    notes = []
    rule = _get(cfg, "eval.threshold_rule")
    if rule and cv is not None and "threshold" in cv and "threshold" in values:
        fold_thresholds = cv.loc[~cv["fold"].astype(str).isin(["mean", "std"]), "threshold"].astype(float)
        notes.append(tables.threshold_note(rule, fold_thresholds, float(values["threshold"][0])).replace("`", ""))

    sections = []
    if cv is not None:
        sections.append(Section("Per fold", [table(cv, "study-level metrics of each fold's scored studies; mean and "
                                                       "std (ddof 1) over folds")]))
    if holdout is not None:
        sections.append(Section("Holdout", [table(holdout_display(holdout), "study-level metrics, 95% bootstrap CI "
                                                                            "over patients", labels=False)]))
    parts = read_csv(path / "tables" / "per_body_part.csv")
    if parts is not None:
        sections.append(Section("Per body part", [table(with_ci(parts), "study-level metrics per body part; κ and "
                                                                        "AUROC of the holdout with 95% CI")]))
    report = read_csv(path / "holdout" / "classification_report.csv")
    if report is not None:
        sections.append(Section("Holdout classification report", [table(report, "study level", labels=False)]))
    return {"title": title, "facts": facts, "headline": headline(values, cv), "notes": notes, "sections": sections,
            "plots": plot_images(path / "plots"),
            "files": links(path, ["summary.md", "config.yaml", "env.json", "folds.csv", "tables/*.csv",
                                  "holdout/metrics.json", "holdout/predictions*.csv"])}


def write_run_report(path: str | Path) -> Path:
    """`path`/report.html of a cv run or a distilled variant (final/<variant>/)."""
    return _write(Path(path), render("cv.html.j2", **run_context(Path(path))))


# ----------------------------------------------------------------------------------------------------------------------
# a distillation study


def teacher_vs_student_display(df: pd.DataFrame) -> pd.DataFrame:
    """tables/teacher_vs_student.csv as report.distill shows it: single rows mean ± std (with the paired Δ and p),
    ensemble rows holdout value [95% CI]."""

    def get(row: dict, key: str) -> Any:
        return row.get(key, math.nan)

    def metric(row: dict, m: str) -> str:
        if row.get("deployable") == "single":
            return f"{fmt(get(row, m))} ± {fmt(get(row, m + '_std'))}" if not _missing(get(row, m)) else NO_VALUE
        return ci_cell(get(row, m), get(row, m + "_low"), get(row, m + "_high"))

    def delta(row: dict, m: str) -> str:
        value = get(row, f"d{m}")
        if row.get("deployable") != "single" or _missing(value):
            return NO_VALUE
        return f"{float(value):+.{DIGITS}f} ± {fmt(get(row, f'd{m}_std'))} (p={fmt(get(row, f'p_{m}'))})"

    rows = df.to_dict("records")
    return pd.DataFrame({
        "model": [r.get("model", "") for r in rows],
        "deployable": [f"{r.get('deployable', '')} ({fmt(get(r, 'members'), count=True)})" for r in rows],
        "params (M)": [get(r, "params_M") for r in rows], "GFLOPs": [get(r, "gflops") for r in rows],
        "CPU ms/img": [get(r, "latency_ms") for r in rows], "scored on": [r.get("evaluation", "") for r in rows],
        "study κ": [metric(r, "kappa") for r in rows], "AUROC": [metric(r, "auroc") for r in rows],
        "F1": [metric(r, "f1") for r in rows],
        "Δκ vs no-KD": [delta(r, "kappa") for r in rows], "ΔAUROC vs no-KD": [delta(r, "auroc") for r in rows],
    })


def search_section(study: Path, variant: str, metric: str) -> dict:
    """One variant's search: best trial line, its parameters, its Optuna plots, and the link to its final page."""
    best = read_yaml(study / "search" / variant / "best_params.yaml")
    if best:
        line = (f"{best.get('n_complete', 0)} complete, {best.get('n_pruned', 0)} pruned, {best.get('n_failed', 0)} "
                f"failed trials; best trial {best.get('trial')}, inner-val {best.get('metric', metric)} "
                f"{fmt(best.get('value'))}.")
        chosen = best.get("params") or {}  # hyper-parameters span decades (lr): 4 significant digits, not 3 decimals
        params = pd.DataFrame({"parameter": list(chosen),
                               "value": [f"{v:.4g}" if isinstance(v, float) else fmt(v) for v in chosen.values()]})
    else:
        line, params = "No search (config defaults).", None
    final = study / "final" / variant
    return {"name": variant, "line": line,
            "params": table(params, "best trial's parameters", labels=False) if params is not None and len(params)
            else None,
            "plots": plot_images(study / "search" / variant / "plots"),
            "link": f"final/{variant}/{REPORT}" if final.is_dir() else None}


def distill_variants(study: Path, comparison: pd.DataFrame | None) -> list[str]:
    """Variant folder names in the comparison table's order, then any other final/ or search/ folder by name."""
    found = {p.name for sub in ("final", "search") for p in (study / sub).glob("*")
             if p.is_dir() and not p.name.endswith(".old")}
    ordered = [] if comparison is None else [m for m in dict.fromkeys(comparison.get("model", [])) if m in found]
    return ordered + sorted(found - set(ordered))


def distill_context(path: Path) -> dict:
    path = Path(path).absolute()  # "." has no name and no parents
    cfg = read_yaml(path / "config.yaml")
    teacher_path = Path(_get(cfg, "teacher_run") or path.parent.parent)
    teacher_cfg = read_yaml(path.parent.parent / "config.yaml") or read_yaml(teacher_path / "config.yaml")
    teacher_model = _get(teacher_cfg, "model.name", "teacher")
    student = _get(cfg, "student.name", "student")
    folds, img = _get(teacher_cfg, "data.folds"), _get(teacher_cfg, "data.img_size")
    shape = ", ".join(s for s in (f"{folds}-fold" if folds else "", f"{img} px" if img else "") if s)
    title = f"Distillation: {teacher_model} → {student}" + (f" ({shape})" if shape else "")
    metric = _get(cfg, "search.metric", "metric")
    facts = [{"label": "Study folder", "value": str(path)},
             {"label": "Teacher run", "value": str(teacher_path)},
             {"label": "Data", "value": _get(teacher_cfg, "data.root") or PHANTOM_TEXT},
             {"label": "Search", "value": f"study {_get(cfg, 'search.study', path.name)}, "
                                          f"{fmt(_get(cfg, 'search.n_trials'))} trials per variant, ranked by "
                                          f"{metric} on the search folds' inner-validation splits"},
             {"label": "KD", "value": f"{fmt(_get(cfg, 'kd.views'))} cached augmented views per image, replayed"
                                      if _get(cfg, "kd.teacher_cache", "views") == "views" else
                                      "teacher run online every step (kd.teacher_cache: none)"}]
    comparison = read_csv(path / "tables" / "teacher_vs_student.csv")
    sections = []
    if comparison is not None:
        sections.append(Section("Teacher vs. students", [table(teacher_vs_student_display(comparison), labels=False)],
                                ["single = one fold model: its cost, and mean ± std of its scored-fold metrics over "
                                 "the K folds; ensemble = the K fold models' mean probability: K× the parameters and "
                                 "FLOPs, its own measured latency, and the holdout with 95% bootstrap CIs over "
                                 "patients. Δ = this model − the no-KD student on the same folds; p = two-sided "
                                 "corrected resampled t-test (Nadeau & Bengio 2003)."]))
    paired = read_csv(path / "tables" / "paired_vs_no_kd.csv")
    if paired is not None:
        if "metric" in paired:
            paired = paired.assign(metric=[label(m) for m in paired["metric"]])
        sections.append(Section("Per-fold differences vs. no-KD", [table(paired, "model − no-KD student, per fold",
                                                                         labels=False)]))
    export = json.loads((path / "export.json").read_text()) if (path / "export.json").is_file() else {}
    exports = []
    for file, info in export.items() if isinstance(export, dict) else ():
        if not isinstance(info, dict):
            continue
        check = (f"max |torch − onnxruntime| = {info['max_abs_diff']:.2e} ({'ok' if info.get('ok') else 'TOO LARGE'})"
                 if info.get("checked") and "max_abs_diff" in info else f"not checked: {info.get('reason', '')}")
        exports.append(f"{file}: {info.get('model', '')}, opset {info.get('opset', NO_VALUE)}; {check}")
    searches = [search_section(path, v, metric) for v in distill_variants(path, comparison)]
    return {"title": title, "facts": facts, "sections": sections, "searches": searches, "exports": exports,
            "files": links(path, ["summary.md", "config.yaml", "env.json", "tables/*.csv", "export.json", "*.onnx",
                                  "search/*/trials.csv", "search/*/best_params.yaml"])}


def write_distill_report(path: str | Path) -> Path:
    """`path`/report.html of a distillation study folder (`<run>/distill/<study>/`)."""
    return _write(Path(path), render("distill.html.j2", **distill_context(Path(path))))


# ----------------------------------------------------------------------------------------------------------------------
# an evaluate output folder


def evaluate_context(path: Path) -> dict:
    path = Path(path).absolute()  # "." has no name and no parents
    report = json.loads((path / "metrics.json").read_text())
    name = next((k for k in report if k.startswith("fold_") and isinstance(report[k], dict)), None)
    res = report.get(name, {}) if name else {}
    ci = res.get("ci95", {})
    values = {f"study_{m}": (band.get("value"), band.get("low"), band.get("high")) for m, band in ci.items()
              if isinstance(band, dict)}
    for m in ("brier", "ece", "auprc"):
        values[f"study_{m}"] = (_get(res, f"study.{m}"), None, None)
    values["study_kappa@0.5"] = (_get(res, "at_0.5.study.kappa"), None, None)
    split = report.get("split", "all")
    title = f"{report.get('model', 'model')} on '{report.get('dataset', path.name)}' " \
            f"({'all splits' if split == 'all' else split + ' split'})"
    facts = [{"label": "Data", "value": f"{report.get('data_root', NO_VALUE)} ({report.get('source', NO_VALUE)}), "
                                        f"{fmt(res.get('n_images'))} images, {fmt(res.get('n_studies'))} studies"},
             {"label": "Run", "value": str(report.get("run", NO_VALUE))},
             {"label": "Threshold", "value": f"{fmt(res.get('threshold'))} ({report.get('threshold_source', '')})"},
             {"label": "Image AUROC", "value": fmt(_get(res, "image.auroc"))},
             {"label": "Manifest sha256", "value": str(report.get("manifest_sha256", NO_VALUE))}]
    sections = []
    metrics = read_csv(path / "tables" / "metrics.csv")
    if metrics is not None:
        sections.append(Section("Metrics", [table(holdout_display(metrics), "study-level metrics, 95% bootstrap CI "
                                                                            "over studies", labels=False)]))
    parts = read_csv(path / "tables" / "per_body_part.csv")
    if parts is not None:
        sections.append(Section("Per body part", [table(with_ci(parts), "study-level metrics per body part, 95% CI")]))
    members = read_csv(path / "tables" / "members.csv")
    if members is not None:
        sections.append(Section("Each fold model alone", [table(members, "each member at its own threshold")]))
    cr = read_csv(path / "classification_report.csv")
    if cr is not None:
        sections.append(Section("Classification report", [table(cr, "study level", labels=False)]))
    return {"title": title, "facts": facts, "headline": headline(values, what="Dataset"), "notes": [],
            "sections": sections, "plots": plot_images(path / "plots"),
            "files": links(path, ["summary.md", "metrics.json", "predictions.csv", "tables/*.csv"])}


def write_evaluate_report(path: str | Path) -> Path:
    """`path`/report.html of an evaluate output folder (`RUN/evaluate/<dataset>/`)."""
    return _write(Path(path), render("evaluate.html.j2", **evaluate_context(Path(path))))
