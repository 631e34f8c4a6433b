"""Vision tokenizer: one causal 3D-conv autoencoder for images and video (an image is a one-frame video), with a
multi-scale residual bitwise quantiser whose codes the unified model generates frame by frame, scale by scale
(next-frame-and-scale prediction, NFSP).

Causality in time: every temporal convolution pads only the past, by repeating the first frame, so frame 0 is
encoded on its own and frame k sees frames <= k. No temporal downsampling: one latent frame per video frame.
For a one-frame input the repeated-frame padding makes a causal 3D conv exactly a 2D conv with the temporal taps
summed, which is used as a fast path (images are most of the data and 3D convs are slow on CPU).

Tensors: pixels x_BCTHW in [-1, 1]; latent f_BDThw with d = `bits` channels; codes: one uint8
[B, T, s, s, d] per scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.config.schema import join, require
from ernie5.modality.bitwise import MultiScaleBitQuantizer
from ernie5.modality.conv import add_channel_bias


@dataclass
class VisionTokenizerConfig:
    """Shape of the vision tokenizer and its loss weights."""

    in_channels: int = 1
    image_size: int = 16
    channels: int = 32
    downsample: int = 1  # number of 2x spatial downsamplings: latent side = image_size / 2^downsample
    temporal_kernel: int = 2
    bits: int = 4  # sign bits per token: vocabulary 2^bits
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    recon_weight: float = 1.0
    commit_weight: float = 0.25
    entropy_weight: float = 0.02
    entropy_temperature: float = 0.5
    batch_entropy_weight: float = 2.0  # gamma of E[H(bit)] - gamma H(E[bit]): > 1 keeps coarse bits in use
    # quantiser step of scale k = magnitude_fraction x running mean |residual k| (momentum stat_momentum);
    # see ernie5/modality/bitwise.py for why these replaced trained magnitudes
    magnitude_fraction: float = 0.5
    stat_momentum: float = 0.05
    adversarial_weight: float = 0.0  # > 0: a small patch discriminator is trained alongside
    teacher_weight: float = 0.0  # > 0: encoder features are regressed toward a teacher's (see `teacher`)

    @property
    def latent_side(self) -> int:
        return self.image_size >> self.downsample

    def validate(self, path: str) -> None:
        require(self.bits >= 1, join(path, "bits"), "must be >= 1")
        require(self.image_size % (1 << self.downsample) == 0, join(path, "image_size"),
                f"{self.image_size} is not divisible by 2^downsample = {1 << self.downsample}")
        require(bool(self.scales) and self.scales == sorted(self.scales), join(path, "scales"),
                f"{self.scales} must be a non-empty increasing list")
        require(self.scales[-1] == self.latent_side if self.scales else True, join(path, "scales"),
                f"last scale {self.scales[-1] if self.scales else None} must equal the latent side "
                f"{self.latent_side} (image_size / 2^downsample)")
        require(self.temporal_kernel >= 1, join(path, "temporal_kernel"), "must be >= 1")
        require(0 < self.stat_momentum <= 1, join(path, "stat_momentum"), "must be in (0, 1]")
        require(self.magnitude_fraction > 0, join(path, "magnitude_fraction"), "must be > 0")


class CausalConv3d(nn.Layer):
    """Conv3D, kernel (kt, k, k), padded spatially 'same' and temporally with kt-1 copies of the first frame."""

    def __init__(self, c_in: int, c_out: int, kt: int = 2, k: int = 3, stride: int = 1):
        super().__init__()
        self.kt = kt
        self.conv = nn.Conv3D(c_in, c_out, (kt, k, k), stride=(1, stride, stride), padding=(0, k // 2, k // 2))

    def forward(self, x_BCTHW: paddle.Tensor) -> paddle.Tensor:
        c = self.conv
        if x_BCTHW.shape[2] == 1:  # image fast path: identical result to padding with copies of frame 0
            y = F.conv2d(x_BCTHW.squeeze(2), c.weight.sum(axis=2), stride=c._stride[1:], padding=c._padding[1:])
            return add_channel_bias(y, c.bias).unsqueeze(2)
        if self.kt > 1:
            x_BCTHW = paddle.concat([x_BCTHW[:, :, :1]] * (self.kt - 1) + [x_BCTHW], axis=2)
        return add_channel_bias(F.conv3d(x_BCTHW, c.weight, stride=c._stride, padding=c._padding), c.bias)


class ResBlock(nn.Layer):
    """x + conv(silu(conv(silu(x)))); no normalisation (batch statistics over time would break causality)."""

    def __init__(self, ch: int, kt: int):
        super().__init__()
        self.c1, self.c2 = CausalConv3d(ch, ch, kt), CausalConv3d(ch, ch, kt)

    def forward(self, x):
        return x + self.c2(F.silu(self.c1(F.silu(x))))


def _up2(x_BCTHW: paddle.Tensor) -> paddle.Tensor:
    B, C, T, H, W = x_BCTHW.shape
    y = F.interpolate(x_BCTHW.reshape([B, C * T, H, W]), scale_factor=2, mode="nearest")
    return y.reshape([B, C, T, 2 * H, 2 * W])


class Encoder(nn.Layer):
    def __init__(self, cfg: VisionTokenizerConfig):
        super().__init__()
        ch, kt = cfg.channels, cfg.temporal_kernel
        self.conv_in = CausalConv3d(cfg.in_channels, ch, kt)
        self.blocks = nn.LayerList()
        for _ in range(cfg.downsample):
            self.blocks.append(ResBlock(ch, kt))
            self.blocks.append(CausalConv3d(ch, ch, kt, stride=2))
        self.blocks.append(ResBlock(ch, kt))
        self.conv_out = CausalConv3d(ch, cfg.bits, 1, k=1)

    def hidden(self, x_BCTHW):
        h = self.conv_in(x_BCTHW)
        for b in self.blocks:
            h = b(h)
        return F.silu(h)

    def forward(self, x_BCTHW):
        h = self.hidden(x_BCTHW)
        return self.conv_out(h), h


class Decoder(nn.Layer):
    def __init__(self, cfg: VisionTokenizerConfig):
        super().__init__()
        ch, kt = cfg.channels, cfg.temporal_kernel
        self.conv_in = CausalConv3d(cfg.bits, ch, kt)
        self.res = nn.LayerList([ResBlock(ch, kt)])
        self.ups = nn.LayerList([CausalConv3d(ch, ch, kt) for _ in range(cfg.downsample)])
        self.res_ups = nn.LayerList([ResBlock(ch, kt) for _ in range(cfg.downsample)])
        self.conv_out = CausalConv3d(ch, cfg.in_channels, kt)

    def forward(self, f_BDThw):
        h = self.res[0](self.conv_in(f_BDThw))
        for up, res in zip(self.ups, self.res_ups):
            h = res(up(_up2(h)))
        return self.conv_out(F.silu(h))


class PatchDiscriminator(nn.Layer):
    """Small per-frame patch discriminator: [N, C, H, W] -> logits [N, 1, H/4, W/4]."""

    def __init__(self, in_channels: int, ch: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2D(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2D(ch, 2 * ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2D(2 * ch, 1, 3, padding=1))

    def forward(self, x_NCHW):
        return self.net(x_NCHW)


class RandomConvTeacher(nn.Layer):
    """A fixed (frozen, seeded) random conv net: the stand-in teacher for the feature regulariser in tests."""

    def __init__(self, in_channels: int, feat: int = 16, seed: int = 0):
        super().__init__()
        paddle.seed(seed)
        self.net = nn.Sequential(nn.Conv2D(in_channels, feat, 3, padding=1), nn.Tanh(),
                                 nn.Conv2D(feat, feat, 3, padding=1))
        for p in self.parameters():
            p.stop_gradient = True
        self.out_features = feat

    def forward(self, x_NCHW):
        return self.net(x_NCHW)


def _frames(x_BCTHW: paddle.Tensor) -> paddle.Tensor:
    B, C, T, H, W = x_BCTHW.shape
    return x_BCTHW.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])


def _unframes(x_NCHW: paddle.Tensor, B: int) -> paddle.Tensor:
    N, C, H, W = x_NCHW.shape
    return x_NCHW.reshape([B, N // B, C, H, W]).transpose([0, 2, 1, 3, 4])


class VisionTokenizer(nn.Layer):
    """encode / decode / next_scale_inputs / features, and `forward` returning the training losses."""

    def __init__(self, cfg: VisionTokenizerConfig, teacher: Callable | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant = MultiScaleBitQuantizer(cfg.bits, cfg.scales, cfg.entropy_temperature, cfg.magnitude_fraction,
                                            cfg.batch_entropy_weight, cfg.stat_momentum)
        self.teacher = teacher  # callable frames [N, C, H, W] -> [N, F, h', w']; not a sublayer: never trained
        if teacher is not None:
            self.teacher_proj = nn.Conv2D(cfg.channels, teacher.out_features, 1)

    # -- quantised path ---------------------------------------------------------------------------------------
    def _quantize(self, x_BCTHW):
        B = x_BCTHW.shape[0]
        f, h = self.encoder(x_BCTHW)
        f_st, codes_N, losses = self.quant(_frames(f))
        codes = [c.reshape([B, -1, *c.shape[1:]]) for c in codes_N]  # [B, T, s, s, d]
        return _unframes(f_st, B), codes, losses, h

    @paddle.no_grad()
    def encode(self, x_BCTHW: paddle.Tensor) -> list[paddle.Tensor]:
        """Pixels -> per-scale bit codes: a list of uint8 [B, T, s_k, s_k, bits]."""
        return self._quantize(x_BCTHW)[1]

    def quantized_latent(self, codes: list[paddle.Tensor]) -> paddle.Tensor:
        """Codes -> latent f_hat [B, bits, T, h, w] (sum of the upsampled scales)."""
        B, T = codes[0].shape[:2]
        flat = [c.reshape([B * T, *c.shape[2:]]) for c in codes]
        return _unframes(self.quant.dequantize(flat), B)

    def decode(self, codes: list[paddle.Tensor]) -> paddle.Tensor:
        """Codes -> pixels [B, C, T, H, W]."""
        return self.decoder(self.quantized_latent(codes))

    def next_scale_inputs(self, codes: list[paddle.Tensor]) -> list[paddle.Tensor]:
        """Teacher-forcing inputs of next-scale prediction: for k = 1..K-1 the accumulated latent of scales < k
        resized to scale k's grid, [B, T, s_k, s_k, bits]: linear in the earlier sign bits, no constant term
        (formula in `ernie5.modality.bitwise`)."""
        B, T = codes[0].shape[:2]
        flat = [c.reshape([B * T, *c.shape[2:]]) for c in codes]
        return [x.reshape([B, T, *x.shape[1:]]) for x in self.quant.next_scale_inputs(flat)]

    def features(self, x_BCTHW: paddle.Tensor) -> paddle.Tensor:
        """Continuous pre-quantisation encoder features for understanding inputs: [B, T, h, w, channels]."""
        return self.encoder.hidden(x_BCTHW).transpose([0, 2, 3, 4, 1])

    # -- training --------------------------------------------------------------------------------------------
    def forward(self, x_BCTHW: paddle.Tensor) -> tuple[paddle.Tensor, dict]:
        """Reconstruction and losses: (x_rec, {name: scalar}) with 'total' the weighted generator loss
        (the adversarial term, if any, is added by the trainer that owns the discriminator)."""
        cfg = self.cfg
        f_st, _, losses, h = self._quantize(x_BCTHW)
        x_rec = self.decoder(f_st)
        losses["recon"] = F.mse_loss(x_rec, x_BCTHW) + 0.1 * F.l1_loss(x_rec, x_BCTHW)
        total = (cfg.recon_weight * losses["recon"] + cfg.commit_weight * losses["commit"]
                 + cfg.entropy_weight * losses["entropy"])
        if self.teacher is not None and cfg.teacher_weight > 0:
            losses["teacher"] = self.teacher_loss(x_BCTHW, h)
            total = total + cfg.teacher_weight * losses["teacher"]
        losses["total"] = total
        return x_rec, losses

    def teacher_loss(self, x_BCTHW, h_BCThw) -> paddle.Tensor:
        """1 - cosine(projected encoder features, teacher features resized to the latent grid), per position."""
        with paddle.no_grad():
            t = self.teacher(_frames(x_BCTHW))
            t = F.adaptive_avg_pool2d(t, list(h_BCThw.shape[-2:]))
        s = self.teacher_proj(_frames(h_BCThw))
        return (1 - F.cosine_similarity(s, t.detach(), axis=1)).mean()


def inflate_state(old_state: dict, model: nn.Layer) -> dict:
    """Initialise `model` from a tokenizer with fewer bits (progressive bit widths): tensors of equal shape are
    copied; where the bit axis grew, the old slice is copied and the new channels keep their fresh init."""
    new_state = model.state_dict()
    out = {}
    for name, new in new_state.items():
        old = old_state.get(name)
        if old is None:
            out[name] = new
            continue
        old = paddle.to_tensor(old) if not isinstance(old, paddle.Tensor) else old
        if list(old.shape) == list(new.shape):
            out[name] = old
            continue
        if len(old.shape) != len(new.shape):
            out[name] = new
            continue
        merged = new.numpy().copy()
        if len(new.shape) > 1 and new.shape[1] > old.shape[1]:
            # new *input* channels (decoder reading the new bits) start at zero: the wider model starts out
            # decoding exactly like the narrow one and learns to use the extra bits
            merged[:, old.shape[1]:] = 0
        sl = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, new.shape))
        merged[sl] = old.numpy()[sl]
        out[name] = paddle.to_tensor(merged)
    model.set_state_dict(out)
    return out
