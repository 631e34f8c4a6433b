"""`ernie5 plan CONFIG --check-build`: the planned layout's first and last pipeline stage, one shard per tensor rank
(expert rank 0), built under paddle.LazyGuard as the trainer builds them, match the plan's per-device parameters
and weight bytes exactly, for every reference config (the trillion-parameter one included), in seconds and
without allocating the weights; a wrong plan exits 2 with one line."""

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ernie5.cli import main
from ernie5.plan import memory
from ernie5.plan.lazy import _fp32_layer_types, check_layout_build
from ernie5.plan.params import ParamCount
from ernie5.runconfig import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REF = sorted((CONFIGS / "reference").glob("*.yaml"))
# tiny_text: 4 layers (layer 0 dense, 3 MoE layers of 8 experts), MTP depth 1, tied embeddings
TINY = ["model.vocab_size=8000", "train.grad_accum_steps=4", "parallel.pipeline=2"]
MM = ["model.vocab_size=8008", "model.multimodal.enabled=true", "model.multimodal.visual_bits=4",
      "model.multimodal.num_scales=4", "model.multimodal.audio_levels=8", "model.multimodal.audio_codebook=1024",
      "model.multimodal.und_cnn_dim=32", "model.multimodal.und_pix_dim=4", "model.multimodal.und_patches=4",
      "train.grad_accum_steps=4", "parallel.pipeline=2", "parallel.data=1"]

# In a child process under an address-space limit (as tests/test_plan_reference.py): if a build ever allocated
# its weights (the 1T config's end-stage shards hold 1.8B / 2.3B parameters each, 7-9 GB in fp32) the child
# fails with MemoryError instead of swapping. tracemalloc sees Python-side allocations, RSS the native ones.
_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, resource, sys, time, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    from ernie5.cli import main
    from ernie5.plan.lazy import _rss_bytes
    main(["plan", sys.argv[1], "--check-build"])  # warm-up: paddle and the model code imported once
    tracemalloc.start()
    res = {}
    for path in sys.argv[1:]:
        out, err = io.StringIO(), io.StringIO()
        tracemalloc.reset_peak()
        rss0, t0 = _rss_bytes(), time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["plan", path, "--check-build"])
        res[path] = {"rc": rc, "seconds": time.perf_counter() - t0, "out": out.getvalue(), "err": err.getvalue(),
                     "traced_peak": tracemalloc.get_traced_memory()[1], "rss_growth": _rss_bytes() - rss0}
    print(json.dumps(res))
""")


def test_reference_layouts_build_as_planned_in_seconds_without_weights():
    paths = [str(p) for p in REF]
    assert any(p.endswith("ernie5_1t.yaml") for p in paths)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *paths], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, r in res.items():
        print(f"{Path(path).name}: {r['seconds']:.2f} s, traced peak {r['traced_peak'] / 1e6:.1f} MB, "
              f"RSS +{r['rss_growth'] / 1e6:.0f} MB")
        assert r["rc"] == 0, (path, r["out"], r["err"])
        lines = r["out"].splitlines()
        shards = [ln for ln in lines if ln.startswith("stage ")]
        assert shards and all(ln.endswith("; ok") for ln in shards), r["out"]
        assert "MISMATCH" not in r["out"] and "all as planned" in lines[-1]
        assert r["seconds"] < 30, (path, r["seconds"])
        assert r["traced_peak"] < 200e6 and r["rss_growth"] < 300e6, (path, r)
    one_t = res[next(p for p in paths if p.endswith("ernie5_1t.yaml"))]["out"]
    # TP 4 x PP 12 (virtual 5) x EP 64: stages 0 and 11, each with 5 layers dealt round robin, every TP rank
    assert sum(ln.startswith("stage 0/12 (layers 0,12,24,36,48) tensor rank") for ln in one_t.splitlines()) == 4
    assert sum(ln.startswith("stage 11/12 (layers 11,23,35,47,59) tensor rank") for ln in one_t.splitlines()) == 4
    assert "expert rank 0/64" in one_t


def test_check_covers_the_planned_stage_and_experts_of_the_1t_layout():
    """The 1T shards are built with their E / EP experts per MoE layer and are what `plan` reports per device."""
    run = load_config(REF[[p.name for p in REF].index("ernie5_1t.yaml")])
    check = check_layout_build(run, tensor_ranks=[0])
    assert check.ok, check.first_problem()
    stages = memory.memory_plan(run)["per_stage"]
    m = run.model
    for shard in check.shards:
        assert shard.built_params == stages[shard.stage]["params"]
        assert shard.built_bytes == stages[shard.stage]["params_bytes"]
        moe = sum(m.is_moe_layer(i) for i in shard.layers)
        per_expert = 3 * m.hidden_size * m.moe.expert_ffn_size
        assert shard.built["experts"][0] == moe * m.moe.num_experts // 64 * per_expert
        assert not shard.allocated


def test_json_output():
    run_args = ["plan", str(CONFIGS / "tiny_text.yaml"), *TINY, "parallel.tensor=2", "--check-build", "--json"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(run_args) == 0
    rep = json.loads(out.getvalue())
    assert rep["ok"] and rep["problem"] is None
    assert [(s["stage"], s["tensor_rank"]) for s in rep["shards"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for s in rep["shards"]:
        assert s["built"] == s["planned"] and s["built_params"] == s["planned_params"]


def test_a_wrong_plan_exits_2_with_one_line(monkeypatch, capsys):
    real = memory.layer_params

    def one_more_attention_param(cfg, i, modality="text", tensor=1):
        pc = real(cfg, i, modality, tensor)
        pc.merge(ParamCount({"attention": 1}, {"attention": 1}))
        return pc

    monkeypatch.setattr(memory, "layer_params", one_more_attention_param)
    assert main(["plan", str(CONFIGS / "tiny_text.yaml"), *TINY, "parallel.tensor=2", "parallel.pipeline_layout=[2,2]",
                 "--check-build"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1, cap.err
    # the layout pins stage 0 to layers 0-1: two layers, one extra planned attention parameter each
    assert err[0].startswith("error: --check-build: built shard differs from the plan: stage 0/2 (layers 0-1) "
                             "tensor rank 0/2 expert rank 0/1: attention params planned "), err[0]
    planned, built = (int(x.replace(",", "")) for x in err[0].split("planned ")[1].split(" built "))
    assert planned == built + 2
    assert cap.out.count("MISMATCH") == 5  # the four shard lines and the summary


@pytest.mark.parametrize("case, overrides", [
    # untied head + MTP: the last stage still keeps an embedding copy (MTP embeds its inputs)
    ("untied_mtp", ["model.tie_embeddings=false", "parallel.data=2", "parallel.expert=2", "parallel.tensor=2"]),
    ("untied_no_mtp", ["model.tie_embeddings=false", "model.mtp.depth=0", "parallel.data=1"]),
    ("virtual_2", ["parallel.data=1", "parallel.virtual_pipeline=2"]),
])
def test_text_layouts(case, overrides):
    run = load_config(CONFIGS / "tiny_text.yaml", TINY + overrides)
    check = check_layout_build(run)
    assert check.ok, check.first_problem()
    last = check.shards[-1]
    assert ("embeddings" in last.built) == (case != "untied_no_mtp")
    if case == "virtual_2":  # 4 layers in 4 chunks: stage 0 holds chunks 0 and 2
        assert [s.layers for s in check.shards] == [[0, 2], [1, 3]]


def test_multimodal_io_on_both_end_stages():
    """ModalityIO (inputs and heads in one module) is held whole by the first and the last stage."""
    run = load_config(CONFIGS / "demo_unified.yaml", MM + ["parallel.tensor=2", "model.tie_embeddings=false"])
    check = check_layout_build(run)
    assert check.ok, check.first_problem()
    for shard in check.shards:
        assert {"modality_embeddings", "patch_merger", "visual_head", "audio_heads"} <= set(shard.built)
    assert "patch_merger" in check.shards[0].built and check.shards[0].built["patch_merger"][1] > 0


def test_fp32_layers_are_the_ones_bf16_amp_keeps_fp32():
    """The byte rule's fp32 layers are the `excluded_layers` of the GPU bf16 path (AMP O2)."""
    from ernie5.model import mixed_precision

    src = inspect.getsource(mixed_precision._decorate_o2)
    excluded = src.split("excluded_layers=[")[1].split("]")[0]
    assert sorted(n.strip() for n in excluded.split(",")) == sorted(t.__name__ for t in _fp32_layer_types())
