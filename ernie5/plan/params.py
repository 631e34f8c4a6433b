"""Parameter counts and training FLOPs per token on paper, from the ModelConfig alone (no tensors are built).

The counts follow what `ernie5.model.transformer.build_model` builds, component by component:
- `embeddings`: the text token table [V, H] (also the text head when tied); `lm_head`: the untied text head.
- `norms`: the two RMSNorms of every block and the final norm (MTP and patch-merger norms count with those).
- `attention`, `dense_ffn` (dense SwiGLU layers), `router` (the fp32 gate of every MoE layer; with isolated
  routing also the vision gate), `experts` (routed experts; with isolated routing the text/audio group),
  `vision_experts` (isolated routing: the image/video group), `shared_experts`.
- `mtp`: each MTP depth (its two input norms, the 2H -> H projection and one dense block).
- multimodal models (`model.multimodal.enabled`): `modality_embeddings` (visual bit projection and per-scale
  embedding, audio level tables), `patch_merger` (the understanding-input merger), `visual_head` (bitwise NFSP
  head) and `audio_heads` (one depth head per RVQ level; level 1 has the extra END class).

Tensor parallelism (`tensor` = P > 1, one TP rank's share, as `build_model(cfg, tp=TPGroup(P, r))` builds it;
every rank holds the same number): q_proj [H, N*D] columns and o_proj rows are divided by P; k_proj / v_proj
[H, K*D] too when P divides K, else (P a multiple of K) each rank holds one kv head's columns, D*H each; the
dense SwiGLU FFN and the shared experts (gate|up columns, down rows), the embedding and the untied head (by
vocabulary) are divided by P. Routed experts, routers, every RMSNorm, MTP's input norms and 2H -> H projection
and the multimodal inputs and heads are replicated on every TP rank (routed experts are divided by expert
parallelism, which `ernie5.plan.memory` applies). The shapes must divide (`check_tensor_parallel`, vocab % P).

`total` counts every parameter. `active` is per token and depends on the token's modality (`MODALITIES`): a
component counts when the token's forward pass goes through it, with two readings kept from the published
ERNIE 4.5 counts: lookup tables count whole (the text table for a text token, the modality tables for a visual
or audio token), and of the routed experts only the top-k of the token's group count. So a text token counts
the text table / head, the text router and top-k text experts, and none of the modality parts; a visual
(generation) token under isolated routing counts the vision router, its top-k vision experts, the visual input
projection and the bitwise head, and neither text table nor text head. MTP blocks run over every position, so
every modality counts them.

FLOPs per token (training) follow the PaLM accounting: 6 x (weights of the matmuls the token passes through:
attention projections, dense FFN or router + top-k experts of its group + shared experts, MTP projection and
block, its input projections and its output heads; for a text token the text head runs for NTP and every MTP
depth) + 12 x (layers + MTP depth) x seq_len x (heads x head_dim) for attention scores and values (causal
masking not subtracted). A visual understanding token adds its patch merger (K CNN + K pixel patch
projections, the merger's self-attention over 2K vectors and its output projection).

The per-token figure of a multimodal model is the FLOPs of a **text token** (`flops_per_token`'s default): the
trainer's `mfu` metric and `ernie5 bench` multiply it by every position of a batch, whatever its modality, so
for unified runs they are an estimate (image/video positions under isolated routing use the vision experts,
and every non-text position swaps the text head for a smaller one); `ernie5 plan` prints the figure of each
modality next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie5.model.config import ModelConfig

# token kinds a per-token count can be asked for; only "text" exists without model.multimodal
MODALITIES = ("text", "visual", "visual_understanding", "audio")
# modalities that route to the vision group under isolated routing (image and video tokens)
VISION_ROUTED = ("visual", "visual_understanding")


@dataclass
class ParamCount:
    """Parameters per component: `total` counts every expert, `active` the ones one token uses."""

    total: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, total: int, active: int | None = None) -> None:
        self.total[name] = self.total.get(name, 0) + total
        self.active[name] = self.active.get(name, 0) + (total if active is None else active)

    def merge(self, other: "ParamCount") -> "ParamCount":
        for name in other.total:
            self.add(name, other.total[name], other.active[name])
        return self

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())


def modalities(cfg: ModelConfig) -> tuple[str, ...]:
    """The token kinds this model has."""
    return MODALITIES if cfg.multimodal.enabled else ("text",)


def _check_modality(cfg: ModelConfig, modality: str) -> None:
    if modality not in modalities(cfg):
        raise ValueError(f"modality {modality!r} is not one of {modalities(cfg)} for this model "
                         f"(model.multimodal.enabled is {cfg.multimodal.enabled})")


def _attn_params(cfg: ModelConfig, tensor: int = 1) -> int:
    """q, k, v, o projections of one TP rank: query heads / P; kv heads / P, or one (replicated) when K < P."""
    H, hd = cfg.hidden_size, cfg.dim_head
    kv_heads = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else 1
    return H * (cfg.num_heads // tensor) * hd * 2 + H * kv_heads * hd * 2


def _swiglu(H: int, F: int, tensor: int = 1) -> int:
    """gate|up [H, 2F] and down [F, H]; a TP-split SwiGLU holds F / P of the width."""
    return 3 * H * (F // tensor)


def embedding_params(cfg: ModelConfig, modality: str = "text", tensor: int = 1) -> ParamCount:
    """Token embedding [V, H] (also the output head when tied; divided by vocabulary over TP); used by text
    tokens only."""
    pc = ParamCount()
    n = (cfg.vocab_size or 0) // tensor * cfg.hidden_size
    pc.add("embeddings", n, n if modality == "text" else 0)
    return pc


def layer_params(cfg: ModelConfig, i: int, modality: str = "text", tensor: int = 1) -> ParamCount:
    """Block i: two RMSNorms, attention, then a dense SwiGLU or router(s) + routed experts + shared experts.
    `tensor` > 1: one TP rank's share (attention, dense FFN and shared experts split; the rest replicated)."""
    H, m = cfg.hidden_size, cfg.moe
    pc = ParamCount()
    pc.add("norms", 2 * H)
    pc.add("attention", _attn_params(cfg, tensor))
    if not cfg.is_moe_layer(i):
        pc.add("dense_ffn", _swiglu(H, cfg.ffn_hidden_size, tensor))
        return pc
    vision = m.isolated and modality in VISION_ROUTED  # this token routes among the vision experts
    expert, vexpert = _swiglu(H, m.expert_ffn_size), _swiglu(H, m.vision_expert_ffn_size)
    pc.add("router", H * m.num_experts, 0 if vision else H * m.num_experts)
    pc.add("experts", m.num_experts * expert, 0 if vision else m.top_k * expert)
    if m.isolated:
        pc.add("router", H * m.vision_num_experts, H * m.vision_num_experts if vision else 0)
        pc.add("vision_experts", m.vision_num_experts * vexpert, m.vision_k * vexpert if vision else 0)
    pc.add("shared_experts", _swiglu(H, m.expert_ffn_size * m.num_shared_experts, tensor))
    return pc


def head_params(cfg: ModelConfig, modality: str = "text", tensor: int = 1) -> ParamCount:
    """Final RMSNorm and, when not tied to the embedding, the text head [H, V] (text tokens only; divided by
    vocabulary over TP)."""
    H = cfg.hidden_size
    pc = ParamCount()
    pc.add("norms", H)
    if not cfg.tie_embeddings:
        n = (cfg.vocab_size or 0) // tensor * H
        pc.add("lm_head", n, n if modality == "text" else 0)
    return pc


def _mtp_depth_params(cfg: ModelConfig, tensor: int = 1) -> int:
    """Input norms and 2H -> H projection (replicated over TP), then a dense block (its norms replicated)."""
    H = cfg.hidden_size
    return 2 * H + 2 * H * H + 2 * H + _attn_params(cfg, tensor) + _swiglu(H, cfg.ffn_hidden_size, tensor)


def mtp_params(cfg: ModelConfig, modality: str = "text", tensor: int = 1) -> ParamCount:
    """Each MTP depth: two input norms, the 2H -> H projection and one dense block (its norms included).
    The blocks run over every position, so every modality counts them as active."""
    pc = ParamCount()
    for _ in range(cfg.mtp.depth):
        pc.add("mtp", _mtp_depth_params(cfg, tensor))
    return pc


def _merger_params(cfg: ModelConfig) -> int:
    mm, H = cfg.multimodal, cfg.hidden_size
    return (mm.und_cnn_dim * H + mm.und_pix_dim * H  # CNN-feature and pixel-patch projections
            + 2 * mm.und_patches * H  # path / patch-position slots
            + 2 * H  # pre-attention and output RMSNorms
            + 4 * (H * H + H)  # self-attention q, k, v, out (paddle's MultiHeadAttention has biases)
            + H * H)  # output projection


def _audio_head_params(cfg: ModelConfig) -> int:
    mm, H = cfg.multimodal, cfg.hidden_size
    return sum(H * (mm.audio_codebook + (1 if level == 0 else 0)) for level in range(mm.audio_levels))


def modality_input_params(cfg: ModelConfig, modality: str = "text") -> ParamCount:
    """Non-text inputs (multimodal models): visual input projection [4d, H] and scale table [scales + 1, H], audio
    level tables [L x codebook, H], and the patch merger of understanding inputs."""
    pc = ParamCount()
    if not cfg.multimodal.enabled:
        return pc
    mm, H = cfg.multimodal, cfg.hidden_size
    visual = 4 * mm.visual_bits * H + (mm.num_scales + 1) * H
    audio = mm.audio_levels * mm.audio_codebook * H
    pc.add("modality_embeddings", visual, visual if modality == "visual" else 0)
    pc.add("modality_embeddings", audio, audio if modality == "audio" else 0)
    merger = _merger_params(cfg)
    pc.add("patch_merger", merger, merger if modality == "visual_understanding" else 0)
    return pc


def modality_head_params(cfg: ModelConfig, modality: str = "text") -> ParamCount:
    """Visual bitwise head [H, d] and audio depth heads (multimodal models)."""
    pc = ParamCount()
    if not cfg.multimodal.enabled:
        return pc
    visual, audio = cfg.hidden_size * cfg.multimodal.visual_bits, _audio_head_params(cfg)
    pc.add("visual_head", visual, visual if modality == "visual" else 0)
    pc.add("audio_heads", audio, audio if modality == "audio" else 0)
    return pc


def count_parameters(cfg: ModelConfig, modality: str = "text", tensor: int = 1) -> ParamCount:
    """Every parameter of the built model by component; `active` for one token of `modality`. `tensor` > 1:
    what one tensor-parallel rank builds (every rank the same; routed experts not divided by EP here)."""
    _check_modality(cfg, modality)
    pc = embedding_params(cfg, modality, tensor).merge(modality_input_params(cfg, modality))
    for i in range(cfg.num_layers):
        pc.merge(layer_params(cfg, i, modality, tensor))
    pc.merge(head_params(cfg, modality, tensor))
    pc.merge(mtp_params(cfg, modality, tensor))
    return pc.merge(modality_head_params(cfg, modality))


def matmul_params(cfg: ModelConfig, modality: str = "text") -> int:
    """Weights of the matmuls one token of `modality` passes through (each output head once per use)."""
    pc = count_parameters(cfg, modality)
    a, H, depth, mm = pc.active, cfg.hidden_size, cfg.mtp.depth, cfg.multimodal
    n = sum(a.get(k, 0) for k in ("attention", "dense_ffn", "router", "experts", "vision_experts",
                                  "shared_experts"))
    n += depth * (_mtp_depth_params(cfg) - 4 * H)  # MTP without its four norms
    if modality == "text":  # the (tied or not) text head runs for NTP and for every MTP depth
        n += (cfg.vocab_size or 0) * H * (1 + depth)
    elif modality == "visual":
        n += 4 * mm.visual_bits * H + a["visual_head"]  # input projection in, bitwise head out
    elif modality == "visual_understanding":  # K CNN + K pixel patches, attention over 2K vectors, output
        n += mm.und_patches * (mm.und_cnn_dim + mm.und_pix_dim) * H + 2 * mm.und_patches * 4 * H * H + H * H
    elif modality == "audio":
        n += a["audio_heads"]
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int, modality: str = "text") -> float:
    """Training FLOPs (forward + backward) of one token of `modality` (default: a text token, the figure the
    trainer's `mfu` and `ernie5 bench` use for every position)."""
    attention = 12 * (cfg.num_layers + cfg.mtp.depth) * seq_len * cfg.num_heads * cfg.dim_head
    if modality == "visual_understanding":  # the merger's own attention over 2K vectors
        attention += 12 * (2 * cfg.multimodal.und_patches) ** 2 * cfg.hidden_size
    return 6.0 * matmul_params(cfg, modality) + attention
