#!/usr/bin/env bash
# The quick start's two commands; each sets itself up (a venv in .venv from requirements.txt).
#   bash run.sh demo   the shipped model says a new sentence; then prepare the bundled demo data,
#                      train the tiny preset and speak with it
#   bash run.sh test   run the test suite (arguments, if any, go to pytest instead of tests/)
#   bash run.sh speak  docs/model.md: the shipped model's recipe, from scratch (flite voices, the
#                      mel codec, the small preset; run it again to continue where it stopped)
#   bash run.sh learn  docs/learning.md: train on a generated espeak-ng corpus (about 1 h 45 min)
#   bash run.sh bilingual  docs/languages.md: English and German in the same voices, then
#                          an English voice speaks German
#   bash run.sh gpu-check [--dry-run] [FILE]  docs/tests.md: tests/test_cuda.py, figures in
#                          gpu_check.txt (or FILE); needs PyTorch with CUDA, installs nothing (a GPU
#                          machine may be bare and offline: numpy comes from wheels/ if it is
#                          missing there; what lacks numpy or a compiler is skipped, and said).
#                          --dry-run: the same checks on the CPU, small, on any machine
#   bash run.sh gpu-wheels [3.X ...]  numpy's wheels into wheels/, on a machine with network, for
#                          a bare one: Pythons 3.10-3.14 (or those given), x86_64 and aarch64
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VALLE_VENV:-.venv}"
PY="$VENV/bin/python"
if [ "${1:-}" = gpu-wheels ] || [ "${1:-}" = gpu-check ]; then
  [ -x "$PY" ] || PY=python3  # this project's venv where there is one, else the machine's Python
fi
if [ "${1:-}" = gpu-wheels ]; then  # on a machine with network: numpy's wheels, for a bare GPU machine
  shift
  spec=$(grep '^numpy==' requirements.txt)
  versions=("$@")
  [ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13 3.14)
  for py in "${versions[@]}"; do
    for machine in x86_64 aarch64; do
      get() {  # the wheel of $1 for Python $py on $machine (glibc 2.28 or older: CUDA's images)
        "$PY" -m pip download -q --only-binary=:all: --no-deps -d wheels --python-version "$py" \
          --platform "manylinux_2_28_$machine" --platform "manylinux_2_17_$machine" \
          --platform "manylinux2014_$machine" "$1" >/dev/null 2>&1
      }
      if get "$spec"; then echo "wheels/: $spec for Python $py on $machine"
      elif get numpy; then echo "wheels/: numpy for Python $py on $machine (the newest for it: $spec has none)"
      else echo "note: no numpy wheel for Python $py on $machine"; fi
    done
  done
  exit 0
fi
if [ "${1:-}" = gpu-check ]; then
  shift
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: $PY has no PyTorch: install PyTorch with CUDA, or point VALLE_VENV at a venv" >&2
    exit 2
  fi
  site="$PWD/.gpu-site"  # numpy from wheels/, beside the code, not in $PY's own packages
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" -c "import numpy" 2>/dev/null; then
    rm -rf "$site"  # another Python's numpy, if any
    cp=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    if "$PY" -m pip --version >/dev/null 2>&1; then  # pip picks the wheel that fits, if one does
      "$PY" -m pip install -q --no-index --find-links wheels --target "$site" numpy >/dev/null 2>&1 || true
    else  # no pip either: a wheel is a zip
      whl=$(ls wheels/numpy-*-"$cp"-"$cp"-*"$(uname -m)".whl 2>/dev/null | tail -n 1)
      [ -z "$whl" ] || "$PY" -m zipfile -e "$whl" "$site"
    fi
    if ! "$PY" -c "import numpy" 2>/dev/null; then
      echo "note: numpy is missing for $PY ($cp, $(uname -m)) and wheels/ holds no wheel that" \
        "fits: the checks that need it are skipped; bash run.sh gpu-wheels ${cp:2:1}.${cp:3} on a" \
        "machine with a network fetches it (copy wheels/ here)"
    fi
  fi
  args=() prev=
  for a in "$@"; do  # a bare FILE is --out FILE
    if [[ "$a" != -* && "$prev" != --out ]]; then args+=(--out "$a"); else args+=("$a"); fi
    prev=$a
  done
  exec "$PY" tests/test_cuda.py ${args[@]+"${args[@]}"}
fi
stamp="$VENV/.requirements-$(sha256sum requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing requirements into $VENV (once; torch is a large download)"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r requirements.txt
  rm -f "$VENV"/.requirements-* && touch "$stamp"  # the extras' stamp goes too: reinstall them
fi
extras() {  # the optional scorers (requirements-eval.txt), which the tests use
  local stamp="$VENV/.requirements-eval-$(sha256sum requirements-eval.txt | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== installing the optional scorers into $VENV (once)"
    "$PY" -m pip install -q -r requirements.txt -r requirements-eval.txt  # the pins hold
    sed -n 's/^#no-deps //p' requirements-eval.txt | xargs -r "$PY" -m pip install -q --no-deps
    rm -f "$VENV"/.requirements-eval-* && touch "$stamp"
  fi
}

case "${1:-}" in
  test)
    shift
    extras
    exec "$PY" -m pytest -q "$@"  # all of tests/ (pytest.ini), or the files/options given
    ;;
  demo)
    # 1. The shipped model says a sentence it never heard, in a bundled voice it knows
    mkdir -p runs
    hear=(); "$PY" -c "import faster_whisper" 2>/dev/null && hear=(--transcribe)  # optional scorers
    "$PY" sample.py --text "The little boat drifted slowly toward the island." --top-p 0 \
      --out runs/shipped.wav ${hear[@]+"${hear[@]}"}  # greedy: its clearer decoding (docs/model.md)
    # 2. The pipeline end to end in minutes: prepare the demo corpus, train the tiny preset, speak
    STEPS="${DEMO_STEPS:-300}"
    if [ ! -f data/prepared/demo/meta.json ]; then
      "$PY" data/prepare.py --layout folder --src data/demo --out data/prepared/demo
    fi
    rm -rf runs/demo
    "$PY" train.py --data data/prepared/demo --out runs/demo --preset tiny --max-steps "$STEPS" \
      --lr 1e-3 --warmup 50 --batch-frames 3000 --eval-every 100 --log-every 25
    "$PY" sample.py --checkpoint runs/demo/best.pt \
      --prompt data/demo/us_female/us_female_03.flac \
      --prompt-text "The train to the city leaves at half past nine." \
      --text "The little boat drifted slowly toward the island." --out runs/demo/out.wav
    ;;
  learn)  # docs/learning.md: an espeak-ng corpus, the spectral test codec, token-space figures
    STEPS="${LEARN_STEPS:-3000}"
    EVERY="${LEARN_EVERY:-500}"
    if [ ! -f data/prepared/learn/meta.json ]; then
      "$PY" data/make_corpus.py --out data/corpus --train 2000 --test 40 --voices 2
      "$PY" data/prepare.py --layout folder --src data/corpus/train --out data/prepared/learn \
        --codec spectral
    fi
    rm -rf runs/learn
    flags=(--data data/prepared/learn --out runs/learn --preset tiny --max-steps "$STEPS"
           --lr 1e-3 --warmup 100 --batch-frames 4000 --eval-every "$EVERY" --log-every 100)
    for ((at = EVERY; at <= STEPS; at += EVERY)); do
      if [ "$at" = "$EVERY" ]; then "$PY" train.py "${flags[@]}" --stop-at "$at"
      else "$PY" train.py "${flags[@]}" --stop-at "$at" --resume; fi
      echo "== step $at: held-out sentences, token space"
      "$PY" eval.py --checkpoint runs/learn/last.pt --layout folder --src data/corpus/test \
        --tokens-only --prompt-seconds 1 --per-speaker 10 | tee "runs/learn/eval_$at.txt"
    done
    ;;
  speak)  # docs/model.md: the shipped model, models/flite-small.pt, made from scratch on 2 CPU cores
    extras  # Whisper and resemblyzer, which measure it
    DATA="${SPEAK_DATA:-data}"  # where the corpora and the prepared data go (git-ignored in data/)
    RUN="${SPEAK_RUN:-runs/speak}"  # the run: speak_ar/, speak_nar/, evaluations, model.pt
    AR_STEPS="${SPEAK_AR_STEPS:-8000}"
    NAR_STEPS="${SPEAK_NAR_STEPS:-4000}"
    EVERY=1000  # a stop (and a kept checkpoint, step_<N>.pt) every EVERY steps
    voices=slt,rms,awb,kal16
    if [ ! -f "$DATA/prepared/speak/meta.json" ]; then  # 12 h of speech, then its codes (~40 min)
      "$PY" data/make_corpus.py --out "$DATA/speak" --text data/sentences.txt --train 16000 \
        --test 80 --voices "$voices"
      "$PY" data/make_corpus.py --out "$DATA/speak_open" --text data/open_vocab.txt --train 0 \
        --test 50 --voices "$voices"
      "$PY" data/prepare.py --layout folder --src "$DATA/speak/train" --out "$DATA/prepared/speak" \
        --codec mel
    fi
    train() {  # MODEL STEPS BATCH_FRAMES: one model, a core of its own, in stops it resumes from
      local out="$RUN/speak_$1" at
      mkdir -p "$out"
      local flags=(--data "$DATA/prepared/speak" --out "$out" --preset small --models "$1"
                   --max-steps "$2" --lr 1e-3 --warmup 500 --batch-frames "$3" --eval-every 500
                   --log-every 100 --threads 1)
      for ((at = EVERY; at < $2 + EVERY; at += EVERY)); do
        ((at > $2)) && at=$2
        [ -f "$out/step_$at.pt" ] && continue  # passed before an interruption
        resume=(); [ -f "$out/last.pt" ] && resume=(--resume)
        "$PY" train.py "${flags[@]}" --stop-at "$at" "${resume[@]}" >> "$out/train.log"
        cp "$out/last.pt" "$out/step_$at.tmp" && mv "$out/step_$at.tmp" "$out/step_$at.pt"
      done
    }
    echo "== training the AR ($AR_STEPS steps) and the NAR ($NAR_STEPS) side by side: $RUN/speak_*/train.log"
    train ar "$AR_STEPS" 4000 & ar=$!
    train nar "$NAR_STEPS" 3000 & nar=$!
    wait "$ar" && wait "$nar"
    nar_last="$RUN/speak_nar/step_$NAR_STEPS.pt"
    for ((at = 2 * EVERY; at < AR_STEPS + 2 * EVERY; at += 2 * EVERY)); do  # the AR's learning, with the last NAR
      ((at > AR_STEPS)) && at=$AR_STEPS
      [ -f "$RUN/eval_$at.txt" ] && continue
      "$PY" models/export.py "$RUN/speak_ar/step_$at.pt" "$RUN/at_$at.pt" --nar-from "$nar_last" --fp32
      "$PY" eval.py --checkpoint "$RUN/at_$at.pt" --layout folder --src "$DATA/speak/test" --per-speaker 5 \
        --prompt-seconds 1 --top-p 0 > "$RUN/eval_$at.tmp"
      mv "$RUN/eval_$at.tmp" "$RUN/eval_$at.txt" && rm "$RUN/at_$at.pt"
      echo "== step $at:" && grep "this model" "$RUN/eval_$at.txt"
    done
    "$PY" models/export.py "$RUN/speak_ar/step_$AR_STEPS.pt" "$RUN/model.pt" --nar-from "$nar_last"
    for sampling in "--top-p 0" "--top-p 0.8"; do  # greedy with RAS, and the default sampling
      name=${sampling// /} real=()
      [ "$name" = --top-p0 ] && real=(--real-c0)  # the NAR over the real codebook 0: the same either way
      "$PY" eval.py --checkpoint "$RUN/model.pt" --layout folder --src "$DATA/speak/test" \
        --prompt-seconds 1 "${real[@]}" $sampling | tee "$RUN/final_heldout$name.txt"
      "$PY" eval.py --checkpoint "$RUN/model.pt" --layout folder --src "$DATA/speak_open/test" \
        --prompt-seconds 1 $sampling | tee "$RUN/final_open$name.txt"
    done
    echo "== $RUN/model.pt: the model; docs/model.md compares it with models/flite-small.pt"
    ;;
  bilingual)  # docs/languages.md: VALL-E X's language ID on a generated corpus
    STEPS="${BILINGUAL_STEPS:-300}"
    if [ ! -f data/prepared/bilingual/meta.json ]; then
      "$PY" data/make_corpus.py --out data/bilingual --languages en,de --train 300 --test 10 --voices 2
      "$PY" data/prepare.py --layout manifest --src data/bilingual/train.list \
        --out data/prepared/bilingual
    fi
    rm -rf runs/bilingual
    "$PY" train.py --data data/prepared/bilingual --out runs/bilingual --preset tiny \
      --max-steps "$STEPS" --lr 1e-3 --warmup 50 --batch-frames 3000 --eval-every 100 --log-every 50
    prompt=data/bilingual/test/us_male/us_male_test_00000
    "$PY" sample.py --checkpoint runs/bilingual/best.pt --prompt "$prompt.flac" \
      --prompt-text "$(cat "$prompt.txt")" --language de \
      --text "Die Katze findet den Schlüssel im Garten." --out runs/bilingual/de.wav
    ;;
  *)
    echo "usage: bash run.sh demo | learn | speak | bilingual | test [pytest arguments] |" \
      "gpu-check [--dry-run] [FILE] | gpu-wheels [3.X ...]" >&2
    exit 2
    ;;
esac
