"""Pipeline layouts: the balanced split against brute force, explicit layouts, and the stages built from them."""

import itertools

import pytest

from ernie5.errors import ConfigError
from ernie5.model.pipeline import build_stage, stage_layers
from ernie5.plan.layout import balanced_sizes, chunk_sizes
from ernie5.runconfig import load_config


def brute_force_best(costs, chunks, last_extra):
    """The smallest possible most expensive chunk over every contiguous split (written independently)."""
    L, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, L), chunks - 1):
        bounds = (0, *cuts, L)
        worst = max(sum(costs[a:b]) + (last_extra if b == L else 0.0) for a, b in zip(bounds, bounds[1:]))
        best = min(best, worst)
    return best


@pytest.mark.parametrize("costs,chunks,extra", [
    ([1, 1, 1, 1], 2, 0.0), ([1, 3, 3, 3, 3, 3], 2, 0.0), ([1, 3, 3, 3, 3, 3], 3, 4.0), ([5, 1, 1, 1, 1, 1, 1], 3, 0.0),
    ([2, 2, 2, 2, 2, 2, 2, 2, 2], 4, 3.0), ([1, 1, 1, 1], 4, 0.0), ([3, 1, 4, 1, 5, 9, 2, 6], 3, 2.5),
])
def test_balanced_split_is_optimal_and_contiguous(costs, chunks, extra):
    sizes = balanced_sizes(costs, chunks, extra)
    assert len(sizes) == chunks and sum(sizes) == len(costs) and min(sizes) >= 1
    bounds = [sum(sizes[:c]) for c in range(chunks + 1)]
    worst = max(sum(costs[a:b]) + (extra if b == len(costs) else 0.0) for a, b in zip(bounds, bounds[1:]))
    assert worst == pytest.approx(brute_force_best(costs, chunks, extra))


def test_uniform_layers_keep_the_even_split():
    assert balanced_sizes([1.0] * 10, 4) == [2, 2, 3, 3]


def test_the_head_and_mtp_move_layers_off_the_last_stage():
    base = ["model.vocab_size=8000", "model.num_layers=4", "parallel.pipeline=2", "train.grad_accum_steps=2"]
    assert chunk_sizes(load_config("configs/tiny_text.yaml", base)) == [2, 2]  # the default: even
    cfg = load_config("configs/tiny_text.yaml", base + ["parallel.pipeline_balance=compute"])
    assert chunk_sizes(cfg) == [3, 1]  # the last stage also runs the 8000-way head twice (NTP + MTP)
    assert chunk_sizes(load_config("configs/tiny_text.yaml", ["model.vocab_size=8000"])) is None


def test_explicit_layout_and_its_errors():
    base = ["model.vocab_size=8000", "model.num_layers=4", "parallel.pipeline=2", "train.grad_accum_steps=2"]
    assert chunk_sizes(load_config("configs/tiny_text.yaml", base + ["parallel.pipeline_layout=[1,3]"])) == [1, 3]
    for bad in ("[2,1]", "[4,0]", "[1,1,2]"):
        with pytest.raises(ConfigError) as e:
            load_config("configs/tiny_text.yaml", base + [f"parallel.pipeline_layout={bad}"])
        assert e.value.where == "parallel.pipeline_layout"


def test_stages_follow_the_sizes():
    assert stage_layers(6, 2, 1, [4, 2]) == [[0, 1, 2, 3], [4, 5]]
    s0 = build_stage(6, 2, 0, virtual=2, sizes=[1, 2, 2, 1])
    assert s0.layers == (0, 3, 4) and s0.chunks == ((0,), (3, 4))
