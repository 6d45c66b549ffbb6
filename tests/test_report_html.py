"""report.html: one self-contained page per run folder (cv run, evaluate output, distillation study).

One 2-fold × 1-epoch resnet10t cv run is built per module (the cv command writes its page); the distillation page is
checked on a study folder made by hand (a real study costs minutes). Each page must parse, carry the run's numbers to
3 decimals and every plot as a data URI, and reference nothing outside itself but relative links into the folder.
Negative controls: a `<script>` cell is escaped, and the checks flag an external image.
"""
from __future__ import annotations

import base64
import io as stdio
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
import yaml
from PIL import Image

from kd_fracture import cv, evaluate
from kd_fracture.report import html, tables

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


class Page(HTMLParser):
    """Tag nesting, the <title> text and every (tag, attribute, value) of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str, str]] = []
        self.title = ""
        self._in_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self._in_title = tag == "title"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_endtag(self, tag):
        self._in_title = False
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def external(self) -> list[str]:
        """src/href values that leave the page's folder: a scheme other than data:, or a network path."""
        refs = [v for _, k, v in self.attrs if k in ("src", "href")]
        return [v for v in refs if urlsplit(v).scheme not in ("", "data") or v.startswith(("//", "/"))]


def check_page(path: Path, title: str) -> tuple[str, Page]:
    """The page parses with balanced tags, has `title`, no scripts/styles from elsewhere, images only as PNG data URIs
    and relative links to files that exist."""
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert text.startswith("<!DOCTYPE html>")
    assert page.title == title
    assert page.tags.isdisjoint({"script", "link", "iframe", "object", "embed"}), page.tags
    assert page.external() == []
    assert "@import" not in text and "url(" not in text  # CSS pulls nothing in either
    for tag, key, value in page.attrs:
        if key == "src":
            assert tag == "img" and value.startswith("data:image/png;base64,"), value[:60]
        if key == "href":
            assert (path.parent / value).exists(), value
    return text, page


def embedded(text: str, png: Path) -> bool:
    return f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in text


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def cv_run(tiny_phantom, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report_html")
    overrides = {"run_dir": str(tmp / "run"), "data.root": str(tiny_phantom), "data.folds": 2, "data.img_size": 32,
                 "data.manifests_dir": str(tmp / "manifests"), "data.inner_val_frac": 0.2,
                 "model.name": "resnet10t", "train.epochs": 1, "train.batch_size": 16, "train.warmup_epochs": 0,
                 "eval.bootstrap": 50}
    assert cv.main(cli_args(overrides)) == 0
    return tmp / "run"


def test_cv_run_page_is_self_contained_and_carries_the_tables(cv_run):
    text, page = check_page(cv_run / "report.html", "resnet10t — 2-fold patient-grouped cross-validation")
    assert "report.html" in (cv_run / "summary.md").read_text()  # named in the summary's file list

    plots = sorted((cv_run / "plots").glob("*.png"))
    assert {"roc", "pr", "calibration", "confusion", "curves"} <= {p.stem for p in plots}
    assert all(embedded(text, p) for p in plots)
    assert len([v for _, k, v in page.attrs if k == "src"]) == len(plots)

    folds = pd.read_csv(cv_run / "tables" / "cv_folds.csv")
    for k in (0, 1):  # every fold's κ and AUROC, to 3 decimals
        assert html.fmt(folds.loc[k, "kappa"]) in text and html.fmt(folds.loc[k, "auroc"]) in text
    assert f"{folds.loc[0, 'auroc']:.3f}" in text
    scored = folds[~folds["fold"].astype(str).isin(["mean", "std"])]
    assert tables.mean_pm_std(scored["kappa"]) in text  # the CV summary: mean ± std over folds

    holdout = pd.read_csv(cv_run / "tables" / "holdout.csv")
    kappa = holdout[(holdout["model"] == "fold_ensemble") & (holdout["metric"] == "study_kappa")].iloc[0]
    assert tables.ci_text(kappa["value"], kappa["ci_low"], kappa["ci_high"]) in text  # holdout κ [95% CI]
    brier = holdout[(holdout["model"] == "fold_ensemble") & (holdout["metric"] == "study_brier")].iloc[0]["value"]
    assert f"{brier:.3f}" in text

    parts = pd.read_csv(cv_run / "tables" / "per_body_part.csv")
    for r in parts.dropna(subset=["kappa_low", "auroc_low"]).itertuples():  # per body part with its CIs
        assert r.body_part in text
        assert tables.ci_text(r.kappa, r.kappa_low, r.kappa_high) in text
        assert tables.ci_text(r.auroc, r.auroc_low, r.auroc_high) in text


def test_table_cells_are_escaped(cv_run, tmp_path):
    """Negative control of autoescape: a body part named like a script tag is shown as text, never run."""
    run = tmp_path / "run"
    run.mkdir()
    for part in ("config.yaml", "tables", "plots"):
        (shutil.copytree if (cv_run / part).is_dir() else shutil.copy)(cv_run / part, run / part)
    parts = pd.read_csv(run / "tables" / "per_body_part.csv")
    parts.loc[0, "body_part"] = SCRIPT
    parts.to_csv(run / "tables" / "per_body_part.csv", index=False)
    html.write_run_report(run)
    text, page = check_page(run / "report.html", "resnet10t — 2-fold patient-grouped cross-validation")
    assert SCRIPT not in text and ESCAPED in text
    assert "script" not in page.tags


def test_checks_flag_external_assets_and_broken_nesting(tmp_path):
    """Negative control of the checks themselves."""
    bad = Page('<html><head><title>t</title></head><body><img src="https://cdn.example/x.png">'
               '<a href="//example.org/y">y</a><a href="notes.md">ok</a></body></html>')
    assert bad.external() == ["https://cdn.example/x.png", "//example.org/y"]
    assert Page("<div><p>text</div></p>").errors


def test_evaluate_output_gets_its_page(cv_run, tiny_phantom):
    assert evaluate.main(["--run", str(cv_run), "--data", str(tiny_phantom), "--split", "holdout"]) == 0
    (out,) = [p for p in (cv_run / "evaluate").iterdir() if p.name.endswith("_holdout")]
    report = json.loads((out / "metrics.json").read_text())
    split = "holdout split"
    text, page = check_page(out / "report.html", f"{report['model']} on '{report['dataset']}' ({split})")
    plots = sorted((out / "plots").glob("*.png"))
    assert plots and all(embedded(text, p) for p in plots)
    members = pd.read_csv(out / "tables" / "members.csv")
    assert html.fmt(members.loc[0, "kappa"]) in text and html.fmt(members.loc[1, "auroc"]) in text
    ci = report["fold_ensemble"]["ci95"]["kappa"]
    assert tables.ci_text(ci["value"], ci["low"], ci["high"]) in text
    assert "report.html" in (out / "summary.md").read_text()


def png(path: Path, color: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = stdio.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_distill_study_page(tmp_path):
    """A study folder made by hand: teacher_vs_student.csv, paired_vs_no_kd.csv, each variant's search and plots."""
    teacher = tmp_path / "teacher"
    study = teacher / "distill" / "tiny"
    study.mkdir(parents=True)
    (teacher / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet10t"},
                                                         "data": {"root": None, "folds": 2, "img_size": 32}}))
    (study / "config.yaml").write_text(yaml.safe_dump({
        "teacher_run": str(teacher), "student": {"name": "hybrid_t"}, "kd": {"views": 2, "teacher_cache": "views"},
        "search": {"study": "tiny", "n_trials": 2, "metric": "study_auroc"}}))
    base = {"latency_threads": 1, "params_M": 1.2345, "gflops": 0.0123, "latency_ms": 2.5}
    single = {"deployable": "single", "members": 1, "evaluation": "CV scored folds", "kappa": 0.4123,
              "kappa_std": 0.05, "auroc": 0.8, "auroc_std": 0.01, "f1": 0.6, "f1_std": 0.02}
    ensemble = {"deployable": "ensemble", "members": 2, "evaluation": SCRIPT, "kappa": 0.5, "kappa_low": 0.3,
                "kappa_high": 0.7, "auroc": 0.9, "auroc_low": 0.85, "auroc_high": 0.95, "f1": 0.7}
    rows = []
    for model, role, d in (("teacher (resnet10t)", "teacher", 0.1), ("hybrid_t_kd", "student", 0.1),
                           ("hybrid_t_no_kd", "student", None)):
        paired = {} if d is None else {"dkappa": d, "dkappa_std": 0.02, "p_kappa": 0.3, "dauroc": -0.01,
                                       "dauroc_std": 0.005, "p_auroc": 0.51}
        rows += [{"model": model, "role": role, **base, **single, **paired},
                 {"model": model, "role": role, **base, **ensemble}]
    (study / "tables").mkdir()
    pd.DataFrame(rows).to_csv(study / "tables" / "teacher_vs_student.csv", index=False)
    pd.DataFrame([{"model": "hybrid_t_kd", "metric": "study_kappa", "fold": k, "diff": 0.1 + k / 100}
                  for k in (0, 1)]).to_csv(study / "tables" / "paired_vs_no_kd.csv", index=False)
    for i, variant in enumerate(("hybrid_t_kd", "hybrid_t_no_kd")):
        (study / "search" / variant).mkdir(parents=True)
        (study / "search" / variant / "best_params.yaml").write_text(yaml.safe_dump({
            "trial": 1, "value": 0.8764, "params": {"train.lr": 0.000321}, "n_complete": 2, "n_pruned": 0,
            "n_failed": 0, "metric": "study_auroc"}))
        png(study / "search" / variant / "plots" / "optuna_history.png", ("red", "blue")[i])
        (study / "final" / variant).mkdir(parents=True)
        (study / "final" / variant / "report.html").write_text("<!DOCTYPE html><html></html>")
    (study / "summary.md").write_text("# tiny\n")

    path = html.write_distill_report(study)
    assert path == study / "report.html"
    text, page = check_page(path, "Distillation: resnet10t → hybrid_t (2-fold, 32 px)")
    for variant in ("hybrid_t_kd", "hybrid_t_no_kd"):
        assert ("a", "href", f"final/{variant}/report.html") in page.attrs
        assert embedded(text, study / "search" / variant / "plots" / "optuna_history.png")
    assert "0.412 ± 0.050" in text  # single rows: mean ± std over folds
    assert "0.500 [0.300, 0.700]" in text  # ensemble rows: holdout [95% CI]
    assert "+0.100 ± 0.020 (p=0.300)" in text  # paired Δκ vs no-KD
    assert "0.876" in text and "0.110" in text  # the best trial's value, a per-fold difference
    assert SCRIPT not in text and ESCAPED in text
    assert text.index("hybrid_t_kd</h3>") < text.index("hybrid_t_no_kd</h3>")  # the comparison's order


def test_numbers_are_shown_to_three_decimals():
    assert [html.fmt(v) for v in (0.12345, 2, float("nan"), None, "x")] == ["0.123", "2", "—", "—", "x"]
    assert html.fmt(78.0, count=True) == "78" and html.fmt(77.5, count=True) == "77.500"
    t = html.table(pd.DataFrame({"fold": ["0", "mean"], "n_studies": [78.0, 77.5], "kappa@0.5": [0.5, 0.25]}))
    assert t.columns == ["fold", "n studies", "κ@0.5"]
    assert t.rows == [["0", "78", "0.500"], ["mean", "77.500", "0.250"]]
