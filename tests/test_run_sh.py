"""run.sh, the entry point: which Python it runs (VARGRPO_PYTHON, an active virtualenv or conda
env that holds requirements.txt, else .venv, built only then), offline; the folder the commands
run in (the caller's; pytest the project's); what it adds to a preset's flags; its usage and
refusals; and the suite's pinning to the CPU (conftest.py). Each test works on a copy of the
project without .venv, so the real one is never touched."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, timeout

PROJECT_FILES = ["run.sh", "requirements.txt", "conftest.py", "pytest.ini", "vargrpo.py", "vargrpo_run.py",
                 "vargrpo_tools.py", "reward_models.py"]
ABSENT = "vargrpo-absent-package"
QUICK = timeout(60)  # run.sh's own checks: the requirements read by a python, ~1 s
STARTS = timeout(180)  # a real python importing torch: ~15 s on a loaded 2-core machine


def can_unshare_network() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


NO_NETWORK = can_unshare_network()


def copy_project(dest: Path) -> Path:
    """The project's files that run.sh reads, in dest (no .venv)."""
    dest.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


@pytest.fixture
def caller(tmp_path):
    """The folder run.sh is called from."""
    folder = tmp_path / "caller"
    folder.mkdir()
    return folder


def recording_python(folder: Path) -> Path:
    """folder/bin/python: a stand-in that runs the requirements check (`-`) with this test's python
    (whose packages satisfy requirements.txt), answers `-c` (run.sh's count of GPUs) with 1, and
    for anything else writes its folder and arguments, one a line, to folder/called instead of
    running it."""
    python = folder / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/bin/sh
case "$1" in
  -) exec {sys.executable} "$@" ;;
  -c) echo 1; exit 0 ;;
esac
printf '%s\\n' "$PWD" "$@" > {folder / "called"}
""")
    python.chmod(0o755)
    return python


def called(python: Path) -> list:
    """What the recording python was asked to run: [its folder, argument, ...]."""
    return (python.parent.parent / "called").read_text().splitlines()


def run_sh(project, caller, *args, timeout=QUICK, **env):
    """`bash PROJECT/run.sh ARGS` from the caller's folder, offline: no network namespace where
    unshare allows one, and pip pointed at a closed port either way (no retries: a pip call fails
    at once). No active environment unless env names one."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    for k in ("VIRTUAL_ENV", "CONDA_PREFIX", "VARGRPO_PYTHON"):
        base.pop(k, None)
    base.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2", **env)
    cmd = ["bash", str(project / "run.sh"), *args]
    if NO_NETWORK:
        cmd = ["unshare", "-n", *cmd]
    return subprocess.run(cmd, cwd=caller, env=base, capture_output=True, text=True, timeout=timeout)


def add_requirement(project, line):
    with open(project / "requirements.txt", "a") as f:
        f.write(f"{line}\n")


# ---- Which Python: the one given, an active environment, else .venv


def test_a_python_holding_the_requirements_starts_offline_without_venv(project, caller):
    """Item 1's acceptance: VARGRPO_PYTHON names a python whose packages satisfy requirements.txt
    (this test's own), the network is off: `run.sh eval --help` starts it (torch and all imported)
    and no .venv is built."""
    res = run_sh(project, caller, "eval", "--help", timeout=STARTS, VARGRPO_PYTHON=sys.executable)

    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage: vargrpo_tools.py eval")
    assert not (project / ".venv").exists()


@pytest.mark.parametrize("variable", ["VARGRPO_PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX"])
def test_the_python_given_or_active_runs_the_command_in_the_callers_folder(project, caller, tmp_path, variable):
    """The python named by VARGRPO_PYTHON, or the active virtualenv's / conda env's, runs the
    command: the project's script by its full path, in the caller's folder (so `--out myrun`
    lands there), the arguments passed on as given; no .venv."""
    python = recording_python(tmp_path / "env")
    value = str(python.parent.parent)
    if variable == "VARGRPO_PYTHON":
        value = str(python)

    res = run_sh(project, caller, "demo", "--out", "myrun", "--seed", "3", **{variable: value})

    assert res.returncode == 0, res.stderr
    assert called(python) == [str(caller), str(project / "vargrpo_tools.py"), "demo", "--out", "myrun", "--seed", "3"]
    assert not (project / ".venv").exists()


def test_tests_run_in_the_project_folder(project, caller, tmp_path):
    """`run.sh test` runs pytest in the project (pytest.ini's testpaths are read from there), one
    pytest-xdist worker per core, each test file on one worker."""
    python = recording_python(tmp_path / "env")
    res = run_sh(project, caller, "test", "-m", "not slow", VARGRPO_PYTHON=str(python))

    assert res.returncode == 0, res.stderr
    xdist = ["-n", "auto", "--dist", "loadfile"]
    assert called(python) == [str(project), "-m", "pytest", "-q", *xdist, "-m", "not slow"]


@pytest.mark.parametrize("missing, named", [
    (ABSENT, ABSENT),
    ("numpy>=999", "numpy>=999 (it has "),
])
def test_vargrpo_python_lacking_a_requirement_is_refused_in_one_line(project, caller, missing, named):
    """VARGRPO_PYTHON whose packages do not satisfy requirements.txt (one absent, one too old):
    exit 2 and one line naming what it lacks; nothing is run or built."""
    add_requirement(project, missing)
    res = run_sh(project, caller, "demo", VARGRPO_PYTHON=sys.executable)

    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"run.sh: VARGRPO_PYTHON={sys.executable} lacks {named}")
    assert res.stdout == ""
    assert not (project / ".venv").exists()


def test_vargrpo_python_that_is_no_program_is_refused_in_one_line(project, caller, tmp_path):
    res = run_sh(project, caller, "demo", VARGRPO_PYTHON=str(tmp_path / "no_python"))

    assert res.returncode == 2
    assert res.stderr == f"run.sh: VARGRPO_PYTHON={tmp_path / 'no_python'}: no such program; name a python, or unset it to use .venv\n"


@pytest.mark.slow
def test_an_active_env_lacking_a_requirement_falls_back_to_building_venv(project, caller, tmp_path):
    """An active virtualenv that lacks a package is passed over with one line naming it; .venv is
    then built, which offline fails with run.sh's one line after pip's own messages (exit 1)."""
    add_requirement(project, ABSENT)
    python = recording_python(tmp_path / "env")
    res = run_sh(project, caller, "demo", timeout=STARTS, VIRTUAL_ENV=str(python.parent.parent))

    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert f"[run.sh] the active environment {python.parent.parent} lacks {ABSENT}; using {project / '.venv'}" in lines
    assert lines[-1].startswith(f"run.sh: could not install requirements.txt into {project / '.venv'}")
    assert not (python.parent.parent / "called").exists()
    assert not (project / ".venv" / ".requirements-hash").exists()


# ---- A preset's flags, usage, unknown commands


@pytest.mark.parametrize("given, passed", [
    ([], ["--preset", "d16", "--reward", "bright", "--steps", "200", "--out", "runs/brightness"]),
    (["--out", "mine", "--steps", "5"], ["--preset", "d16", "--reward", "bright", "--steps", "200", "--out", "mine", "--steps", "5"]),
    (["--out=mine"], ["--preset", "d16", "--reward", "bright", "--steps", "200", "--out=mine"]),
    (["--resume", "r", "--steps", "400"], ["--resume", "r", "--steps", "400"]),
])
def test_a_preset_adds_out_only_when_none_is_given_and_nothing_on_resume(project, caller, tmp_path, given, passed):
    """`run.sh brightness`: torchrun on vargrpo.py (full paths) with the preset's flags and then the
    user's; --out runs/brightness only when the user gives no --out (and says so on stderr);
    with --resume the user's flags alone (the run keeps its own settings), so a refusal never
    names a flag run.sh added."""
    python = recording_python(tmp_path / "env")
    res = run_sh(project, caller, "brightness", *given, VARGRPO_PYTHON=str(python))

    assert res.returncode == 0, res.stderr
    folder, script, torchrun, standalone, nproc, trainer, train, *rest = called(python)
    assert (folder, script, torchrun, standalone) == (str(caller), str(project / "vargrpo_run.py"), "torchrun", "--standalone")
    assert nproc == "--nproc_per_node=1"
    assert (trainer, train) == (str(project / "vargrpo.py"), "train")
    assert rest == passed
    said = "[run.sh] no --out given: the run goes to runs/brightness"
    assert (said in res.stderr) == (given == [])


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], []])
def test_help_prints_the_usage_and_exits_0(project, caller, args):
    res = run_sh(project, caller, *args)

    assert res.returncode == 0
    assert res.stdout.startswith("vargrpo entry point")
    assert "bash run.sh test [pytest args]" in res.stdout
    assert res.stderr == ""


def test_an_unknown_command_is_named_on_stderr(project, caller):
    res = run_sh(project, caller, "brightnes", "--out", "x")

    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr == "run.sh: unknown command 'brightnes'; bash run.sh --help lists the commands\n"


# ---- The suite on the CPU; the GPU tier (conftest.py)


def test_the_suite_hides_the_gpus():
    """Outside `-m gpu` the suite runs on the CPU, on any machine (CUDA_VISIBLE_DEVICES set empty
    before torch loaded; the trainers the tests start inherit it)."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert torch.cuda.device_count() == 0
    assert not torch.cuda.is_available()


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has a GPU: -m gpu would run the tier")
def test_the_gpu_tier_without_a_gpu_skips_in_one_line_and_exits_0():
    """`run.sh test -m gpu` (pytest -m gpu) on a machine without a GPU: every gpu test skipped,
    one line saying why, exit 0 (not 5: the tests were collected and skipped)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STARTS)

    assert res.returncode == 0, res.stdout[-2000:]
    lines = [line for line in res.stdout.splitlines() if "gpu tests skipped" in line]
    assert len(lines) == 1
    assert lines[0].endswith(" gpu tests skipped: no usable CUDA GPU (" + lines[0].split("(", 1)[1])
    assert " passed" not in res.stdout
