"""The paper count equals the instantiated model; the FLOPs formula equals a hand count."""

import pytest

from ernie5.runconfig import load_config
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


# ---- per-device memory (ernie5.plan.memory) ----

from ernie5.plan.memory import in_flight, memory_plan, stage_layers  # noqa: E402

# layer 0 dense, layers 1-2 MoE (4 experts of width 16, top-2), tied embeddings, no MTP, tensor 1
MEM = BASE + ["model.moe.layer_start=1", "model.moe.top_k=2", "data.seq_len=16", "train.micro_batch_size=2",
              "parallel.data=4", "parallel.expert=2", "parallel.sharding_stage=1"]


def _stage0(overrides):
    return memory_plan(load_config(None, MEM + overrides))["per_stage"][0]


def test_memory_hand_count():
    st = _stage0([])
    H, V, F, Fe, E, k, d, nq = 32, 97, 48, 16, 4, 2, 8, 4
    emb, norms, attn, dense = V * H, 3 * 2 * H + H, 3 * 4 * H * H, 3 * H * F
    router, experts = 2 * H * E, 2 * E * 3 * H * Fe // 2  # two MoE layers; experts split over expert=2
    params = emb + norms + attn + dense + router + experts
    assert st["params"] == params
    fp32 = router + norms  # kept fp32 under bf16 (AMP O2 leaves Router and RMSNorm alone)
    assert st["params_bytes"] == (params - fp32) * 2 + fp32 * 4  # bf16, routers and norms fp32
    assert st["grads_bytes"] == params * 4  # fp32 grads
    # ZeRO-1: dense states over data=4, expert states over data/expert = 2; Adam 12 B (fp32 weights: 8 B, no master)
    assert st["optimizer_bytes"] == (emb + attn + dense) * 12 // 4 + fp32 * 8 // 4 + experts * 12 // 2
    a, T = 2, 2 * 16
    common = 2 * (H * a + 4) + (H * a + (nq + 2 * nq) * d * a) + (nq * d * a + nq * 4) + H * a
    dense_layer = common + 2 * F * a + F * a
    moe_layer = common + (2 * k * Fe * a + k * Fe * a) + (E * 4 + 12 * k + k * H * a + k * H * a)
    head = H * a + 4 + H * a + V * 4
    assert st["activations_bytes"] == T * (dense_layer + 2 * moe_layer + head)
    assert st["in_flight"] == 1.0
    assert st["total_bytes"] == st["params_bytes"] + st["grads_bytes"] + st["optimizer_bytes"] + st["activations_bytes"]


def test_zero1_divides_optimizer_states_by_data_parallel_degree():
    off = _stage0(["parallel.expert=1", "parallel.sharding_stage=0"])
    on = _stage0(["parallel.expert=1", "parallel.sharding_stage=1"])
    assert off["optimizer_bytes"] == 4 * on["optimizer_bytes"]
    assert (off["params_bytes"], off["grads_bytes"]) == (on["params_bytes"], on["grads_bytes"])


def test_expert_parallel_divides_experts():
    experts = 2 * 4 * 3 * 32 * 16
    ep1 = _stage0(["parallel.expert=1", "parallel.sharding_stage=0"])
    ep4 = _stage0(["parallel.expert=4", "parallel.sharding_stage=0"])
    assert ep1["params"] - ep4["params"] == experts - experts // 4
    assert ep1["optimizer_bytes"] - ep4["optimizer_bytes"] == 12 * (experts - experts // 4)
    # with ZeRO-1 and expert == data, expert states have no data-parallel replica left to shard over
    z = _stage0(["parallel.expert=4", "parallel.sharding_stage=1"])
    dense_states = (ep4["optimizer_bytes"] - 12 * experts // 4)
    assert z["optimizer_bytes"] == dense_states // 4 + 12 * experts // 4


def test_recompute_and_fp8_storage_shrink_activations():
    T, H, a, k, Fe = 32, 32, 2, 2, 16
    common = 2 * (H * a + 4) + (H * a + 12 * 8 * a) + (4 * 8 * a + 4 * 4) + H * a  # norms, qkv, attention
    dense_layer, moe_layer = common + 3 * 48 * a, common + 3 * k * Fe * a + (4 * 4 + 12 * k + 2 * k * H * a)
    head = H * a + 4 + H * a + 97 * 4
    base = _stage0([])["activations_bytes"]
    assert base == T * (dense_layer + 2 * moe_layer + head)
    # full recompute keeps each layer's input plus one re-run block (the largest, an MoE block)
    assert _stage0(["recompute.mode=full"])["activations_bytes"] == T * (3 * H * a + head + moe_layer)
    assert _stage0(["recompute.mode=full", "recompute.layers=[0]"])["activations_bytes"] == \
        T * (H * a + 2 * moe_layer + head + dense_layer)
    sel = _stage0(["recompute.mode=selective", "recompute.modules=[expert_gate_up]"])["activations_bytes"]
    assert base - sel == 2 * T * 3 * k * Fe * a  # two MoE layers' gate|up outputs and products
    sel = _stage0(["recompute.mode=selective", "recompute.modules=[attention, norm_qkv]"])["activations_bytes"]
    assert base - sel == 3 * T * ((4 * 8 * a + 4 * 4) + (H * a + 12 * 8 * a))
    f8 = _stage0(["precision.fp8.enabled=true", "precision.fp8.store_activations=true", "precision.fp8.tile=16"])
    saved = (a - (1 + 4 / 16)) * (k * H + k * Fe)  # per MoE layer and token: dispatched tokens, expert products
    assert base - f8["activations_bytes"] == pytest.approx(2 * T * saved, abs=1)


def test_pipeline_stages_and_in_flight():
    assert stage_layers(10, 4) == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]
    assert stage_layers(10, 4, 2) == [[0, 4], [1, 5], [2, 6, 7], [3, 8, 9]]
    assert [in_flight(s, 4, 1, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight(0, 4, 1, 2) == 2  # fewer micro-batches than stages
    assert in_flight(0, 4, 2, 8) == (2 * 3 + 4 + 1) / 2  # Megatron interleaved warm-up
    assert in_flight(0, 1, 1, 8) == 1
