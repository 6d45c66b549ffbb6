"""Model factory: hybrid students, timm teachers, local weights files, freezing and Grad-CAM layers."""
from __future__ import annotations

import copy

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from kd_fracture.errors import UserError
from kd_fracture.models import (HybridStudent, classifier_param_names, count_params, create_model, create_student,
                                create_teacher, grad_cam_target_layer)

torch.set_num_threads(1)


def _bce_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = torch.arange(x.shape[0]) % 2
    loss = F.binary_cross_entropy_with_logits(model(x).reshape(-1), y.float())
    loss.backward()
    return loss


# ---------------------------------------------------------------------------------------------------------- students


@pytest.mark.parametrize("name", ["hybrid_t", "hybrid_s"])
def test_gradients_reach_every_student_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1).train()
    _bce_step(model, torch.randn(4, 1, 64, 64))
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient for {dead}"


@pytest.mark.parametrize("name,sizes", [("hybrid_t", (32, 64)), ("hybrid_s", (64, 96))])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_student_output_shapes(name, sizes, in_chans):
    model = create_student(name, in_chans=in_chans, num_classes=1).eval()
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, in_chans, size, size)
            assert model(x).shape == (2, 1)
            n_tokens = (size // model.stride) ** 2
            assert model.forward_features(x).shape == (2, n_tokens, model.cfg.embed_dim)
    two = create_student(name, in_chans=in_chans, num_classes=2).eval()
    assert two(torch.randn(3, in_chans, sizes[0], sizes[0])).shape == (3, 2)


def test_position_embedding_distinguishes_token_positions():
    model = create_student("hybrid_t").eval()
    pe = model.pos_embed(2, 3, torch.zeros(1))  # (1, 6, D), fixed sin-cos for a 2×3 grid
    assert pe.shape == (1, 6, model.embed_dim)
    assert torch.cdist(pe[0], pe[0]).fill_diagonal_(1.0).min() > 0.1  # all positions differ
    with torch.no_grad():  # a rectangular input gives a rectangular token grid
        assert model.forward_features(torch.randn(1, 1, 32, 48)).shape[1] == 2 * 3


def test_img_size_must_be_divisible_by_stride():
    assert create_student("hybrid_s").stride == 16
    with pytest.raises(UserError, match="--img-size 70 is not divisible by the student's stride 16; "
                                        "use a multiple of 16"):
        create_model("hybrid_s", in_chans=1, img_size=70)
    create_model("hybrid_s", in_chans=1, img_size=80)


def test_overrides_and_drop_rate_reach_the_config():
    model = create_model("hybrid_t", in_chans=1, depth=3, embed_dim=48, widths=[8, 16, 24], drop_rate=0.3)
    assert len(model.blocks) == 3 and model.embed_dim == 48 and model.cfg.widths == (8, 16, 24)
    assert model.head_drop.p == 0.3
    with pytest.raises(UserError, match=r"unknown student override\(s\) \['n_layers'\]"):
        create_model("hybrid_t", n_layers=3)
    with pytest.raises(UserError, match="divisible by 4 and by heads"):
        create_model("hybrid_t", embed_dim=30)


def test_default_student_is_at_most_a_fifth_of_resnet50():
    resnet50 = timm.create_model("resnet50", num_classes=1)
    student = create_model("hybrid_s", in_chans=1)
    assert count_params(student) <= 0.2 * count_params(resnet50)


def test_hybrids_are_registered_with_timm():
    model = timm.create_model("hybrid_t", num_classes=2, in_chans=1)
    assert isinstance(model, HybridStudent) and model.head.out_features == 2 and model.in_chans == 1


def test_timm_student_baseline():
    model = create_model("timm:resnet18", in_chans=1, img_size=64)
    assert type(model).__name__ == "ResNet"
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1)
    vit = create_student("timm:vit_tiny_patch16_224", in_chans=1, img_size=32)  # img_size reaches models taking it
    assert vit.patch_embed.img_size == (32, 32)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_channels_last_fast_paths_keep_the_students_math():
    """On channels_last input (the engine's default) the student runs its wide 1×1 convs as GEMMs and GELU on the
    NHWC view (student.PointwiseConv2d, GELU2d): the same parameters and state_dict as nn.Conv2d / nn.GELU, the
    same FLOPs, and the same loss and gradients as the NCHW path up to float32 rounding."""
    from torch.utils.flop_counter import FlopCounterMode

    from kd_fracture.models.student import GELU2d, PointwiseConv2d

    torch.manual_seed(0)
    nchw = create_student("hybrid_s", in_chans=1).train()
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    kinds = {type(m) for m in nchw.modules()}
    assert PointwiseConv2d in kinds and GELU2d in kinds
    assert isinstance(nchw.proj, PointwiseConv2d) and nchw.proj.bias is not None
    plain = {k for k in nchw.state_dict()}  # keys as nn.Conv2d / nn.GELU would name them
    assert "proj.weight" in plain and "stages.0.0.block.0.0.weight" in plain and nchw.state_dict().keys() == plain

    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0.0, 1.0, 0.0, 1.0])

    def step(model, image):
        torch.manual_seed(1)  # the same dropout mask in both arms
        loss = F.binary_cross_entropy_with_logits(model(image).reshape(-1), y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, grads_a = step(nchw, x)
    loss_b, grads_b = step(nhwc, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, g in grads_a.items():  # atol: biases feeding a BatchNorm have a gradient of 0 up to rounding
        torch.testing.assert_close(grads_b[name], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()) + 1e-6, msg=name)

    def flops(model, image):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(image)
        return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}

    fa = flops(nchw, x)
    fb = flops(nhwc, x.contiguous(memory_format=torch.channels_last))
    assert sum(fa.values()) == sum(fb.values())  # same work, counted the same way
    assert fb["aten.convolution"] < fa["aten.convolution"]  # …but the wide 1×1 convs ran as GEMMs
    with torch.no_grad():  # channels_last feature maps stay channels_last through the conv stages
        fmap = nhwc.forward_conv(x.contiguous(memory_format=torch.channels_last))
    assert fmap.is_contiguous(memory_format=torch.channels_last)
    traced = torch.jit.trace(nhwc.eval(), x.contiguous(memory_format=torch.channels_last))  # as ONNX export traces
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in nhwc.modules())
    assert str(traced.inlined_graph).count("aten::_convolution(") == n_convs  # exported graphs keep plain Conv nodes


# ---------------------------------------------------------------------------------------------------------- teachers


def test_freeze_backbone_trains_only_the_classifier():
    torch.manual_seed(0)
    model = create_teacher("resnet18", in_chans=1, freeze="backbone")
    head = classifier_param_names(model)
    assert head == {"fc.weight", "fc.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    assert count_params(model, trainable_only=True) == 512 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    _bce_step(model, torch.randn(4, 1, 32, 32) * 3 + 1)
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head  # backbone weights, BN affine params and BN running stats untouched


def test_freeze_none_trains_everything_and_updates_bn_stats():
    model = create_teacher("resnet18", in_chans=1, freeze="none").train()
    assert count_params(model, trainable_only=True) == count_params(model)
    running_mean = model.bn1.running_mean.clone()
    with torch.no_grad():
        model(torch.randn(4, 1, 32, 32) * 3 + 1)
    assert not torch.equal(model.bn1.running_mean, running_mean)
    with pytest.raises(UserError, match="--freeze 'head'"):
        create_teacher("resnet18", freeze="head")


def test_freeze_bn_trains_every_conv_but_keeps_batchnorm_as_it_was():
    torch.manual_seed(0)
    model = create_teacher("resnet18", in_chans=1, freeze="bn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    _bce_step(model, torch.randn(4, 1, 32, 32) * 3 + 1)
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "conv1.weight" in changed and "fc.weight" in changed
    assert not any(k.startswith(("bn1.", "layer1.0.bn1.")) for k in changed)  # running stats and affine kept


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if timm tries to reach the hub or a URL."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    from timm.models import _builder
    for fn in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file", "load_custom_from_hf"):
        if hasattr(_builder, fn):
            monkeypatch.setattr(_builder, fn, refuse)


def test_local_pretrained_file_loads_backbone_and_adapts_head_and_input(tmp_path, no_network):
    torch.manual_seed(0)
    source = timm.create_model("resnet18")  # 1000 classes, 3 channels: an "ImageNet" file
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(state, str(path))

    model = create_teacher("resnet18", num_classes=1, in_chans=1, pretrained=str(path))
    loaded = model.state_dict()
    assert loaded["fc.weight"].shape == (1, 512)  # fresh head for the new class count
    # timm's adapt_input_conv: one grey channel = the sum of the RGB filters
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    backbone = [k for k in state if not k.startswith(("fc.", "conv1."))]
    assert backbone and all(torch.equal(loaded[k], state[k]) for k in backbone)

    pth = tmp_path / "resnet18.pth"  # torch.save file, same classes and channels: everything loads
    torch.save({"state_dict": state}, pth)
    model = create_teacher("resnet18", num_classes=1000, in_chans=3, pretrained=str(pth))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_pretrained_file_errors(tmp_path, no_network):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match=f"{missing}: file not found"):
        create_teacher("resnet18", pretrained=str(missing))
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"encoder.w": torch.zeros(3)}, str(foreign))
    with pytest.raises(UserError, match="none of its tensor names match"):
        create_teacher("resnet18", pretrained=str(foreign))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        create_teacher("resnet18", pretrained=str(corrupt))
    with pytest.raises(UserError, match="random init"):
        create_model("hybrid_t", pretrained=str(foreign))


def test_unknown_model_lists_close_matches():
    with pytest.raises(UserError, match=r"unknown model 'resnet5'.*resnet50"):
        create_teacher("resnet5")
    with pytest.raises(UserError, match=r"unknown model 'resnt18'.*resnet18"):  # typo: difflib fallback
        create_model("resnt18")
    with pytest.raises(UserError, match="unknown model"):
        create_model("timm:not_a_model_xyz")
    with pytest.raises(UserError, match="architecture name"):
        create_teacher("hf-hub:timm/resnet18.a1_in1k")


# ---------------------------------------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("name,expected,stride", [("resnet18", lambda m: m.layer4[-1], 32),
                                                  ("hybrid_t", lambda m: m.stages[-1], 16)])
def test_grad_cam_target_layer_gives_a_spatial_map(name, expected, stride):
    model = create_model(name, in_chans=1).eval()
    layer = grad_cam_target_layer(model)
    assert layer is expected(model)
    seen = []
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, 1, 64, 64))
    handle.remove()
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][2:] == (64 // stride, 64 // stride)  # (1, C, h, w)


@pytest.mark.parametrize("img_size, stage", [(None, "layer4"), (224, "layer4"), (128, "layer3"), (64, "layer2"),
                                             (16, "layer1")])
def test_grad_cam_layer_keeps_a_map_of_at_least_7_pixels(img_size, stage):
    model = create_teacher("resnet10t", num_classes=1)
    assert grad_cam_target_layer(model, img_size) is getattr(model, stage)[-1]


def test_same_weights_give_the_same_checkpoint_bytes_in_every_process(tmp_path):
    """safetensors orders a multi-key metadata map at random per process; a resumed fold's identical weights then got
    another sha256 and distill rebuilt its teacher cache. The checkpoint file must depend only on weights + meta."""
    import subprocess
    import sys

    code = ("import sys, torch; from kd_fracture.train.checkpoint import save_weights; from pathlib import Path; "
            "torch.manual_seed(0); m = torch.nn.Linear(3, 2); "
            "save_weights(m, Path(sys.argv[1]), {'epoch': 3, 'study_kappa': 0.5, 'a': 1, 'b': 2, 'c': 3})")
    digests = set()
    for i in range(2):  # 5 keys: two processes order them alike by chance 1 time in 120
        path = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(path.read_bytes())
    assert len(digests) == 1
