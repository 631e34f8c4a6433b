"""The unified objective on packed multimodal rows (`ernie5.data.sequence`): text NTP + MTP, visual next-scale
prediction with a bitwise head (NFSP), audio next-codec prediction with depth heads (NCP), one backbone.

Per position (see `ernie5.data.sequence`): text / special positions predict the next token with the text head;
visual positions predict their own d bits from their group's inputs (every token of a scale in parallel);
positions before an audio frame predict its L codes with the depth heads; the position before EOA inside an
audio segment predicts END on level 1 (so generation knows when speech stops).

Loss terms (each logged): `loss_text` (NTP), `loss_mtp_k`, `loss_visual` (bit BCE), `loss_audio` (mean CE over
levels), `loss_aux` (balancing). Rules:
- **Scale reweighting** toward coarse scales: a visual token of scale k weighs n_k^(-p) (n_k tokens in that
  scale of that frame, whatever its bucket's grid; p = `visual_scale_power`), normalised so the weights average 1 over the batch's visual tokens. p = 0: every
  token equal (fine scales dominate); p = 1: every scale equal.
- **Bit-flip corruption**: with `bit_flip_rate` r > 0 each bit of the visual *history* is flipped with
  probability r and the inputs of later scales are recomputed from the flipped bits (exactly, through the
  shard's `vis_history.npz` linear maps); targets stay the true codes.
- **Posterior modality weighting** (`modality_weighting: posterior`): each modality's loss is divided by a
  running mean of its own value (EMA with `posterior_momentum`, detached) and multiplied by the mean of those
  running means, so every modality contributes on the same scale and the total keeps the loss's magnitude.
  The means move once per applied optimizer step, from that step's finite values averaged over micro-batches
  and data-parallel ranks (`UnifiedObjective.finish_step`); a modality with no mean yet keeps its fixed weight.
  `none`: fixed `text_weight` / `visual_weight` / `audio_weight`.
- **Token-balanced loss** (ERNIE 4.5): the forward value of a modality's loss (and of each MTP depth's) is its
  masked mean, its gradient is sum(loss * mask) / C with C = `token_balance_length` (default: the row length)
  x rows, so samples with many visual tokens do not shrink the per-token gradient of their text.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from ernie5.constants import AUDIO, IGNORE, IMAGE, MODALITY_TERMS, VIDEO
from ernie5.data.sequence import HEAD_AUDIO, HEAD_TEXT, HEAD_VISUAL, frame_until, space_to_depth, video_runs
from ernie5.objectives.config import ObjectiveConfig
from ernie5.objectives.mtp import mtp_loss
from ernie5.objectives.text import TextLoss, head_row_losses, token_balanced



_HIDE_STREAM = 0x0F4A  # appended to a row's key: the old-frame draws use a stream of their own


# -- batches (numpy) -------------------------------------------------------------------------------------------
def unpack_bits(ids: np.ndarray, d: int) -> np.ndarray:
    """Packed visual token ids [...] -> their d bits [..., d] (bit i = channel i; inverse of sequence._pack_bits)."""
    return (np.maximum(ids, 0)[..., None] >> np.arange(d)) & 1


def flip_history(rows: dict, maps: dict, scales: list[int], rate: float, rngs: list) -> np.ndarray:
    """vis_in with the visual history corrupted: every bit of a frame's codes flipped with probability `rate`,
    later scales' inputs moved by sum_{j<k} A_jk (signs'_j - signs_j) and the frame context group's latent by
    the same sum over all K scales (`space_to_depth` of it). A frame's maps are those of its latent grid (its
    resolution bucket, read off the finest scale's positions: `maps["HxW/A_j_k"]`). Targets are untouched (the
    caller keeps them). `rngs[b]` draws row b's flips (one generator per row, so a row's corruption depends on
    that row alone)."""
    vis = rows["vis_in"].copy()
    B, S = vis.shape[:2]
    K = len(scales)
    d = vis.shape[-1] // 4
    for b in range(B):
        rng = rngs[b]
        sc, grp = rows["scale"][b], rows["group"][b]
        first = np.ones(S, bool)
        first[1:] = grp[1:] != grp[:-1]
        for start in np.nonzero((sc == 0) & first)[0]:  # each frame's first position (scale 0 may have several)
            bounds = _frame_block(sc, grp, int(start), K)  # scales 0..K-1, then the context group, back to back
            if bounds is None:
                continue
            fine = slice(bounds[K - 1], bounds[K])
            Lh = len(np.unique(rows["pos"][b, fine, 1]))
            Lw = (bounds[K] - bounds[K - 1]) // Lh
            key = f"{Lh}x{Lw}/"
            if key + "base_1" not in maps:
                raise ValueError(f"no bit-flip maps for a {Lh}x{Lw} latent grid (the shards' vis_history.npz has "
                                 f"{sorted({k.split('/')[0] for k in maps})})")
            bits = unpack_bits(rows["target"][b, start:bounds[K]], d)  # the true codes [n, d]
            signs = bits * 2.0 - 1.0
            flips = rng.random(signs.shape) < rate
            delta = np.where(flips, -2.0 * signs, 0.0)  # signs' - signs
            for k in range(1, K + 1):
                shift = sum(maps[f"{key}A_{j}_{k}"] @ delta[bounds[j] - start:bounds[j + 1] - start]
                            for j in range(k))
                if k < K:
                    vis[b, bounds[k]:bounds[k + 1], :d] += shift.astype(np.float32)
                else:
                    ctx = space_to_depth(shift.reshape(Lh, Lw, d)).reshape(-1, 4 * d)
                    vis[b, bounds[K]:bounds[K + 1]] += ctx.astype(np.float32)
    return vis


def _frame_block(scale_S: np.ndarray, group_S: np.ndarray, start: int, K: int):
    """[start, end of scale 0, ..., end of scale K-1, end of the context group] of the frame starting at `start`
    (each scale one group, in order), or None if the row does not hold the whole frame."""
    bounds, pos, S = [start], start, len(scale_S)
    for k in range(K + 1):
        if pos >= S or scale_S[pos] != k:
            return None
        end = pos + 1
        while end < S and group_S[end] == group_S[pos]:
            end += 1
        bounds.append(end)
        pos = end
    return bounds


def make_unified_batch(rows: dict, *, scales: list[int], audio_end: int, specials: dict, mtp_depth: int,
                       cfg: ObjectiveConfig, maps: Optional[dict] = None,
                       row_keys: Optional[list] = None, temporal_window: int = 0, train: bool = False) -> dict:
    """Model inputs and targets (numpy) from loader rows (`MultimodalLoader.next()`). `row_keys[b]` seeds row b's
    bit-flip and old-frame draws (default: the row index). `until` (the video recipe's key expiry,
    `sequence.frame_until`) is added when `temporal_window` > 0 or, in training, `cfg.old_frame_mask_rate` > 0."""
    B, S = rows["token"].shape
    target, mask = rows["target"].astype(np.int64), rows["loss_mask"].astype(bool)
    modality = rows["modality"].astype(np.int64)
    out = {"token": rows["token"].astype(np.int64), "modality": modality, "pos": rows["pos"].astype(np.float32),
           "group": rows["group"].astype(np.int64), "doc": rows["doc"].astype(np.int64),
           "audio": rows["audio"].astype(np.int64), "scale": rows["scale"].astype(np.int64),
           "und_index": rows["und_index"].astype(np.int64), "und_feats": rows["und_feats"].astype(np.float32)}
    vis = rows["vis_in"].astype(np.float32)
    if cfg.bit_flip_rate > 0 and maps is not None:
        keys = row_keys if row_keys is not None else list(range(B))
        vis = flip_history(rows, maps, scales, cfg.bit_flip_rate, [np.random.default_rng(k) for k in keys])
    out["vis_in"] = vis
    hide_rate = cfg.old_frame_mask_rate if train else 0.0
    if temporal_window > 0 or hide_rate > 0:
        keys = row_keys if row_keys is not None else list(range(B))
        hide = None
        if hide_rate > 0:  # a draw per frame of each video, from the row's own stream (apart from the bit flips)
            hide = []
            for b in range(B):
                rng = np.random.default_rng(np.append(np.atleast_1d(keys[b]), _HIDE_STREAM))
                runs = video_runs(rows["doc"][b], rows["scale"][b], rows["modality"][b])
                hide.append([rng.random(int(rows["frame"][b, lo:hi].max()) + 1) < hide_rate for lo, hi in runs])
        out["until"] = frame_until(rows["doc"], rows["group"], rows["frame"], rows["scale"], rows["modality"],
                                   temporal_window, hide)
    und = out["und_index"] >= 0
    out["und_flat_pos"] = np.nonzero(und.reshape(-1))[0].astype(np.int64)
    out["und_feats"] = out["und_feats"][out["und_index"][und]] if und.any() else out["und_feats"][:0]
    # text head
    text_t = np.where(mask[..., HEAD_TEXT], target, IGNORE)
    out["labels_0"] = text_t
    for k in range(1, mtp_depth + 1):  # MTP depth k at t: the text target of t + k, same document
        lab = np.full((B, S), IGNORE, np.int64)
        same = rows["doc"][:, k:] == rows["doc"][:, :-k]
        lab[:, :-k] = np.where(same, text_t[:, k:], IGNORE)
        out[f"labels_{k}"] = lab
    # visual head: own bits, scale-reweighted (context positions have no target: the mask excludes them)
    d = vis.shape[-1] // 4
    vmask = mask[..., HEAD_VISUAL] & np.isin(modality, (IMAGE, VIDEO))
    out["vis_bits"] = unpack_bits(target, d).astype(np.float32)
    n_k = np.ones((B, S))  # tokens of each position's scale: a scale is one group (any bucket's grid)
    for b in range(B):
        _, inv, counts = np.unique(rows["group"][b], return_inverse=True, return_counts=True)
        n_k[b] = counts[inv]
    w = np.where(vmask, n_k ** (-cfg.visual_scale_power), 0.0)
    out["vis_weight"] = (w / max(w[vmask].mean(), 1e-12) if vmask.any() else w).astype(np.float32)
    # audio depth heads: L codes of the next frame; END on level 1 where an audio segment ends next
    amask = mask[..., HEAD_AUDIO]
    ta = np.where(amask[..., None], rows["target_audio"].astype(np.int64), IGNORE)
    # the position before EOA: the last frame (or BOA itself for an empty segment)
    ends = ((target == specials["<eoa>"]) & mask[..., HEAD_TEXT]
            & ((modality == AUDIO) | (out["token"] == specials["<boa>"])))
    ta[ends, 0] = audio_end
    out["audio_targets"] = ta
    return out


# -- loss -----------------------------------------------------------------------------------------------------
class UnifiedObjective:
    """Holds the running state of posterior weighting (checkpointed) and computes the loss.

    Posterior weighting's running means move once per *applied* optimizer step, never inside `loss()`: each
    training `loss()` call notes its per-modality values, and the trainer calls `finish_step` when the step's
    fate is known. A skipped step (non-finite loss or gradient) leaves the running means as they were; an
    applied one moves each by one EMA update toward the mean of that step's finite values over every
    micro-batch and, through `sum_fn`, every data-parallel rank, so all ranks hold the same state (and rank 0's
    checkpoint resumes any of them exactly). Until a modality has a running mean it keeps its fixed weight.
    """

    def __init__(self, cfg: ObjectiveConfig, mtp_weight: float, seq_len: int):
        self.cfg, self.mtp_weight = cfg, mtp_weight
        self.C = cfg.token_balance_length or seq_len
        self.running: dict[str, float] = {}
        self._noted = np.zeros((2, len(MODALITY_TERMS)))  # this step's [sum; count] per modality, this rank

    def state_dict(self) -> dict:
        return {"running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        self.running = {k: float(v) for k, v in state.get("running", {}).items()}
        self._noted[:] = 0

    def _reduce(self, loss_N: paddle.Tensor, weight_N: paddle.Tensor, rows: int) -> paddle.Tensor:
        """Masked (weighted) mean; token-balanced: the same value, gradient sum / (C x rows)."""
        total = (loss_N * weight_N).sum()
        mean = total / paddle.clip(weight_N.sum(), min=1e-12)
        return token_balanced(total, mean, self.C * rows) if self.cfg.token_balanced else mean

    def _weights(self, present: dict[str, paddle.Tensor]) -> dict[str, float]:
        """Each present modality's weight: fixed, or (posterior) fixed x mean(running) / running[modality]."""
        fixed = {"text": self.cfg.text_weight, "visual": self.cfg.visual_weight, "audio": self.cfg.audio_weight}
        if self.cfg.modality_weighting == "none":
            return {k: fixed[k] for k in present}
        known = [self.running[k] for k in present if k in self.running]
        scale = float(np.mean(known)) if known else 1.0
        return {k: fixed[k] * scale / max(self.running[k], 1e-6) if k in self.running else fixed[k]
                for k in present}

    def _note(self, values: dict[str, float]) -> None:
        for i, k in enumerate(MODALITY_TERMS):
            if k in values and np.isfinite(values[k]):
                self._noted[:, i] += (values[k], 1.0)

    def finish_step(self, applied: bool, sum_fn=lambda a: a) -> None:
        """Close the step: if it was applied, move the running means (one EMA update each, from the step's
        values summed over ranks by `sum_fn`, a collective every rank calls alike); else drop its values."""
        noted, self._noted = self._noted, np.zeros_like(self._noted)
        if not applied or self.cfg.modality_weighting != "posterior":
            return
        total_2M = sum_fn(noted)
        m = self.cfg.posterior_momentum
        for i, k in enumerate(MODALITY_TERMS):
            if total_2M[1, i] > 0:
                x = float(total_2M[0, i] / total_2M[1, i])
                if np.isfinite(x):
                    self.running[k] = x if k not in self.running else m * self.running[k] + (1 - m) * x

    def loss(self, model, b: dict, submodel=None, record: bool = True) -> TextLoss:
        """The total loss and its logged terms; `record` (training) notes the per-modality values for
        `finish_step`."""
        emb = model.embed_unified(b)
        return self.heads(model, b, self.backbone(model, b, submodel, emb), emb, record)

    @staticmethod
    def backbone(model, b: dict, submodel=None, emb=None, pipe_in=None, chunk: int = 0):
        """The backbone on a unified batch (`emb`: its input vectors on the first pipeline stage; `pipe_in`,
        `chunk`: a later stage's input and layer chunk, see `UnifiedModel.backbone`)."""
        return model.backbone(None, b["pos"], b["doc"], submodel, embeds_BSH=emb, groups_BS=b["group"],
                              modality_BS=b["modality"], pipe_in=pipe_in, chunk=chunk, until_BS=b.get("until"))

    def heads(self, model, b: dict, out, emb, record: bool = True) -> TextLoss:
        """The loss from the backbone's output (the last pipeline stage's part of `loss`); `emb`: the batch's
        input vectors (MTP's inputs)."""
        B, S = b["token"].shape
        hn = model.norm(out.hidden_BSH).reshape([B * S, -1])  # heads read only the positions that have their targets
        present: dict[str, paddle.Tensor] = {}
        terms: dict[str, float] = {}
        tokens = 0
        # text: the head only on positions with a text target (the vocabulary GEMM is the costliest part)
        text_idx = paddle.nonzero(b["labels_0"].reshape([-1]) != IGNORE).flatten()
        if text_idx.shape[0]:
            lab = paddle.gather(b["labels_0"].reshape([-1]), text_idx)
            ce = head_row_losses(model, paddle.gather(hn, text_idx), lab)
            present["text"] = self._reduce(ce, paddle.ones_like(ce), B)
            tokens += int(text_idx.shape[0])
        # visual: d bit logits per token
        vis_idx = paddle.nonzero(b["vis_weight"].reshape([-1]) > 0).flatten()
        if vis_idx.shape[0]:
            hv = paddle.gather(hn, vis_idx)
            logit = model.io.visual_logits(hv)
            bits = paddle.gather(b["vis_bits"].reshape([B * S, -1]), vis_idx)
            bce = F.binary_cross_entropy_with_logits(logit, bits, reduction="none").mean(-1)
            present["visual"] = self._reduce(bce, paddle.gather(b["vis_weight"].reshape([-1]), vis_idx), B)
            tokens += int(vis_idx.shape[0])
        # audio: depth heads with teacher forcing
        L = b["audio_targets"].shape[-1]
        tgt = b["audio_targets"].reshape([B * S, L])
        aud_idx = paddle.nonzero(tgt[:, 0] != IGNORE).flatten()
        if aud_idx.shape[0]:
            ha = paddle.gather(hn, aud_idx)
            t = paddle.gather(tgt, aud_idx)
            logits_l = model.io.audio_logits(ha, paddle.clip(t, min=0))
            ces = []
            for l, lg in enumerate(logits_l):
                valid = (t[:, l] != IGNORE).astype("float32")
                ce = F.cross_entropy(lg, paddle.clip(t[:, l], min=0).unsqueeze(-1), reduction="none").reshape([-1])
                ces.append(ce * valid)
            per_token = paddle.add_n(ces) / L
            present["audio"] = self._reduce(per_token, paddle.ones_like(per_token), B)
            tokens += int(aud_idx.shape[0])
        weights = self._weights(present)
        parts = [weights[k] * v for k, v in present.items()]
        for k, v in present.items():
            terms[f"loss_{k}"] = float(v)
        if record and model.training:
            self._note({k: terms[f"loss_{k}"] for k in present})
        # MTP on text positions: x_{t+k} is the input embedding shifted by k (zeros past the row); the last MTP
        # block's queries and the head only on positions with a depth-k target; weighted like the text loss
        def next_embeds(k: int) -> paddle.Tensor:
            return paddle.concat([emb[:, k:], paddle.zeros_like(emb[:, :k])], axis=1)

        target_idx: dict[int, paddle.Tensor] = {}

        def targets(k: int) -> paddle.Tensor:
            target_idx[k] = paddle.nonzero(b[f"labels_{k}"].reshape([-1]) != IGNORE).flatten()
            return target_idx[k]

        def depth_loss(k: int, hk_NH: paddle.Tensor) -> paddle.Tensor:
            ce_N = head_row_losses(model, model.norm(hk_NH), paddle.gather(b[f"labels_{k}"].reshape([-1]),
                                                                           target_idx[k]))
            return self._reduce(ce_N, paddle.ones_like(ce_N), B)

        mtp = mtp_loss(model, out, next_embeds, depth_loss, self.mtp_weight * weights.get("text", 1.0), terms,
                       targets)
        total = paddle.add_n(parts) if parts else paddle.zeros([1])
        if mtp is not None:
            total = total + mtp
        if out.aux_loss is not None:
            terms["loss_aux"] = float(out.aux_loss)
            total = total + out.aux_loss
        return TextLoss(total, terms, tokens)
