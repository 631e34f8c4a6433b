"""Run under paddle.distributed.launch (2 ranks) by test_distributed.py: one forward/backward of a tiny MoE with
the layout given on the command line; each rank saves its synced gradients and the logits on a fixed batch.

`--native` runs the dispatcher's native all-to-all branch (what NCCL runs) on gloo: gloo has no alltoall, so
`paddle.distributed.alltoall_single` is replaced by a stand-in with the same contract built from all_gather. The
stand-in checks the split sizes it is given against every rank's (what a real all-to-all silently relies on)."""

import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config
from ernie5.model.moe import ExpertPlacement
from ernie5.model.transformer import build_model, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.parallel.expert_parallel import ExpertParallelDispatcher
from ernie5.parallel.runtime import ParallelRuntime
from ernie5.parallel.topology import init_topology
from ernie5.tensor_io import save_tensors

out_dir, overrides = sys.argv[1], [a for a in sys.argv[2:] if a != "--native"]
native = "--native" in sys.argv[2:]
cfg = load_config(None, overrides)
topo = init_topology(cfg.parallel)
E = cfg.model.moe.num_experts
native_calls = 0


def alltoall_single_standin(out_tensor, in_tensor, in_split_sizes=None, out_split_sizes=None, group=None,
                            sync_op=True):
    """alltoall_single's contract: rows [sum(in[:j]), +in[j]) of in_tensor go to group rank j; out_tensor
    (preallocated) receives out[i] rows from rank i, in rank order. Written independently of ernie5's gloo path."""
    global native_calls
    native_calls += 1
    n, me = (group.nranks, group.rank) if group is not None else (dist.get_world_size(), dist.get_rank())
    ins, outs = list(map(int, in_split_sizes)), list(map(int, out_split_sizes))
    assert len(ins) == n and len(outs) == n, (ins, outs)
    assert sum(ins) == in_tensor.shape[0], ("in_split_sizes do not cover the input", ins, in_tensor.shape)
    assert sum(outs) == out_tensor.shape[0], ("out_split_sizes do not cover the output", outs, out_tensor.shape)
    sizes: list = []
    dist.all_gather(sizes, paddle.to_tensor(np.array(ins, np.int64)), group=group)
    send = np.stack([t.numpy() for t in sizes])  # [src, dst]
    assert send[:, me].tolist() == outs, ("out_split_sizes disagree with what the ranks send", send, outs, me)
    width = in_tensor.shape[1]
    most = int(send.sum(1).max())
    buf = np.zeros((most, width), np.float32)
    buf[:in_tensor.shape[0]] = in_tensor.numpy()
    bufs: list = []
    dist.all_gather(bufs, paddle.to_tensor(buf), group=group)
    got = [bufs[src].numpy()[send[src, :me].sum():send[src, :me + 1].sum()] for src in range(n)]
    recv = np.concatenate(got) if got else np.zeros((0, width), np.float32)
    paddle.assign(paddle.to_tensor(recv.astype(np.float32)), output=out_tensor)


if native:
    dist.alltoall_single = alltoall_single_standin  # read as dist.alltoall_single by ernie5.parallel.alltoall
placement = (ExpertPlacement(topo.local_experts(E), ExpertParallelDispatcher(E, topo.ep, topo.ep_rank, topo.ep_group,
                                                                            native_alltoall=native))
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
np.savez(f"{out_dir}/rank{topo.rank}.npz", logits=logits, norm=runtime.grad_norm(), native_calls=native_calls,
         **{f"g::{k}": v for k, v in grads.items()})
state = runtime.model_state()
save_tensors(state)(Path(f"{out_dir}/model.rank{topo.rank}.safetensors"))
