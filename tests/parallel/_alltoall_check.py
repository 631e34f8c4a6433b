"""Run under paddle.distributed.launch (2 ranks): the gloo all-to-all equals a NumPy reference, both ways."""

import sys

import numpy as np
import paddle
import paddle.distributed as dist

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.parallel.alltoall import all_to_all

dist.init_parallel_env()
me, n = dist.get_rank(), dist.get_world_size()
send = np.array([[3, 0], [2, 5]])  # rows rank i sends to rank j; includes an empty transfer
rows = [np.arange(send[i].sum() * 4, dtype=np.float32).reshape(-1, 4) + 100 * i for i in range(n)]
x = paddle.to_tensor(rows[me], stop_gradient=False)
y = all_to_all(x, send, None, me, native=False)
want = np.concatenate([rows[src][send[src, :me].sum():send[src, :me + 1].sum()] for src in range(n)])
assert np.array_equal(y.numpy(), want), (me, y.numpy(), want)
weights = paddle.arange(y.shape[0] * 4, dtype="float32").reshape(y.shape) + 1000 * me
(y * weights).sum().backward()
# d/dx of sum(y * w) routes each receiver's weights back to the sender's rows
w_all = [np.arange(send[:, j].sum() * 4, dtype=np.float32).reshape(-1, 4) + 1000 * j for j in range(n)]
grad_want = np.concatenate([w_all[dst][send[:me, dst].sum():send[:me + 1, dst].sum()] for dst in range(n)])
assert np.array_equal(x.grad.numpy(), grad_want), (me, x.grad.numpy(), grad_want)
print(f"rank {me} ok", flush=True)
sys.exit(0)
