"""Modality inputs and heads of the unified model: one backbone, every modality (the sequence
layout is in `ernie5.data.sequence`).

Inputs (one vector per position, chosen by the position's modality):
- text / special tokens: the token table (tied to the text head);
- visual generation tokens (next-scale prediction): `vis_in` [4d] (scale positions: the accumulated latent of the
  earlier scales on this scale's grid in the first d columns; frame context positions: 2x2 cells of the frame's
  complete latent) through a linear projection, plus a learned embedding per scale and one for the context
  group (index `num_scales`);
- visual understanding tokens: the attention **patch merger** over K patches (tokenizer-encoder "CNN" features
  projected, and a ViT-style linear embedding of the raw pixel patches; 2K vectors, one self-attention layer,
  mean-pool, project);
- audio frames: the sum of the L level embeddings.
Heads: the text head (tied), the **bitwise visual head** (d independent bit logits per token, all tokens of a
scale in parallel: NFSP), and the **audio depth heads** (level 1 from the hidden state; then level l from the
hidden state plus the embeddings of levels < l: teacher forcing in training, the sampled codes in generation).
Level 1 has one extra class, END (= codebook size): the frame after the last one is EOA.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn

from ernie5.constants import AUDIO, IMAGE, TEXT, VIDEO
from ernie5.model.config import ModelConfig
from ernie5.model.layers import RMSNorm, linear



def _normal(std: float) -> paddle.ParamAttr:
    return paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, std))


class PatchMerger(nn.Layer):
    """[N, K, C + P] patch features -> [N, H]: K CNN patches (projected) + K pixel patches (ViT-style patch
    embedding) = 2K vectors with path and patch-position embeddings, pre-norm self-attention, mean-pool, project,
    RMS-normalise (without it the merged tokens grew to 20x the norm of text embeddings in a demo run).
    K = 16 slots: a video token fills them all (2x2 patches x 4 frames), an image token the first 4 (`valid_N`:
    the slots in use per token; the others are masked out of the attention and the mean)."""

    def __init__(self, cnn_dim: int, pix_dim: int, patches: int, hidden: int, heads: int, std: float):
        super().__init__()
        self.cnn_dim = cnn_dim
        self.cnn_proj = linear(cnn_dim, hidden, std)
        self.pix_proj = linear(pix_dim, hidden, std)
        self.slot = self.create_parameter([2 * patches, hidden], default_initializer=nn.initializer.Normal(0.0, std))
        self.norm = RMSNorm(hidden, 1e-6)
        self.attn = nn.MultiHeadAttention(hidden, heads)
        self.out = linear(hidden, hidden, std)
        self.out_norm = RMSNorm(hidden, 1e-6)  # merged tokens enter the residual stream at a controlled scale

    def forward(self, feats_NKF: paddle.Tensor, valid_N: paddle.Tensor | None = None) -> paddle.Tensor:
        """`valid_N` None: every slot is in use. Otherwise the tokens are merged in groups of equal slot counts,
        each group over its own slots only (an image token over 2 x 4 vectors, not 2 x 16 of which 24 would be
        masked): the same result as masking the unused slots, at a quarter of the cost for images."""
        if valid_N is None:
            return self._merge(feats_NKF)
        counts = sorted(set(valid_N.numpy().tolist()))
        if len(counts) == 1:
            return self._merge(feats_NKF[:, :counts[0]])
        groups = [paddle.nonzero(valid_N == k).flatten() for k in counts]
        merged = paddle.concat([self._merge(paddle.gather(feats_NKF[:, :k], idx)) for k, idx in zip(counts, groups)])
        return paddle.gather(merged, paddle.argsort(paddle.concat(groups)))  # back to the tokens' order

    def _merge(self, feats_NKF: paddle.Tensor) -> paddle.Tensor:
        """Every one of the K slots in use (K <= the merger's 16: the first K slot embeddings of each path)."""
        K, P = feats_NKF.shape[1], self.slot.shape[0] // 2
        cnn = self.cnn_proj(feats_NKF[:, :, :self.cnn_dim])
        pix = self.pix_proj(feats_NKF[:, :, self.cnn_dim:])
        slot = self.slot if K == P else paddle.concat([self.slot[:K], self.slot[P:P + K]])
        x = paddle.concat([cnn, pix], axis=1) + slot  # [N, 2K, H]
        x = x + self.attn(self.norm(x))
        return self.out_norm(self.out(x.mean(1)))


class ModalityIO(nn.Layer):
    """The non-text embeddings and heads (the text table and head stay on the backbone)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mm, H, std = cfg.multimodal, cfg.hidden_size, cfg.init_std
        self.bits, self.levels, self.codebook = mm.visual_bits, mm.audio_levels, mm.audio_codebook
        self.vis_proj = linear(4 * mm.visual_bits, H, std)  # `ernie5.data.sequence.vis_width`
        self.scale_embed = nn.Embedding(mm.num_scales + 1, H, weight_attr=_normal(std))  # + the context group
        self.audio_embed = nn.Embedding(mm.audio_levels * mm.audio_codebook, H, weight_attr=_normal(std))
        self.merger = PatchMerger(mm.und_cnn_dim, mm.und_pix_dim, mm.und_patches, H, mm.merger_heads, std)
        self.visual_head = linear(H, mm.visual_bits, std)
        self.audio_heads = nn.LayerList([linear(H, mm.audio_codebook + (1 if l == 0 else 0), std)
                                         for l in range(mm.audio_levels)])

    def audio_level_embedding(self, level: int, codes: paddle.Tensor) -> paddle.Tensor:
        return self.audio_embed(paddle.clip(codes, 0, self.codebook - 1) + level * self.codebook)

    def audio_frame_embedding(self, codes_BSL: paddle.Tensor) -> paddle.Tensor:
        """Sum of the level embeddings of each frame's codes [B, S, L] (negative codes read as 0)."""
        return paddle.add_n([self.audio_level_embedding(l, codes_BSL[..., l]) for l in range(self.levels)])

    def embed(self, text_embed: nn.Layer, b: dict) -> paddle.Tensor:
        """Input vectors [B, S, H] of a unified batch (see `ernie5.objectives.unified.make_unified_batch`)."""
        mod = b["modality"]
        is_text = (mod == TEXT).astype("float32").unsqueeze(-1)
        und = b["und_index"] >= 0
        is_vis = paddle.logical_and(paddle.logical_or(mod == IMAGE, mod == VIDEO), paddle.logical_not(und))
        is_vis = is_vis.astype("float32").unsqueeze(-1)
        is_audio = (mod == AUDIO).astype("float32").unsqueeze(-1)
        x = text_embed(paddle.clip(b["token"], 0, text_embed.vocab_size - 1)) * is_text
        x = x + (self.vis_proj(b["vis_in"]) + self.scale_embed(paddle.clip(b["scale"], min=0))) * is_vis
        x = x + self.audio_frame_embedding(b["audio"]) * is_audio
        if b["und_feats"].shape[0]:
            B, S, H = x.shape
            # K in use per token from its modality: 16 for video (2x2 x 4 frames), 4 for images
            video = paddle.gather(mod.reshape([-1]), b["und_flat_pos"]) == VIDEO
            valid = paddle.where(video, paddle.full_like(b["und_flat_pos"], 16), paddle.full_like(b["und_flat_pos"], 4))
            merged_NH = self.merger(b["und_feats"], paddle.clip(valid, max=b["und_feats"].shape[1]))
            x = paddle.index_add(x.reshape([B * S, H]), b["und_flat_pos"], 0, merged_NH).reshape([B, S, H])
        return x

    def visual_logits(self, h_NH: paddle.Tensor) -> paddle.Tensor:
        """Bit logits [N, d] (P(bit = 1) = sigmoid)."""
        return self.visual_head(h_NH)

    def audio_logits(self, h_NH: paddle.Tensor, codes_NL: paddle.Tensor) -> list[paddle.Tensor]:
        """Depth heads with teacher forcing: level l sees h + sum of the embeddings of the true codes < l.
        Returns L logits tensors (level 1: codebook + 1 classes with END last)."""
        out, h = [], h_NH
        for l, head in enumerate(self.audio_heads):
            out.append(head(h))
            if l + 1 < self.levels:
                h = h + self.audio_level_embedding(l, codes_NL[:, l])
        return out
