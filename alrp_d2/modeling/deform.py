"""Deformable convolutions of the ResNet backbones on torchvision's ``deform_conv2d``.

Detectron2's ``DeformBottleneckBlock`` (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``,
``DEFORM_MODULATED``, ``DEFORM_NUM_GROUPS``) computes its 3x3 convolution with
``detectron2._C``'s kernels: CUDA only, except a forward pass of the plain (not modulated)
convolution with one deformable group on the CPU. The aLRP authors' DCN model (modulated,
DCNv2, one group) and Rank & Sort's (four groups) must also train on the CPU, so
:func:`convert_deform_convs` replaces each of those convolutions of a built model by
:class:`TorchvisionDeformConv` or :class:`TorchvisionModulatedDeformConv`: the same module
(same parameters, initialisation, ``norm`` and state-dict keys, so Detectron2's DCN
checkpoints load) whose forward pass calls ``torchvision.ops.deform_conv2d`` (CPU and CUDA,
forward and backward, any number of groups). The offsets and masks are Detectron2's
block's, unchanged: ``conv2_offset``'s channels split in three, the first two thirds the
offsets, the last the masks (through a sigmoid), in the layout both kernels read (per
deformable group, per kernel position, the vertical offset then the horizontal one).
"""

from __future__ import annotations

from typing import Optional

import torch
from detectron2.layers.deform_conv import DeformConv, ModulatedDeformConv
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = ["TorchvisionDeformConv", "TorchvisionModulatedDeformConv", "convert_deform_convs"]

# Offsets are held within this many pixels: every sampling position beyond it lies outside
# any feature map (and samples 0), so no finite offset changes its output or gradient, and
# half precision can hold it.
_FAR = 1e4


def _held(offset: torch.Tensor) -> torch.Tensor:
    """``offset`` with NaN and infinite entries (a diverged model's) moved outside the
    image, where Detectron2's and mmcv's kernels sample 0: torchvision's kernels turn a
    NaN position into a memory index (a crash on the CPU)."""
    return torch.nan_to_num(offset, nan=_FAR, posinf=_FAR, neginf=-_FAR).clamp(-_FAR, _FAR)


def _deform_conv(module, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]):
    """``module``'s convolution (weight, bias, stride, padding, dilation, groups) of ``x``
    sampled at ``offset`` (and weighted by ``mask``), followed by its norm and activation.
    An empty batch gives an empty output of the right shape (torchvision's kernels handle
    it; Detectron2's own empty-input path fails on integer paddings)."""
    taps = module.kernel_size[0] * module.kernel_size[1]
    expected = 2 * module.deformable_groups * taps
    if offset.shape[1] != expected:
        raise ValueError(
            f"{type(module).__name__} with {module.deformable_groups} deformable groups"
            f" takes {expected} offset channels, got {offset.shape[1]}"
        )
    if mask is not None and mask.shape[1] != module.deformable_groups * taps:
        raise ValueError(
            f"{type(module).__name__} with {module.deformable_groups} deformable groups"
            f" takes {module.deformable_groups * taps} mask channels, got {mask.shape[1]}"
        )
    bias = module.bias
    offset = _held(offset)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # torchvision's CPU kernel has no reduced-precision form, and its CUDA one under
        # autocast computes in float32: float32 on both, the result in the input's dtype.
        with torch.autocast(device, enabled=False):
            out = deform_conv2d(
                x.float(),
                offset.float(),
                module.weight.float(),
                None if bias is None else bias.float(),
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                mask=None if mask is None else mask.float(),
            )
        out = out.to(x.dtype)
    else:
        out = deform_conv2d(
            x,
            offset,
            module.weight,
            bias,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            mask=mask,
        )
    if module.norm is not None:
        out = module.norm(out)
    if module.activation is not None:
        out = module.activation(out)
    return out


class TorchvisionDeformConv(DeformConv):
    """Detectron2's :class:`DeformConv` (deformable convolution, DCNv1) computed by
    ``torchvision.ops.deform_conv2d``: every device, any number of groups, with gradients."""

    def forward(self, x, offset):
        return _deform_conv(self, x, offset, None)


class TorchvisionModulatedDeformConv(ModulatedDeformConv):
    """Detectron2's :class:`ModulatedDeformConv` (DCNv2) computed by
    ``torchvision.ops.deform_conv2d``: every device, any number of groups, with gradients."""

    def forward(self, x, offset, mask):
        return _deform_conv(self, x, offset, mask)


_REPLACEMENTS = (
    (ModulatedDeformConv, TorchvisionModulatedDeformConv),
    (DeformConv, TorchvisionDeformConv),
)


def _replacement(conv: nn.Module) -> nn.Module:
    for detectron2_class, cls in _REPLACEMENTS:
        if type(conv) is detectron2_class:
            break
    else:
        return conv
    kwargs = dict(
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        deformable_groups=conv.deformable_groups,
        norm=conv.norm,
        activation=conv.activation,
    )
    if cls is TorchvisionModulatedDeformConv:
        kwargs["bias"] = conv.with_bias
    # The new module's own initialisation is thrown away: it must draw no random numbers,
    # so that every layer built after it is initialised as in Detectron2's own build.
    with torch.random.fork_rng(devices=[]):
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, **kwargs)
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    new.train(conv.training)
    return new


def convert_deform_convs(module: nn.Module) -> nn.Module:
    """``module`` with every Detectron2 ``DeformConv`` / ``ModulatedDeformConv`` in it
    replaced by its torchvision-backed twin holding the same parameters (in place; a
    ``module`` that is such a convolution itself is returned replaced). A model without
    deformable convolutions is returned as it is."""
    replaced = _replacement(module)
    if replaced is not module:
        return replaced
    for name, child in module.named_children():
        new = convert_deform_convs(child)
        if new is not child:
            setattr(module, name, new)
    return module
