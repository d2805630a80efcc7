"""CARAFE (Wang et al., *CARAFE: Content-Aware ReAssembly of FEatures*, ICCV 2019) in plain
PyTorch, and the FPN that upsamples with it (mmdetection's ``FPN_CARAFE``), the neck of the
Rank & Sort authors' "+" models.

mmcv's ``CARAFEPack`` runs a CUDA kernel; here the reassembly is ``k * k`` shifted
multiply-adds of the input with the predicted kernels (CPU and GPU, forward and backward
by autograd): memory of the output's size beyond what the convolutions take, no
``C * k * k``-fold unfolded copy of the input.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn

from .deform import convert_deform_convs

__all__ = ["CARAFE", "CARAFEFPN", "build_carafe_resnet_fpn_backbone", "carafe"]


def carafe(x: torch.Tensor, kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """Content-aware reassembly of ``x`` ``(N, C, H, W)`` into ``(N, C, sH, sW)``
    (``s = scale``) with ``kernels`` ``(N, G, k * k, s * s, H, W)``: for the output
    position ``(s i + a, s j + b)`` of a channel ``c`` of group ``g = c // (C / G)``::

        out[c, s i + a, s j + b] = sum_{u, v = 0}^{k - 1}
            kernels[g, u k + v, s a + b, i, j] * x[c, i + u - r, j + v - r]

    with ``r = (k - 1) / 2`` and ``x`` zero outside the image: each output pixel is a
    weighted sum of the ``k x k`` input neighbourhood of the pixel it lies in (mmcv's
    ``carafe`` op, its mask pixel-shuffled: ``kernels`` is that mask before the shuffle).
    """
    n, c, h, w = x.shape
    groups, taps, subpixels = kernels.shape[1:4]
    k = math.isqrt(taps)
    if k * k != taps or k % 2 == 0:
        raise ValueError(f"CARAFE needs an odd square kernel, got {taps} taps")
    if subpixels != scale * scale or kernels.shape[4:] != (h, w) or c % groups:
        raise ValueError(
            f"kernels {tuple(kernels.shape)} do not fit features {tuple(x.shape)} at scale {scale}"
        )
    r = (k - 1) // 2
    padded = F.pad(x, (r, r, r, r))
    out = None
    for tap in range(taps):
        u, v = divmod(tap, k)
        # (N, G, C / G, 1, H, W): a view (only the channel axis is split), so autograd keeps
        # no copy of it
        window = padded[:, :, u : u + h, v : v + w].reshape(n, groups, c // groups, 1, h, w)
        term = window * kernels[:, :, None, tap]
        out = term if out is None else out + term
    return F.pixel_shuffle(out.reshape(n, c * subpixels, h, w), scale)


class CARAFE(nn.Module):
    """Upsampling by content-aware reassembly (mmcv's ``CARAFEPack``, same parameters and
    initialisation). The kernels are predicted from the features themselves::

        m = content_encoder(channel_compressor(x))      (N, G k^2 s^2, H, W)
        kernels = softmax over the k^2 taps of m         (per group, sub-pixel and position)
        out = carafe(x, kernels, s)

    ``channel_compressor``: 1x1 convolution to ``compressed_channels``;
    ``content_encoder``: ``encoder_kernel`` convolution (dilation ``encoder_dilation``) to
    ``up_kernel^2 * up_group * scale^2`` channels, in the order pixel shuffle reads
    (``(g k^2 + tap) s^2 + sub-pixel``). Initialisation: Xavier-uniform for the compressor,
    normal(0, 0.001) for the encoder, zero biases.
    """

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        up_kernel: int = 5,
        up_group: int = 1,
        encoder_kernel: int = 3,
        encoder_dilation: int = 1,
        compressed_channels: int = 64,
    ):
        super().__init__()
        if up_kernel % 2 == 0 or encoder_kernel % 2 == 0:
            raise ValueError(
                f"CARAFE's kernels must be odd, got up {up_kernel}, encoder {encoder_kernel}"
            )
        if channels % up_group:
            raise ValueError(f"{channels} channels do not split into {up_group} groups")
        self.scale, self.up_kernel, self.up_group = scale, up_kernel, up_group
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(
            compressed_channels,
            up_kernel * up_kernel * up_group * scale * scale,
            encoder_kernel,
            padding=(encoder_kernel - 1) * encoder_dilation // 2,
            dilation=encoder_dilation,
        )
        nn.init.xavier_uniform_(self.channel_compressor.weight)
        nn.init.zeros_(self.channel_compressor.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)
        nn.init.zeros_(self.content_encoder.bias)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised reassembly kernels ``(N, G, k^2, s^2, H, W)`` of ``x``."""
        n, _, h, w = x.shape
        logits = self.content_encoder(self.channel_compressor(x))
        taps, subpixels = self.up_kernel * self.up_kernel, self.scale * self.scale
        return logits.view(n, self.up_group, taps, subpixels, h, w).softmax(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return carafe(x, self.kernels(x), self.scale)


def _xavier_conv(in_channels, out_channels, kernel_size, stride=1):
    """A convolution with bias, Xavier-uniform weights and zero bias (mmcv's ``xavier_init``
    with ``distribution='uniform'``, how ``FPN_CARAFE`` initialises its convolutions)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2
    )
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class CARAFEFPN(Backbone):
    """mmdetection's ``FPN_CARAFE`` (``start_level=0``, one extra level, no norm, no
    activation) on a Detectron2 bottom-up network, with outputs ``p<l>`` for the levels
    ``l`` of ``in_features`` and one more level above them.

    Unlike Detectron2's FPN (P6 by max pooling of P5, nearest upsampling), with
    ``C_l`` the bottom-up features and ``L`` the top input level::

        lateral_l = conv1x1(C_l)                 l <= L
        lateral_{L+1} = conv3x3, stride 2 (C_L)  (the extra level, also in the top-down path)
        top_l = lateral_l + crop(CARAFE_l(top_{l+1}))   from l = L down, top_{L+1} = lateral_{L+1}
        p_l = conv3x3(top_l)                     for every level, the extra one included

    where ``crop`` keeps the top-left part of the upsampled map when it is larger (odd
    sizes). Every convolution has a bias and Xavier-uniform weights.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: List[str],
        out_channels: int,
        carafe_kwargs: Dict[str, int],
    ):
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        shapes = bottom_up.output_shape()
        strides = [shapes[f].stride for f in in_features]
        for low, high in zip(strides, strides[1:]):
            if high != 2 * low:
                raise ValueError(f"FPN input strides must double per level, got {strides}")
        levels = [int(math.log2(s)) for s in strides] + [int(math.log2(strides[-1])) + 1]
        self._levels = levels
        for level, feature in zip(levels, in_features):
            lateral = _xavier_conv(shapes[feature].channels, out_channels, 1)
            self.add_module(f"fpn_lateral{level}", lateral)
        self.add_module(
            f"fpn_lateral{levels[-1]}",
            _xavier_conv(shapes[in_features[-1]].channels, out_channels, 3, stride=2),
        )
        for level in levels[:-1]:
            # upsamples level + 1 into level
            self.add_module(f"fpn_upsample{level}", CARAFE(out_channels, 2, **carafe_kwargs))
        for level in levels:
            self.add_module(f"fpn_output{level}", _xavier_conv(out_channels, out_channels, 3))
        self._out_features = [f"p{level}" for level in levels]
        self._out_feature_strides = {f"p{level}": 2**level for level in levels}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = strides[-1]

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up = self.bottom_up(x)
        top_input = bottom_up[self.in_features[-1]]
        laterals = [
            getattr(self, f"fpn_lateral{level}")(bottom_up[f])
            for level, f in zip(self._levels, self.in_features)
        ]
        laterals.append(getattr(self, f"fpn_lateral{self._levels[-1]}")(top_input))
        for i in range(len(laterals) - 1, 0, -1):
            below = laterals[i - 1]
            up = getattr(self, f"fpn_upsample{self._levels[i - 1]}")(laterals[i])
            laterals[i - 1] = below + up[:, :, : below.shape[2], : below.shape[3]]
        return {
            f"p{level}": getattr(self, f"fpn_output{level}")(top)
            for level, top in zip(self._levels, laterals)
        }

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_carafe_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet with :class:`CARAFEFPN` (``MODEL.FPN.IN_FEATURES``, ``OUT_CHANNELS``;
    ``MODEL.CARAFE``), its deformable convolutions on torchvision (:mod:`.deform`).
    ``MODEL.FPN.NORM`` and ``FUSE_TYPE`` other than the authors' (none, sum) are refused:
    this FPN does not read them."""
    if cfg.MODEL.FPN.NORM:
        raise ValueError(
            f"MODEL.FPN.NORM {cfg.MODEL.FPN.NORM!r}: build_carafe_resnet_fpn_backbone has no"
            " norm (the authors' FPN_CARAFE, norm_cfg=None); set it to ''"
        )
    if cfg.MODEL.FPN.FUSE_TYPE != "sum":
        raise ValueError(
            f"MODEL.FPN.FUSE_TYPE {cfg.MODEL.FPN.FUSE_TYPE!r}: build_carafe_resnet_fpn_backbone"
            " sums the levels; set it to 'sum'"
        )
    c = cfg.MODEL.CARAFE
    return CARAFEFPN(
        convert_deform_convs(build_resnet_backbone(cfg, input_shape)),
        cfg.MODEL.FPN.IN_FEATURES,
        cfg.MODEL.FPN.OUT_CHANNELS,
        dict(
            up_kernel=c.UP_KERNEL,
            up_group=c.UP_GROUP,
            encoder_kernel=c.ENCODER_KERNEL,
            encoder_dilation=c.ENCODER_DILATION,
            compressed_channels=c.COMPRESSED_CHANNELS,
        ),
    )
