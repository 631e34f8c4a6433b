"""Model size and FLOPs on paper, from the config alone (no tensors are built).

FLOPs per token (training) follow the PaLM accounting: 6 x (matmul parameters a token passes through: attention
projections, dense FFN or its top-k experts + shared experts, router, output head for NTP and every MTP depth)
+ 12 x layers x seq_len x (heads x head_dim) for attention scores and values (causal masking not subtracted).
`mfu` in metrics.jsonl and `ernie5 bench` use this same number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie5.model.config import ModelConfig


@dataclass
class ParamCount:
    """Parameters per component: `total` counts every expert, `active` the ones one token uses."""

    total: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, total: int, active: int | None = None) -> None:
        self.total[name] = self.total.get(name, 0) + total
        self.active[name] = self.active.get(name, 0) + (total if active is None else active)

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())


def _attn_params(cfg: ModelConfig) -> int:
    H, hd = cfg.hidden_size, cfg.dim_head
    return H * cfg.num_heads * hd * 2 + H * cfg.num_kv_heads * hd * 2


def count_parameters(cfg: ModelConfig) -> ParamCount:
    H, V, m = cfg.hidden_size, cfg.vocab_size or 0, cfg.moe
    pc = ParamCount()
    pc.add("embeddings", V * H)
    if not cfg.tie_embeddings:
        pc.add("lm_head", V * H)
    for i in range(cfg.num_layers):
        pc.add("norms", 2 * H)
        pc.add("attention", _attn_params(cfg))
        if cfg.is_moe_layer(i):
            pc.add("router", H * m.num_experts)
            pc.add("experts", m.num_experts * 3 * H * m.expert_ffn_size, m.top_k * 3 * H * m.expert_ffn_size)
            pc.add("shared_experts", 3 * H * m.expert_ffn_size * m.num_shared_experts)
        else:
            pc.add("dense_ffn", 3 * H * cfg.ffn_hidden_size)
    pc.add("norms", H)
    for _ in range(cfg.mtp.depth):
        pc.add("mtp", 2 * H + 2 * H * H + 2 * H + _attn_params(cfg) + 3 * H * cfg.ffn_hidden_size)
    return pc


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per input token."""
    pc = count_parameters(cfg)
    H, V, depth = cfg.hidden_size, cfg.vocab_size or 0, cfg.mtp.depth
    not_matmul = pc.active["embeddings"] + pc.active.get("lm_head", 0) + pc.active["norms"] + depth * 4 * H
    head = V * H * (1 + depth)  # the (tied or not) output head runs for NTP and for every MTP depth
    matmul = pc.active_params - not_matmul + head
    attention = 12 * (cfg.num_layers + depth) * seq_len * cfg.num_heads * cfg.dim_head
    return 6.0 * matmul + attention
