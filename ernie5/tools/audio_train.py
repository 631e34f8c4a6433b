"""Audio codec training with a held-out report: SNR (silence scores 0 dB) and multi-resolution STFT distance
vs *silence*; per-level code usage."""

from __future__ import annotations

import math
import time

import numpy as np
import paddle

from ernie5.data.digits_world import load_arrays
from ernie5.modality.audio import AudioTokenizer, RandomConvTeacher1d, multi_resolution_stft_loss, snr_db
from ernie5.modality.media_io import TokenizerRecipe, load_asset, save_asset
from ernie5.tools.tokenizer_common import _lr, _split


def train_audio(recipe: TokenizerRecipe, log=print) -> dict:
    return _train_audio(recipe, load_arrays(recipe.data_dir), log)


def _clips(data: dict, idx: np.ndarray) -> list[np.ndarray]:
    lens = [c["samples"] for c in data["audio_index"]["clips"]]
    return [data["audio"][i, :lens[i]] for i in idx]


def _crop_batch(clips, n: int, length: int, rng, speed: float = 0.0, gain: float = 0.0) -> np.ndarray:
    """n random crops [n, length]; with speed > 0 each is resampled by a random factor in 1 +- speed (pitch and
    tempo move together, like a different voice), with gain > 0 scaled by a random factor in 1 +- gain."""
    from scipy.signal import resample_poly

    out = np.zeros((n, length), np.float32)
    for j, k in enumerate(rng.integers(0, len(clips), n)):
        c = clips[k]
        f = int(rng.integers(round(100 * (1 - speed)), round(100 * (1 + speed)) + 1)) if speed > 0 else 100
        need = -(-length * f // 100)
        start = int(rng.integers(0, max(1, len(c) - need + 1)))
        seg = c[start:start + need]
        if f != 100:
            seg = resample_poly(seg, 100, f)[:length]  # f > 100: faster and higher
        out[j, :len(seg)] = seg * (rng.uniform(1 - gain, 1 + gain) if gain > 0 else 1.0)
    return out


def _shifted_rows(clips, length: int, hop: int, rng) -> np.ndarray:
    """All clips in random order, each shifted by a random sub-frame offset, concatenated and cut into rows
    [n, length]: one pass over the data with frame boundaries at new positions."""
    long = np.concatenate([clips[k][int(rng.integers(0, hop)):] for k in rng.permutation(len(clips))])
    n = len(long) // length
    return long[:n * length].reshape(n, length).astype(np.float32)


def _audio_eval(model, clips, cfg) -> dict:
    """Whole held-out clips (padded to whole frames), one at a time."""
    model.eval()
    snrs, stft, stft0 = [], [], []
    all_codes = []
    with paddle.no_grad():
        for c in clips:
            n = -(-len(c) // cfg.hop) * cfg.hop
            x = np.zeros((1, n), np.float32)
            x[0, :len(c)] = c
            xt = paddle.to_tensor(x)
            codes = model.encode(xt)
            rec = model.decode(codes)
            snrs.append(snr_db(rec.numpy()[0, :len(c)], c))
            stft.append(float(multi_resolution_stft_loss(rec, xt, cfg.stft_resolutions)))
            stft0.append(float(multi_resolution_stft_loss(paddle.zeros_like(xt), xt, cfg.stft_resolutions)))
            all_codes.append(codes.numpy()[0])
    model.train()
    codes = np.concatenate(all_codes)
    levels = []
    for level in range(cfg.levels):
        counts = np.bincount(codes[:, level], minlength=cfg.codebook_size)
        p = counts[counts > 0] / counts.sum()
        levels.append({"used": int((counts > 0).sum()), "codebook": cfg.codebook_size,
                       "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 1)})
    return {"snr_db": round(float(np.mean(snrs)), 2), "baseline_silence_snr_db": 0.0,
            "stft_distance": round(float(np.mean(stft)), 3),
            "baseline_silence_stft_distance": round(float(np.mean(stft0)), 3), "code_usage": levels}


def _train_audio(recipe: TokenizerRecipe, data: dict, log) -> dict:
    cfg, tc = recipe.audio, recipe.train
    sr = data["audio_index"]["sample_rate"]
    if sr != cfg.sample_rate:
        from ernie5.errors import UserError

        raise UserError("audio.sample_rate", f"{cfg.sample_rate} but the data is at {sr} Hz")
    tr, va = _split(len(data["audio_index"]["clips"]))
    train_clips, val_clips = _clips(data, tr), _clips(data, va)
    teacher = RandomConvTeacher1d() if tc.teacher == "random_conv" else None
    model = AudioTokenizer(cfg, teacher)
    length = max(cfg.hop, int(tc.crop_seconds * cfg.sample_rate) // cfg.hop * cfg.hop)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()
    if recipe.init_from:
        init = load_asset(recipe.init_from)
        model.set_state_dict(init.state_dict())
    elif cfg.init_passes:  # principal components + k-means codebooks on many shifted copies of the training clips
        stats = model.init_from_data([_shifted_rows(train_clips, length, cfg.hop, rng)
                                      for _ in range(cfg.init_passes)], kmeans_iters=cfg.init_kmeans_iters)
        log(f"init: linear maps keep {stats['pca_energy']:.3f} of frame energy, k-means on "
            f"{stats['kmeans_frames']} frames ({time.time() - t0:.0f}s)")
    t_eval = time.time()  # what training adds on top of the init, measured outside the training clock
    init_snr = _audio_eval(model, val_clips, cfg)["snr_db"]
    t0 += time.time() - t_eval
    log(f"held-out SNR before gradient training: {init_snr} dB")
    opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=model.parameters())
    for step in range(tc.steps):
        x = paddle.to_tensor(_crop_batch(train_clips, tc.batch_size, length, rng, cfg.augment_speed,
                                         cfg.augment_gain))
        opt.set_lr(_lr(step, tc))
        _, losses, _, norms = model(x)
        losses["total"].backward()
        opt.step()
        opt.clear_grad()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            log(f"step {step:4d} " + " ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
                + " residual " + "/".join(f"{n:.3f}" for n in norms) + f" ({time.time() - t0:.0f}s)")
    train_seconds = round(time.time() - t0, 1)
    report = {"heldout_clips": len(val_clips), "engine": data["audio_index"]["engine"],
              **_audio_eval(model, val_clips, cfg), "snr_db_before_gradient_training": init_snr,
              "frame_rate_hz": cfg.frame_rate, "levels": cfg.levels,
              "codebook_size": cfg.codebook_size, "bits_per_second": round(cfg.frame_rate * cfg.levels
                                                                          * math.log2(cfg.codebook_size)),
              "steps": tc.steps, "train_seconds": train_seconds}
    out = save_asset(recipe, model, report)
    report["asset"] = str(out)
    return report
