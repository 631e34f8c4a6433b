"""Run under paddle.distributed.launch (2 ranks) by test_distributed.py: one forward/backward of a tiny MoE with
the layout given on the command line; each rank saves its synced gradients and the logits on a fixed batch."""

import sys

import numpy as np
import paddle

import ernie5  # noqa: F401
from ernie5.config.run import load_config
from ernie5.model.moe import ExpertPlacement
from ernie5.model.transformer import build_model, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.parallel.expert_parallel import ExpertParallelDispatcher
from ernie5.parallel.runtime import ParallelRuntime
from ernie5.parallel.topology import init_topology

out_dir, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, overrides)
topo = init_topology(cfg.parallel)
E = cfg.model.moe.num_experts
placement = (ExpertPlacement(topo.local_experts(E), ExpertParallelDispatcher(E, topo.ep, topo.ep_rank, topo.ep_group,
                                                                            native_alltoall=False))
             if topo.ep > 1 else None)
with paddle.utils.unique_name.guard():
    model = build_model(cfg.model, seed=3, placement=placement)
runtime = ParallelRuntime(model, cfg.optim, topo)
rng = np.random.default_rng(7)
tokens = rng.integers(0, cfg.model.vocab_size, (2 * topo.dp, 13))  # rank r trains on rows [2r, 2r+2)
mine = slice(2 * topo.dp_rank, 2 * topo.dp_rank + 2)
batch = to_tensor_batch(make_text_batch(tokens[mine], np.zeros_like(tokens[mine]), 0))
model.train()
text_loss(model, batch, 0.0).total.backward()
runtime.sync_grads()
grads = {runtime.to_global[n]: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
model.eval()
logits = model(paddle.to_tensor(tokens[:, :12])).numpy()
np.savez(f"{out_dir}/rank{topo.rank}.npz", logits=logits, norm=runtime.grad_norm(),
         **{f"g::{k}": v for k, v in grads.items()})
state = runtime.model_state()
paddle.save(state, f"{out_dir}/model.rank{topo.rank}.pdparams")
