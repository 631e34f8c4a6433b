"""Run under paddle.distributed.launch (2 ranks) by test_distributed.py: one optimizer step in which some
parameters produce no gradient. Rank r trains on rows [2r, 2r+2) of a fixed batch; rank 0 always runs the
elastic depth sub-model without layer 1, rank 1 runs the full model (`one`) or the same cut (`both`). Each rank
saves its parameters after the step (global names) for comparison with one process doing both halves.
"""

import sys

import numpy as np
import paddle

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config
from ernie5.elastic.submodel import SubModel
from ernie5.model.transformer import build_model, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.parallel.runtime import ParallelRuntime
from ernie5.parallel.topology import init_topology

CUT = SubModel(layers=(0, 2))


def submodel_of(rank: int, mode: str):
    return CUT if rank == 0 or mode == "both" else None


def batches(cfg, ranks: int):
    tokens = np.random.default_rng(7).integers(0, cfg.model.vocab_size, (2 * ranks, 13))
    return [to_tensor_batch(make_text_batch(tokens[2 * r:2 * r + 2], np.zeros((2, 13), np.int64), 0))
            for r in range(ranks)]


if __name__ == "__main__":
    out_dir, mode, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(None, overrides)
    topo = init_topology(cfg.parallel)
    with paddle.utils.unique_name.guard():
        model = build_model(cfg.model, seed=3)
    runtime = ParallelRuntime(model, cfg.optim, topo)
    model.train()
    batch = batches(cfg, topo.dp)[topo.dp_rank]
    text_loss(model, batch, 0.0, submodel=submodel_of(topo.dp_rank, mode)).total.backward()
    runtime.sync_grads()
    runtime.step(1e-2)
    np.savez(f"{out_dir}/rank{topo.rank}.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
