"""The planner counts what `build_model` builds, for every run config under configs/ (text and unified,
agnostic and isolated routing), component by component; and the per-token counts of a multimodal model
(active parameters, FLOPs) follow the routing group and heads each modality's tokens use."""

import dataclasses
import math
from pathlib import Path

import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.model.transformer import build_model, count_params
from ernie5.plan import PlanOptions, count_parameters, flops_per_token, format_plan, plan_report
from ernie5.plan.lazy import check_buildable, component_of

MODALITIES = ("text", "visual", "visual_understanding", "audio")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# run configs (configs/data holds data-preparation configs, configs/sweeps sweep files, not runs)
RUN_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                     if p.parent.name not in ("data", "sweeps"))
UNIFIED = {"demo_unified.yaml", "ablations/routing_agnostic.yaml", "ablations/routing_isolated.yaml"}
# what `resolve_multimodal` reads from the digits-world shards' meta.json (text vocabulary 8000 + 7 specials,
# 4-bit visual tokens over 4 scales, 8 RVQ levels of 1024 codes, 32 CNN channels and 2x2 pixels per patch)
MM = ["model.vocab_size=8007", "model.multimodal.enabled=true", "model.multimodal.visual_bits=4",
      "model.multimodal.num_scales=4", "model.multimodal.audio_levels=8", "model.multimodal.audio_codebook=1024",
      "model.multimodal.und_cnn_dim=32", "model.multimodal.und_pix_dim=4", "model.multimodal.und_patches=4"]
# the 1T target is a unified model: also plan it with modality parts and isolated routing
ISOLATED = ["model.moe.routing=isolated", "model.moe.vision_num_experts=64", "model.moe.vision_expert_ffn_size=1024",
            "model.moe.vision_top_k=4", "parallel.expert=1", "parallel.sequence_parallel=false"]
VARIANTS = [(name, []) for name in RUN_CONFIGS] + [("reference/ernie5_1t.yaml", MM[1:] + ISOLATED),
                                                  ("tiny_text.yaml", ["model.tie_embeddings=false"])]


def _model_cfg(name: str, extra: list[str]):
    overrides = (MM if name in UNIFIED else []) + extra
    cfg = load_config(CONFIGS / name, overrides).model
    if cfg.vocab_size is None:  # text runs take it from the tokenizer
        cfg.vocab_size = 8000
    return _shrink(cfg) if name.startswith("reference/") else cfg


def _shrink(m):
    """Tiny widths and few layers / experts, keeping every structural feature: dense layers before the first
    MoE layer, the MoE layer range, GQA, an explicit head_dim, shared experts, MTP, ties, routing groups."""
    moe = m.moe
    layers = min(m.num_layers, (moe.layer_start if moe.num_experts else 0) + 3)
    experts = min(moe.num_experts, 8)
    moe = dataclasses.replace(
        moe, num_experts=experts, top_k=min(moe.top_k, 3), expert_ffn_size=16 if experts else 0,
        layer_end=None if moe.layer_end is None else min(moe.layer_end, layers - 1),
        vision_num_experts=min(moe.vision_num_experts, 6), vision_expert_ffn_size=12 if moe.isolated else 0,
        vision_top_k=None if moe.vision_top_k is None else min(moe.vision_top_k, 2))
    heads = 8
    kv = max(1, heads * m.num_kv_heads // m.num_heads)
    mm = m.multimodal
    if mm.enabled:
        mm = dataclasses.replace(mm, audio_codebook=16, und_cnn_dim=6)
    small = dataclasses.replace(m, vocab_size=101, hidden_size=32, num_layers=layers, num_heads=heads,
                                num_kv_heads=kv, head_dim=None if m.head_dim is None else 6, ffn_hidden_size=48,
                                moe=moe, multimodal=mm)
    small.validate("model")
    return small


def _built(cfg) -> dict[str, int]:
    """Parameters of the lazily built model (shapes only, no storage) by plan component."""
    with paddle.LazyGuard():
        model = build_model(cfg)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        comp = component_of(name)
        out[comp] = out.get(comp, 0) + math.prod(p.shape)
    return out


def test_every_run_config_is_covered():
    assert {"tiny_text.yaml", "bench/small.yaml", "reference/ernie5_1t.yaml"} | UNIFIED <= set(RUN_CONFIGS)


@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}{'+' if e else ''}" for n, e in VARIANTS])
def test_plan_counts_what_build_model_builds(name, extra):
    cfg = _model_cfg(name, extra)
    pc = count_parameters(cfg)
    built = _built(cfg)
    assert pc.total_params == sum(built.values())
    assert {k: v for k, v in pc.total.items() if v} == built
    modality_parts = {"modality_embeddings", "patch_merger", "visual_head", "audio_heads"}
    assert cfg.multimodal.enabled == (name in UNIFIED or "model.multimodal.enabled=true" in extra)
    assert (modality_parts <= set(built)) == cfg.multimodal.enabled
    assert ("vision_experts" in built) == cfg.moe.isolated


def test_lazy_build_equals_eager_build_isolated_unified():
    cfg = _model_cfg("ablations/routing_isolated.yaml", [])
    assert count_parameters(cfg).total_params == count_params(build_model(cfg)) == 6_006_784


def test_lazy_check_full_and_representative_unified_isolated():
    cfg = _model_cfg("ablations/routing_isolated.yaml", [])
    for full in (True, False):
        c = check_buildable(cfg, full)
        assert c.ok and c.built["vision_experts"] == 884_736 and c.built["audio_heads"] == 1_048_704, c.built


def test_routing_isolated_components_by_hand():
    cfg = _model_cfg("ablations/routing_isolated.yaml", [])
    t = count_parameters(cfg).total
    H, moe_layers = 128, 3  # layer 0 dense, layers 1-3 MoE
    assert t["vision_experts"] == moe_layers * 8 * 3 * H * 96
    assert t["experts"] == moe_layers * 8 * 3 * H * 128
    assert t["router"] == moe_layers * (H * 8 + H * 8)  # text and vision gates
    assert t["dense_ffn"] == 3 * H * 384  # layer 0 only: vision experts are not a dense FFN
    assert t["modality_embeddings"] == 4 * 4 * H + (4 + 1) * H + 8 * 1024 * H  # [4d, H] input, scales + context
    assert t["visual_head"] == H * 4
    assert t["audio_heads"] == H * 1025 + 7 * H * 1024
    merger = 32 * H + 4 * H + 8 * H + 2 * H + 4 * (H * H + H) + H * H
    assert t["patch_merger"] == merger


def test_per_token_counts_follow_the_tokens_group_and_heads():
    iso = _model_cfg("ablations/routing_isolated.yaml", [])
    agn = _model_cfg("ablations/routing_agnostic.yaml", [])
    H, S, V, layers, depth, d = 128, 512, 8007, 4, 1, 4
    text_expert, vis_expert = 3 * H * 128, 3 * H * 96
    # a text token never touches the vision group or the modality parts: same figures under both routings
    for f in (lambda c: {k: n for k, n in count_parameters(c).active.items() if n}, lambda c: flops_per_token(c, S)):
        assert f(iso) == f(agn)
    a = count_parameters(iso, "text").active
    assert a["vision_experts"] == a["modality_embeddings"] == a["visual_head"] == a["audio_heads"] == 0
    assert a["embeddings"] == V * H
    # a visual token under isolated routing: vision gate + top-2 vision experts, no text table / head
    v = count_parameters(iso, "visual").active
    assert v["vision_experts"] == 3 * 2 * vis_expert and v["experts"] == 0 and v["router"] == 3 * H * 8
    assert v["embeddings"] == 0 and v["visual_head"] == H * d and v["modality_embeddings"] == 4 * d * H + (4 + 1) * H
    assert count_parameters(agn, "visual").active["experts"] == 3 * 2 * text_expert
    # FLOPs: isolated vs agnostic differ only by the experts a visual token runs
    diff = flops_per_token(agn, S, "visual") - flops_per_token(iso, S, "visual")
    assert diff == 6 * 3 * 2 * (text_expert - vis_expert)
    # visual token by hand: attention, dense layer 0, 3 MoE layers, MTP, bit projection in, bitwise head out
    attn = 2 * H * H + 2 * H * 64
    per = (layers * attn + 3 * H * 384 + 3 * (H * 8 + 2 * vis_expert + text_expert)
           + depth * (2 * H * H + attn + 3 * H * 384) + 4 * d * H + H * d)  # input projection [4d, H]
    assert flops_per_token(iso, S, "visual") == 6 * per + 12 * (layers + depth) * S * 4 * 32
    # audio tokens route with the text experts and run the depth heads instead of the text head
    au = flops_per_token(iso, S, "audio") - flops_per_token(iso, S, "text")
    assert au == 6 * ((H * 1025 + 7 * H * 1024) - V * H * (1 + depth))
    assert all(flops_per_token(iso, S, m) > 0 for m in MODALITIES)
    with pytest.raises(ValueError, match="modality"):
        count_parameters(_model_cfg("tiny_text.yaml", []), "visual")


def test_plan_report_of_unified_isolated_config():
    run = load_config(CONFIGS / "ablations/routing_isolated.yaml", MM + ["parallel.data=1"])
    r = plan_report(run, PlanOptions())
    assert r["total_params"] == 6_006_784
    assert r["flops_per_token"] == r["flops_per_token_by_modality"]["text"] == flops_per_token(run.model, 512)
    assert set(r["flops_per_token_by_modality"]) == set(MODALITIES)
    assert r["params_by_component"]["vision_experts"] == 884_736
    st = r["memory"]["per_stage"][0]
    assert st["params"] == 6_006_784  # one stage holds everything, replicated on one device
    out = format_plan(r)
    assert "vision_experts" in out and "visual_understanding" in out
