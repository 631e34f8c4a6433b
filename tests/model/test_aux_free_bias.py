"""Aux-free balancing bias: the exact update rule b_i <- b_i + u * sign(mean_load - load_i), per router group, and
that a Trainer step applies it to the loads of all its micro-batches together.

Expected values are built here from loads counted independently (a hook on each router records the chosen expert
ids of every forward), never from the layer's own `step_counts` or `update_bias`.
"""

import numpy as np
import paddle

from ernie5.model.config import ModelConfig, MoEConfig
from ernie5.model.moe import MoELayer
from ernie5.train.trainer import Trainer


def _layer(**moe):
    cfg = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_size=8,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8, **moe))
    return MoELayer(cfg)


def test_update_bias_moves_each_expert_by_exactly_the_rate_toward_the_mean():
    layer = _layer()
    start = np.array([0.25, -0.5, 0.0, 1.0], np.float32)
    layer.router.e_score_correction_bias.set_value(paddle.to_tensor(start))
    u = 0.125  # a power of two: start +- u is exact in fp32, so equality below is exact
    # loads 10, 2, 6, 6: mean 6. Expert 0 is overloaded -> down by u; expert 1 underloaded -> up by u;
    # experts 2 and 3 sit exactly at the mean -> unchanged (sign(0) = 0).
    layer.update_bias(u, np.array([10, 2, 6, 6]))
    np.testing.assert_array_equal(layer.router.e_score_correction_bias.numpy(), [0.125, -0.375, 0.0, 1.0])
    # the step size does not depend on how far from the mean a load is: loads 0, 100, 50, 50 (mean 50)
    layer.update_bias(u, np.array([0, 100, 50, 50]))
    np.testing.assert_array_equal(layer.router.e_score_correction_bias.numpy(), [0.25, -0.5, 0.0, 1.0])


def test_update_bias_balances_each_isolated_group_against_its_own_mean():
    layer = _layer(routing="isolated", vision_num_experts=3, vision_expert_ffn_size=8, vision_top_k=1)
    u = 0.5
    # counts list the 4 text experts, then the 3 vision experts. Text loads 1 1 1 5 (mean 2): -> +u +u +u -u.
    # Vision loads 9 0 3 (mean 4): -> -u +u +u. Against the mean of all 7 (20/7 ~ 2.86) text expert 3 (load 5)
    # would still go down but vision expert 2 (load 3) would go down too: the groups must not be mixed.
    layer.update_bias(u, np.array([1, 1, 1, 5, 9, 0, 3]))
    np.testing.assert_array_equal(layer.router.e_score_correction_bias.numpy(), [0.5, 0.5, 0.5, -0.5])
    np.testing.assert_array_equal(layer.vision_router.e_score_correction_bias.numpy(), [-0.5, 0.5, 0.5])


class _AroundAlgorithm:
    """A step timer (the trainer's phase hook) that records each MoE layer's router bias just before and just
    after the router updates of every applied step, and the loads the router hooks counted that step."""

    def __init__(self, log, counter):
        self.log, self.counter = log, counter

    def run(self, phase, fn, *args, **kwargs):
        if phase != "algorithm":
            return fn(*args, **kwargs)
        model = args[0]
        bias = lambda: [l.router.e_score_correction_bias.numpy().copy() for l in model.moe_layers()]  # noqa: E731
        self.log.setdefault("before", []).append({"bias": bias(), "micro": self.counter.take()})
        out = fn(*args, **kwargs)
        self.log.setdefault("after", []).append({"bias": bias()})
        return out


class _RouterCounter:
    """Forward hooks on every router: per layer, the expert histogram of each training forward (one per
    micro-batch here: no recompute, no evaluation)."""

    def __init__(self, model, E):
        self.E, self.now = E, []
        layers = model.moe_layers()
        self.now = [[] for _ in layers]
        for i, layer in enumerate(layers):
            layer.router.register_forward_post_hook(self._hook(i))

    def _hook(self, i):
        def hook(router, inputs, out):
            if router.training:
                self.now[i].append(np.bincount(out.topk_ids_TK.numpy().ravel(), minlength=self.E))
        return hook

    def take(self):
        got, self.now = self.now, [[] for _ in self.now]
        return got


def test_trainer_step_updates_the_bias_from_the_loads_of_all_micro_batches(tiny_cfg):
    """grad_accum_steps=2 (tiny config): after every step, bias = bias_before + u * sign(mean(L) - L) with L the
    expert loads summed over the step's two micro-batches (text rows are packed: no padding positions)."""
    u = 1e-3
    cfg = tiny_cfg("train.max_steps=4", f"model.moe.bias_update_rate={u}", "train.grad_accum_steps=2")
    log = {}
    tr = Trainer(cfg, callbacks=[], quiet=True)
    counter = _RouterCounter(tr.model, cfg.model.moe.num_experts)
    tr.timer = _AroundAlgorithm(log, counter)
    tr.train()
    assert len(log["before"]) == 4
    discriminating = 0
    for before, after in zip(log["before"], log["after"]):
        for layer, micro in enumerate(before["micro"]):
            assert len(micro) == 2  # one histogram per micro-batch
            total = micro[0] + micro[1]
            assert total.sum() == 2 * 4 * 32 * 2  # 2 micro-batches x 4 rows x 32 positions x top-2
            want = before["bias"][layer] + np.float32(u) * np.sign(total.mean() - total).astype(np.float32)
            np.testing.assert_allclose(after["bias"][layer], want, rtol=0, atol=1e-9)
            # count the cases where using one micro-batch alone would have given another update
            discriminating += any((np.sign(m.mean() - m) != np.sign(total.mean() - total)).any() for m in micro)
    assert discriminating > 0  # so the check above really tells "all micro-batches" from "the last one"
