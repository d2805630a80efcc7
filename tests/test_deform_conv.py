"""Deformable convolutions on torchvision (alrp_d2/modeling/deform.py): equal to a direct
computation of their definition and to Detectron2's where both run, with the gradients
gradcheck finds; selected by Detectron2's keys, with Detectron2's parameters and state-dict
keys; the ResNeXt-101-DCN config trains on the CPU."""

import os

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.layers import ShapeSpec
    from detectron2.layers.deform_conv import DeformConv, ModulatedDeformConv
    from detectron2.modeling import build_model
    from detectron2.modeling.backbone.resnet import DeformBottleneckBlock, build_resnet_backbone
    from detectron2.utils.events import EventStorage
    from runs import batch, tiny_cfg

    from alrp_d2.config import get_cfg
    from alrp_d2.modeling import (
        TorchvisionDeformConv,
        TorchvisionModulatedDeformConv,
        convert_deform_convs,
    )
    from alrp_d2.modeling.backbone import resnet_fpn

DCN_CONFIG = os.path.join(
    ROOT, "configs", "COCO-Detection", "alrp_atss_X_101_64x4d_FPN_DCN_800.yaml"
)


def bilinear(x, py, px):
    """``x`` (B, G, C, H, W) at the real positions ``py``, ``px`` (B, G, K, Ho, Wo), zero
    outside the image: (B, G, C, K, Ho, Wo)."""
    b, g, c, h, w = x.shape
    flat = x.reshape(b, g, c, h * w)
    y0, x0 = py.floor(), px.floor()
    out = 0
    for yc, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xc, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            inside = (yc >= 0) & (yc < h) & (xc >= 0) & (xc < w)
            index = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()
            picked = flat.gather(3, index.reshape(b, g, 1, -1).expand(b, g, c, -1))
            weight = (wy * wx * inside).reshape(b, g, 1, -1)
            out = out + picked * weight
    return out.reshape(b, g, c, *py.shape[2:])


def reference(x, offset, mask, weight, bias, stride, padding, dilation):
    """DCNv2 as defined: ``y(p) = sum_k w_k x(p_0 + p_k + dp_k) m_k``, each deformable group
    of input channels sampled at its own offsets (vertical, then horizontal, per kernel
    position) and masks, then a grouped convolution of the samples."""
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    off = offset.reshape(b, dg, taps, 2, ho, wo)
    ki = torch.arange(kh, dtype=x.dtype).repeat_interleave(kw) * dilation
    kj = torch.arange(kw, dtype=x.dtype).repeat(kh) * dilation
    oy = torch.arange(ho, dtype=x.dtype) * stride - padding
    ox = torch.arange(wo, dtype=x.dtype) * stride - padding
    py = oy.view(1, 1, 1, ho, 1) + ki.view(1, 1, taps, 1, 1) + off[:, :, :, 0]
    px = ox.view(1, 1, 1, 1, wo) + kj.view(1, 1, taps, 1, 1) + off[:, :, :, 1]
    samples = bilinear(x.reshape(b, dg, c // dg, h, w), py, px)  # (B, dg, C/dg, K, Ho, Wo)
    if mask is not None:
        samples = samples * mask.reshape(b, dg, 1, taps, ho, wo)
    groups = c // cg
    samples = samples.reshape(b, groups, cg, taps, ho, wo)
    out = torch.einsum("bgckhw,gock->bgohw", samples, weight.reshape(groups, o // groups, cg, taps))
    out = out.reshape(b, o, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def inputs(
    c=8,
    o=8,
    size=(9, 11),
    dg=1,
    groups=1,
    stride=1,
    dilation=1,
    seed=0,
    dtype=torch.float64,
    fractional=False,
):
    """Random input, offsets (some reaching outside the image), masks, weights and bias."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1  # padding = dilation keeps 3x3 "same"
    x = torch.randn(1 if fractional else 2, c, h, w, generator=g, dtype=dtype)
    shape = (x.shape[0], 2 * dg * 9, ho, wo)
    if fractional:  # gradcheck: sample away from the integer grid, where bilinear has kinks
        offset = (
            torch.randint(-2, 3, shape, generator=g).to(dtype)
            + 0.2
            + 0.6 * torch.rand(shape, generator=g, dtype=dtype)
        )
    else:
        offset = torch.randn(shape, generator=g, dtype=dtype) * 2
    mask = torch.rand(x.shape[0], dg * 9, ho, wo, generator=g, dtype=dtype)
    weight = torch.randn(o, c // groups, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    return x, offset, mask, weight, bias


def modulated(weight, bias, dg, groups, stride, dilation):
    conv = TorchvisionModulatedDeformConv(
        weight.shape[1] * groups,
        weight.shape[0],
        3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        groups=groups,
        deformable_groups=dg,
        bias=bias is not None,
    )
    conv = conv.to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


CASES = [(1, 1, 1, 1), (4, 2, 2, 1), (2, 4, 1, 2), (4, 1, 2, 2)]  # dg, groups, stride, dilation


@pytest.mark.parametrize("dg,groups,stride,dilation", CASES)
def test_modulated_equals_its_definition(dg, groups, stride, dilation):
    x, offset, mask, weight, bias = inputs(dg=dg, groups=groups, stride=stride, dilation=dilation)
    conv = modulated(weight, bias, dg, groups, stride, dilation)
    got = conv(x, offset, mask)
    expected = reference(x, offset, mask, weight, bias, stride, dilation, dilation)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dg,groups", [(1, 1), (4, 2)])
def test_plain_equals_its_definition(dg, groups):
    x, offset, _, weight, _ = inputs(dg=dg, groups=groups)
    conv = TorchvisionDeformConv(8, 8, 3, padding=1, groups=groups, deformable_groups=dg).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    torch.testing.assert_close(
        conv(x, offset), reference(x, offset, None, weight, None, 1, 1, 1), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_to_detectron2_on_the_cpu(dtype):
    """Detectron2's DeformConv runs forward on the CPU with one deformable group (its
    ModulatedDeformConv does not run on the CPU at all): same weights and offsets, same
    output; the modulated one with every mask 1 too."""
    torch.manual_seed(0)
    x, offset, mask, weight, _ = inputs(c=6, o=10, dg=1, groups=2, stride=2, dtype=dtype)
    theirs = DeformConv(6, 10, 3, stride=2, padding=1, groups=2).to(dtype)
    ours = convert_deform_convs(DeformConv(6, 10, 3, stride=2, padding=1, groups=2).to(dtype))
    assert type(ours) is TorchvisionDeformConv
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        expected = theirs(x, offset)
        assert torch.equal(ours(x, offset), expected)
        ones = modulated(theirs.weight, None, 1, 2, 2, 1)
        torch.testing.assert_close(ones(x, offset, torch.ones_like(mask)), expected)
        # Why the modulated one is compared on CUDA only (and why this project has its own):
        with pytest.raises(NotImplementedError, match="not supported on CPUs"):
            ModulatedDeformConv(6, 10, 3, stride=2, padding=1, groups=2).to(dtype)(x, offset, mask)


def test_block_equal_to_detectron2_on_the_cpu():
    """Detectron2's own DeformBottleneckBlock (not modulated, one group: its CPU case), then
    converted: the same output, and now a backward pass."""
    torch.manual_seed(0)
    block = DeformBottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm="BN").eval()
    with torch.no_grad():  # Detectron2 initialises the offsets at 0: make them matter
        block.conv2_offset.weight.normal_(0, 0.1)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        expected = block(x)
    converted = convert_deform_convs(block)
    assert converted is block and type(block.conv2) is TorchvisionDeformConv
    x.requires_grad_()
    out = block(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert block.conv2_offset.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Detectron2's modulated kernel is CUDA only"
)
@pytest.mark.parametrize("dg,groups", [(1, 1), (4, 2)])
def test_modulated_equal_to_detectron2_on_cuda(dg, groups):
    x, offset, mask, weight, bias = inputs(dg=dg, groups=groups, stride=2, dtype=torch.float32)
    theirs = ModulatedDeformConv(
        8, 8, 3, stride=2, padding=1, groups=groups, deformable_groups=dg
    ).cuda()
    with torch.no_grad():
        theirs.weight.copy_(weight)
        theirs.bias.copy_(bias)
    ours = convert_deform_convs(theirs)
    args = [t.cuda() for t in (x, offset, mask)]
    from detectron2.layers.deform_conv import modulated_deform_conv

    with torch.no_grad():
        expected = modulated_deform_conv(*args, theirs.weight, theirs.bias, 2, 1, 1, groups, dg)
        torch.testing.assert_close(ours(*args), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dg,groups", [(1, 1), (2, 2)])
def test_gradients_pass_gradcheck(dg, groups):
    """Every input's gradient (image, offsets, masks, weight, bias) against finite
    differences, in float64, sampling away from the pixel grid (bilinear's kinks)."""
    x, offset, mask, weight, bias = inputs(
        c=4, o=4, size=(5, 6), dg=dg, groups=groups, fractional=True
    )
    conv = modulated(weight, bias, dg, groups, 1, 1)

    def f(x, offset, mask, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x, offset, mask))

    args = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def small_resnet_cfg(modulated=True, groups=1, stages=(False, True, True, True)):
    cfg = get_cfg()
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NORM, r.OUT_FEATURES = 50, "BN", ["res3", "res4", "res5"]
    r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 8, 16, 4
    r.NUM_GROUPS = 2
    r.DEFORM_ON_PER_STAGE, r.DEFORM_MODULATED, r.DEFORM_NUM_GROUPS = list(stages), modulated, groups
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    return cfg


@pytest.mark.parametrize("modulated,groups", [(True, 1), (True, 4), (False, 2)])
def test_backbone_is_detectron2s_with_torchvision_convs(modulated, groups):
    """Detectron2's keys select the blocks; parameters, initial values and state-dict keys
    are those of Detectron2's own build (its DCN checkpoints load), only the convolutions'
    class differs."""
    cfg = small_resnet_cfg(modulated, groups)
    shape = ShapeSpec(channels=3)
    torch.manual_seed(0)
    theirs = build_resnet_backbone(cfg, shape)
    torch.manual_seed(0)
    ours = resnet_fpn(cfg, shape, lambda bottom_up: None).bottom_up
    expected = {"res2": 0, "res3": 4, "res4": 6, "res5": 3}
    op = TorchvisionModulatedDeformConv if modulated else TorchvisionDeformConv
    for stage, count in expected.items():
        convs = [b.conv2 for b in getattr(ours, stage)]
        assert sum(type(c) is op for c in convs) == count, stage
        assert all(c.deformable_groups == groups for c in convs if type(c) is op)
    state = theirs.state_dict()
    assert list(ours.state_dict()) == list(state)
    assert "res3.0.conv2_offset.weight" in state and "res3.0.conv2.norm.running_mean" in state
    assert state["res5.2.conv2_offset.weight"].shape[0] == (27 if modulated else 18) * groups
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key
    ours.load_state_dict(state, strict=True)


def test_backbone_without_deformable_stages_is_unchanged():
    cfg = small_resnet_cfg(stages=(False, False, False, False))
    backbone = resnet_fpn(cfg, ShapeSpec(channels=3), lambda bottom_up: None).bottom_up
    assert not any(isinstance(m, (DeformConv, ModulatedDeformConv)) for m in backbone.modules())


def test_backbone_trains_and_autocasts_on_the_cpu():
    """Four deformable groups (Rank & Sort's DCN models): forward and backward on the CPU,
    gradients into the offsets, and bfloat16 autocast (torchvision's CPU kernel has no
    bfloat16: computed in float32, returned in the autocast dtype)."""
    torch.manual_seed(0)
    backbone = resnet_fpn(small_resnet_cfg(True, 4), ShapeSpec(channels=3), lambda bottom_up: None)
    x = torch.randn(2, 3, 64, 64)
    features = backbone(x)
    sum(f.sum() for f in features.values()).backward()
    offsets = backbone.bottom_up.res4[0].conv2_offset.weight.grad
    assert offsets is not None and offsets.abs().sum() > 0
    backbone.eval()
    with torch.no_grad():
        full = backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone(x)
            res5 = backbone.bottom_up(x)["res5"]
    assert all(f.dtype == torch.bfloat16 for f in low.values()) and res5.dtype == torch.bfloat16
    for name, value in full.items():  # bfloat16's 8 bits of mantissa, through 16 layers
        torch.testing.assert_close(
            low[name].float(), value, rtol=0.05, atol=0.05 * value.abs().max()
        )


def test_mismatched_offsets_are_refused():
    conv = TorchvisionModulatedDeformConv(8, 8, 3, padding=1, deformable_groups=2)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="2 deformable groups takes 36 offset channels, got 18"):
        conv(x, torch.zeros(1, 18, 5, 5), torch.ones(1, 18, 5, 5))
    with pytest.raises(ValueError, match="takes 18 mask channels, got 9"):
        conv(x, torch.zeros(1, 36, 5, 5), torch.ones(1, 9, 5, 5))


def test_non_finite_offsets_sample_nothing():
    """A diverged model's NaN or infinite offsets sample 0, as positions outside the image
    (Detectron2's and mmcv's kernels; torchvision's alone crashes on a NaN position), and
    leave the other gradients finite."""
    x, offset, mask, weight, bias = inputs(dg=2)
    conv = modulated(weight, bias, 2, 1, 1, 1)
    outside = offset.clone()
    outside[0, :4] = 1e3  # two kernel positions' offsets of the first image, group 0
    expected = conv(x, outside, mask)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = offset.clone()
        broken[0, :4] = bad
        xg = x.clone().requires_grad_()
        got = conv(xg, broken, mask)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        got.sum().backward()
        assert torch.isfinite(xg.grad).all() and torch.isfinite(conv.weight.grad).all()
        conv.zero_grad()


def test_empty_batch_gives_an_empty_output():
    conv = TorchvisionModulatedDeformConv(8, 4, 3, stride=2, padding=1)
    x = torch.zeros(0, 8, 9, 9, requires_grad=True)
    out = conv(x, torch.zeros(0, 18, 5, 5), torch.zeros(0, 9, 5, 5))
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and conv.weight.grad.abs().sum() == 0


@pytest.mark.slow
def test_dcn_config_trains_one_step_and_infers():
    """The authors' X101-64x4d-DCN ATSS 800: DCNv2 with one group in res3-res5's 3x3
    convolutions (strided ones included), trained a step on the CPU (finite losses, the
    offsets trained), then inference."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DCN_CONFIG))
    bottom_up = model.backbone.bottom_up
    for stage, deformable in (("res2", False), ("res3", True), ("res4", True), ("res5", True)):
        for block in getattr(bottom_up, stage):
            assert (type(block.conv2) is TorchvisionModulatedDeformConv) is deformable, stage
            if deformable:
                assert block.conv2.deformable_groups == 1 and block.conv2.groups == 64
    model.train()
    with EventStorage():
        losses = model(batch())
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert bottom_up.res3[0].conv2_offset.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"]} for x in batch()])
    assert len(outputs) == 2 and all(
        o["instances"].pred_boxes.tensor.shape[1] == 4 for o in outputs
    )
