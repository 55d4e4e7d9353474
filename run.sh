#!/usr/bin/env bash
# vargrpo entry point: one subcommand, extra arguments passed on (relative paths are read from the
# folder you call it from; runs/NAME below lands there):
#   bash run.sh test [pytest args]   the test suite on the CPU (what CI runs); -m gpu: the GPU tier, one GPU (< 10 min)
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
# The training presets write to runs/NAME unless you give --out; with --resume DIR the run keeps its
# own settings and the preset adds none.
# Python: VARGRPO_PYTHON=/path/to/python, else the active virtualenv or conda env when it holds
# requirements.txt, else .venv here (built from requirements.txt on first use).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Which Python runs the commands:
# 1. $VARGRPO_PYTHON when set; refused in one line if it lacks a package of requirements.txt.
# 2. else the active virtualenv's ($VIRTUAL_ENV) or conda env's ($CONDA_PREFIX) python, when it
#    already holds every package of requirements.txt (checked by that python itself, offline:
#    nothing is installed or downloaded, so run.sh starts without a network).
# 3. else .venv beside this file, built from requirements.txt on first use and again whenever that
#    file changes. pip reads its own settings there (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf).
#    PyPI's default torch wheel is built for CUDA 13.0 and needs NVIDIA driver 580 or newer
#    (nvidia-smi shows yours); CUDA 12 wheels run on driver 525 or newer. For one of those:
#      PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 bash run.sh test
#    pip takes the newest torch of both indexes; where PyPI's is still newer, install torch from
#    that index into an environment of your own, then its requirements, and pass VARGRPO_PYTHON.

usage() {
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$here/run.sh"
}

# What the python $1 lacks of requirements.txt, on stdout ("" and success when it lacks nothing).
missing_requirements() {
  "$1" - "$here/requirements.txt" <<'PYTHON'
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        print("packaging or pip (to read requirements.txt)")
        sys.exit(1)

missing = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue

    req = Requirement(line)
    if req.marker and not req.marker.evaluate():
        continue

    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        missing.append(line)
        continue

    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{line} (it has {version})")

print(", ".join(missing))
sys.exit(1 if missing else 0)
PYTHON
}

# .venv beside this file, (re)built when requirements.txt changed since it was built.
venv_python() {
  local venv="$here/.venv"
  local want
  want=$(sha256sum "$here/requirements.txt" | cut -c1-16)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.requirements-hash" 2>/dev/null)" = "$want" ]; then
    return
  fi

  echo "[run.sh] installing requirements.txt into $venv ..." >&2
  if ! install_venv "$venv"; then
    echo "run.sh: could not install requirements.txt into $venv (pip says why above);" \
      "offline, pass VARGRPO_PYTHON=/path/to/a/python that holds the packages" >&2
    exit 1
  fi
  echo "$want" > "$venv/.requirements-hash"
}

install_venv() {
  python3 -m venv "$1" || return 1
  "$1/bin/python" -m pip install -q --upgrade pip || return 1
  "$1/bin/python" -m pip install -q -r "$here/requirements.txt" || return 1
}

# Sets PY: the Python the commands run with (see the top of this file).
choose_python() {
  local missing
  if [ -n "${VARGRPO_PYTHON:-}" ]; then
    if ! command -v "$VARGRPO_PYTHON" > /dev/null; then
      echo "run.sh: VARGRPO_PYTHON=$VARGRPO_PYTHON: no such program; name a python, or unset it to use .venv" >&2
      exit 2
    fi
    if ! missing=$(missing_requirements "$VARGRPO_PYTHON"); then
      echo "run.sh: VARGRPO_PYTHON=$VARGRPO_PYTHON lacks $missing (requirements.txt);" \
        "install it there, or unset VARGRPO_PYTHON to use .venv" >&2
      exit 2
    fi
    PY=$VARGRPO_PYTHON
    return
  fi

  local env
  for env in "${VIRTUAL_ENV:-}" "${CONDA_PREFIX:-}"; do
    if [ -z "$env" ] || [ ! -x "$env/bin/python" ]; then
      continue
    fi
    if missing=$(missing_requirements "$env/bin/python"); then
      PY=$env/bin/python
      return
    fi
    echo "[run.sh] the active environment $env lacks $missing; using $here/.venv" >&2
  done

  venv_python
  PY=$here/.venv/bin/python
}

# torchrun with one process per visible GPU (one process on a machine without GPUs), through
# vargrpo_run.py's launcher: it exits as the trainers did (2 a refusal, 130 / 143 after Ctrl-C /
# SIGTERM and a saved checkpoint) where torchrun exits 1, and gives them an hour to save, not 30 s.
launch() {
  local n
  n=$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')
  exec "$PY" "$here/vargrpo_run.py" torchrun --standalone --nproc_per_node="$n" "$here/vargrpo.py" train "$@"
}

# Whether the arguments after $1 hold the flag $1 (as FLAG VALUE or FLAG=VALUE).
gives() {
  local flag=$1
  shift
  local arg
  for arg in "$@"; do
    case "$arg" in
      "$flag" | "$flag"=*) return 0 ;;
    esac
  done
  return 1
}

# preset NAME FLAGS... -- USER_ARGS...: a paper preset, the user's flags after its own (the last
# of a flag wins), in runs/NAME unless the user gives --out; --resume: the user's flags alone.
preset() {
  local name=$1
  shift
  local flags=()
  while [ "$1" != -- ]; do
    flags+=("$1")
    shift
  done
  shift

  if gives --resume "$@"; then
    launch "$@"
  fi
  if ! gives --out "$@"; then
    echo "[run.sh] no --out given: the run goes to runs/$name" >&2
    set -- --out "runs/$name" "$@"
  fi
  launch "${flags[@]}" "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  help | -h | --help)
    usage
    exit 0
    ;;
  test | demo | prepare | eval | brightness | dark | aesthetic | painting | aesthetic+painting | ablate | bench | gpu-check) ;;
  *)
    echo "run.sh: unknown command '$cmd'; bash run.sh --help lists the commands" >&2
    exit 2
    ;;
esac

choose_python
case "$cmd" in
  # pytest in the project folder (pytest.ini: test_vargrpo.py and tests/; paths given are the
  # project's); -m "not slow": the fast tier; -m gpu: the GPU tier (conftest.py). One worker
  # per core (pytest-xdist), each test file on one worker: every test runs on one thread
  test)
    cd "$here"
    exec "$PY" -m pytest -q -n auto --dist loadfile "$@"
    ;;
  demo) exec "$PY" "$here/vargrpo_tools.py" demo "$@" ;;
  prepare) exec "$PY" "$here/vargrpo_tools.py" prepare "$@" ;;
  eval) exec "$PY" "$here/vargrpo_tools.py" eval "$@" ;;
  brightness) preset brightness --preset d16 --reward bright --steps 200 -- "$@" ;;
  dark) preset dark --preset d16 --reward dark --steps 200 -- "$@" ;;
  aesthetic) preset aesthetic --preset d16 --reward aesthetic --steps 40000 -- "$@" ;;
  painting) preset painting --preset d30 --reward "clip:a painting" --steps 10000 -- "$@" ;;
  aesthetic+painting) preset aesthetic+painting --preset d30 --reward "aesthetic+clip:a painting" --steps 10000 -- "$@" ;;
  ablate) exec "$PY" "$here/vargrpo_tools.py" ablate "$@" ;;
  bench) exec "$PY" "$here/vargrpo_tools.py" bench "$@" ;;
  gpu-check) exec "$PY" "$here/vargrpo_tools.py" gpu-check "$@" ;;
esac
