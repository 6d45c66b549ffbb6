"""The served form (issue #24): BatchNorm folded into the convolutions, outputs equal to the trained form's."""
from __future__ import annotations

import torch
from torch import nn

from kd_fracture.models import create_model, for_inference, graphed
from kd_fracture.models.serve import fold_batchnorms


def with_real_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm given non-trivial running statistics and affine parameters (a fresh BN folds to nothing)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def n_batchnorms(model: nn.Module) -> int:
    return sum(type(m) is nn.BatchNorm2d for m in model.modules())


def check_served(name: str, in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    model = with_real_statistics(create_model(name, in_chans=in_chans, img_size=size))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = for_inference(model, name=name)
    assert n_batchnorms(model) > 0 and n_batchnorms(served) == 0  # every BN folded
    x = torch.randn(3, in_chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), served(x)
        cl = served(x.contiguous(memory_format=torch.channels_last))  # the engine's layout takes other kernels
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cl, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


def test_served_student_equals_the_trained_form():
    check_served("hybrid_s", 1, 64)


def test_served_timm_teacher_equals_the_trained_form():
    check_served("resnet50", 3, 64)
    check_served("resnet10t", 3, 64)  # timm's deep stem: a Sequential of convs before bn1


def test_a_model_in_training_mode_is_served_in_eval_mode_with_a_note(capsys):
    model = with_real_statistics(create_model("hybrid_t", in_chans=1, img_size=32)).train()
    served = for_inference(model, name="hybrid_t")
    assert "hybrid_t was in training mode" in capsys.readouterr().err
    assert not served.training and model.training  # the copy is in eval mode, the original is as it was


class ConvThenElsewhereBN(nn.Module):
    """Registered conv → bn, but the BN normalises another branch: folding it into the conv would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        return self.conv(x) + self.bn(self.other(x))


def test_a_bn_that_does_not_follow_its_conv_is_left_unfolded(capsys):
    model = with_real_statistics(ConvThenElsewhereBN())
    served = for_inference(model, name="odd")
    assert "serving it unfolded" in capsys.readouterr().err
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x))
    assert fold_batchnorms(with_real_statistics(ConvThenElsewhereBN())) == 1  # the naive rule would have folded it


def test_graphed_is_the_model_itself_without_cuda():
    model = create_model("hybrid_t", in_chans=1, img_size=32).eval()
    assert graphed(model, torch.zeros(1, 1, 32, 32)) is model
