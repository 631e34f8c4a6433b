"""Check the GPU-only paths once against their CPU reference: `python -m ernie5.tools.gpu_check --device gpu`
(what scripts/gpu_check.sh runs) or `--device cpu` (what the test suite runs: the device side then runs on CPU).

    python -m ernie5.tools.gpu_check --device gpu|cpu [--nproc N] [--only NAME ...] [--workdir DIR]

Single-device checks (`ernie5.tools.gpu_check_single`): attention (Paddle's kernels under the packed-document and
scale-wise masks; FlashMask where the build has it), the tiny model in fp32 and under bf16 AMP, the FP8 recipe.
Multi-device checks (`--nproc` >= 2, over NCCL on GPUs, gloo on CPU) launch `python -m paddle.distributed.launch`:
TP 2 (tests/parallel/_tp_check.py of this checkout: loss, logits, every gradient against one process), EP 2 with
the native all-to-all (`ernie5.tools.gpu_check_ep`), and 3 training steps of PP 2 (`ernie5 train
parallel.pipeline=2` on synthetic tokens) against one process's losses.

Prints `PASS name detail`, `FAIL name detail` or `SKIP name reason` per check, then a summary; exits 0 iff no FAIL
(2 for a usage error, e.g. `--device gpu` without a CUDA device). fp32 references are compared with fp32
tolerances, so TF32 is switched off for this process and the launched ones (NVIDIA_TF32_OVERRIDE=0, unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/parallel/_tp_check.py and configs/ live there
TP_SCRIPT = REPO / "tests" / "parallel" / "_tp_check.py"
EP_SCRIPT = Path(__file__).with_name("gpu_check_ep.py")
SINGLE = ("attention", "model", "fp8")
MULTI = ("tp", "ep", "pp")
# the tiny text MoE of the 2-rank checks (tests/parallel/test_tensor_parallel.py): MTP, shared experts, GQA
TINY = ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=48",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_size=16",
        "model.moe.num_shared_experts=1", "model.moe.layer_start=1"]
TP_ARGS = TINY + ["model.vocab_size=96", "model.num_layers=3", "model.mtp.depth=1", "data.seq_len=16",
                  "model.moe.aux_loss_coef=0.01", "parallel.tensor=2"]
EP_ARGS = TINY + ["model.vocab_size=97", "model.num_layers=3", "parallel.expert=2"]
PP_ARGS = TINY + ["data.synthetic=true", "model.vocab_size=96", "model.num_layers=4", "model.mtp.depth=1",
                  "data.seq_len=16", "train.micro_batch_size=2", "train.grad_accum_steps=4", "train.max_steps=3",
                  "train.log_interval=1", "train.eval_interval=0", "train.progress_bar=false", "checkpoint.interval=0",
                  "model.moe.aux_loss_coef=0.01", "--quiet"]


def _env(device: str) -> dict:
    env = dict(os.environ)
    env.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    # worker scripts run by path: let them import this checkout's ernie5 even where it is not pip-installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # 2 processes share the cores
    return env


def launch(nproc: int, device: str, script: Path, args: list[str], log_dir: Path, timeout: int = 600):
    """`nproc` processes through Paddle's launcher (GPUs 0..nproc-1 on GPUs); returns (returncode, worker logs)."""
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", str(log_dir)]
    if device != "cpu":
        cmd += ["--devices", ",".join(map(str, range(nproc)))]
    p = subprocess.run(cmd + [str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=_env(device))
    logs = "\n".join(f.read_text(errors="replace") for f in sorted(Path(log_dir).glob("workerlog.*")))
    return p.returncode, logs or p.stdout[-2000:] + p.stderr[-2000:]


def _last_error(logs: str) -> str:
    lines = [ln for ln in logs.splitlines() if re.match(r"^\w*(Error|Exception)\b", ln.strip())]
    return lines[-1].strip()[:300] if lines else "no error line in the worker logs"


def _checks(logs: str) -> list[tuple[str, float]]:
    return [(m.group(1), float(m.group(2))) for m in re.finditer(r"^CHECK (\S+) (\S+)", logs, re.M)]


def check_tp(device: str, nproc: int, work: Path):
    from ernie5.tools.gpu_check_single import verdict

    if not TP_SCRIPT.is_file():
        return [verdict("tp", False, f"{TP_SCRIPT} not found: run from a checkout of the repository")]
    code, logs = launch(2, device, TP_SCRIPT, TP_ARGS, work / "log_tp")
    checks = _checks(logs)
    done = logs.count("TP_CHECK_DONE")
    worst = max(checks, key=lambda c: c[1]) if checks else ("-", float("nan"))
    detail = (f"TP 2 (sequence parallel) vs one process: {len(checks)} checks over 2 ranks (initial shards, loss "
              f"terms, logits, every gradient, the gradient norm), worst {worst[0]} {worst[1]:.1e} <= 1e-5")
    ok = code == 0 and done == 2
    return [verdict("tp", ok, detail if ok else f"exit {code}, {done}/2 ranks done: {_last_error(logs)}")]


def check_ep(device: str, nproc: int, work: Path):
    from ernie5.tools.gpu_check_single import verdict

    code, logs = launch(2, device, EP_SCRIPT, EP_ARGS, work / "log_ep")
    checks = _checks(logs)
    calls = [int(c) for c in re.findall(r"^NATIVE_CALLS (\d+)", logs, re.M)]
    ok = code == 0 and logs.count("EP_CHECK_DONE") == 2 and calls == [12, 12]
    how = "NCCL alltoall_single" if device != "cpu" else "on gloo a stand-in with alltoall_single's contract"
    worst = max(checks, key=lambda c: c[1]) if checks else ("-", float("nan"))
    detail = (f"EP 2, native all-to-all branch ({how}), vs one process: {len(checks)} checks over 2 ranks (logits "
              f"<= 1e-5, every gradient <= 1e-4), worst {worst[0]} {worst[1]:.1e}; all-to-all calls per rank "
              f"{calls} (want 12)")
    return [verdict("ep-alltoall", ok, detail if code == 0 else f"exit {code}: {_last_error(logs)}; {detail}")]


def check_pp(device: str, nproc: int, work: Path):
    from ernie5.tools.gpu_check_single import verdict

    import numpy as np

    main = str(REPO / "ernie5" / "__main__.py")
    cfg = str(REPO / "configs" / "tiny_text.yaml")
    single, pp2 = work / "pp_single", work / "pp2"
    p = subprocess.run([sys.executable, "-m", "ernie5", "train", cfg, f"run.output_dir={single}", *PP_ARGS], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=_env(device))
    if p.returncode != 0:
        return [verdict("pp", False, f"one-process run exit {p.returncode}: {p.stderr.strip()[-300:]}")]
    code, logs = launch(2, device, Path(main), ["train", cfg, f"run.output_dir={pp2}", "parallel.pipeline=2",
                                                *PP_ARGS], work / "log_pp")
    if code != 0:
        return [verdict("pp", False, f"PP 2 run exit {code}: {_last_error(logs)}")]

    def losses(run):
        return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
    got, want = losses(pp2), losses(single)
    rel = float(np.max(np.abs(np.subtract(got, want)) / np.abs(want))) if len(got) == len(want) else float("inf")
    return [verdict("pp", len(got) == len(want) == 3 and rel <= 1e-5,
                    f"3 training steps of PP 2 (1F1B, 4 micro-batches) vs one process: losses {len(got)} / "
                    f"{len(want)}, max rel diff {rel:.1e} <= 1e-5")]


def run_checks(device: str, nproc: int, only: Optional[list[str]] = None, workdir: Optional[Path] = None,
               attention_core: Optional[Callable] = None, out=None):
    """Run the selected checks, printing one line each as it finishes; returns the results."""
    from ernie5.tools import gpu_check_single as single
    from ernie5.tools.gpu_check_single import Result

    out = out or sys.stdout
    chosen = only or list(SINGLE + MULTI)
    runs = {"attention": lambda: single.check_attention(device, core=attention_core),
            "model": lambda: single.check_model(device), "fp8": lambda: single.check_fp8(device)}
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            if name in MULTI:
                if nproc < 2:
                    got = [Result(name, "SKIP", f"needs >= 2 devices (--nproc {nproc})")]
                    results += got
                    print(got[0].line(), file=out, flush=True)
                    continue
                fn = {"tp": check_tp, "ep": check_ep, "pp": check_pp}[name]
                run = (lambda fn=fn: fn(device, nproc, work))
            else:
                run = runs[name]
            start = time.time()
            try:
                got = run()
            except Exception as e:  # a path that raises on this device is a failure of that path, not of the tool
                msg = str(e).strip().splitlines()
                got = [Result(name, "FAIL", f"raised {type(e).__name__}: {msg[-1][:300] if msg else ''}")]
            for r in got:
                print(r.line() + (f" [{time.time() - start:.0f}s]" if r is got[-1] else ""), file=out, flush=True)
            results += got
    return results


def main(argv=None, attention_core: Optional[Callable] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ernie5.tools.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu"], required=True)
    ap.add_argument("--nproc", type=int, default=None, help="devices for the multi-device checks (default: GPUs "
                                                            "visible, at most 2; 1 on CPU)")
    ap.add_argument("--only", nargs="+", choices=SINGLE + MULTI, help="run just these checks")
    ap.add_argument("--workdir", type=Path, help="keep launcher logs and run outputs here (default: a temp dir)")
    args = ap.parse_args(argv)
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # before CUDA initialises (fp32 references, fp32 tolerances)
    from ernie5.env import setup

    setup()
    import paddle

    if args.device == "gpu":
        count = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
        if count < 1:
            print("error: gpu_check: --device gpu but no CUDA device is visible to this Paddle "
                  f"({paddle.__version__}, compiled with CUDA: {paddle.is_compiled_with_cuda()})", file=sys.stderr)
            return 2
        device, nproc = "gpu:0", args.nproc if args.nproc is not None else min(count, 2)
        if nproc > count:
            print(f"error: gpu_check: --nproc {nproc} > {count} visible GPUs", file=sys.stderr)
            return 2
    else:
        device, nproc = "cpu", args.nproc if args.nproc is not None else 1
    print(f"gpu_check: device {device}, {nproc} process(es) for the multi-device checks, paddle "
          f"{paddle.__version__} (CUDA build: {paddle.is_compiled_with_cuda()})", flush=True)
    results = run_checks("cpu" if device == "cpu" else "gpu:0", nproc, args.only, args.workdir, attention_core)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
