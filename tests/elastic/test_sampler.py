"""Elastic space and sampler: configured frequencies, balanced subsets, schedule, reproducibility, state."""

import numpy as np
import pytest

from ernie5.runconfig import load_config
from ernie5.elastic.sampler import ElasticSampler
from ernie5.elastic.space import ElasticSpace
from ernie5.elastic.submodel import FULL, SubModel
from ernie5.errors import ConfigError

# 6 layers (layer 0 dense), 8 experts over 2 EP ranks, top-4
MODEL = ["model.vocab_size=64", "model.num_layers=6", "model.moe.num_experts=8", "model.moe.top_k=4",
         "model.moe.expert_ffn_size=8", "model.moe.layer_start=1", "parallel.data=2", "parallel.expert=2"]
SPACE = ["elastic.enabled=true", "elastic.depth.p_full=0.7", "elastic.depth.retain_prob=0.25",
         "elastic.width.p_full=0.6", "elastic.width.sizes=[4,6]", "elastic.sparsity.p_full=0.8",
         "elastic.sparsity.k_min=2"]


def sampler(*extra):
    cfg = load_config(None, MODEL + SPACE + list(extra))
    return ElasticSampler(cfg.elastic, cfg.model, cfg.parallel.expert, run_seed=cfg.run.seed)


def test_frequencies_match_the_configured_probabilities():
    s = sampler()
    draws = [s.submodel_at(step, mb) for step in range(1, 5001) for mb in range(4)]
    n = len(draws)
    tol = 0.015
    depth = [d for d in draws if d.layers is not None]
    width = [d for d in draws if d.experts is not None]
    topk = [d for d in draws if d.top_k is not None]
    assert abs(len(depth) / n - 0.3) < tol and abs(len(width) / n - 0.4) < tol and abs(len(topk) / n - 0.2) < tol
    assert abs(sum(d.kind == "full" for d in draws) / n - 0.7 * 0.6 * 0.8) < tol  # dimensions are independent
    # depth: layers 0 and 5 always kept; each middle layer kept with 0.25 given that at least one is dropped
    assert all(d.layers[0] == 0 and d.layers[-1] == 5 and len(d.layers) < 6 for d in depth)
    kept = np.mean([[i in d.layers for i in range(1, 5)] for d in depth], axis=0)
    want = 0.25 * (1 - 0.25 ** 3) / (1 - 0.25 ** 4)  # P(keep layer | not all kept)
    np.testing.assert_allclose(kept, want, atol=0.02)
    # width: sizes uniform over [4, 6], same count on each EP rank (experts 0-3 | 4-7), every expert used
    sizes = np.array([len(d.experts) for d in width])
    assert set(sizes) == {4, 6} and abs((sizes == 4).mean() - 0.5) < 0.03
    for d in width:
        lo = sum(e < 4 for e in d.experts)
        assert lo == len(d.experts) - lo
    used = np.bincount(np.concatenate([d.experts for d in width]), minlength=8) / len(width)
    np.testing.assert_allclose(used, 5 / 8, atol=0.03)
    # k uniform over [k_min, top_k - 1] = [2, 3]
    ks = np.array([d.top_k for d in topk])
    assert set(ks) == {2, 3} and abs((ks == 2).mean() - 0.5) < 0.04


def test_candidate_depths_and_groups():
    s = sampler("model.num_layers=8", "elastic.depth.group_size=2", "elastic.depth.depths=[4]",
                "elastic.depth.p_full=0.0")
    for step in range(1, 200):
        layers = s.submodel_at(step, 0).layers
        assert len(layers) == 4 and {0, 7} <= set(layers)
        dropped = sorted(set(range(8)) - set(layers))
        # whole groups {1, 2}, {3, 4}, {5, 6}
        assert all(dropped[i] % 2 == 1 and dropped[i + 1] == dropped[i] + 1 for i in range(0, 4, 2)), dropped


def test_schedule_and_reproducibility_without_state():
    s = sampler("elastic.full_model_steps=20")
    assert all(s.submodel_at(step, mb) == FULL for step in range(1, 21) for mb in range(3))
    seq = [s.submodel_at(step, mb) for step in range(21, 200) for mb in range(3)]
    assert any(d != FULL for d in seq)
    assert seq == [sampler("elastic.full_model_steps=20").submodel_at(step, mb)
                   for step in range(21, 200) for mb in range(3)]  # a function of (seed, step, micro-step) only
    other = sampler("elastic.full_model_steps=20", "elastic.seed=7")
    assert seq != [other.submodel_at(step, mb) for step in range(21, 200) for mb in range(3)]


def test_state_round_trip_keeps_the_sequence():
    a = sampler("elastic.seed=11")
    for step in range(1, 6):
        a.sample(step, 0)
    state = a.state_dict()
    b = sampler("elastic.seed=99")  # a resumed run whose config seed changed keeps the checkpoint's sequence
    b.load_state_dict(state)
    assert b.kind_counts == a.kind_counts and sum(b.kind_counts.values()) == 5
    assert [b.submodel_at(s, m) for s in range(6, 60) for m in range(2)] == \
           [a.submodel_at(s, m) for s in range(6, 60) for m in range(2)]


def test_step_metrics_per_kind():
    s = sampler("elastic.full_model_steps=1")
    s.sample(1, 0)
    s.record_loss(2.0)
    s.sample(1, 1)
    s.record_loss(4.0)
    m = s.step_metrics()
    assert m["elastic_kind"] == "full,full" and m["loss_full"] == 3.0 and "loss_sub" not in m
    assert m["elastic_submodels"] == ["L6/6 E8/8 k4/4"] * 2
    assert s.step_metrics()["elastic_kind"] == ""  # cleared


def test_canonical_cuts_and_grid():
    cfg = load_config(None, MODEL + SPACE)
    space = ElasticSpace(cfg.elastic, cfg.model, cfg.parallel.expert)
    assert space.canonical(depth=4).layers == (0, 2, 4, 5)  # evenly spaced drops among layers 1-4
    assert space.canonical(experts=4).experts == (0, 1, 4, 5)  # 2 per EP rank
    assert space.canonical(top_k=4) == FULL and space.canonical(depth=6, experts=8) == FULL
    names = [name for name, _ in space.grid()]
    assert names[0] == "full" and "depth=2" in names and "experts=4" in names and "top_k=2" in names
    assert names[-1] == "depth=2,experts=4,top_k=2"
    assert SubModel((0, 5), (0, 4), 2).kind == "depth_width_topk"


@pytest.mark.parametrize("extra, where, reason", [
    (["elastic.width.sizes=[10]"], "elastic.width.sizes[0]", "must be in [1, model.moe.num_experts 8)"),
    (["elastic.width.sizes=[3]"], "elastic.width.sizes[0]", "not divisible by parallel.expert 2"),
    (["elastic.width.sizes=[2]"], "elastic.width.sizes[0]", "< model.moe.top_k 4"),
    (["elastic.sparsity.k_max=4"], "elastic.sparsity.k_max", "must be below model.moe.top_k 4"),
    (["elastic.sparsity.k_min=3", "elastic.sparsity.k_max=2"], "elastic.sparsity.k_max", "< k_min 3"),
    (["elastic.depth.keep_first=3", "elastic.depth.keep_last=3"], "elastic.depth.keep_first", "no layer to drop"),
    (["elastic.depth.group_size=3"], "elastic.depth.group_size", "does not divide the 4 droppable"),
    (["elastic.depth.depths=[5, 1]"], "elastic.depth.depths[1]", "not a reachable sub-model depth"),
    (["elastic.depth.retain_prob=1.0"], "elastic.depth.retain_prob", "must be in [0, 1)"),
    (["elastic.width.p_full=1.5"], "elastic.width.p_full", "probability"),
    (["model.moe.num_experts=0"], "elastic.width.p_full", "the model has no experts"),
    (["parallel.pipeline=2"], "elastic.depth.p_full", "pipeline"),
])
def test_impossible_settings_are_config_errors(extra, where, reason):
    with pytest.raises(ConfigError) as e:
        load_config(None, MODEL + SPACE + extra)
    assert e.value.where == where and reason in e.value.reason, e.value.line()


def test_disabled_section_is_not_checked_against_the_model():
    cfg = load_config(None, MODEL + SPACE + ["elastic.enabled=false", "elastic.width.sizes=[10]"])
    assert not cfg.elastic.enabled
