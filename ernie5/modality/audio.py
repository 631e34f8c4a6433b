"""Audio tokenizer: a conv codec at a configurable frame rate (12.5 Hz at 16 kHz by default) with residual VQ
(SPEC §2, NCP). Level 1 can be distilled toward a teacher's features (ERNIE uses Whisper; pluggable here).

Waveforms are [B, samples] float32 in [-1, 1]; the hop (samples per frame) is the product of `strides` and must
equal sample_rate / frame_rate. Codes: [B, frames, levels] int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.config.schema import join, require
from ernie5.modality.rvq import ResidualVQ


@dataclass
class AudioTokenizerConfig:
    """Shape of the audio codec and its losses."""

    sample_rate: int = 16000
    frame_rate: float = 12.5
    strides: list[int] = field(default_factory=lambda: [4, 4, 8, 10])  # product = hop = 1280 at 12.5 Hz
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # after each stride
    latent_dim: int = 64
    levels: int = 4
    codebook_size: int = 256
    ema_decay: float = 0.95
    dead_threshold: float = 0.05
    stft_resolutions: list[list[int]] = field(default_factory=lambda: [[512, 128], [1024, 256], [256, 64]])
    stft_weight: float = 1.0
    l1_weight: float = 1.0
    commit_weight: float = 0.25
    teacher_weight: float = 0.0  # > 0: level-1 codes regressed toward `teacher` features

    @property
    def hop(self) -> int:
        return int(np.prod(self.strides))

    def validate(self, path: str) -> None:
        want = self.sample_rate / self.frame_rate
        require(abs(want - self.hop) < 1e-6, join(path, "strides"),
                f"product {self.hop} must equal sample_rate / frame_rate = {want:g}")
        require(len(self.channels) == len(self.strides), join(path, "channels"),
                f"{len(self.channels)} entries, strides has {len(self.strides)}")
        require(self.levels >= 1, join(path, "levels"), "must be >= 1")
        require(self.codebook_size >= 2, join(path, "codebook_size"), "must be >= 2")
        for i, r in enumerate(self.stft_resolutions):
            require(len(r) == 2 and r[0] > r[1] > 0, join(path, f"stft_resolutions[{i}]"), "expected [n_fft, hop]")


class ResUnit1d(nn.Layer):
    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.c1 = nn.Conv1D(ch, ch, 7, padding=3 * dilation, dilation=dilation)
        self.c2 = nn.Conv1D(ch, ch, 1)

    def forward(self, x):
        return x + self.c2(F.elu(self.c1(F.elu(x))))


class AudioEncoder(nn.Layer):
    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        layers, c_prev = [nn.Conv1D(1, cfg.channels[0] // 2, 7, padding=3)], cfg.channels[0] // 2
        for s, c in zip(cfg.strides, cfg.channels):
            layers += [ResUnit1d(c_prev, 1), nn.ELU(), nn.Conv1D(c_prev, c, 2 * s, stride=s, padding=s // 2 + s % 2)]
            c_prev = c
        layers += [nn.ELU(), nn.Conv1D(c_prev, cfg.latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, wav_BT):
        return self.net(wav_BT.unsqueeze(1))  # [B, D, frames]


class AudioDecoder(nn.Layer):
    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        chans = list(reversed(cfg.channels))
        layers, c_prev = [nn.Conv1D(cfg.latent_dim, chans[0], 7, padding=3)], chans[0]
        for s, c in zip(reversed(cfg.strides), chans[1:] + [cfg.channels[0] // 2]):
            layers += [nn.ELU(), nn.Conv1DTranspose(c_prev, c, 2 * s, stride=s, padding=s // 2 + s % 2,
                                                         output_padding=s % 2),
                       ResUnit1d(c, 1)]
            c_prev = c
        layers += [nn.ELU(), nn.Conv1D(c_prev, 1, 7, padding=3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z_BDF):
        return self.net(z_BDF).squeeze(1)


def multi_resolution_stft_loss(x_BT, y_BT, resolutions) -> paddle.Tensor:
    """Sum over resolutions of spectral convergence + L1 of log magnitudes."""
    total = 0.0
    for n_fft, hop in resolutions:
        window = paddle.to_tensor(np.hanning(n_fft).astype("float32"))
        X = paddle.abs(paddle.signal.stft(x_BT, n_fft, hop, window=window)) + 1e-7
        Y = paddle.abs(paddle.signal.stft(y_BT, n_fft, hop, window=window)) + 1e-7
        sc = paddle.linalg.norm(Y - X) / (paddle.linalg.norm(Y) + 1e-7)
        total = total + sc + F.l1_loss(paddle.log(X), paddle.log(Y))
    return total


class AudioTokenizer(nn.Layer):
    """encode -> codes [B, frames, levels]; decode(codes) -> waveform; `forward` returns the training losses."""

    def __init__(self, cfg: AudioTokenizerConfig, teacher: Callable | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = AudioEncoder(cfg), AudioDecoder(cfg)
        self.rvq = ResidualVQ(cfg.latent_dim, cfg.levels, cfg.codebook_size, cfg.ema_decay, cfg.dead_threshold)
        self.teacher = teacher  # callable wav [B, T] -> features [B, F, frames']; frozen, not a sublayer
        if teacher is not None:
            self.teacher_proj = nn.Linear(cfg.latent_dim, teacher.out_features)

    def crop(self, wav_BT):
        """Trim to a whole number of frames (the codec's unit)."""
        n = wav_BT.shape[1] // self.cfg.hop * self.cfg.hop
        return wav_BT[:, :n]

    def _quantize(self, wav_BT):
        z = self.encoder(self.crop(wav_BT))  # [B, D, F]
        B, D, Fr = z.shape
        z_ND = z.transpose([0, 2, 1]).reshape([B * Fr, D])
        z_q, codes, quantised, norms = self.rvq(z_ND)
        return z_ND, z_q, codes.reshape([B, Fr, -1]), quantised, norms, (B, Fr)

    @paddle.no_grad()
    def encode(self, wav_BT: paddle.Tensor) -> paddle.Tensor:
        return self._quantize(wav_BT)[2]

    def decode(self, codes_BFL: paddle.Tensor) -> paddle.Tensor:
        B, Fr, L = codes_BFL.shape
        z = self.rvq.decode(codes_BFL.reshape([B * Fr, L])).reshape([B, Fr, -1]).transpose([0, 2, 1])
        return self.decoder(z)

    def forward(self, wav_BT: paddle.Tensor):
        cfg = self.cfg
        wav_BT = self.crop(wav_BT)
        z_ND, z_q, codes, quantised, norms, (B, Fr) = self._quantize(wav_BT)
        rec = self.decoder(z_q.reshape([B, Fr, -1]).transpose([0, 2, 1]))
        losses = {"stft": multi_resolution_stft_loss(rec, wav_BT, cfg.stft_resolutions),
                  "l1": F.l1_loss(rec, wav_BT), "commit": F.mse_loss(z_ND, z_q.detach())}
        total = cfg.stft_weight * losses["stft"] + cfg.l1_weight * losses["l1"] + cfg.commit_weight * losses["commit"]
        if self.teacher is not None and cfg.teacher_weight > 0:
            losses["teacher"] = self.teacher_loss(wav_BT, z_ND, quantised[0], B, Fr)
            total = total + cfg.teacher_weight * losses["teacher"]
        losses["total"] = total
        return rec, losses, codes, norms

    def teacher_loss(self, wav_BT, z_ND, q1_ND, B, Fr):
        """Level-1 distillation: the level-1 codeword (straight-through to the encoder) projected to the
        teacher's feature size should match the teacher's features pooled to the codec frame rate (cosine)."""
        with paddle.no_grad():
            t = self.teacher(wav_BT)  # [B, F', frames']
            t = F.adaptive_avg_pool1d(t, Fr).transpose([0, 2, 1]).reshape([B * Fr, -1])
        q1 = z_ND + (q1_ND - z_ND).detach()
        return (1 - F.cosine_similarity(self.teacher_proj(q1), t, axis=1)).mean()


class RandomConvTeacher1d(nn.Layer):
    """Fixed random conv features of a waveform: the stand-in teacher for the distillation hook in tests."""

    def __init__(self, feat: int = 16, seed: int = 0):
        super().__init__()
        paddle.seed(seed)
        self.net = nn.Sequential(nn.Conv1D(1, feat, 400, stride=160), nn.Tanh())
        for p in self.parameters():
            p.stop_gradient = True
        self.out_features = feat

    def forward(self, wav_BT):
        return self.net(wav_BT.unsqueeze(1))


def snr_db(rec: np.ndarray, ref: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - rec|^2); silence (rec = 0) scores exactly 0 dB."""
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - rec) ** 2).sum(), 1e-12)))
