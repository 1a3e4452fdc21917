#!/usr/bin/env bash
# The quick start's two commands; each sets itself up (a venv in .venv from requirements.txt).
#   bash run.sh demo   prepare the bundled demo data, train the tiny preset, speak a sentence
#   bash run.sh test   run the test suite (arguments, if any, go to pytest instead of tests/)
#   bash run.sh learn  docs/learning.md: train on a generated espeak-ng corpus (about 1 h 45 min)
#   bash run.sh speak  docs/learning.md "Heard": flite voices, the mel codec, Whisper's WER every
#                      2,000 steps (about 2 h 20 min on 2 idle cores; run it again to continue a run)
#   bash run.sh bilingual  docs/languages.md: English and German in the same voices, then
#                          an English voice speaks German
#   bash run.sh gpu-check  docs/tests.md: tests/test_cuda.py, figures in gpu_check.txt; needs
#                          PyTorch with CUDA and numpy, installs nothing else (a GPU machine may be
#                          bare and offline: numpy comes from wheels/ if it is missing there)
#   bash run.sh gpu-wheels numpy's wheel into wheels/, on a machine with network, for a bare one
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VALLE_VENV:-.venv}"
PY="$VENV/bin/python"
if [ "${1:-}" = gpu-wheels ] || [ "${1:-}" = gpu-check ]; then
  [ -x "$PY" ] || PY=python3  # this project's venv where there is one, else the machine's Python
fi
if [ "${1:-}" = gpu-wheels ]; then  # on a machine with network: numpy's wheel, for a bare GPU machine
  exec "$PY" -m pip download -q --only-binary=:all: --no-deps -d wheels "$(grep '^numpy==' requirements.txt)"
fi
if [ "${1:-}" = gpu-check ]; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: $PY has no PyTorch: install PyTorch with CUDA, or point VALLE_VENV at a venv" >&2
    exit 2
  fi
  if ! "$PY" -c "import numpy" 2>/dev/null && ls wheels/numpy-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links wheels --target .gpu-site numpy  # not into $PY
    export PYTHONPATH=".gpu-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  exec "$PY" tests/test_cuda.py --out "${2:-gpu_check.txt}"
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
  speak)  # docs/learning.md "Heard": a model that speaks, judged by Whisper, offline
    extras  # the mel codec's vocoder, Whisper and resemblyzer
    STEPS="${SPEAK_STEPS:-12000}"
    EVERY="${SPEAK_EVERY:-2000}"
    if [ ! -f data/prepared/flite/meta.json ]; then
      "$PY" data/make_corpus.py --out data/flite --train 2000 --test 40 --voices slt,rms
      "$PY" data/prepare.py --layout folder --src data/flite/train --out data/prepared/flite --codec mel
    fi
    flags=(--data data/prepared/flite --out runs/flite --preset tiny --max-steps "$STEPS"
           --lr 1e-3 --warmup 200 --batch-frames 4000 --eval-every 500 --log-every 100)
    step() {  # the step of runs/flite/last.pt (0: none yet)
      "$PY" -c 'import sys, torch; print(torch.load(sys.argv[1], map_location="cpu", weights_only=True)["step"])' \
        runs/flite/last.pt 2>/dev/null || echo 0
    }
    for ((at = EVERY; at < STEPS + EVERY; at += EVERY)); do
      ((at > STEPS)) && at=$STEPS
      ((at < $(step))) && continue  # a run here already passed this stop: it continues
      resume=(); [ -f runs/flite/last.pt ] && resume=(--resume)
      "$PY" train.py "${flags[@]}" --stop-at "$at" "${resume[@]}"
      [ -f "runs/flite/eval_$at.txt" ] && continue  # measured before the run was interrupted
      echo "== step $at: Whisper and resemblyzer on 10 held-out sentences"
      "$PY" eval.py --checkpoint runs/flite/last.pt --layout folder --src data/flite/test \
        --per-speaker 5 --prompt-seconds 1 --real-c0 --out "runs/flite/eval_$at" > "runs/flite/eval_$at.tmp"
      mv "runs/flite/eval_$at.tmp" "runs/flite/eval_$at.txt" && cat "runs/flite/eval_$at.txt"
    done
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
    echo "usage: bash run.sh demo | learn | speak | bilingual | test [pytest arguments]" >&2
    exit 2
    ;;
esac
