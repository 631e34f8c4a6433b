"""`ernie5 bench` on a tiny synthetic model: every key present with sane values; bad input exits 2.

No timing thresholds: the machine may be shared, so only relations that hold by construction are checked.
"""

import json

import pytest

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.cli import main
from ernie5.runconfig import load_config
from tests.conftest import run_cli

CONFIG = "configs/bench/small.yaml"
TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=64", "model.moe.expert_ffn_size=32", "data.seq_len=32", "model.max_seq_len=32",
        "train.micro_batch_size=2"]
# breakdown fractions add up to 1 by construction (`other` is the step's uncovered remainder); what is left
# is the timers' own enter/exit cost between the step's wall clock and its root region
SUM_TOLERANCE = 0.01
# phases the tiny MoE model certainly runs: each must have been reached by the instrumentation
REACHED = ("attention", "router", "dispatch_combine", "experts", "shared_expert", "dense_ffn", "norms_rope",
           "head_loss", "backward", "optimizer", "grad_clip", "data")


@pytest.fixture(scope="module")
def result():
    proc = run_cli("bench", CONFIG, *TINY, "--json", "--steps", "2", "--warmup", "1", "--breakdown-steps", "1",
                   "--overhead-steps", "2", "--profile", timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_headline_numbers(result):
    for key in ("tokens_per_s", "mfu", "gemm_gflops", "step_s", "achieved_gflops", "flops_per_token",
                "tokens_per_step", "peak_rss_mb", "breakdown", "train_overhead_fraction"):
        assert key in result, key
    assert result["tokens_per_step"] == 2 * 32
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_s"], rel=1e-9)
    assert result["achieved_gflops"] == pytest.approx(result["tokens_per_s"] * result["flops_per_token"] / 1e9)
    assert 0 < result["mfu"] < 1
    assert result["mfu"] == pytest.approx(result["achieved_gflops"] / result["gemm_gflops"])
    gemm = result["gemm"]
    assert result["gemm_gflops"] == max(gemm["square_1024_gflops"], gemm["model_gemm"]["gflops"])
    assert gemm["model_gemm"]["name"] == "head"  # 32 x 256 vocab is the tiny model's biggest GEMM
    assert result["peak_rss_mb"] > 10
    assert len(result["step_s_all"]) == 2 and result["step_s"] > 0
    assert result["fused_kernels"] == "on" and result["malloc_retained"] is True


def test_breakdown(result):
    fractions = result["breakdown"]
    assert sum(fractions.values()) == pytest.approx(1.0, abs=SUM_TOLERANCE)
    assert all(f >= 0 for f in fractions.values())  # exclusive times of nested regions cannot be negative
    assert [p for p in REACHED if result["breakdown_s"][p] <= 0] == []
    assert result["uninstrumented"] == []


def test_profile(result):
    prof = result["profile"]
    assert prof["replay"]["failed"] == []
    split = prof["breakdown_split"]["fractions"]
    assert "backward" not in split and "backward_unattributed" in split
    assert sum(split.values()) == pytest.approx(1.0, abs=SUM_TOLERANCE)
    ops = prof["ops"]
    assert ops and {"phase", "op", "calls", "s", "fraction"} <= set(ops[0])
    assert any(o["phase"] == "backward" and o["op"].endswith("GradNode") for o in ops)


def test_train_overhead(result):
    over = result["train_overhead"]
    assert 0 <= result["train_overhead_fraction"] < 1
    assert over["steps"] == 2 and over["loop_s"] > 0


def test_train_overhead_times_data_through_the_trainer_hook(tiny_cfg):
    """The loop's overhead is measured through the trainer's `step` / `data` hooks (no trainer method is
    replaced); a periodic evaluation is costed apart, and the trainer's config and timer are restored."""
    from ernie5.bench import train_overhead
    from ernie5.train.timing import NO_TIMER
    from ernie5.train.trainer import Trainer

    tr = Trainer(tiny_cfg("train.eval_interval=2", "train.max_steps=10"), quiet=True)
    cfg = tr.cfg
    over = train_overhead(tr, 2)
    assert over["evaluate_s"] > 0 and over["data_s"] > 0 and over["steps"] == 2
    assert tr.cfg is cfg and cfg.train.max_steps == 10 and cfg.train.eval_interval == 2
    assert tr.timer is NO_TIMER and "train_step" not in vars(tr)


def test_instrumentation_is_removed():
    """After a run no wrapper is left on the model code, and the trainer's hook is back to the default."""
    import ernie5.model.attention as attention_mod
    import ernie5.objectives.text as text_mod
    from ernie5.bench import BenchOptions, run_bench

    before = (text_mod.head_ce, text_mod.text_loss, attention_mod.apply_rope)
    cfg = load_config(CONFIG, TINY)
    out = run_bench(cfg, BenchOptions(steps=1, warmup=0, breakdown_steps=1, overhead_steps=0, profile=True,
                                      gemm_seconds=0.05))
    assert (text_mod.head_ce, text_mod.text_loss, attention_mod.apply_rope) == before
    assert "train_overhead_fraction" not in out and out["profile"]["replay"]["replayed"] > 0
    fresh = load_config(CONFIG, TINY)  # the bench ran on a copy: the caller's config is unchanged
    assert (cfg.run.output_dir, cfg.checkpoint.resume) == (fresh.run.output_dir, fresh.checkpoint.resume)


def _bench_trainer(tmp_path, name):
    from ernie5.train.trainer import Trainer

    cfg = load_config(CONFIG, TINY + ["model.mtp.depth=1", f"run.output_dir={tmp_path / name}"])
    return Trainer(cfg, callbacks=[], quiet=True)


def test_probe_leaves_the_step_bit_identical(tmp_path):
    """A step with bench's probe and hooks attached computes exactly what a bare step does (MoE, shared expert,
    MTP head loss included): same loss terms, same parameters afterwards."""
    import numpy as np

    from ernie5.bench import PhaseTimer, instrument

    bare, probed = _bench_trainer(tmp_path, "bare"), _bench_trainer(tmp_path, "probed")
    want = bare.train_step()
    timer = PhaseTimer(capture=True)
    with instrument(probed, timer) as missing:
        got = probed.train_step()
    assert missing == [] and timer.calls["trainer.loss/head_ce"] == 2  # next-token and the MTP depth
    assert {k: got[k] for k in got if k.startswith("loss")} == {k: want[k] for k in want if k.startswith("loss")}
    assert got["loss"] == want["loss"] and got["loss_mtp_1"] == want["loss_mtp_1"]
    for (name, a), b in zip(bare.model.named_parameters(), probed.model.parameters()):
        assert np.array_equal(a.numpy(), b.numpy()), name


def test_instrument_replaces_no_names(tmp_path):
    """Bench attaches to the model's probe and forward hooks only: while it is attached and afterwards, every
    module attribute of ernie5.model.* / ernie5.objectives.* is the same object, and no layer instance gets an
    attribute other than the probe (no method overrides); afterwards the layers are as before."""
    import sys

    import ernie5.model.attention as attention_mod
    import ernie5.model.transformer as transformer_mod
    import ernie5.objectives.text as text_mod
    from ernie5.bench import PhaseTimer, instrument, timed_step
    from ernie5.model.probe import NO_PROBE

    originals = (text_mod.head_ce, attention_mod.apply_rope, transformer_mod.rope_cos_sin,
                 transformer_mod.group_mask)
    tr = _bench_trainer(tmp_path, "run")
    model = tr.model
    modules = {n: m for n, m in sys.modules.items()
               if m is not None and n.split(".")[:2] in (["ernie5", "model"], ["ernie5", "objectives"])}
    attrs = {n: dict(vars(m)) for n, m in modules.items()}
    layers = dict(model.named_sublayers(include_self=True))
    keys = {p: set(vars(layer)) for p, layer in layers.items()}

    absent = object()

    def changed_module_attrs():  # replaced, added or removed
        return [f"{n}.{a}" for n, m in modules.items() for a in set(attrs[n]) | set(vars(m))
                if vars(m).get(a, absent) is not attrs[n].get(a, absent)]

    timer = PhaseTimer()
    with instrument(tr, timer):
        timed_step(tr, timer)
        assert changed_module_attrs() == []
        assert {p: set(vars(layer)) - keys[p] for p, layer in layers.items()} == \
            {p: {"probe"} if hasattr(type(layer), "probe") else set() for p, layer in layers.items()}
        assert model.layers[0].attn.probe is model.probe is not NO_PROBE
    assert timer.calls["layers.1.attn:qkv"] and timer.calls["layers.1.attn:qkv/apply_rope"]
    assert timer.calls["layers.0:forward"] and timer.calls["layers.1.mlp.router:forward"]
    assert changed_module_attrs() == []
    assert (text_mod.head_ce, attention_mod.apply_rope, transformer_mod.rope_cos_sin,
            transformer_mod.group_mask) == originals
    assert {p: set(vars(layer)) for p, layer in layers.items()} == keys
    assert all(layer.probe is NO_PROBE for layer in layers.values() if hasattr(type(layer), "probe"))
    assert not any(layer._forward_pre_hooks or layer._forward_post_hooks for layer in layers.values())


def test_bench_does_not_patch_the_trainer_or_paddle():
    """The trainer and autograd are timed through the trainer's hooks: bench names neither module; the model
    through its probe and forward hooks: bench sets no attribute anywhere."""
    from pathlib import Path

    import ernie5.bench as bench

    src = Path(bench.__file__).read_text()
    for name in ("ernie5.train.trainer as", "patch(paddle", "_micro_batch", "tr.train_step =", "setattr(",
                 "delattr("):
        assert name not in src, name


def test_one_gemm_probe():
    import ernie5.bench as bench
    import ernie5.train.perf as perf

    assert bench.gemm_gflops is perf.gemm_gflops


def test_layer_phases():
    from ernie5.bench import layer_phases
    from ernie5.model.transformer import build_model

    phases = layer_phases(build_model(load_config(CONFIG, TINY).model))
    assert phases["layers.0.attn"] == phases["layers.1.attn.o_proj"] == "attention"
    assert phases["layers.0.mlp"] == phases["layers.0.mlp.gate_up"] == "dense_ffn"
    assert phases["layers.1.mlp"] == "dispatch_combine"
    assert phases["layers.1.mlp.router"] == "router"
    assert phases["layers.1.mlp.experts.3"] == phases["layers.1.mlp.experts.3.down"] == "experts"
    assert phases["layers.1.mlp.shared"] == "shared_expert"
    assert phases["layers.2.input_norm"] == "norms_rope"
    assert phases["embed"] == "embedding"


def test_missing_config_exits_2(capsys):
    assert main(["bench", "configs/bench/no_such.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such.yaml" in err[0] and "not found" in err[0]


@pytest.mark.parametrize("args", [["--steps", "0"], ["--warmup", "x"], ["model.hidden_size=abc"]])
def test_bad_arguments_exit_2(args):
    proc = run_cli("bench", CONFIG, *args, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
