"""Benchmark 8, `bf16`: ResNet-50 training and inference images/s with bf16 autocast ÷ fp32, on CPU."""
from __future__ import annotations

import statistics
from dataclasses import replace

from common import Context, Figure, Result, paired, ratio_median, run_epoch, torch_seed, trainer

TARGETS = {"train": 1.4, "infer": 2.0}


def run(ctx: Context) -> Result:
    """Two arms per image size and mode, alternated, through the project's own paths with `train.precision` fp32
    vs bf16: training = `engine.train_one_epoch` (CVConfig's train settings: BCE, AdamW, grad clip, channels_last)
    over batches held in memory; inference = `engine.predict_logits(precision=…)` over batches in memory. Figure =
    fp32 seconds ÷ bf16 seconds (= bf16 images/s ÷ fp32 images/s).

    Where `engine.cpu_bf16_supported()` is False (no avx512_bf16 / amx_bf16: oneDNN would emulate bf16, slower
    than fp32) the figures are recorded as not supported (value None), not as misses; with
    `bf16_measure_unsupported` (--quick) the arms still run and the emulated ratio goes to details.
    """
    from kd_fracture.train import engine

    s, res = ctx.settings, Result()
    check = getattr(engine, "cpu_bf16_supported", None)
    supported = bool(check()) if check is not None else False
    api = check is not None and "precision" in _params(engine.predict_logits)
    cpu_note = ("this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo): bf16 autocast "
                "would be emulated and slower than fp32, so train.precision auto stays fp32 here")
    if not api:
        note = "kd_fracture.train.engine has no cpu_bf16_supported / precision API yet"
    else:
        note = cpu_note
    measured: dict[tuple[str, int], dict] = {}
    if api and (supported or s.bf16_measure_unsupported):
        for i, size in enumerate(s.bf16_sizes):
            measured[("train", size)] = _train_arms(ctx, size, s.bf16_train_batches[i])
            measured[("infer", size)] = _infer_arms(ctx, size, s.bf16_infer_batches[i])
    for mode in ("train", "infer"):
        for size in s.bf16_sizes:
            what = "training" if mode == "train" else "inference"
            fid, name = f"bf16_{mode}_{size}", f"bf16 autocast speed-up, {s.teacher} {what} {size} px"
            unit, target = "× (bf16 ÷ fp32 images/s)", TARGETS[mode]
            meaning = (f"{s.teacher} {'trains' if mode == 'train' else 'infers'} this multiple of fp32's images/s "
                       f"under bf16 autocast on CPU ({size} px, batch {s.bf16_batch})")
            m = measured.get((mode, size))
            if supported and m is not None:
                res.figures.append(Figure(fid, name, m["ratio"], target, ">=", unit, meaning=meaning,
                                          details=m["details"]))
            else:
                details = {"cpu_bf16_supported": supported, "img_size": size, "batch": s.bf16_batch}
                if m is not None:
                    details["measured_anyway_emulated"] = m["details"] | {"ratio": m["ratio"]}
                res.figures.append(Figure.not_supported(fid, name, target, ">=", unit, note, meaning=meaning,
                                                        details=details))
    for (mode, size), m in measured.items():
        if m["details"]["output_dtype"].get("bf16") != "bfloat16":
            res.notes.append(f"{mode} {size} px: the bf16 arm's output is {m['details']['output_dtype'].get('bf16')}, "
                             f"so {m['details']['path']} did not autocast to bf16")
    return res


def _params(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _batches(size: int, batch: int, n: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last),
             "label": torch.randint(0, 2, (batch,), generator=g).float(), "index": torch.arange(batch),
             "view": torch.zeros(batch, dtype=torch.long)} for _ in range(n)]


def _out_dtype(model):
    """A forward hook recording the model's output dtype (did autocast act?)."""
    seen: dict = {}

    def hook(module, inputs, output):
        seen["dtype"] = str(output.dtype).removeprefix("torch.")
    return seen, model.register_forward_hook(hook)


def _train_arms(ctx: Context, size: int, n_batches: int) -> dict:
    import torch

    from kd_fracture.config import CVConfig
    from kd_fracture.models import create_model
    from kd_fracture.train import tasks

    s = ctx.settings
    base = CVConfig().train
    torch_seed(0)
    model = create_model(s.teacher, in_chans=3).to(memory_format=torch.channels_last)
    cfgs = {p: replace(base, precision=p, batch_size=s.bf16_batch) for p in ("fp32", "bf16")}
    optimizer, scaler = trainer(model, base)
    task = tasks.SupervisedTask(loss=base.loss)
    batches = _batches(size, s.bf16_batch, n_batches)
    seen, handle = _out_dtype(model)
    dtypes = {}
    for p, cfg in cfgs.items():  # warm-up: oneDNN builds kernels per dtype and shape
        run_epoch(model, task, batches[:1], optimizer, scaler, cfg)
        dtypes[p] = seen.get("dtype")
    handle.remove()
    times = paired({p: (lambda c=cfg: run_epoch(model, task, batches, optimizer, scaler, c))
                    for p, cfg in cfgs.items()}, s.repeats)
    n = n_batches * s.bf16_batch
    return {"ratio": ratio_median(times["fp32"], times["bf16"]), "details": {
        "fp32_images_per_s": n / statistics.median(times["fp32"]), "bf16_images_per_s": n / statistics.median(
            times["bf16"]), "images": n, "batch": s.bf16_batch, "img_size": size, "model": s.teacher,
        "path": "engine.train_one_epoch(cfg.precision)", "output_dtype": dtypes, "per_repeat": times}}


def _infer_arms(ctx: Context, size: int, n_batches: int) -> dict:
    import torch

    from kd_fracture.models import create_model
    from kd_fracture.train import engine

    s = ctx.settings
    torch_seed(0)
    model = create_model(s.teacher, in_chans=3).eval().to(memory_format=torch.channels_last)
    batches = _batches(size, s.bf16_batch, n_batches, seed=1)
    device = torch.device("cpu")

    def infer(p: str, bs=batches) -> None:
        engine.predict_logits(model, bs, device, True, channels_last=True, precision=p)

    seen, handle = _out_dtype(model)
    dtypes = {}
    for p in ("fp32", "bf16"):
        infer(p, batches[:1])
        dtypes[p] = seen.get("dtype")
    handle.remove()
    times = paired({p: (lambda p=p: infer(p)) for p in ("fp32", "bf16")}, s.repeats)
    n = n_batches * s.bf16_batch
    return {"ratio": ratio_median(times["fp32"], times["bf16"]), "details": {
        "fp32_images_per_s": n / statistics.median(times["fp32"]), "bf16_images_per_s": n / statistics.median(
            times["bf16"]), "images": n, "batch": s.bf16_batch, "img_size": size, "model": s.teacher,
        "path": "engine.predict_logits(precision=…)", "output_dtype": dtypes, "per_repeat": times}}
