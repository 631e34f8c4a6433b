"""Layouts the model cannot run yet are refused with one line, on any build and any process count."""

import pytest

from ernie5.runconfig import load_config
from ernie5.errors import UserError
from ernie5.parallel.topology import init_topology


@pytest.mark.parametrize("world", [1, 2, 4])
def test_interleaved_pipeline_is_refused(world):
    cfg = load_config(None, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.grad_accum_steps=2"]).parallel
    with pytest.raises(UserError) as e:
        init_topology(cfg, world=world)  # refused before any process group is made
    assert e.value.where == "parallel.virtual_pipeline" and "not built yet" in e.value.reason


def test_the_cuda_build_is_refused_too(monkeypatch):
    import paddle

    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    with pytest.raises(UserError):
        init_topology(load_config(None, ["parallel.pipeline=2", "parallel.virtual_pipeline=2",
                                         "train.grad_accum_steps=2"]).parallel, world=2)
