"""Run under paddle.distributed.launch (2 data-parallel ranks) by test_distributed.py: a few Trainer steps with the
aux-free bias update; hooks on the routers count this rank's expert loads per micro-batch, and each rank saves
them with every MoE layer's router bias before and after each step's update."""

import sys

import numpy as np

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config
from ernie5.train.trainer import Trainer

out_dir, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, overrides)
E = cfg.model.moe.num_experts
tr = Trainer(cfg, callbacks=[], quiet=True)
layers = tr.model.moe_layers()
micro = [[] for _ in layers]  # this step's per-micro-batch histograms, per layer


def hook_for(i):
    def hook(router, inputs, out):
        if router.training:
            micro[i].append(np.bincount(out.topk_ids_TK.numpy().ravel(), minlength=E))
    return hook


for i, layer in enumerate(layers):
    layer.router.register_forward_post_hook(hook_for(i))
log = {"before": [], "after": [], "loads": []}


def snap(key):
    log[key].append(np.stack([l.router.e_score_correction_bias.numpy() for l in layers]))


class AroundAlgorithm:
    """The trainer's step-timer hook: biases just before and after the router updates of each applied step."""

    def run(self, phase, fn, *args, **kwargs):
        if phase != "algorithm":
            return fn(*args, **kwargs)
        snap("before")
        assert all(len(m) == cfg.train.grad_accum_steps for m in micro), [len(m) for m in micro]
        log["loads"].append(np.stack([np.sum(m, 0) for m in micro]))  # [layer, E], this rank, whole step
        for m in micro:
            m.clear()
        out = fn(*args, **kwargs)
        snap("after")
        return out


tr.timer = AroundAlgorithm()
tr.train()
np.savez(f"{out_dir}/bias.rank{tr.topo.rank}.npz", **{k: np.stack(v) for k, v in log.items()})
print(f"rank {tr.topo.rank} ok", flush=True)
