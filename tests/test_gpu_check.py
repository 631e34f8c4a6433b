"""scripts/gpu_check.sh / `python -m ernie5.tools.gpu_check`: the CPU half. With `--device cpu` the device side of
every check runs on CPU, so each check's CPU reference, the comparison and its tolerance run here; the GPU lines
(bf16 kernels, FlashMask, native FP8) must say SKIP with a reason, never PASS."""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import paddle.nn.functional as F

from ernie5.tools import gpu_check, gpu_check_single
from tests.conftest import REPO


def _lines(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.partition(" ")
            out[name] = (status, detail)
    return out


def test_single_device_checks_pass_or_skip_with_reasons_on_cpu(capsys):
    assert gpu_check.main(["--device", "cpu", "--only", "attention", "model", "fp8"]) == 0
    got = _lines(capsys.readouterr().out)
    masks = ("packed-doc", "scale-wise")
    assert {n for n, (s, _) in got.items() if s == "PASS"} == {
        *(f"attention[{m}]" for m in masks), "model-fp32", "bf16-amp", "fp8-recipe"}
    skips = {n: d for n, (s, d) in got.items() if s == "SKIP"}
    assert set(skips) == {*(f"attention-bf16[{m}]" for m in masks), *(f"flashmask[{m}]" for m in masks), "fp8-native"}
    assert all(skips[f"flashmask[{m}]"].startswith("not available") for m in masks)
    assert "FP8 GEMMs need" in skips["fp8-native"]
    assert "differs from fp32" in got["bf16-amp"][1] and ": True" in got["bf16-amp"][1]


def test_paddle_sdpa_as_the_device_kernel_is_within_the_bound():
    """Paddle's scaled_dot_product_attention (the call Attention.core makes on GPUs) run on CPU as the device
    side: a real, nonzero difference from gqa_attention, inside the fp32 bound."""
    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape([q.shape[0], q.shape[1], -1])

    results = [r for r in gpu_check_single.check_attention("cpu", core=sdpa) if r.status != "SKIP"]
    assert [r.status for r in results] == ["PASS", "PASS"], results
    assert all("max err 0.00e+00" not in r.detail for r in results)


def test_a_perturbed_device_result_fails_and_exits_1():
    out = io.StringIO()

    def off_by_a_little(q, k, v, mask):  # 1e-3 on outputs of size ~1: far inside any visible error, beyond fp32's
        return gpu_check_single.default_core(q, k, v, mask) + 1e-3

    results = gpu_check.run_checks("cpu", 1, ["attention"], attention_core=off_by_a_little, out=out)
    got = _lines(out.getvalue())
    assert got["attention[packed-doc]"][0] == got["attention[scale-wise]"][0] == "FAIL"
    assert "max err 1.00e-03" in got["attention[packed-doc]"][1]
    assert any(r.status == "FAIL" for r in results)
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert gpu_check.main(["--device", "cpu", "--only", "attention"], attention_core=off_by_a_little) == 1
    assert "gpu_check: 2 passed" not in buf.getvalue() and "2 failed" in buf.getvalue()


def test_a_path_that_raises_is_a_fail_line_and_the_others_still_run():
    def broken(q, k, v, mask):
        raise RuntimeError("no kernel for this place")

    out = io.StringIO()
    results = gpu_check.run_checks("cpu", 1, ["attention", "fp8"], attention_core=broken, out=out)
    status = {r.name: r.status for r in results}
    assert status["attention[packed-doc]"] == status["attention[scale-wise]"] == "FAIL"
    assert status["fp8-recipe"] == "PASS" and status["flashmask[scale-wise]"] == "SKIP"
    assert "raised RuntimeError: no kernel for this place" in out.getvalue()


def test_multi_device_checks_over_gloo_on_2_cpu_ranks(tmp_path):
    """TP 2, EP 2 (native all-to-all branch) and PP 2 against one process, through paddle.distributed.launch."""
    p = subprocess.run([sys.executable, "-m", "ernie5.tools.gpu_check", "--device", "cpu", "--nproc", "2", "--only",
                        "tp", "ep", "pp", "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=400)
    got = _lines(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert {n: s for n, (s, _) in got.items()} == {"tp": "PASS", "ep-alltoall": "PASS", "pp": "PASS"}, p.stdout
    assert "calls per rank [12, 12]" in got["ep-alltoall"][1]
    assert "losses 3 / 3" in got["pp"][1]
    assert "gpu_check: 3 passed, 0 failed, 0 skipped" in p.stdout


def test_script_without_a_gpu_says_so_and_exits_2():
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("gpu_check: no GPU visible") and "--cpu" in p.stderr
    assert "PASS" not in p.stdout


def test_device_gpu_without_cuda_is_a_usage_error(capsys):
    assert gpu_check.main(["--device", "gpu"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_attention_masks_are_the_two_rules():
    """The packed-document mask is document-causal; the scale-wise one lets a scale see itself whole."""
    (doc, grp), (sdoc, sgrp) = gpu_check_single.attention_masks().values()
    a = gpu_check_single.allowed(doc, grp, doc, grp)
    assert (a == (np.tril(np.ones((19, 19), bool)) & (doc[:, :, None] == doc[:, None, :]))).all()
    s = gpu_check_single.allowed(sdoc, sgrp, sdoc, sgrp)[0]
    assert s[3, 6] and s[6, 3] and not s[2, 3]  # frame 1 scale 1 (positions 3-6) sees itself; scale 0 not scale 1
