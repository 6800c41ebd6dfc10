"""EDLNet: the 2-D U-Net that turns one CT slice into (reconstruction, anomaly logit).

Layout (DESIGN.md section 4): four down-steps with widths w, 2w, 4w, 8w, 16w (double 3x3 conv
+ BN + ReLU, 2x2 max-pool), a bottleneck that is either the plain 16w double conv or the SCRB
(spatial-channel refinement block), and four up-steps (2x2 transposed conv, gated fusion with
the skip features, double conv). A 1x1 head gives two maps of the input's size:
- reconstruction: linear (no sigmoid), in the input's [0, 1] intensity units, so that air at
  exactly 0 is reachable and an MSE target needs no logit of 0 or 1;
- anomaly logit: apply a sigmoid for a probability.
H and W must be multiples of 16 (four 2x pools); anything else raises ValueError.

Why these blocks: the published parameter counts pin the design down. Width 64, convs that
feed a BN carry no bias; C = output width of an up-step (512 at the deepest, 64 at the last):
- Encoder, double convs 1->64->64 ... 256->512->512:             4,686,144
- Up-steps: transposed conv 2C->C (8C^2 + C), gate 1x1 (C + 1), and a double conv that keeps
  the fused width 2C in its first conv, 2C->2C->C (54C^2 + 6C), four steps:  21,593,604
  A standard U-Net decoder conv 2C->C->C has 27C^2; the extra 27C^2 per step is what turns
  a 31.0 M U-Net into the published 40.4 M, and it also reproduces the published "0.26 M of
  the weights trained" under the detach bug: only the first encoder block (37,696), the
  last gate (65), the last decoder conv (221,568) and the head (130) get gradients: 259,459.
- Head 1x1 64 -> 2:                                                     130
- Plain bottleneck, double conv 512->1024->1024:  14,159,872 -> 40,439,750 in all (40.4 M)
- SCRB bottleneck (C = 1024): 1x1 projection 512->C + BN 526,336; spatial part, four
  depthwise 1x1 + BN 6,144; channel part: group conv 3x3 C/2->C in 2 groups 2,359,296,
  point-wise C/2->C 524,288, point-wise C/2->C/2 262,144, BN 2,048; SCRB 3,680,256
  -> 29,960,134 in all (published 30.2 M: -0.8 %).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "EDLNet"
MULTIPLE = 16  # four 2x down-steps
SHIFT = 2  # px, the spatial part's diagonal shift
_DEFAULTS = {"width": 64, "in_channels": 1, "scrb": True, "gate": True, "detach_fusion": False}


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, mid: int | None = None):
        mid = cout if mid is None else mid
        super().__init__(*_conv_bn_relu(cin, mid), *_conv_bn_relu(mid, cout))


class SpatialRefinement(nn.Module):
    """Depthwise 1x1 convs on four copies of x shifted by (+-2, +-2) px (zero fill), summed,
    BN, GELU: each pixel mixes in its diagonal neighbours at almost no parameter cost."""

    def __init__(self, channels: int):
        super().__init__()
        self.mix = nn.ModuleList(nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
                                 for _ in range(4))
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s, e = SHIFT, 2 * SHIFT
        padded = F.pad(x, (s, s, s, s))
        # The crop taken at offset (dy, dx) of the padded map is x shifted by (s - dy, s - dx).
        crops = (padded[..., :h, :w], padded[..., :h, e:], padded[..., e:, :w],
                 padded[..., e:, e:])
        total = sum(conv(c) for conv, c in zip(self.mix, crops))
        return self.act(self.norm(total))


class ChannelRefinement(nn.Module):
    """After SCConv's channel reconstruction unit: the channels are split in halves; the first
    half goes through a group-wise 3x3 conv plus a point-wise conv (rich, to C channels), the
    second through a cheap point-wise conv concatenated with itself (to C channels); the two
    results are mixed per channel by a softmax over their globally pooled means. (SCConv takes
    that softmax over all 2C channels at once, which shrinks the activations by about 2C; a
    per-channel softmax over the two branches keeps their scale.)"""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.half = half
        self.group_conv = nn.Conv2d(half, channels, 3, padding=1, groups=2, bias=False)
        self.point_rich = nn.Conv2d(half, channels, 1, bias=False)
        self.point_cheap = nn.Conv2d(channels - half, channels - half, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x[:, :self.half], x[:, self.half:]
        rich = self.group_conv(first) + self.point_rich(first)
        cheap = torch.cat([self.point_cheap(second), second], dim=1)
        stats = torch.stack([rich.mean(dim=(2, 3)), cheap.mean(dim=(2, 3))])
        weight = torch.softmax(stats, dim=0)[..., None, None]
        return self.norm(weight[0] * rich + weight[1] * cheap)


class SCRB(nn.Module):
    """Spatial-channel refinement block in place of the bottleneck double conv: a 1x1
    projection to the bottleneck width, then the spatial and the channel part, each residual."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.project = nn.Sequential(*_conv_bn_relu(cin, cout, kernel=1))
        self.spatial = SpatialRefinement(cout)
        self.channel = ChannelRefinement(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        x = x + self.spatial(x)
        return x + self.channel(x)


class UpStep(nn.Module):
    """2x2 transposed conv, then fusion with the skip features, then a double conv.

    gate=True: g = sigmoid(1x1 conv(skip)) is a spatial gate and the block fuses
    [g * skip, (1 - g) * up]; gate=False: plain U-Net concatenation [skip, up].
    detach_fusion=True detaches `up` there, as the published code does (the bug that leaves
    everything before the last decoder step untrained)."""

    def __init__(self, cin: int, cout: int, gate: bool, detach_fusion: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.gate = nn.Conv2d(cout, 1, 1) if gate else None
        self.detach_fusion = detach_fusion
        self.conv = DoubleConv(2 * cout, cout, mid=2 * cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        if self.detach_fusion:
            up = up.detach()
        if self.gate is not None:
            g = torch.sigmoid(self.gate(skip))
            skip, up = g * skip, (1.0 - g) * up
        return self.conv(torch.cat([skip, up], dim=1))


class EDLNet(nn.Module):
    def __init__(self, width: int = 64, in_channels: int = 1, scrb: bool = True,
                 gate: bool = True, detach_fusion: bool = False):
        super().__init__()
        self._config = _validated({"width": width, "in_channels": in_channels, "scrb": scrb,
                                   "gate": gate, "detach_fusion": detach_fusion})
        widths = [width * 2 ** i for i in range(5)]
        self.down = nn.ModuleList(
            DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels] + widths[:3], widths[:4]))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = SCRB(widths[3], widths[4]) if scrb else DoubleConv(widths[3], widths[4])
        self.ups = nn.ModuleList(UpStep(widths[i + 1], widths[i], gate, detach_fusion)
                                 for i in reversed(range(4)))
        self.head = nn.Conv2d(width, 2, 1)

    @property
    def config(self) -> dict:
        return {"architecture": ARCHITECTURE, **self._config}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        if h % MULTIPLE or w % MULTIPLE:
            raise ValueError(f"EDLNet needs slice height and width that are multiples of "
                             f"{MULTIPLE}; got {h} x {w} (pad the slice first)")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for step, skip in zip(self.ups, reversed(skips)):
            x = step(x, skip)
        out = self.head(x)
        return out[:, 0:1], out[:, 1:2]


def _validated(config: dict) -> dict:
    unknown = sorted(set(config) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown EDLNet setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(_DEFAULTS)}")
    out = {**_DEFAULTS, **config}
    for key in ("width", "in_channels"):
        value = out[key]
        if type(value) is not int or value < 1:
            raise ValueError(f"EDLNet {key} must be a positive integer, got {value!r}")
    for key in ("scrb", "gate", "detach_fusion"):
        if type(out[key]) is not bool:
            raise ValueError(f"EDLNet {key} must be true or false, got {out[key]!r}")
    return out


def build_model(config: dict) -> EDLNet:
    """Rebuild an EDLNet from `model.config` (settings left out take their defaults)."""
    if not isinstance(config, dict):
        raise ValueError(f"model config must be a mapping, got {type(config).__name__}")
    settings = dict(config)
    architecture = settings.pop("architecture", ARCHITECTURE)
    if architecture != ARCHITECTURE:
        raise ValueError(f"unknown architecture {architecture!r}; this version builds "
                         f"{ARCHITECTURE!r} only")
    return EDLNet(**_validated(settings))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
