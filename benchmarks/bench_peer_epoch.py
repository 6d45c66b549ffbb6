"""Benchmark 7, `peer_epoch`: a kd_fracture `cv` epoch against a plain seed-style loop (training images/s), and
`checkpoint_overhead`: the share of that epoch spent writing checkpoints, state and history."""
from __future__ import annotations

import shutil
import statistics
import time

import numpy as np
from common import CallTimer, Context, Figure, Result, paired, ratio_median, torch_seed

import plain_loop


def run(ctx: Context) -> Result:
    """Per image size, two arms on the same images and batch size, alternated (A B, B A, A B):

    kd_fracture: one epoch of `cv`'s fold trainer as `cv.train_fold` calls it (`fold.train_and_score_fold` →
    `engine.fit`, `train.epochs` = 1): CVConfig's defaults (train, aug, data; ResNet-50 on 3 replicated
    channels, AdamW, grad clip, channels_last, `train.precision`, inner validation with study-level metrics, the
    checkpoint written every epoch (checkpoint: last), history.csv, state_last.pt when `state_interval_min` is due),
    the project's loader with its decoded-image cache (built before the epoch, as a run builds it once), the task
    `cv` builds. The model starts from random init (`model.pretrained: none`): start weights do not change an
    epoch's cost, and the default phantom pretraining would take far longer than the benchmark. The epoch is timed
    from the start of `train_one_epoch` to fit's `epoch_callback` (train + inner val + every write of the epoch);
    the fold's scoring after fit is not part of an epoch and is not run.

    plain: `plain_loop.py` — PIL decode per access, albumentations, timm ResNet-50, Adam, BCE, a validation pass on
    the same inner-validation images, no checkpoints.

    Figure per size: kd_fracture training images/s ÷ the plain loop's (both count only training images; both
    epochs include their validation pass), median over repeats of the per-repeat ratio. The kd arm runs the whole
    fold trainer (`fold.train_and_score_fold`, one epoch), whose scoring of 8 images afterwards is not timed.
    checkpoint_overhead: seconds inside `checkpoint.save_weights` / `save_state` and kd_fracture.io writes during
    the kd arm's epochs ÷ those epochs' seconds, at the first (default, 64 px) size.
    """
    s, res = ctx.settings, Result()
    shares: dict[int, dict] = {}
    for size, n_train, n_val in zip(s.peer_sizes, s.peer_train_images, s.peer_val_images):
        out = _peer_arms(ctx, size, n_train, n_val)
        times, kd, plain = out["times"], out["kd"], out["plain"]
        ratio = ratio_median(times["plain"], times["kd"])  # same training images: images/s ratio = time ratio
        kd_s, plain_s = statistics.median(times["kd"]), statistics.median(times["plain"])
        res.figures.append(Figure(
            f"peer_epoch_{size}", f"training epoch vs a plain loop, {s.teacher} {size} px", ratio, 1.25, ">=",
            "× (kd_fracture ÷ plain images/s)",
            meaning=f"a kd_fracture cv epoch trains this multiple of a plain PIL + albumentations + timm loop's "
                    f"training images per second ({size} px, inner validation and checkpoints included)",
            details={"kd_images_per_s": n_train / kd_s, "plain_images_per_s": n_train / plain_s,
                     "kd_epoch_s": kd_s, "plain_epoch_s": plain_s,
                     "kd_train_phase_s": statistics.median(kd["train_s"]),
                     "plain_train_phase_s": statistics.median(plain["train_s"]),
                     "train_phase_ratio": ratio_median(plain["train_s"], kd["train_s"]),
                     "kd_writes_s": statistics.median(kd["write_s"]),
                     "train_images": n_train, "val_images": n_val, "batch": out["batch"],
                     "eval_batch": out["eval_batch"], "precision": out["precision"],
                     "images": f"first {n_train + n_val} rows of the benchmark phantom's CV pool "
                               f"({s.phantom_patients} patients, {s.phantom_size}-px PNGs; cycled when the pool is "
                               f"smaller): {n_train} train, {n_val} inner-val, the same in both arms",
                     "model": s.teacher, "num_workers": s.num_workers, "cache_build_s": out["cache_build_s"],
                     "per_repeat": {"kd_s": times["kd"], "plain_s": times["plain"]}}))
        res.measure(f"{size} px: kd_fracture training images/s", n_train / kd_s, "images/s")
        res.measure(f"{size} px: plain loop training images/s", n_train / plain_s, "images/s")
        shares[size] = out
    first = s.peer_sizes[0]
    out = shares[first]
    kd = out["kd"]
    share = statistics.median(w / e for w, e in zip(kd["write_s"], out["times"]["kd"]))
    res.figures.append(Figure(
        "checkpoint_overhead", f"checkpoint/state/history writes, share of a cv epoch ({first} px)", share, 0.05,
        "<=", "fraction of epoch time",
        meaning="the share of a default kd_fracture cv epoch spent writing checkpoint_best, state_last, history.csv "
                "and their sidecars",
        details={"write_s_per_epoch": statistics.median(kd["write_s"]), "epoch_s": statistics.median(
                     out["times"]["kd"]),
                 "by_writer_s": out["by_writer"], "calls_per_epoch": out["calls"],
                 "state_last_pt": out["state"], "img_size": first, "train_images": s.peer_train_images[0],
                 "wrapped": out["wrapped"], "not_found": out["missing"],
                 "note": "per-epoch writes are fixed in size, so their share shrinks as the epoch grows: an "
                         "epoch smaller than a default fold's (≈ 680 training images on the default phantom) "
                         "overstates it"}))
    for size, o in shares.items():
        res.measure(f"{size} px: writes per kd_fracture epoch", statistics.median(o["kd"]["write_s"]), "s")
    st = out["state"]
    res.measure("state_last.pt: one write (model + optimizer state)", st["write_s"], "s")
    res.measure("state_last.pt: size", st["bytes"] / 1e6, "MB")
    res.measure("state_last.pt: amortised share at train.state_interval_min", st["amortised_share"], "fraction")
    return res


def _peer_arms(ctx: Context, size: int, n_train: int, n_val: int) -> dict:
    import torch

    from kd_fracture import io
    from kd_fracture.config import CVConfig, DataConfig, ModelConfig, replace
    from kd_fracture.data.loaders import FoldRows, SharedCache, build_loader
    from kd_fracture.pipelines import fold
    from kd_fracture.pipelines.fold import fold_seed
    from kd_fracture.runs.models import build_model
    from kd_fracture.train import checkpoint, engine, tasks

    s = ctx.settings
    base = CVConfig()
    cfg = CVConfig(data=DataConfig(img_size=size, num_workers=s.num_workers),
                   model=ModelConfig(name=s.teacher, pretrained="none"))
    batch, eval_batch = base.train.batch_size, base.train.eval_batch_size
    batch = min(batch, max(2, n_train // 2))  # --quick: tiny sets still make ≥ 2 steps
    train_cfg = replace(cfg.train, epochs=1, batch_size=batch)
    rows = ctx.train_rows(n_train + n_val)
    train_rows, val_rows = rows.iloc[:n_train].reset_index(drop=True), rows.iloc[n_train:].reset_index(drop=True)
    manifest, device = ctx.manifest, torch.device("cpu")
    seed = fold_seed(train_cfg.seed, 0)
    t0 = time.perf_counter()
    cache = SharedCache(manifest.root, size, cfg.data.cache_images)
    for r in (train_rows, val_rows):
        cache.for_rows(r)  # a run decodes its images once, before fold 0's first epoch
    cache_build_s = time.perf_counter() - t0

    def kd_loader(r, train: bool):  # cv.train_fold's loader
        return build_loader(r, manifest, cfg.data, cfg.aug, train=train, in_chans=cfg.model.in_chans,
                            batch_size=train_cfg.batch_size if train else train_cfg.eval_batch_size, seed=seed,
                            cache=cache)

    def make_task():  # cv.train_fold's task
        return tasks.SupervisedTask(loss=train_cfg.loss,
                                    pos_weight=tasks.resolve_pos_weight(train_cfg.pos_weight, train_rows["label"]),
                                    label_smoothing=train_cfg.label_smoothing, mixup=tasks.make_mixup(train_cfg))

    writes = CallTimer([(checkpoint, "save_weights", "checkpoint_best"), (engine, "save_weights", "checkpoint_best"),
                        (checkpoint, "save_state", "state_last"), (engine, "save_state", "state_last"),
                        (checkpoint, "write_sidecar", "sidecars"),
                        *[(io, name, "history/json/other") for name in
                          ("write_csv", "write_json", "write_text", "write_yaml", "write_bytes")]])
    kd: dict[str, list] = {"train_s": [], "write_s": []}
    plain: dict[str, list] = {"train_s": []}
    by_writer: list[dict] = []
    calls: list[dict] = []
    runs = iter(range(10**6))

    def kd_epoch(train_subset=None, val_subset=None) -> float:
        """One default cv fold of one epoch (`fold.train_and_score_fold` → `engine.fit`) in a fresh folder; returns
        the epoch's seconds (train_one_epoch start → epoch_callback) and records the train phase and the writes."""
        tr = train_rows if train_subset is None else train_subset
        va = val_rows if val_subset is None else val_subset
        out_dir = ctx.work / f"peer_{size}_{next(runs)}"
        engine.seed_everything(seed)
        model = build_model(cfg.model, size)  # built before the fold trainer seeds, so outside its window
        marks: dict[str, float] = {}
        original = engine.train_one_epoch

        def timed_train(*args, **kwargs):
            marks["start"] = time.perf_counter()
            writes.reset()
            try:
                return original(*args, **kwargs)
            finally:
                marks["train_end"] = time.perf_counter()

        def at_epoch_end(epoch: int, row: dict) -> None:
            marks["end"] = time.perf_counter()
            marks["write_s"] = writes.total
            marks["by_writer"], marks["calls"] = dict(writes.seconds), dict(writes.calls)

        engine.train_one_epoch = timed_train
        try:
            with writes:  # cv.train_fold's call; the fold's scoring after fit is outside the epoch window
                fold.train_and_score_fold(0, FoldRows(tr, va, va.iloc[:8]), lambda: model, lambda r: make_task(),
                                          kd_loader, train_cfg, cfg.eval, out_dir, name=f"peer {size}px",
                                          device=device, epoch_callback=at_epoch_end)
        finally:
            engine.train_one_epoch = original
        shutil.rmtree(out_dir, ignore_errors=True)
        if train_subset is None:
            kd["train_s"].append(marks["train_end"] - marks["start"])
            kd["write_s"].append(marks["write_s"])
            by_writer.append(marks["by_writer"])
            calls.append(marks["calls"])
        return marks["end"] - marks["start"]

    paths = lambda r: [manifest.root / p for p in r["image_path"]]  # noqa: E731
    labels = lambda r: r["label"].to_numpy(np.float32)  # noqa: E731

    def plain_epoch(train_subset=None, val_subset=None) -> float:
        tr = train_rows if train_subset is None else train_subset
        va = val_rows if val_subset is None else val_subset
        torch_seed(seed)
        model = plain_loop.make_model(s.teacher)
        optimizer = plain_loop.make_optimizer(model, lr=train_cfg.lr)
        train_loader, val_loader = plain_loop.make_loaders(paths(tr), labels(tr), paths(va), labels(va), size,
                                                           batch, s.num_workers)
        t0 = time.perf_counter()
        plain_loop.train_one_epoch(model, train_loader, optimizer)
        t1 = time.perf_counter()
        plain_loop.validate(model, val_loader)
        t2 = time.perf_counter()
        if train_subset is None:
            plain["train_s"].append(t1 - t0)
        return t2 - t0

    # warm-up (untimed): allocator, oneDNN kernels, page cache, for both arms on two batches
    warm_train, warm_val = train_rows.iloc[:2 * batch], val_rows.iloc[:max(2, min(len(val_rows), 8))]
    kd_epoch(warm_train, warm_val)
    plain_epoch(warm_train, warm_val)
    seconds: dict[str, list[float]] = {"kd": [], "plain": []}
    times = paired({"kd": lambda: seconds["kd"].append(kd_epoch()),
                    "plain": lambda: seconds["plain"].append(plain_epoch())}, s.repeats)
    del times  # the arms time themselves (epoch window only, model construction excluded)

    # state_last.pt: not due inside a short run at the default interval; one write of what fit would save, timed
    model = build_model(cfg.model, size)
    state = {"model": model.state_dict(), "optimizer": {"state": {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for i, p in enumerate(model.parameters())}, "param_groups": [{"params": list(range(len(list(
            model.parameters()))))}]}, "epoch": 0, "best_score": 0.0, "best_epoch": 0, "bad_epochs": 0,
        "history_columns": ["epoch"], "history": [[0]], "torch_rng": torch.get_rng_state(), "seed": 0}
    state_path = ctx.work / f"state_{size}" / checkpoint.LAST
    t0 = time.perf_counter()
    checkpoint.save_state(state_path, state)
    state_s = time.perf_counter() - t0
    nbytes = state_path.stat().st_size
    shutil.rmtree(state_path.parent, ignore_errors=True)
    interval = train_cfg.state_interval_min * 60
    return {"times": seconds, "kd": kd, "plain": plain, "batch": batch, "eval_batch": eval_batch,
            "precision": _precision(engine, train_cfg, device), "cache_build_s": cache_build_s,
            "by_writer": _median_dict(by_writer), "calls": _median_dict(calls),
            "wrapped": sorted({label for _, _, label in writes.targets}), "missing": writes.missing,
            "state": {"write_s": state_s, "bytes": nbytes, "interval_s": interval,
                      "amortised_share": state_s / interval if interval > 0 else float("nan"),
                      "written_in_timed_epochs": sum(c.get("state_last", 0) for c in calls)}}


def _precision(engine, train_cfg, device) -> str:
    resolve = getattr(engine, "resolve_precision", None)
    precision = getattr(train_cfg, "precision", None)
    if resolve is None or precision is None:
        return "fp32 (no train.precision)"
    try:
        return resolve(precision, device, train_cfg.amp)
    except TypeError:
        return resolve(precision, device)


def _median_dict(items: list[dict]) -> dict:
    keys = sorted({k for d in items for k in d})
    return {k: statistics.median(d.get(k, 0) for d in items) for k in keys}
