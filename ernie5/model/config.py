"""Model configs (no paddle import, so configs load and `plan` runs without building tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ernie5.config.schema import join, require


@dataclass
class MoEConfig:
    """Mixture-of-experts layers: which layers, how many experts, how tokens are routed and balanced."""

    num_experts: int = 0  # 0: every layer is dense
    top_k: int = 2
    num_shared_experts: int = 0
    expert_ffn_size: int = 0  # width of one routed expert (shared experts are n_shared times as wide)
    layer_start: int = 0  # layer i is MoE iff start <= i <= end and (i + 1) % interval == 0 (ERNIE 4.5's rule)
    layer_end: Optional[int] = None  # None: the last layer
    layer_interval: int = 1
    # agnostic (ERNIE 5.0): every token, any modality, routes over all experts. isolated (ERNIE 4.5-VL): image and
    # video tokens route among `vision_num_experts` experts of width `vision_expert_ffn_size` (top `vision_top_k`),
    # text and audio tokens among the `num_experts` text experts; shared experts serve every token.
    routing: Literal["agnostic", "isolated"] = "agnostic"
    vision_num_experts: int = 0
    vision_expert_ffn_size: int = 0
    vision_top_k: Optional[int] = None  # None: top_k
    norm_min: float = 1e-12  # combine weights = p / max(sum p, norm_min)
    bias_update_rate: float = 1e-4  # aux-free balancing step u; 0 turns it off
    aux_loss_coef: float = 0.0  # Switch load-balancing loss
    seq_aux_loss_coef: float = 0.0  # per-sequence balancing loss (DeepSeek-V3 form)
    z_loss_coef: float = 0.0  # router z-loss: mean(logsumexp(logits)^2)
    orthogonal_coef: float = 0.0  # router rows pulled toward orthogonal after each optimizer step (ERNIE 4.5: 1e-3)

    def validate(self, path: str) -> None:
        require(self.num_experts >= 0, join(path, "num_experts"), "must be >= 0")
        if self.num_experts == 0:
            return
        require(self.top_k >= 1, join(path, "top_k"), f"{self.top_k} must be >= 1")
        require(self.top_k <= self.num_experts, join(path, "top_k"),
                f"{self.top_k} > num_experts {self.num_experts}")
        require(self.expert_ffn_size > 0, join(path, "expert_ffn_size"), "must be > 0 when num_experts > 0")
        require(self.num_shared_experts >= 0, join(path, "num_shared_experts"), "must be >= 0")
        require(self.layer_interval >= 1, join(path, "layer_interval"), "must be >= 1")
        require(self.layer_start >= 0, join(path, "layer_start"), "must be >= 0")
        for name in ("bias_update_rate", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "orthogonal_coef"):
            require(getattr(self, name) >= 0, join(path, name), "must be >= 0")
        if self.routing == "isolated":
            require(self.vision_num_experts >= 1, join(path, "vision_num_experts"),
                    "isolated routing needs vision experts (>= 1)")
            require(self.vision_expert_ffn_size > 0, join(path, "vision_expert_ffn_size"), "must be > 0")
            require(1 <= self.vision_k <= self.vision_num_experts, join(path, "vision_top_k"),
                    f"{self.vision_k} must be in [1, vision_num_experts {self.vision_num_experts}]")

    @property
    def vision_k(self) -> int:
        return self.vision_top_k if self.vision_top_k is not None else self.top_k

    @property
    def isolated(self) -> bool:
        return self.routing == "isolated" and self.num_experts > 0

    @property
    def total_experts(self) -> int:
        """Routed experts per MoE layer over all groups (isolated: text experts first, then vision experts)."""
        return self.num_experts + (self.vision_num_experts if self.isolated else 0)

    def is_moe_layer(self, i: int, num_layers: int) -> bool:
        if self.num_experts == 0:
            return False
        end = num_layers - 1 if self.layer_end is None else self.layer_end
        return self.layer_start <= i <= end and (i + 1) % self.layer_interval == 0


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 / ERNIE 4.5 form): `depth` extra blocks predicting t+2 .. t+1+depth."""

    depth: int = 0
    loss_weight: float = 0.3

    def validate(self, path: str) -> None:
        require(self.depth >= 0, join(path, "depth"), "must be >= 0")
        require(self.loss_weight >= 0, join(path, "loss_weight"), "must be >= 0")


@dataclass
class MultimodalConfig:
    """Modality inputs and heads of the unified model (`ernie5.model.multimodal`). `enabled` and the sizes are
    filled in from the multimodal shards' meta.json when a run starts (set them only to check they match)."""

    enabled: bool = False
    visual_bits: int = 0  # d: a visual token is d sign bits; the bitwise head predicts them
    num_scales: int = 0  # next-scale prediction scales per frame
    audio_levels: int = 0  # RVQ levels; one depth head each
    audio_codebook: int = 0
    und_cnn_dim: int = 0  # understanding inputs: tokenizer-encoder feature channels per patch
    und_pix_dim: int = 0  # and raw pixels per patch (the ViT-style path)
    und_patches: int = 16  # K slots of the patch merger: video 2x2 patches x 4 frames; an image uses 4 of them
    merger_heads: int = 4
    temporal_window: int = 0  # W >= 1: a video frame attends to itself and the W - 1 frames before it; 0: all

    def validate(self, path: str) -> None:
        if not self.enabled:
            return
        for name in ("visual_bits", "num_scales", "audio_levels", "audio_codebook", "und_cnn_dim", "und_pix_dim",
                     "und_patches", "merger_heads"):
            require(getattr(self, name) >= 1, join(path, name), f"{getattr(self, name)} must be >= 1")
        require(self.temporal_window >= 0, join(path, "temporal_window"), f"{self.temporal_window} must be >= 0")


@dataclass
class ModelConfig:
    """The decoder-only transformer (ERNIE 4.5 text shapes; multimodal parts come with their own configs)."""

    vocab_size: Optional[int] = None  # None: taken from the tokenizer when the run starts
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    ffn_hidden_size: int = 1024  # dense SwiGLU width (layers that are not MoE)
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_sections: Optional[list[int]] = None  # [t, h, w] frequency pairs; None: 20/64 to t, rest split h/w
    tie_embeddings: bool = True
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def sections_thw(self) -> list[int]:
        if self.rope_sections is not None:
            return list(self.rope_sections)
        pairs = self.dim_head // 2
        t = round(pairs * 20 / 64)
        h = (pairs - t) // 2
        return [pairs - 2 * h, h, h]

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.is_moe_layer(i, self.num_layers)

    def validate(self, path: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "max_seq_len"):
            require(getattr(self, name) >= 1, join(path, name), f"{getattr(self, name)} must be >= 1")
        if self.vocab_size is not None:
            require(self.vocab_size >= 2, join(path, "vocab_size"), "must be >= 2")
        if self.head_dim is None:
            require(self.hidden_size % self.num_heads == 0, join(path, "num_heads"),
                    f"{self.num_heads} does not divide hidden_size {self.hidden_size} (or set head_dim)")
        require(self.num_heads % self.num_kv_heads == 0, join(path, "num_kv_heads"),
                f"{self.num_kv_heads} does not divide num_heads {self.num_heads}")
        require(self.dim_head % 2 == 0, join(path, "head_dim"), f"{self.dim_head} must be even for RoPE")
        secs = self.sections_thw
        require(len(secs) == 3 and min(secs) >= 0 and sum(secs) == self.dim_head // 2, join(path, "rope_sections"),
                f"{secs} must be three counts summing to head_dim/2 = {self.dim_head // 2}")
        require(self.rope_theta > 0, join(path, "rope_theta"), "must be > 0")
        if self.moe.num_experts > 0:
            end = self.num_layers - 1 if self.moe.layer_end is None else self.moe.layer_end
            require(end < self.num_layers, join(path, "moe.layer_end"),
                    f"{end} is past the last layer ({self.num_layers - 1})")
            require(any(self.is_moe_layer(i) for i in range(self.num_layers)), join(path, "moe.layer_start"),
                    "no layer is MoE with these layer_start / layer_end / layer_interval")
