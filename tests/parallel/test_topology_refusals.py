"""Layouts the model cannot run yet are refused with one line, on any build and any process count."""

import pytest

from ernie5.runconfig import load_config
from ernie5.errors import UserError
from ernie5.parallel.topology import init_topology


@pytest.mark.parametrize("name", ["tensor", "pipeline"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_tensor_and_pipeline_parallel_are_refused(name, world):
    cfg = load_config(None, [f"parallel.{name}=2"]).parallel
    with pytest.raises(UserError) as e:
        init_topology(cfg, world=world)  # refused before any process group is made
    assert e.value.where == f"parallel.{name}" and "not supported yet" in e.value.reason


def test_the_cuda_build_is_refused_too(monkeypatch):
    """Before, a CUDA build accepted tensor / pipeline > 1 and every rank computed the whole model."""
    import paddle

    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    with pytest.raises(UserError):
        init_topology(load_config(None, ["parallel.tensor=2"]).parallel, world=2)
