"""Worker of `ernie5.tools.gpu_check` run under paddle.distributed.launch on 2 ranks: one forward / backward of a
tiny MoE under expert parallelism 2 with the dispatcher's native all-to-all branch (`alltoall_single`, what NCCL
runs), against the same model in one process computed here on every rank from the same seed and batch.

On NCCL the real `paddle.distributed.alltoall_single` runs. Gloo has no all-to-all, so there it is replaced by a
stand-in with the same contract built from all_gather (as tests/parallel/_ep_check.py does): the native branch's
split sizes and row order are then still checked, the collective itself only on GPUs.

Prints `CHECK <name> <scale-relative error>` per compared tensor, `NATIVE_CALLS <n>` and `EP_CHECK_DONE`; exits
1 on a mismatch beyond 1e-5 (logits) / 1e-4 (gradients averaged over the 2 data-parallel ranks)."""

import sys

import numpy as np

from ernie5.env import setup

setup()  # thread settings before paddle loads

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from ernie5.model.moe import ExpertPlacement  # noqa: E402
from ernie5.model.transformer import build_model, to_tensor_batch  # noqa: E402
from ernie5.objectives.text import make_text_batch, text_loss  # noqa: E402
from ernie5.parallel.expert_parallel import ExpertParallelDispatcher  # noqa: E402
from ernie5.parallel.runtime import ParallelRuntime  # noqa: E402
from ernie5.parallel.topology import init_topology  # noqa: E402
from ernie5.runconfig import load_config  # noqa: E402

calls = 0


def alltoall_single_standin(out_tensor, in_tensor, in_split_sizes=None, out_split_sizes=None, group=None,
                            sync_op=True):
    """alltoall_single's contract on gloo: rows [sum(in[:j]), +in[j]) go to group rank j; out_tensor receives
    out[i] rows from rank i in rank order. Checks the split sizes against what every rank sends."""
    n, me = (group.nranks, group.rank) if group is not None else (dist.get_world_size(), dist.get_rank())
    ins, outs = list(map(int, in_split_sizes)), list(map(int, out_split_sizes))
    assert len(ins) == n and len(outs) == n and sum(ins) == in_tensor.shape[0] and sum(outs) == out_tensor.shape[0]
    sizes: list = []
    dist.all_gather(sizes, paddle.to_tensor(np.array(ins, np.int64)), group=group)
    send = np.stack([t.numpy() for t in sizes])  # [src, dst]
    assert send[:, me].tolist() == outs, ("out_split_sizes disagree with what the ranks send", send, outs, me)
    width, most = in_tensor.shape[1], int(send.sum(1).max())
    buf = np.zeros((most, width), np.float32)
    buf[:in_tensor.shape[0]] = in_tensor.numpy()
    bufs: list = []
    dist.all_gather(bufs, paddle.to_tensor(buf), group=group)
    recv = np.concatenate([bufs[s].numpy()[send[s, :me].sum():send[s, :me + 1].sum()] for s in range(n)])
    paddle.assign(paddle.to_tensor(recv.astype(np.float32)), output=out_tensor)


def counted(fn):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        return fn(*args, **kwargs)
    return wrapper


cfg = load_config(None, sys.argv[1:])
topo = init_topology(cfg.parallel)
assert topo.ep == 2, "run with parallel.expert=2 on 2 ranks"
# read as dist.alltoall_single by ernie5.parallel.alltoall
dist.alltoall_single = counted(dist.alltoall_single if topo.backend == "nccl" else alltoall_single_standin)
E = cfg.model.moe.num_experts
with paddle.utils.unique_name.guard():
    ref = build_model(cfg.model, seed=3)
placement = ExpertPlacement(topo.local_experts(E), ExpertParallelDispatcher(E, topo.ep, topo.ep_rank, topo.ep_group,
                                                                          native_alltoall=True))
with paddle.utils.unique_name.guard():
    model = build_model(cfg.model, seed=3, placement=placement)
runtime = ParallelRuntime(model, cfg.optim, topo)
ref_params = dict(ref.named_parameters())

rng = np.random.default_rng(7)
tokens = rng.integers(0, cfg.model.vocab_size, (2 * topo.dp, 13))  # rank r trains on rows [2r, 2r + 2)
mine = slice(2 * topo.dp_rank, 2 * topo.dp_rank + 2)
zeros = np.zeros_like(tokens)
ref.train()
text_loss(ref, to_tensor_batch(make_text_batch(tokens, zeros, 0)), 0.0).total.backward()
model.train()
text_loss(model, to_tensor_batch(make_text_batch(tokens[mine], zeros[mine], 0)), 0.0).total.backward()
runtime.sync_grads()
failed = []


def check(name, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-4)) if got.size else 0.0
    print(f"CHECK {name} {err:.2e}", flush=True)
    if not err <= tol:
        failed.append(name)


for name, p in model.named_parameters():
    gname = runtime.to_global[name]
    if p.grad is None:
        continue
    want = ref_params[gname].grad
    check(f"grad.{gname}", p.grad.numpy(), want.numpy(), 1e-4)  # the mean of 2 ranks' row means: regrouped sums
model.eval()
ref.eval()
ids = paddle.to_tensor(tokens[:, :12])
check("logits", model(ids).numpy(), ref(ids).numpy(), 1e-5)
print(f"NATIVE_CALLS {calls}", flush=True)
if failed:
    print(f"EP_CHECK_FAILED {' '.join(failed)}", flush=True)
    sys.exit(1)
print("EP_CHECK_DONE", flush=True)
