"""CARAFE in plain PyTorch equals its definition (mmcv's carafe op, written as a loop over
output pixels), and the CARAFE FPN is mmdetection's FPN_CARAFE (the Rank & Sort "+" models):
P6 from C5 by a strided convolution and in the top-down path, CARAFE upsampling cropped to
odd sizes, the keys it does not read refused by name."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone
    from runs import tiny_cfg

    from alrp_d2.modeling import (
        CARAFE,
        CARAFEFPN,
        TorchvisionModulatedDeformConv,
        carafe,
    )

PLUS = os.path.join(ROOT, "configs", "COCO-Detection", "rs_mask_rcnn_plus_R_101_FPN_DCN_ms_3x.yaml")


def carafe_by_definition(x, encoded, k, groups, s):
    """mmcv's CARAFE from its definition: the encoder's output pixel-shuffled into one
    kernel per output pixel and group, softmax over its k x k taps, each output pixel the
    kernel-weighted sum of the k x k neighbourhood (zero outside) of its source pixel."""
    n, c, h, w = x.shape
    mask = F.pixel_shuffle(encoded, s)  # (N, G k^2, sH, sW)
    mask = mask.view(n, groups, k * k, s * h, s * w).softmax(2)
    r = (k - 1) // 2
    out = x.new_zeros(n, c, s * h, s * w)
    for b in range(n):
        for ch in range(c):
            g = ch // (c // groups)
            for y in range(s * h):
                for xx in range(s * w):
                    total = x.new_zeros(())
                    for u in range(k):
                        for v in range(k):
                            iy, ix = y // s + u - r, xx // s + v - r
                            if 0 <= iy < h and 0 <= ix < w:
                                total = total + mask[b, g, u * k + v, y, xx] * x[b, ch, iy, ix]
                    out[b, ch, y, xx] = total
    return out


@pytest.mark.parametrize(
    "k,groups,s,size", [(3, 1, 2, (3, 4)), (5, 2, 2, (4, 3)), (3, 2, 3, (2, 3))]
)
def test_carafe_equals_its_definition(k, groups, s, size):
    g = torch.Generator().manual_seed(k * 10 + groups)
    x = torch.randn(2, 4, *size, generator=g, dtype=torch.float64, requires_grad=True)
    encoded = torch.randn(
        2, groups * k * k * s * s, *size, generator=g, dtype=torch.float64, requires_grad=True
    )
    kernels = encoded.view(2, groups, k * k, s * s, *size).softmax(2)
    ours = carafe(x, kernels, s)
    want = carafe_by_definition(x, encoded, k, groups, s)
    assert ours.shape == (2, 4, s * size[0], s * size[1])
    assert torch.allclose(ours, want, atol=1e-12)
    probe = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((ours * probe).sum(), (x, encoded))
    expected = torch.autograd.grad((want * probe).sum(), (x, encoded))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-12)


def test_carafe_module_predicts_normalised_kernels_from_the_features():
    torch.manual_seed(0)
    module = CARAFE(8, 2, up_kernel=5, up_group=2, compressed_channels=6)
    assert module.channel_compressor.out_channels == 6
    assert module.content_encoder.out_channels == 5 * 5 * 2 * 2 * 2
    assert module.content_encoder.weight.std().item() == pytest.approx(0.001, rel=0.2)
    assert module.content_encoder.bias.abs().sum() == 0
    x = torch.randn(1, 8, 5, 6)
    kernels = module.kernels(x)
    assert kernels.shape == (1, 2, 25, 4, 5, 6)
    assert torch.allclose(kernels.sum(2), torch.ones(1, 2, 4, 5, 6))
    encoded = module.content_encoder(module.channel_compressor(x))
    with torch.no_grad():
        assert torch.allclose(module(x), carafe_by_definition(x, encoded, 5, 2, 2), atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        CARAFE(8, 2, up_kernel=4)


class FakeBottomUp(torch.nn.Module):
    """C2-C5 of given channels (stride 4-32), a fixed random function of the image."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, c, 1) for c in (4, 6, 8, 10))

    def forward(self, x):
        return {
            f"res{i + 2}": conv(F.avg_pool2d(x, 2 ** (i + 2), ceil_mode=True))
            for i, conv in enumerate(self.convs)
        }

    def output_shape(self):
        return {
            f"res{i + 2}": ShapeSpec(channels=c, stride=2 ** (i + 2))
            for i, c in enumerate((4, 6, 8, 10))
        }


def test_carafe_fpn_is_fpn_carafe():
    torch.manual_seed(0)
    fpn = CARAFEFPN(
        FakeBottomUp(), ["res2", "res3", "res4", "res5"], 8, dict(compressed_channels=4)
    )
    shapes = fpn.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert fpn.size_divisibility == 32
    image = torch.randn(1, 3, 96, 160)  # C5 3 x 5: P6 2 x 3, its upsampling cropped
    out = fpn(image)
    c = fpn.bottom_up(image)
    # the definition, with the FPN's own layers
    top6 = fpn.fpn_lateral6(c["res5"])
    assert fpn.fpn_lateral6.stride == (2, 2) and fpn.fpn_lateral6.kernel_size == (3, 3)
    top = {6: top6}
    for level in (5, 4, 3, 2):
        lateral = getattr(fpn, f"fpn_lateral{level}")(c[f"res{level}"])
        up = getattr(fpn, f"fpn_upsample{level}")(top[level + 1])
        top[level] = lateral + up[:, :, : lateral.shape[2], : lateral.shape[3]]
    assert top6.shape[2:] == (2, 3) and top[5].shape[2:] == (3, 5)
    for level in (2, 3, 4, 5, 6):
        want = getattr(fpn, f"fpn_output{level}")(top[level])
        assert torch.allclose(out[f"p{level}"], want, atol=1e-6), level
    # P6 is not Detectron2's max pooling of P5
    assert out["p6"].shape[2:] == (2, 3)
    assert not torch.allclose(out["p6"], F.max_pool2d(out["p5"], 1, 2))
    for conv in (fpn.fpn_lateral2, fpn.fpn_output6, fpn.fpn_upsample2.channel_compressor):
        assert conv.bias is not None and conv.bias.abs().sum() == 0
        bound = (
            6
            / (
                conv.in_channels * conv.kernel_size[0] ** 2
                + conv.out_channels * conv.kernel_size[0] ** 2
            )
        ) ** 0.5
        assert conv.weight.abs().max() <= bound  # Xavier-uniform


def test_plus_config_builds_the_carafe_fpn_on_torchvision_deformable_convolutions():
    cfg = tiny_cfg(PLUS)
    cfg.MODEL.RESNETS.DEPTH = 50  # the same stages, fewer blocks
    backbone = build_backbone(cfg)
    assert isinstance(backbone, CARAFEFPN)
    deform = [m for m in backbone.modules() if isinstance(m, TorchvisionModulatedDeformConv)]
    assert deform and all(m.deformable_groups == 4 for m in deform)
    assert backbone.fpn_upsample2.up_kernel == 5 and backbone.fpn_upsample2.up_group == 1
    assert backbone.fpn_upsample2.channel_compressor.out_channels == 64
    out = backbone(torch.randn(1, 3, 64, 96))
    out["p2"].sum().backward()
    assert all(m.weight.grad is not None for m in deform[:1])


@pytest.mark.parametrize("key,value", [("MODEL.FPN.NORM", "GN"), ("MODEL.FPN.FUSE_TYPE", "avg")])
def test_keys_the_carafe_fpn_does_not_read_are_refused(key, value):
    cfg = tiny_cfg(PLUS)
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_backbone(cfg)
