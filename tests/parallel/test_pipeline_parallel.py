"""Pipeline parallelism (1F1B over blocking send / recv) on 2 and 4 CPU processes, against one process: whole
`ernie5 train` runs under paddle.distributed.launch must give the one-process losses."""

import json
import shutil

import numpy as np
import pytest

from tests.conftest import run_cli, tiny_overrides
from tests.parallel.test_tensor_parallel import launch, losses


@pytest.fixture(scope="module")
def train_args(text_assets):
    _, tok, shards = text_assets

    def make(run, *extra):  # 4 layers: 2 per stage; MTP and the tied embedding on the last stage
        return ["configs/tiny_text.yaml", *tiny_overrides(run, shards, tok), "model.num_layers=4",
                "train.grad_accum_steps=4", "checkpoint.interval=3", "--quiet", *extra]
    return make


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, train_args):
    """The one-process run of some overrides (each distinct one trained once per module)."""
    runs: dict = {}

    def run(*extra):
        if extra not in runs:
            out = tmp_path_factory.mktemp("single")
            p = run_cli("train", *train_args(out, *extra))
            assert p.returncode == 0, p.stderr
            runs[extra] = out
        return runs[extra]
    return run


def metric(run, key) -> list:
    return [json.loads(line).get(key) for line in open(run / "metrics.jsonl")]


def assert_same_run(run, single, keys=("loss",), rtol=1e-5):
    """`run`'s logged values of `keys` equal the one-process run's (None where both logged none)."""
    for key in keys:
        got, want = metric(run, key), metric(single, key)
        assert [g is None for g in got] == [w is None for w in want] and any(g is not None for g in got), key
        np.testing.assert_allclose([g for g in got if g is not None], [w for w in want if w is not None],
                                   rtol=1e-4 if key == "grad_norm" else rtol, err_msg=key)


COMMON = ("train.max_steps=6", "model.moe.aux_loss_coef=0.01", "train.eval_interval=3", "train.eval_batches=2")


def test_pp2_training_equals_one_process_and_checkpoints_reshard(tmp_path, train_args, one_process):
    """6 steps of PP 2 (1F1B over 4 micro-batches, balancing loss on both stages, held-out evaluation through the
    pipeline) give the one-process losses, gradient norms, held-out loss and per-layer expert loads; the PP 2
    checkpoint of step 3 resumes in one process, and the one-process checkpoint under PP 2, with the
    uninterrupted losses."""
    single = one_process(*COMMON)
    pp2 = tmp_path / "pp2"
    code, logs = launch(2, train_args(pp2, *COMMON, "parallel.pipeline=2"), tmp_path / "l1")
    assert code == 0, logs
    assert_same_run(pp2, single, ("loss", "grad_norm", "val_loss"))
    # routing.jsonl lists every MoE layer (3 of 4, on both stages) with the one-process loads
    routing = [[json.loads(line)["load"] for line in open(run / "routing.jsonl")] for run in (single, pp2)]
    assert len(routing[1][0]) == 3 and routing[1] == routing[0]
    for src, dst, nproc in ((pp2, tmp_path / "to_pp1", 1), (single, tmp_path / "to_pp2", 2)):
        (dst / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_00000003", dst / "checkpoints" / "step_00000003")
        if nproc == 1:
            p = run_cli("train", *train_args(dst, *COMMON))
            assert p.returncode == 0 and "step_00000003" in p.stderr, p.stderr
        else:
            code, logs = launch(2, train_args(dst, *COMMON, "parallel.pipeline=2"), tmp_path / "l2")
            assert code == 0, logs
        np.testing.assert_allclose(losses(dst)[-3:], losses(single)[3:], rtol=1e-5)


def test_interleaved_pp2_v2_equals_one_process(tmp_path, train_args, one_process):
    """Interleaved 1F1B, 2 stages x 2 chunks (stage 0: layers 0 and 2, stage 1: layers 1 and 3; a micro-batch
    crosses the ring stage 1 -> stage 0 between the chunks) for 6 steps: losses, gradient norms, held-out loss."""
    run = tmp_path / "v2"
    code, logs = launch(2, train_args(run, *COMMON, "parallel.pipeline=2", "parallel.virtual_pipeline=2"),
                        tmp_path / "l")
    assert code == 0, logs
    assert_same_run(run, one_process(*COMMON), ("loss", "grad_norm", "val_loss"))


@pytest.mark.parametrize("layout", [["parallel.tensor=2", "parallel.pipeline_balance=compute"], ["parallel.expert=2"],
                                    ["parallel.pipeline_layout=[1,3]"],
                                    ["parallel.tensor=2", "parallel.virtual_pipeline=2"], ["parallel.sharding_stage=1"]],
                         ids=["pp2xtp2", "pp2xep2", "pp2xdp2", "pp2v2xtp2", "pp2xzero1"])
def test_pp2_composed_on_4_ranks_equals_one_process(tmp_path, train_args, one_process, layout):
    """PP 2 x TP 2 (sequence parallel, compute-balanced: 3 + 1 layers), PP 2 x EP 2, PP 2 x DP 2 (4 rows per
    rank; explicit layout 1 + 3 layers), interleaved PP 2 x 2 chunks x TP 2 and PP 2 x ZeRO-1, for 6 steps."""
    base = ("train.max_steps=6", "model.moe.aux_loss_coef=0")  # a per-rank Switch loss is not the batch's
    dp2 = "parallel.tensor=2" not in layout
    single = one_process(*base, *(["train.micro_batch_size=8"] if dp2 else []))
    run = tmp_path / "pp"
    code, logs = launch(4, train_args(run, *base, "parallel.pipeline=2", *layout), tmp_path / "l")
    assert code == 0, logs
    assert_same_run(run, single)


def test_untied_head_without_mtp_under_pp2_equals_one_process(tmp_path, train_args, one_process):
    """An untied head and no MTP: the last stage holds no embedding copy, so only the first stage's is updated."""
    common = ("train.max_steps=4", "model.tie_embeddings=false", "model.mtp.depth=0")
    run = tmp_path / "untied"
    code, logs = launch(2, train_args(run, *common, "parallel.pipeline=2"), tmp_path / "l")
    assert code == 0, logs
    assert_same_run(run, one_process(*common), ("loss", "grad_norm"))


def test_pp4_with_middle_stages_equals_one_process(tmp_path, train_args, one_process):
    """4 stages of one layer each (two middle stages that hold neither end; the tied embedding's copies 3 ranks
    apart) for 6 steps: losses and gradient norms."""
    run = tmp_path / "pp4"
    code, logs = launch(4, train_args(run, *COMMON, "parallel.pipeline=4"), tmp_path / "l")
    assert code == 0, logs
    assert_same_run(run, one_process(*COMMON), ("loss", "grad_norm", "val_loss"))


def test_elastic_width_and_top_k_under_pp2_equal_one_process(tmp_path, train_args, one_process):
    """Elastic training (expert-count and top-k cuts; depth stays full under PP) for 4 steps: every stage trains
    the same sub-model per micro-batch, and the losses (overall and per sub-model kind) equal one process's."""
    common = ("train.max_steps=4", "elastic.enabled=true", "elastic.depth.p_full=1.0")
    pp2 = tmp_path / "pp2"
    code, logs = launch(2, train_args(pp2, *common, "parallel.pipeline=2"), tmp_path / "l")
    assert code == 0, logs
    single = one_process(*common)
    assert metric(pp2, "elastic_submodels") == metric(single, "elastic_submodels")
    assert_same_run(pp2, single, ("loss", "loss_full", "loss_sub"))


def test_nan_on_the_last_stage_skips_the_step_on_every_rank(tmp_path, train_args):
    run = tmp_path / "nan"
    code, logs = launch(2, train_args(run, "train.max_steps=3", "parallel.pipeline=2", "faults.nan_loss_steps=[2]"),
                        tmp_path / "l")
    assert code == 0, logs
    steps = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m.get("skipped", False) for m in steps] == [False, True, False]
    assert "skipped_step" in (run / "events.jsonl").read_text()


@pytest.mark.parametrize("override,message", [
    (["train.grad_accum_steps=1"], "train.grad_accum_steps: 1 < parallel.pipeline 2 (1F1B needs a micro-batch per "
                                   "stage)"),
    (["parallel.data=2"], "parallel: data 2 x tensor 1 x pipeline 2 = 4, but 1 processes were launched"),
    (["parallel.virtual_pipeline=2", "train.grad_accum_steps=3"], "train.grad_accum_steps: 3 is not a multiple of "
     "parallel.pipeline 2 (interleaved 1F1B runs the micro-batches in groups of one per stage)"),
    (["parallel.virtual_pipeline=3"], "parallel.pipeline: 2 stages x virtual_pipeline 3 = 6 chunks > "
                                      "model.num_layers 4"),
    (["elastic.enabled=true"], "elastic.depth.p_full: elastic depth with pipeline parallelism (stage-balanced "
                               "dropping) is not supported yet; set it to 1.0"),
    (["parallel.pipeline_layout=[3,3]"], "parallel.pipeline_layout: [3, 3] must be 2 layer counts (pipeline x "
                                         "virtual_pipeline), each >= 1, summing to model.num_layers 4"),
])
def test_bad_pipeline_layouts_exit_2(tmp_path, train_args, override, message):
    p = run_cli("train", *train_args(tmp_path / "x", "parallel.pipeline=2", *override))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"error: {message}", p.stderr


def test_pp2_with_a_two_source_mixture_equals_one_process(tmp_path, text_assets):
    """Blended sources through the pipeline: the losses, the mixture's held-out loss and each source's (evaluated
    through the schedule, source by source) and the tokens seen per source equal one process's."""
    from ernie5.data.prepare import prepare_text
    from ernie5.runconfig import load_config

    corpus, tok, _ = text_assets
    lines = [x for x in corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    (tmp_path / "a.txt").write_text("\n".join(lines[::2]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(lines[1::2]) + "\n", encoding="utf-8")
    shards = tmp_path / "shards"
    mix = [f"data.sources=[{{name: a, paths: [{tmp_path / 'a.txt'}], weight: 0.7}}, "
           f"{{name: b, paths: [{tmp_path / 'b.txt'}], weight: 0.3}}]", "data.val_fraction=0.25"]

    def args(run, *extra):
        return ["configs/tiny_text.yaml", *tiny_overrides(run, shards, tok), *mix, "model.num_layers=4",
                "train.grad_accum_steps=4", "checkpoint.interval=0", "--quiet", *COMMON, *extra]
    prepare_text(load_config(None, [o for o in args(tmp_path / "x") if "=" in o and not o.startswith("--")]),
                 progress=False)
    single, pp2 = tmp_path / "single", tmp_path / "pp2"
    assert run_cli("train", *args(single)).returncode == 0
    code, logs = launch(2, args(pp2, "parallel.pipeline=2"), tmp_path / "logs")
    assert code == 0, logs
    assert_same_run(pp2, single, ("loss", "val_loss", "val_loss/a", "val_loss/b", "tokens_seen/a", "tokens_seen/b"))
