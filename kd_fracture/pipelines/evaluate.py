"""`python -m kd_fracture.evaluate --run runs/NAME --data ROOT`: judge a run's models on another dataset.

The data source is any the project reads (`load_source`): MURA v1.1 CSVs or a synthetic phantom tree, the folder
layout with any of its splits (a folder with only `test/` is fine: scoring needs no training split), or a flat
folder of images labelled by their folder names (`fractured/`, `not_fractured/`, MURA `studyN_positive/`), scored as
one holdout split. The models, image size, image decoding rules and eval transform come from the run directory. By
default every image of the dataset is scored — its CV pool and its holdout split alike, since none of it was seen in
training when the dataset is a different one (`--split holdout|train` narrows that). Output, by default in `runs/NAME/evaluate/<dataset>/`, has
the holdout's shape (docs/design.md §4, §6):

    predictions.csv  metrics.json  classification_report.{txt,csv}  summary.md  report.html
    tables/  metrics.{csv,md,tex} (study-level, 95% bootstrap CI)  per_body_part.*  members.* (each fold model)
    plots/   roc.png  pr.png  calibration.png  confusion.png  sample_predictions.png  gradcam_examples.png

κ, sensitivity, specificity and F1 are at the run's threshold (`runs.models.load_run_models`: the mean of the fold
thresholds chosen on the inner-validation splits, or fold k's for `--fold k`; each member alone at its own) and at
0.5 (`at_0.5`, `@0.5` rows and columns).

    python -m kd_fracture.evaluate --run runs/phantom/resnet50 --data /data/MURA
    python -m kd_fracture.evaluate --run runs/phantom/resnet50 --model student --data /data/fractures --split holdout
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from kd_fracture import io
from kd_fracture.data.inputs import load_labelled_folder
from kd_fracture.data.loaders import SharedCache
from kd_fracture.data.manifest import SPLITS, Manifest, detect_source, load_folder, load_mura
from kd_fracture.errors import UserError
from kd_fracture.report import aggregate, figures, html, plots, tables
from kd_fracture.runs import scoring
from kd_fracture.runs.models import RunModels
from kd_fracture.train import engine

SPLIT_CHOICES = (*SPLITS, "all")


def load_source(data: str | Path, verify_images: bool = False, name: str | None = None) -> Manifest:
    """The dataset at `data`: a MURA root; a folder layout with whichever of train/, val/, test/ it has; else any
    folder of images labelled by folder names (`inputs.load_labelled_folder`, all in the holdout split)."""
    source, root = detect_source(Path(data), flat=True)
    if source == "mura":
        return load_mura(root, verify_images=verify_images, name=name)
    if source == "folder":
        return load_folder(root, verify_images=verify_images, name=name, need_splits=())
    return load_labelled_folder(root, verify_images=verify_images, name=name)


def select_rows(manifest: Manifest, split: str) -> pd.DataFrame:
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLIT_CHOICES)}")
    rows = manifest.df if split == "all" else manifest.split(split)
    if rows.empty:
        raise UserError(f"{manifest.root}: the {split} split has no images; choose another --split")
    return rows.reset_index(drop=True)


def default_out(run_path: str | Path, dataset: str, split: str, models: RunModels) -> Path:
    """runs/NAME/evaluate/<dataset>[_<split>][_student][_fold<k>]/ (the plain name for the default teacher run)."""
    name = dataset + ("" if split == "all" else f"_{split}") + ("" if models.role == "teacher" else f"_{models.role}")
    if len(models.members) == 1:
        name += f"_fold{models.members[0]}"
    return Path(run_path) / "evaluate" / name


def evaluate_dataset(models: RunModels, manifest: Manifest, split: str, out: Path, device: torch.device,
                     run_sha256: str | None = None) -> dict:
    """Score `models` on the `split` rows of `manifest` and write the holdout-shaped report into `out`.

    Returns the metrics.json content. `run_sha256` is the manifest hash of the data the run trained on (env.json);
    when it equals this manifest's, the CV pool images were training images and a warning says so.
    """
    cfg = models.cfg
    rows = select_rows(manifest, split)
    scope = {"all": "all images (CV pool + holdout splits)", "train": "the CV pool split",
             "holdout": "the holdout split"}[split]
    narrow = "; --split holdout|train narrows this" if split == "all" else ""
    engine.log(f"{models.description}: scoring {scope} of dataset '{manifest.name}' — {len(rows)} images, "
               f"{rows['study_id'].nunique()} studies{narrow}")
    if run_sha256 == manifest.sha256() and split != "holdout":
        engine.log(f"warning: '{manifest.name}' is the dataset this run was trained on; its CV-pool images were "
                   "training images, so these scores are optimistic — use --split holdout")

    pred = models.predict(rows, manifest, device, SharedCache(manifest.root, cfg.data.img_size, cfg.data.cache_images))
    name = "fold_ensemble" if len(models.members) > 1 else f"fold_{models.members[0]}"
    result, ci = aggregate.score(cfg, pred)
    member_pred = {k: pred.assign(prob=pred[f"prob_fold{k}"]) for k in models.members}
    member_cut = {k: scoring.fold_threshold(models.run.path, k) for k in models.members}  # None: not recorded
    member_results = {k: scoring.evaluate_at(p, cfg.eval.threshold if member_cut[k] is None else member_cut[k],
                                             cfg.eval.threshold_rule) for k, p in member_pred.items()}
    report = {"run": str(models.run.path), "model": models.description, "dataset": manifest.name,
              "data_root": str(manifest.root), "source": manifest.source, "split": split,
              "manifest_sha256": manifest.sha256(), "threshold_source": models.threshold_source,
              name: {**result, "ci95": ci},
              "members": {str(k): r for k, r in member_results.items()}}

    io.write_csv(out / "predictions.csv", pred)
    io.write_json(out / "metrics.json", report)
    written = aggregate.write_classification_report(pred, cfg.eval.threshold, out)
    written += tables.write_table(tables.holdout_table({name: (result, ci)}), out / "tables" / "metrics",
                                     f"{manifest.name}: study-level metrics with 95% bootstrap CI")
    written += tables.write_table(tables.per_body_part_table({manifest.name: result}),
                                     out / "tables" / "per_body_part", "Study-level metrics per body part")
    members_table = tables.cv_fold_table(member_results)
    written += tables.write_table(members_table, out / "tables" / "members",
                                     f"{manifest.name}: each fold model alone")
    written += [plots.plot_roc(member_pred if len(member_pred) > 1 else {}, pred, out / "plots" / "roc.png"),
                plots.plot_pr(member_pred if len(member_pred) > 1 else {}, pred, out / "plots" / "pr.png"),
                plots.plot_calibration({}, pred, out / "plots" / "calibration.png"),
                plots.plot_confusion({f"{manifest.name} ({name})": result["confusion"]},
                                         out / "plots" / "confusion.png")]

    written += figures.example_plots(models, pred, manifest.root, out / "plots", device)
    write_summary(out, report, name, members_table, [*written, out / html.REPORT])
    html.write_evaluate_report(out)
    return report


def write_summary(out: Path, report: dict, name: str, members_table: pd.DataFrame, written: list[Path]) -> Path:
    res, ci = report[name], report[name]["ci95"]
    per_part = tables.per_body_part_table({report["dataset"]: res}).drop(columns="evaluation")
    text = "\n".join([
        f"# {report['model']} on '{report['dataset']}' "
        f"({'all splits' if report['split'] == 'all' else report['split'] + ' split'})",
        "",
        f"Data: `{report['data_root']}` ({report['source']}), {res['n_images']} images, {res['n_studies']} studies. "
        f"Run: `{report['run']}`.",
        "",
        f"**Study κ {tables.ci_text(ci['kappa']['value'], ci['kappa']['low'], ci['kappa']['high'])}**, "
        f"study AUROC {tables.ci_text(ci['auroc']['value'], ci['auroc']['low'], ci['auroc']['high'])} "
        f"(95% bootstrap CI over patients); image AUROC {res['image']['auroc']:.3f}.  ",
        f"Threshold {res['threshold']:.3f} ({report['threshold_source']}); κ at 0.5: "
        f"{res[scoring.AT_REFERENCE]['study']['kappa']:.3f}. Calibration: Brier {res['study']['brier']:.3f}, "
        f"ECE {res['study']['ece']:.3f}; AUPRC {res['study']['auprc']:.3f}.",
        "",
        "## Per body part", "", per_part.round(3).to_markdown(index=False), "",
        "## Each fold model alone", "", members_table.round(3).to_markdown(index=False), "",
        "## Files", "", tables.markdown_link_list(out, written), "",
    ])
    return io.write_text(out / "summary.md", text)
