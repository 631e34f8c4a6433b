"""Audio tokenizer: a frame-domain codec at a configurable frame rate (12.5 Hz at 16 kHz by default) with residual
VQ; the unified model predicts every level of the next frame with depth heads (next-codec prediction, NCP).
Level 1 can be distilled toward a teacher's features (ERNIE uses Whisper; pluggable here).

The codec works on short-time Fourier frames, one per codec frame (hop = sample_rate / frame_rate, Hann window of
`window_frames` hops). The encoder reads the complex STFT (real / imag, plus log magnitude for its conv branch);
the decoder predicts the complex STFT (real / imag) and an inverse STFT (weighted overlap-add) gives the waveform,
so the waveform *phase* is something the decoder outputs directly (Vocos-style) rather than something a low-rate
time-domain conv stack has to rediscover. Encoder and decoder are each a linear map (latent <-> real / imag) plus a
residual conv branch over neighbouring frames whose output layer starts at zero. `init_from_data` sets the linear
maps to the principal components of training frames and seeds the RVQ codebooks by k-means, so training starts
from a phase-faithful transform codec and then learns the nonlinear part end to end (straight-through RVQ).

Waveforms are [B, samples] float32 in [-1, 1]; codes are [B, frames, levels] int64 with frames = samples / hop.
Every conv is centred with a finite kernel, so a frame's codes depend only on audio within `lookahead_frames()`
frames of it, and decoded samples only on codes that near (bounded look-ahead; chunked encoding is exact away
from chunk edges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie5.config.schema import join, require
from ernie5.modality.conv import Conv1D
from ernie5.modality.rvq import ResidualVQ


@dataclass
class AudioTokenizerConfig:
    """Shape of the audio codec and its losses."""

    sample_rate: int = 16000
    frame_rate: float = 12.5  # codec frames per second; hop = sample_rate / frame_rate (1280 at 12.5 Hz)
    window_frames: int = 2  # STFT window = window_frames * hop (Hann, centred on its frame)
    channels: list[int] = field(default_factory=lambda: [256])  # residual conv stages of each nonlinear branch
    latent_dim: int = 192
    levels: int = 8
    codebook_size: int = 1024
    ema_decay: float = 0.999  # slow: the codebooks start from k-means on many frames and should not forget them
    dead_threshold: float = 0.05  # a code whose usage EMA is under this x the mean usage is re-seeded
    stft_resolutions: list[list[int]] = field(default_factory=lambda: [[512, 128], [1024, 256], [256, 64]])
    snr_weight: float = 1.0  # -SNR(dB)/10 of the batch: the waveform error itself, independent of loudness
    l1_weight: float = 1.0  # waveform L1
    spec_weight: float = 1.0  # L1 of the complex STFT (real and imag) at the codec's resolution: phase-aware
    stft_weight: float = 0.02  # multi-resolution STFT magnitude (spectral convergence + log magnitude); its
    # log(|X| + 1e-7) gradient is ~30-140x the SNR term's on the decoder and orthogonal to it (docs/audio_codec.md)
    stft_items: int = 2  # ... computed on the first n crops of a batch (0: all); the costliest loss term on CPU
    mel_weight: float = 0.0  # L1 of log mel spectrograms (`mel_distance`; an alternative to the STFT term)
    commit_weight: float = 0.25  # (only when the encoder trains)
    train_encoder: bool = True  # False: the PCA / k-means encoder and codebooks stay fixed (no gradient, no EMA,
    # no dead-code re-seeding) and only the decoder learns; ~25% cheaper steps, same held-out quality
    teacher_weight: float = 0.0  # > 0: level-1 codes regressed toward `teacher` features
    encode_beam: int = 8  # RVQ beam search width when encoding (1 = greedy, as in training)
    # training (`ernie5 tokenizer train`): data-dependent init, then augmented crops
    init_passes: int = 48  # passes over the training clips (random sub-frame shifts) for PCA / k-means init; 0: none
    init_kmeans_iters: int = 5
    augment_speed: float = 0.12  # training crops resampled by a random factor in 1 +- this (pitch and tempo)
    augment_gain: float = 0.3  # ... and scaled by a random gain in 1 +- this

    @property
    def hop(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def n_fft(self) -> int:
        return self.window_frames * self.hop

    def validate(self, path: str) -> None:
        want = self.sample_rate / self.frame_rate
        require(abs(want - round(want)) < 1e-6 and round(want) % 2 == 0, join(path, "frame_rate"),
                f"sample_rate / frame_rate = {want:g} must be an even whole number of samples")
        require(self.window_frames >= 2, join(path, "window_frames"), "must be >= 2 (overlapping windows)")
        require(len(self.channels) >= 1 and min(self.channels) >= 1, join(path, "channels"),
                "need at least one positive width")
        require(self.latent_dim >= 1, join(path, "latent_dim"), "must be >= 1")
        require(1 <= self.levels <= 16, join(path, "levels"), "must be in 1..16")
        require(self.codebook_size >= 2, join(path, "codebook_size"), "must be >= 2")
        require(self.stft_items >= 0, join(path, "stft_items"), "must be >= 0")
        require(self.mel_weight >= 0 and self.stft_weight >= 0, join(path, "mel_weight"), "loss weights must be >= 0")
        require(self.teacher_weight == 0 or self.train_encoder, join(path, "train_encoder"),
                "teacher_weight > 0 distils the encoder's level-1 codes: needs train_encoder: true")
        require(self.encode_beam >= 1, join(path, "encode_beam"), "must be >= 1")
        require(self.init_passes >= 0 and self.init_kmeans_iters >= 0, join(path, "init_passes"), "must be >= 0")
        require(0 <= self.augment_speed < 0.5, join(path, "augment_speed"), "must be in [0, 0.5)")
        require(0 <= self.augment_gain < 1, join(path, "augment_gain"), "must be in [0, 1)")
        for i, r in enumerate(self.stft_resolutions):
            require(len(r) == 2 and r[0] > r[1] > 0, join(path, f"stft_resolutions[{i}]"), "expected [n_fft, hop]")


# -- STFT / inverse STFT with exact frame bookkeeping ---------------------------------------------------------
class STFT(nn.Layer):
    """Hann-windowed STFT whose frame i is centred on samples [i*h, (i+1)*h): T samples (a multiple of h) give
    exactly T/h frames, and `inverse` (weighted overlap-add) gives back exactly T samples. Differentiable."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop, self.m = n_fft, hop, n_fft // hop
        self.pad = (n_fft - hop) // 2
        n = np.arange(n_fft)
        w = (0.5 - 0.5 * np.cos(2 * np.pi * (n + 0.5) / n_fft)).astype("float32")  # Hann, > 0 at every sample
        self.scale = float(np.sqrt((w ** 2).sum()))  # unit-energy window: STFT values are O(signal)
        self.register_buffer("window", paddle.to_tensor(w), persistable=False)

    def _frames(self, x_BT):
        B, T = x_BT.shape
        N = T // self.hop
        xp = F.pad(x_BT.unsqueeze(1), [self.pad, self.pad], data_format="NCL").squeeze(1)
        xs = xp.reshape([B, N + self.m - 1, self.hop])
        return paddle.concat([xs[:, j:j + N] for j in range(self.m)], axis=-1)  # [B, N, n_fft]

    def forward(self, x_BT):
        """[B, T] -> complex [B, bins, frames]."""
        return paddle.fft.rfft(self._frames(x_BT) * self.window, axis=-1).transpose([0, 2, 1]) / self.scale

    def inverse(self, spec_BKN):
        """complex [B, bins, frames] -> [B, frames * hop]."""
        fr = paddle.fft.irfft(spec_BKN.transpose([0, 2, 1]), n=self.n_fft, axis=-1) * (self.window * self.scale)
        B, N = fr.shape[0], fr.shape[1]
        parts = fr.reshape([B, N, self.m, self.hop])
        out = sum(_shift(parts[:, :, j], j, self.m - 1 - j) for j in range(self.m))  # chunk j of frame i -> i + j
        w2 = (self.window ** 2).reshape([self.m, 1, 1, self.hop])
        env = sum(_shift(w2[j].expand([1, N, self.hop]), j, self.m - 1 - j) for j in range(self.m))
        return (out / env).reshape([B, -1])[:, self.pad:self.pad + N * self.hop]


def _shift(x_BNH, before: int, after: int):
    """Zero-pad axis 1 (frames) of [B, N, H]."""
    if before == 0 and after == 0:
        return x_BNH
    B, _, H = x_BNH.shape
    parts = [paddle.zeros([B, before, H], x_BNH.dtype)] if before else []
    parts.append(x_BNH)
    if after:
        parts.append(paddle.zeros([B, after, H], x_BNH.dtype))
    return paddle.concat(parts, axis=1)


# -- encoder / decoder ------------------------------------------------------------------------------------------
class ResBlock1d(nn.Layer):
    """x + conv1x1(GELU(conv3(GELU(x)))) over frames; centred, so it sees `dilation` frames either side."""

    def __init__(self, ch: int, dilation: int = 1):
        super().__init__()
        self.c1 = Conv1D(ch, ch, 3, padding=dilation, dilation=dilation)
        self.c2 = Conv1D(ch, ch, 1)

    def forward(self, x):
        return x + self.c2(F.gelu(self.c1(F.gelu(x))))


def _branch(c_in: int, channels: list[int], c_out: int) -> nn.Sequential:
    """conv3 in -> residual stages (widths `channels`, dilations 1, 2, 1, 2 ...) -> zero-initialised 1x1 out."""
    layers, c_prev = [Conv1D(c_in, channels[0], 3, padding=1)], channels[0]
    for i, c in enumerate(channels):
        if c != c_prev:
            layers.append(Conv1D(c_prev, c, 1))
        layers.append(ResBlock1d(c, 1 + i % 2))
        c_prev = c
    out = Conv1D(c_prev, c_out, 1)
    out.weight.set_value(paddle.zeros_like(out.weight))  # the branch starts as a no-op next to the linear path
    out.bias.set_value(paddle.zeros_like(out.bias))
    return nn.Sequential(*layers, nn.GELU(), out)


def _branch_reach(channels: list[int]) -> int:
    """Frames either side a branch can see."""
    return 1 + sum(1 + i % 2 for i in range(len(channels)))


FEATURE_GAIN = 10.0  # STFT values of speech at ~0.1 RMS -> O(1) network inputs


def _slow() -> paddle.ParamAttr:
    """The linear maps start as the principal components (`init_from_data`) the codebooks are fitted to: they
    learn 10x slower than the conv branches, so the EMA codebooks can follow them."""
    return paddle.ParamAttr(learning_rate=0.1)



class AudioEncoder(nn.Layer):
    """Complex STFT [B, bins, frames] -> latent [B, latent_dim, frames]: a linear map of real / imag plus a conv
    branch over neighbouring frames that reads that linear latent and the log magnitude."""

    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        bins = cfg.n_fft // 2 + 1
        self.linear = Conv1D(2 * bins, cfg.latent_dim, 1, weight_attr=_slow(), bias_attr=_slow())
        self.branch = _branch(cfg.latent_dim + bins, cfg.channels, cfg.latent_dim)

    @staticmethod
    def features(spec_BKN):
        re_im = paddle.concat([paddle.real(spec_BKN), paddle.imag(spec_BKN)], axis=1) * FEATURE_GAIN
        return re_im, 0.2 * paddle.log(paddle.abs(spec_BKN) + 1e-4)

    def forward(self, spec_BKN):
        re_im, logmag = self.features(spec_BKN)
        z = self.linear(re_im)
        return z + self.branch(paddle.concat([z, logmag], axis=1))


class AudioDecoder(nn.Layer):
    """Latent [B, latent_dim, frames] -> complex STFT [B, bins, frames] (real, imag per bin)."""

    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        self.bins = cfg.n_fft // 2 + 1
        self.linear = Conv1D(cfg.latent_dim, 2 * self.bins, 1, weight_attr=_slow(), bias_attr=_slow())
        self.branch = _branch(cfg.latent_dim, list(reversed(cfg.channels)), 2 * self.bins)

    def forward(self, z_BDF):
        y = (self.linear(z_BDF) + self.branch(z_BDF)) / FEATURE_GAIN
        return paddle.complex(y[:, :self.bins], y[:, self.bins:])


# -- log-mel spectrogram (metric and loss) ---------------------------------------------------------------------
MEL_BINS, MEL_FFT, MEL_HOP, MEL_FLOOR = 80, 1024, 256, 1e-5


def hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4)."""
    f = np.asarray(f, dtype=np.float64)
    logf = 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(f < 1000.0, f * 3.0 / 200.0, logf)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = MEL_BINS, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters with centres evenly spaced in mels, each scaled to unit area
    over Hz (2 / bandwidth: Slaney normalisation, so a band's value is an average magnitude, not a sum)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return (tri * (2.0 / (hi - lo))).astype(np.float32)


_FILTERBANKS: dict = {}


def log_mel(x_BT, sample_rate: int) -> paddle.Tensor:
    """log(mel + 1e-5) of a waveform [B, T] -> [B, 80, frames]: magnitude STFT (1024-point periodic Hann, hop 256,
    centred with reflection padding; audio under 1024 samples is zero-padded to 1024 first), 80 Slaney mel bands
    0..sample_rate / 2. Differentiable."""
    key = (sample_rate, MEL_FFT, MEL_BINS)
    if key not in _FILTERBANKS:
        _FILTERBANKS[key] = (mel_filterbank(sample_rate, MEL_FFT), np.hanning(MEL_FFT + 1)[:-1].astype("float32"))
    fb, win = _FILTERBANKS[key]
    if x_BT.shape[1] < MEL_FFT:
        x_BT = F.pad(x_BT.unsqueeze(1), [0, MEL_FFT - x_BT.shape[1]], data_format="NCL").squeeze(1)
    mag = paddle.abs(paddle.signal.stft(x_BT, MEL_FFT, MEL_HOP, window=paddle.to_tensor(win), center=True,
                                        pad_mode="reflect"))  # [B, bins, frames]
    return paddle.log(paddle.matmul(paddle.to_tensor(fb), mag) + MEL_FLOOR)


def mel_distance(x_BT, y_BT, sample_rate: int) -> paddle.Tensor:
    """Mean |log_mel(x) - log_mel(y)| (natural log): 0 for identical audio; silence against speech scores how far
    the speech's bands sit above the 1e-5 floor."""
    return (log_mel(x_BT, sample_rate) - log_mel(y_BT, sample_rate)).abs().mean()


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
        self.stft = STFT(cfg.n_fft, cfg.hop)
        self.encoder, self.decoder = AudioEncoder(cfg), AudioDecoder(cfg)
        self.rvq = ResidualVQ(cfg.latent_dim, cfg.levels, cfg.codebook_size, cfg.ema_decay, cfg.dead_threshold)
        self.teacher = teacher  # callable wav [B, T] -> features [B, F, frames']; frozen, not a sublayer
        if teacher is not None:
            self.teacher_proj = nn.Linear(cfg.latent_dim, teacher.out_features)

    def crop(self, wav_BT):
        """Trim to a whole number of frames (the codec's unit)."""
        n = wav_BT.shape[1] // self.cfg.hop * self.cfg.hop
        return wav_BT[:, :n]

    def lookahead_frames(self) -> int:
        """Codec frames either side of frame f that can change its codes (and, for decode, its samples): the
        STFT window's overhang plus the conv branch's reach."""
        return self.cfg.window_frames // 2 + _branch_reach(self.cfg.channels)

    def _latent(self, wav_BT):
        z = self.encoder(self.stft(self.crop(wav_BT)))  # [B, D, F]
        B, D, Fr = z.shape
        return z.transpose([0, 2, 1]).reshape([B * Fr, D]), B, Fr

    def _synth(self, z_BFD):
        return self.stft.inverse(self.decoder(z_BFD.transpose([0, 2, 1])))

    @paddle.no_grad()
    def init_from_data(self, batches, pca_frames: int = 16384, kmeans_iters: int = 8) -> dict:
        """Data-dependent start (like k-means codebook init): the linear encoder / decoder maps become the
        top-`latent_dim` principal components of the frames' real / imag STFT (from the first `pca_frames`
        frames), and the RVQ codebooks are seeded by k-means on the latents of all frames. `batches`: one
        waveform tensor [B, T] or a list of them. Meant for a freshly built model (its conv branches still output
        zero). Returns the energy fraction the components keep and the number of k-means frames."""
        batches = [batches] if isinstance(batches, paddle.Tensor) else list(batches)
        batches = [b if isinstance(b, paddle.Tensor) else paddle.to_tensor(b) for b in batches]
        rows, n = [], 0
        for wav in batches:
            re_im, _ = AudioEncoder.features(self.stft(self.crop(wav)))
            rows.append(re_im.transpose([0, 2, 1]).reshape([-1, re_im.shape[1]]).numpy())
            n += len(rows[-1])
            if n >= pca_frames:
                break
        X = np.concatenate(rows)[:pca_frames]
        evals, evecs = np.linalg.eigh((X.T @ X).astype("float64") / len(X))
        P = evecs[:, ::-1][:, :self.cfg.latent_dim].astype("float32")  # [2 bins, D], orthonormal columns
        self.encoder.linear.weight.set_value(paddle.to_tensor(np.ascontiguousarray(P.T)[:, :, None]))
        self.encoder.linear.bias.set_value(paddle.zeros([self.cfg.latent_dim]))
        self.decoder.linear.weight.set_value(paddle.to_tensor(np.ascontiguousarray(P)[:, :, None]))
        self.decoder.linear.bias.set_value(paddle.zeros([P.shape[0]]))
        z = []
        for wav in batches:  # the conv branch still outputs zero on a fresh model: the linear map is the latent
            re_im, _ = AudioEncoder.features(self.stft(self.crop(wav)))
            z.append(self.encoder.linear(re_im).transpose([0, 2, 1]).reshape([-1, self.cfg.latent_dim]))
        z = paddle.concat(z)
        self.rvq.init_from(z, kmeans_iters)
        return {"pca_energy": float(evals[::-1][:self.cfg.latent_dim].sum() / max(evals.sum(), 1e-12)),
                "kmeans_frames": int(z.shape[0])}

    @paddle.no_grad()
    def encode(self, wav_BT: paddle.Tensor) -> paddle.Tensor:
        z_ND, B, Fr = self._latent(wav_BT)
        return self.rvq.encode(z_ND, self.cfg.encode_beam).reshape([B, Fr, -1])

    def decode(self, codes_BFL: paddle.Tensor) -> paddle.Tensor:
        B, Fr, L = codes_BFL.shape
        return self._synth(self.rvq.decode(codes_BFL.reshape([B * Fr, L])).reshape([B, Fr, -1]))

    def forward(self, wav_BT: paddle.Tensor):
        """Training step: (reconstruction, losses incl. "total", codes [B, F, L], residual norms per level).
        With `train_encoder` false the encoder and codebooks are fixed: codes come from greedy RVQ search, no
        gradient or EMA update reaches them, and only the decoder learns."""
        cfg = self.cfg
        wav_BT = self.crop(wav_BT)
        if cfg.train_encoder:
            z_ND, B, Fr = self._latent(wav_BT)
            z_q, codes, quantised, norms = self.rvq(z_ND)
        else:
            with paddle.no_grad():
                z_ND, B, Fr = self._latent(wav_BT)
                codes = self.rvq.encode(z_ND, 1)
                z_q = self.rvq.decode(codes)
                norms = [float(paddle.linalg.norm(z_ND, axis=1).mean()),
                         float(paddle.linalg.norm(z_ND - z_q, axis=1).mean())]
        spec = self.decoder(z_q.reshape([B, Fr, -1]).transpose([0, 2, 1]))
        rec = self.stft.inverse(spec)
        diff = self.stft(rec) - self.stft(wav_BT)  # of the waveform actually produced (a consistent STFT)
        losses = {"snr": 10 * paddle.log10((wav_BT ** 2).sum() / (((rec - wav_BT) ** 2).sum() + 1e-8)),
                  "l1": F.l1_loss(rec, wav_BT),
                  "spec": (paddle.abs(paddle.real(diff)) + paddle.abs(paddle.imag(diff))).mean()}
        total = (-cfg.snr_weight / 10 * losses["snr"] + cfg.l1_weight * losses["l1"]
                 + cfg.spec_weight * losses["spec"])
        if cfg.train_encoder:
            losses["commit"] = F.mse_loss(z_ND, z_q.detach())
            total = total + cfg.commit_weight * losses["commit"]
        if cfg.mel_weight > 0:
            losses["mel"] = mel_distance(rec, wav_BT, cfg.sample_rate)
            total = total + cfg.mel_weight * losses["mel"]
        if cfg.stft_weight > 0:
            n = cfg.stft_items or B
            losses["stft"] = multi_resolution_stft_loss(rec[:n], wav_BT[:n], cfg.stft_resolutions)
            total = total + cfg.stft_weight * losses["stft"]
        if self.teacher is not None and cfg.teacher_weight > 0:
            losses["teacher"] = self.teacher_loss(wav_BT, z_ND, quantised[0], B, Fr)
            total = total + cfg.teacher_weight * losses["teacher"]
        losses["total"] = total
        return rec, losses, codes.reshape([B, Fr, -1]), norms

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
        self.net = nn.Sequential(Conv1D(1, feat, 400, stride=160), nn.Tanh())
        for p in self.parameters():
            p.stop_gradient = True
        self.out_features = feat

    def forward(self, wav_BT):
        return self.net(wav_BT.unsqueeze(1))


def snr_db(rec: np.ndarray, ref: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - rec|^2); silence (rec = 0) scores exactly 0 dB."""
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - rec) ** 2).sum(), 1e-12)))
