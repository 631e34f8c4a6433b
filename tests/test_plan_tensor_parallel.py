"""`ernie5 plan` counts each device's parameters exactly as the runtime builds a tensor-parallel rank: every TP
rank's model is built in this process (`TPGroup(group=None)`: no communication) and its parameter numels add up
to the planner's per-device count, component by component (kv heads split or replicated, vocabulary-split
embedding and head, replicated norms / routers / routed experts / MTP projection / modality parts)."""

import math
from pathlib import Path

import pytest

from ernie5.comm.regions import TPGroup
from ernie5.errors import ConfigError
from ernie5.model.transformer import build_model
from ernie5.plan.lazy import component_of
from ernie5.plan.memory import EXPERT_COMPONENTS, check_layout, memory_plan, stage_params
from ernie5.runconfig import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT = ["model.vocab_size=8000", "parallel.data=1"]
# the digits-world modality shapes (as tests/test_plan_configs.py), vocabulary padded to a multiple of 4
MM = ["model.vocab_size=8008", "parallel.data=1", "model.multimodal.enabled=true", "model.multimodal.visual_bits=4",
      "model.multimodal.num_scales=4", "model.multimodal.audio_levels=8", "model.multimodal.audio_codebook=1024",
      "model.multimodal.und_cnn_dim=32", "model.multimodal.und_pix_dim=4", "model.multimodal.und_patches=4"]

# tiny_text: 4 heads, 2 kv heads, layer 0 dense + 3 MoE layers (8 experts, 1 shared), MTP depth 1, tied
CASES = {
    "kv_split": ("tiny_text.yaml", TEXT + ["parallel.tensor=2"]),
    "kv_replicated_k1": ("tiny_text.yaml", TEXT + ["parallel.tensor=2", "model.num_kv_heads=1"]),
    "kv_replicated_tp4": ("tiny_text.yaml", TEXT + ["parallel.tensor=4"]),  # 2 kv heads over 4 ranks
    "untied_head": ("tiny_text.yaml", TEXT + ["parallel.tensor=2", "model.tie_embeddings=false"]),
    "mtp2_shared2": ("tiny_text.yaml", TEXT + ["parallel.tensor=2", "model.mtp.depth=2",
                                               "model.moe.num_shared_experts=2", "model.num_kv_heads=1",
                                               "model.head_dim=16"]),
    "tp1": ("tiny_text.yaml", TEXT),
    "unified": ("demo_unified.yaml", MM + ["parallel.tensor=2", "model.tie_embeddings=false"]),
    "unified_isolated": ("ablations/routing_isolated.yaml", MM + ["parallel.tensor=2",
                                                                  "parallel.sequence_parallel=false"]),
}


def _built(model_cfg, P: int, r: int) -> dict[str, int]:
    """Parameter numels by plan component of TP rank r's model (the whole model when P is 1)."""
    tp = TPGroup(degree=P, rank=r, sequence_parallel=True, group=None) if P > 1 else None
    out: dict[str, int] = {}
    for name, p in build_model(model_cfg, tp=tp).named_parameters():
        comp = component_of(name)
        out[comp] = out.get(comp, 0) + math.prod(p.shape)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_per_device_count_equals_each_built_rank(case):
    name, overrides = CASES[case]
    run = load_config(CONFIGS / name, overrides)
    check_layout(run)
    m, P = run.model, run.parallel.tensor
    planned = {k: v for k, v in stage_params(m, list(range(m.num_layers)), True, True, 1, P).total.items() if v}
    per_device = memory_plan(run)["per_stage"][0]["params"]
    assert per_device == sum(planned.values())
    for r in range(P):
        built = _built(m, P, r)
        assert built == planned, (case, r)
        assert sum(built.values()) == per_device
    if P > 1:  # what is split really shrank, what is replicated did not
        whole = _built(m, 1, 0)
        assert planned["embeddings"] * P == whole["embeddings"]
        for comp in ("norms", "experts", "router"):
            assert planned[comp] == whole[comp]


def test_kv_heads_replicated_when_fewer_than_ranks():
    """2 kv heads over TP 4: every rank holds one kv head (D x H per k and v), not half of one."""
    run = load_config(CONFIGS / "tiny_text.yaml", TEXT + ["parallel.tensor=4"])
    m = run.model
    H, D, N = m.hidden_size, m.dim_head, m.num_heads
    attn = stage_params(m, [0], False, False, 1, 4).total["attention"]
    assert attn == 2 * H * (N // 4) * D + 2 * H * D


def test_experts_divided_by_expert_parallelism():
    """EP 2 on top of TP 2: the device holds the TP rank's count with half of the routed experts."""
    run = load_config(CONFIGS / "tiny_text.yaml", ["model.vocab_size=8000", "parallel.data=2", "parallel.expert=2",
                                                   "parallel.tensor=2"])
    built = _built(run.model, 2, 0)
    want = sum(built.values()) - sum(built[c] for c in EXPERT_COMPONENTS if c in built) // 2
    assert memory_plan(run)["per_stage"][0]["params"] == want


def test_vocabulary_must_divide():
    run = load_config(CONFIGS / "tiny_text.yaml", ["model.vocab_size=8001", "parallel.data=1", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match="8001 is not divisible by parallel.tensor 2"):
        check_layout(run)
