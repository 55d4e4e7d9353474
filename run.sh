#!/usr/bin/env bash
# vargrpo entry point. Creates .venv from requirements.txt on first use (and again whenever
# requirements.txt changes), then runs one subcommand (extra arguments are passed on):
#   bash run.sh test [pytest args]   the test suite (what CI runs)
#   bash run.sh demo [train flags]   CPU demo: GRPO makes the pre-trained digits VAR draw brighter images -> runs/demo
#   bash run.sh prepare [--out DIR]  rebuild the digits model the demo uses (weights/; 53 min on one CPU thread)
#   bash run.sh brightness | dark    the GRPO-VAR paper's toy experiment, VAR-d16, one process per GPU
#   bash run.sh aesthetic            LAION aesthetic reward, VAR-d16, 40k steps (paper 5.2)
#   bash run.sh painting             CLIP score to "a painting", VAR-d30, 10k steps (paper 5.3)
#   bash run.sh aesthetic+painting   both rewards summed, VAR-d30, 10k steps (paper 5.3)
#   bash run.sh ablate [args]        VAR-RL ablation on digits7: digit:correct (5 methods x 5 seeds + VMR m sweep) and a region reward (x 3 seeds) -> runs/ablate
#   bash run.sh eval --ckpt RUN      Table 1 of a run: its reward and class fidelity, pre-trained vs fine-tuned
#   bash run.sh bench [args]         speed/memory table of the model layer and one GRPO step
#   bash run.sh gpu-check [args]     one JSON: a random d16's step on this GPU (< 5 min), plain / checkpointing / --fsdp
set -euo pipefail
cd "$(dirname "$0")"

want=$(sha256sum requirements.txt | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements-hash 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] installing requirements.txt into .venv ..." >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > .venv/.requirements-hash
fi
PY=.venv/bin/python

# torchrun with one process per visible GPU (one process on a machine without GPUs), through
# vargrpo_run.py's launcher: it exits as the trainers did (2 a refusal, 130 / 143 after Ctrl-C /
# SIGTERM and a saved checkpoint) where torchrun exits 1, and gives them an hour to save, not 30 s.
launch() {
  local n
  n=$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')
  exec "$PY" vargrpo_run.py torchrun --standalone --nproc_per_node="$n" vargrpo.py train "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  test)  exec "$PY" -m pytest -q "$@" ;;  # pytest.ini: test_vargrpo.py and tests/; -m "not slow": the fast tier
  demo)  exec "$PY" vargrpo_tools.py demo "$@" ;;
  prepare) exec "$PY" vargrpo_tools.py prepare "$@" ;;
  eval) exec "$PY" vargrpo_tools.py eval "$@" ;;
  brightness) launch --preset d16 --reward bright --out runs/brightness --steps 200 "$@" ;;
  dark)       launch --preset d16 --reward dark --out runs/dark --steps 200 "$@" ;;
  aesthetic)  launch --preset d16 --reward aesthetic --out runs/aesthetic --steps 40000 "$@" ;;
  painting)   launch --preset d30 --reward "clip:a painting" --out runs/painting --steps 10000 "$@" ;;
  aesthetic+painting) launch --preset d30 --reward "aesthetic+clip:a painting" --out runs/aesthetic+painting --steps 10000 "$@" ;;
  ablate) exec "$PY" vargrpo_tools.py ablate "$@" ;;
  bench) exec "$PY" vargrpo_tools.py bench "$@" ;;
  gpu-check) exec "$PY" vargrpo_tools.py gpu-check "$@" ;;
  *) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; [ "$cmd" = help ] || exit 2 ;;
esac
