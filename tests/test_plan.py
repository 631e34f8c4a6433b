"""The paper count equals the instantiated model; the FLOPs formula equals a hand count."""

import pytest

from ernie5.config.run import load_config
from ernie5.model.transformer import build_model, count_params
from ernie5.plan import count_parameters, flops_per_token

BASE = ["model.vocab_size=97", "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4",
        "model.ffn_hidden_size=48", "model.moe.num_experts=4", "model.moe.expert_ffn_size=16"]


@pytest.mark.parametrize("extra", [
    [], ["model.num_kv_heads=2", "model.mtp.depth=2"], ["model.tie_embeddings=false", "model.moe.num_shared_experts=2"],
    ["model.moe.num_experts=0"], ["model.moe.layer_start=1", "model.moe.layer_interval=2", "model.head_dim=16"],
])
def test_count_matches_instantiated_model(extra):
    cfg = load_config(None, BASE + extra).model
    assert count_parameters(cfg).total_params == count_params(build_model(cfg))


def test_flops_per_token_hand_count():
    cfg = load_config(None, BASE + ["model.num_kv_heads=2", "model.moe.layer_start=1", "model.moe.top_k=2",
                                    "model.moe.num_shared_experts=1", "model.mtp.depth=1"]).model
    H, V, S, hd = 32, 97, 64, 8
    attn = H * 32 + 2 * H * 16 + 32 * H  # q, k, v (2 kv heads), o
    dense, expert = 3 * H * 48, 3 * H * 16
    per_token = (3 * attn + dense + 2 * (4 * H + 2 * expert + expert)  # 3 layers: 1 dense, 2 MoE (router, top-2, shared)
                 + (2 * H * H + attn + dense)  # MTP: projection + dense block
                 + 2 * V * H)  # tied head for NTP and MTP
    want = 6 * per_token + 12 * 4 * S * 4 * hd
    assert flops_per_token(cfg, S) == want
