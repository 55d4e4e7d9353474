"""Tests of vargrpo_run.py, the run machinery, in its order: distributed runs (1 process, 2 gloo
processes and 2 "nodes" give the same run; run.sh's torchrun launch), settings (--config, argument
checks), the run folder's rules (atomic writes, which folders are runs), checkpoint files, and the
RunFolder: nothing lost, nothing silent (--overwrite, the lock, a full disk, resume, what a run
writes, TensorBoard, the safetensors export, a failing reward, a diverged policy, zero advantages),
signals, and a property test that random sequences of runs, interrupts, resumes and overwrites never
lose a saved step. Each fault-injection test names the fault it injects; a trainer's mistake ends
in one line and its exit code.
"""
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from safetensors.torch import load_file, save_file

import vargrpo as vg
import vargrpo_run as vr
from helpers import (HEAD, ROOT, TINY, another_preparation, copy_run, exit_and_stderr,
                     flip_a_weight_bit, labels_for, needs_head, policy_state, random_model,
                     read_metrics, read_only, save_edited, timeout, tmpfs)

# a CLI call that refuses its arguments takes ~10 s on a loaded 2-core machine (importing torch)
REFUSAL_TIMEOUT = timeout(300)
# anything that trains: the slowest (torchrun, 2 steps, 2 processes) took ~100 s
TRAIN_TIMEOUT = timeout(900)


def train_cli(*args, cwd=ROOT, env=None):
    """`python vargrpo.py train ...` in a fresh process: (exit code, stderr)."""
    res = subprocess.run([sys.executable, "vargrpo.py", "train", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=TRAIN_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return res.returncode, res.stderr


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("vargrpo:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def run_main(argv, capsys):
    """vg.main in this process: (exit code, stderr)."""
    return exit_and_stderr(vg.main, argv, capsys)


def wait_for_first_step(proc, run):
    """Until the trainer in `proc` has logged a step (it must not exit before)."""
    deadline = time.time() + TRAIN_TIMEOUT
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)


# ---- Distributed helpers: the same step whatever the number of processes

LAUNCH_LR = 1e-5
LAUNCH = [*TINY, "--labels-per-step", "4", "--minibatch", "8", "--lr", str(LAUNCH_LR), "--steps", "2", "--image-every", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    subprocess.run([sys.executable, "vargrpo.py", "train", *LAUNCH, "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=TRAIN_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def assert_same_run(one, other):
    a, b = policy_state(one), policy_state(other)
    init = vg.build_models(vg.TrainArgs(preset="tiny"), "cpu")[2].state_dict()
    assert any(not torch.equal(a["model"][k], init[k]) for k in init)  # the steps did change the weights
    # Equal up to float summation order. Adam's first steps move a weight by about lr whatever the size of
    # its gradient, so where a gradient is ~0 the weight moves by summation-order noise: elementwise two
    # runs can differ by up to 2 lr per step, 4 lr after LAUNCH's 2 steps (measured: 0.27 lr on one CPU,
    # 1.27 lr on another). Over all weights they differ by 2.3e-4 of the distance moved; with every rank
    # taking the first share of each minibatch (a bug) by 0.86.
    ks = [k for k in init if init[k].is_floating_point() and torch.isfinite(init[k]).all()]
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in ks) <= 4 * LAUNCH_LR
    moved = sum((a["model"][k] - init[k]).double().square().sum() for k in ks).sqrt()
    apart = sum((a["model"][k] - b["model"][k]).double().square().sum() for k in ks).sqrt()
    assert apart <= 2e-3 * moved, (apart / moved).item()
    for key in ("reward/mean", "adv/std", "policy/kl", "policy/entropy", "loss/loss", "loss/grad_norm"):  # the logs agree too
        assert [r[key] for r in read_metrics(one)] == pytest.approx([r[key] for r in read_metrics(other)], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(one_process, tmp_path):
    """Two updates per step (minibatch 8 of 4 x 4 samples): every minibatch holds the same global
    samples under 1 and 2 processes (before, each rank drew its minibatches from its own samples)."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "vargrpo.py", "train", *LAUNCH, "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                         text=True, timeout=TRAIN_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(one_process, tmp_path / "two")


@pytest.mark.slow
def test_two_nodes_equal_one_process(one_process, tmp_path):
    """The README's multi-node line, run as two "nodes" on this machine (one process each, gloo)."""
    port, out = free_port(), tmp_path / "nodes"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=vargrpo-test", "vargrpo.py", "train", *LAUNCH, "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in (0, 1)]
    try:
        results = [n.communicate(timeout=TRAIN_TIMEOUT) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert_same_run(one_process, out)


def torchrun_train(*args, nproc=2):
    """`torchrun --standalone --nproc-per-node=N vargrpo.py train ...` (gloo on the CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "vargrpo.py", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TRAIN_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """LAUNCH's 2 steps with --fsdp on 2 gloo processes (a checkpoint after each step)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    res = torchrun_train(*LAUNCH, "--save-every", "1", "--fsdp", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(one_process, fsdp_run):
    """--fsdp (FSDP2, each process holding half of every weight, gradient and AdamW moment) trains
    what one process trains, within the DDP test's bounds (measured: 1.27 lr elementwise, 8.4e-4 of
    the distance moved); its checkpoint is an unsharded run's: the official keys and the optimizer
    state numbered the same way, every tensor whole."""
    assert_same_run(one_process, fsdp_run)
    one, fsdp = policy_state(one_process), policy_state(fsdp_run)
    assert {k: v.shape for k, v in one["model"].items()} == {k: v.shape for k, v in fsdp["model"].items()}
    assert [{**g, "params": None} for g in one["optimizer"]["param_groups"]] == \
        [{**g, "params": None} for g in fsdp["optimizer"]["param_groups"]]
    assert [g["params"] for g in one["optimizer"]["param_groups"]] == [g["params"] for g in fsdp["optimizer"]["param_groups"]]
    for i, state in one["optimizer"]["state"].items():
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in fsdp["optimizer"]["state"][i].items()}


def same_state(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and all(
        torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k]) for i in a["optimizer"]["state"]
        for k in a["optimizer"]["state"][i])


@pytest.mark.slow
def test_fsdp_resumes_bit_exactly_and_under_ddp(fsdp_run, one_process, tmp_path):
    """An --fsdp run stopped after 1 step and resumed to 2 with --fsdp ends bit-identical (weights
    and AdamW state) to the straight 2-step run; the same 1-step checkpoint resumed without --fsdp
    (DDP) ends equal to it within the DDP test's bounds. The other way: a 1-process run's checkpoint
    continues under --fsdp as it continues in 1 process."""
    stopped = tmp_path / "stopped"
    res = torchrun_train(*LAUNCH, "--steps", "1", "--fsdp", "--out", str(stopped))
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = copy_run(stopped, tmp_path / "ddp")
    res = torchrun_train("--resume", str(stopped), "--steps", "2", "--fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_state(policy_state(stopped), policy_state(fsdp_run))
    def logged(run):  # all but the timings
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))} for m in read_metrics(run)]
    assert logged(stopped) == logged(fsdp_run)
    res = torchrun_train("--resume", str(ddp), "--steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(fsdp_run, ddp)

    plain, sharded = copy_run(one_process, tmp_path / "plain"), copy_run(one_process, tmp_path / "sharded")
    code, err = train_cli("--resume", str(plain), "--steps", "3")
    assert code == 0, err[-3000:]
    res = torchrun_train("--resume", str(sharded), "--steps", "3", "--fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(plain, sharded)


FSDP_BYTES = """
import json, sys, torch
import vargrpo as vg, vargrpo_run as vr
d = vr.setup_distributed("cpu")
a = vg.TrainArgs(preset="tiny", fsdp=d.world > 1)
vae, policy, ref = vg.build_models(a, "cpu")
model = vr.distribute(policy, ref, d, a.fsdp)
opt = vg.make_optimizer(policy, a, "cpu")
labels, idx = torch.arange(4) % 10, torch.randint(0, 64, (4, 30), generator=torch.Generator().manual_seed(0))
vg.token_logprobs(model, labels, idx).sum().backward()
opt.step()  # AdamW now holds its two moments
def held(t):
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this process's shard
    return t.numel() * t.element_size()
print(json.dumps(dict(rank=d.rank, params=sum(held(p) for p in policy.parameters()),
                      grads=sum(held(p.grad) for p in policy.parameters()),
                      optimizer=sum(held(v) for st in opt.state.values() for v in st.values() if v.ndim),
                      ref=sum(held(p) for p in ref.parameters()))))
"""


@pytest.mark.slow
def test_fsdp_halves_the_bytes_each_process_holds(tmp_path):
    """Parameters, gradients and AdamW moments held by each of 2 --fsdp processes, counted from
    their local shards after an optimizer step, against one unsharded process: half, up to the
    padding of tensors whose first dimension is odd (measured on the tiny preset: 0.503 on rank 0, 0.497 on
    rank 1)."""
    script = tmp_path / "fsdp_bytes.py"
    script.write_text(FSDP_BYTES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT, env=env)
    one = subprocess.run([sys.executable, str(script)], **run)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)], **run)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    whole = json.loads(one.stdout.strip().splitlines()[-1])
    shards = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in shards) == [0, 1]
    for r in shards:
        for k in ("params", "grads", "optimizer", "ref"):
            print(k, r["rank"], r[k], whole[k], r[k] / whole[k])
            assert 0.45 * whole[k] <= r[k] <= 0.51 * whole[k], (k, r, whole)
    assert sum(r["params"] + r["optimizer"] for r in shards) >= whole["params"] + whole["optimizer"]  # nothing lost


@needs_head
@pytest.mark.slow
def test_run_sh_aesthetic_smoke_on_cpu(tmp_path):
    """`bash run.sh aesthetic` with a tiny preset and a tiny random CLIP: torchrun (1 process, gloo)."""
    run = tmp_path / "aes"
    res = subprocess.run(["bash", "run.sh", "aesthetic", "--preset", "tiny", "--clip-model", "tiny-random",
                          "--aesthetic-head", str(HEAD), "--steps", "2", "--labels-per-step", "2", "--group-size", "4",
                          "--minibatch", "8", "--out", str(run)],
                         cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(run)
    assert len(m) == 2 and 3 < m[-1]["reward/aesthetic"] < 8 and m[-1]["reward/mean"] == m[-1]["reward/aesthetic"]


# ---- The device: an official preset never falls back to the CPU silently

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def no_weights_env(tmp_path) -> dict:
    """Empty weight caches, huggingface_hub offline: a run that gets as far as loading the
    official weights stops there, with its own line."""
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "VARGRPO_CACHE": str(tmp_path / "old")}


@no_gpu
def test_official_preset_without_a_gpu_stops_before_loading_weights(tmp_path):
    """d16 without --device on a machine torch finds no GPU on: exit 2, one line saying why (torch's
    own reason) and --device cpu, before the weights (whose absence would be the next line) and
    before the run folder. With --device cpu it goes on, to the missing weights."""
    args = ["--preset", "d16", "--reward", "brightness", "--steps", "1"]
    code, err = train_cli(*args, "--out", str(tmp_path / "gpu"), env=no_weights_env(tmp_path))
    line = one_error_line(err)
    assert code == 2 and line.startswith("vargrpo: error: --preset d16 needs a CUDA GPU and torch cannot use one ("), err
    assert f"({vr.why_no_cuda()})" in line and line.endswith("or pass --device cpu to run it on the CPU anyway (fp32, very slow)")
    assert not (tmp_path / "gpu").exists()
    code, err = train_cli(*args, "--device", "cpu", "--out", str(tmp_path / "cpu"), env=no_weights_env(tmp_path))
    assert code == 2 and "var_d16.pth is not in " in one_error_line(err) and "CUDA" not in err, err


@no_gpu
@pytest.mark.slow
def test_official_preset_without_a_gpu_stops_under_torchrun(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "vargrpo.py", "train", "--preset", "d30", "--reward", "brightness", "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **no_weights_env(tmp_path)})
    lines = [l for l in res.stderr.splitlines() if l.startswith("vargrpo: error:")]
    assert res.returncode != 0 and lines, res.stderr[-3000:]
    assert all(l.startswith("vargrpo: error: --preset d30 needs a CUDA GPU") and "--device cpu" in l for l in lines)
    assert "var_d30.pth" not in res.stderr and not (tmp_path / "r").exists()


@no_gpu
def test_default_device_by_preset_and_why_no_cuda(monkeypatch):
    """The CPU for digits and tiny, as before; d16-d30 refused unless --device says so. The reason
    is torch's: the error of torch.cuda.init(), else the warning is_available() gave."""
    assert [vr.default_device(None, p) for p in ("digits", "tiny")] == ["cpu", "cpu"]
    assert vr.default_device("cpu", "d30") == "cpu"
    for preset in vr.OFFICIAL_PRESETS:
        with pytest.raises(vr.UsageError, match=f"--preset {preset} needs a CUDA GPU .*--device cpu"):
            vr.default_device(None, preset)

    def warns():
        import warnings
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).")
        return False
    monkeypatch.setattr(torch.cuda, "is_available", warns)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    assert vr.why_no_cuda() == "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)."

    def fails():
        raise RuntimeError("Found no NVIDIA driver on your system.\nsecond line")
    monkeypatch.setattr(torch.cuda, "init", fails)
    assert vr.why_no_cuda() == "Found no NVIDIA driver on your system."


@no_gpu
def test_eval_of_an_official_run_without_a_gpu_stops_before_loading_weights(tmp_path):
    """eval reads the run's preset from its checkpoint and stops before the official weights."""
    import vargrpo_tools as tools
    ckpt = tmp_path / "last.pt"
    torch.save({"model": {}, "args": {"preset": "d16", "reward": "aesthetic"}, "step": 1}, ckpt)
    with pytest.raises(vr.UsageError, match="--preset d16 needs a CUDA GPU .*--device cpu"):
        tools.load_finetuned(str(ckpt), None)
    with pytest.raises(vr.CheckpointError, match="var_d16.pth is not in "):
        with pytest.MonkeyPatch.context() as mp:
            import huggingface_hub.constants
            mp.setenv("VARGRPO_CACHE", str(tmp_path / "old"))
            mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            tools.load_finetuned(str(ckpt), "cpu")


def torchrun(*args, launcher=False, env=None, **popen):
    """2 gloo processes of `vargrpo.py train` under torchrun, or under vargrpo_run.py's launcher
    (torchrun in its process, exiting with the trainers' code)."""
    head = ["vargrpo_run.py", "torchrun"] if launcher else ["-m", "torch.distributed.run"]
    return [sys.executable, *head, "--standalone", "--nproc-per-node=2", *args], dict(
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **popen)


@pytest.mark.slow
def test_torchrun_refusal_reaches_every_process(tiny_run, tmp_path):
    """Fault: `torchrun ... --out <a finished run>`: process 0 refuses, and process 1 (which would
    wait in a collective for ever) stops too; the launcher exits 2, as the trainers do."""
    run = copy_run(tiny_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    for launcher in (False, True):
        cmd, kw = torchrun("vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "3", launcher=launcher)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TRAIN_TIMEOUT, **kw)
        assert "already holds a run" in one_error_line(res.stderr), res.stderr[-3000:]
        assert res.returncode == (2 if launcher else 1), res.stderr[-3000:]  # torchrun itself: 1
        if launcher:
            assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


FAIL_ON_RANK_1 = """import os, sys, torch, reward_models as rm, vargrpo as vg
class FailOnRank1(torch.nn.Module):
    def forward(self, images):
        if os.environ["RANK"] == "1":
            raise RuntimeError("reward server down on this node")
        return rm.luma(images)
rm.REGISTRY["flakyrank"] = lambda arg, ctx: FailOnRank1()
vg.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_reward_failing_on_one_process(tmp_path):
    """Fault: the reward raises on process 1 only: every process saves and stops, and the one line
    names the process, the error and the checkpoint (it said "saved None")."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    cmd, kw = torchrun(str(script), "train", *TINY, "--labels-per-step", "4", "--minibatch", "8", "--reward",
                       "flakyrank", "--out", str(tmp_path / "run"), "--steps", "3", launcher=True,
                       env={"PYTHONPATH": str(ROOT)})
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TRAIN_TIMEOUT, **kw)
    line = one_error_line(res.stderr)
    assert res.returncode == 1 and "the reward raised twice at step 0 on process 1" in line, res.stderr[-3000:]
    assert "reward server down on this node" in line and "checkpoints/last.pt" in line and "None" not in line
    assert policy_state(tmp_path / "run")["step"] == 0


def test_process_group_options_timeout_and_device():
    """--dist-timeout is the process group's timeout; on a GPU the process's device is bound too
    (device_id); a timeout that is not a positive number of minutes is refused in one line."""
    import datetime
    assert vr.process_group_options("cpu", 0.5) == dict(timeout=datetime.timedelta(seconds=30))
    cuda = vr.process_group_options("cuda:1", 60)
    assert cuda == dict(timeout=datetime.timedelta(hours=1), device_id=torch.device("cuda:1"))
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(vr.UsageError, match="--dist-timeout must be a positive number of minutes"):
            vr.process_group_options("cpu", bad)
    assert vg.TrainArgs().dist_timeout == vr.DIST_TIMEOUT_MINUTES == 60


def test_a_resumed_run_keeps_its_dist_timeout(tmp_path):
    """The process group starts before the checkpoint is read: resuming without --dist-timeout
    takes the run's own from its args.json, with it the value given; a fresh run the flag's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"dist_timeout": 240.0}))
    resume = vg.TrainArgs(resume=str(run))
    assert vr.run_dist_timeout(resume, set()) == 240
    assert vr.run_dist_timeout(dataclasses.replace(resume, dist_timeout=5.0), {"dist_timeout"}) == 5
    assert vr.run_dist_timeout(vg.TrainArgs(out=str(run)), set()) == 60
    (run / "args.json").write_text("{}")  # an older run
    assert vr.run_dist_timeout(resume, set()) == 60


# Process 0's checkpoint writes take SLOW_SAVE_S seconds longer: slow storage
SLOW_SAVE = """import os, sys, time
import vargrpo as vg, vargrpo_run as vr
real_save = vr.RunFolder.save
def slow_save(self, policy, opt, step):
    if os.environ["RANK"] == "0":
        time.sleep(float(os.environ["SLOW_SAVE_S"]))
    return real_save(self, policy, opt, step)
vr.RunFolder.save = slow_save
vg.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_dist_timeout_reaches_the_process_group_and_outlasts_a_slow_save(tmp_path):
    """Fault: process 0's checkpoint takes 15 s longer (slow storage) while process 1 waits for it
    in a collective (gloo, 2 processes, 1 step). With --dist-timeout 0.1 (6 s) process 1 gives up:
    exit 1 and one line naming --dist-timeout, process 0's checkpoint still written whole; with
    --dist-timeout 1 the same run finishes."""
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    env = {"PYTHONPATH": str(ROOT), "SLOW_SAVE_S": "15", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}
    results = {}
    for minutes in ("0.1", "1"):
        out = tmp_path / f"run_{minutes}"
        cmd, kw = torchrun(str(script), "train", *TINY, "--labels-per-step", "4", "--minibatch", "8",
                           "--steps", "1", "--image-every", "0", "--out", str(out), "--dist-timeout",
                           minutes, launcher=True, env=env)
        results[minutes] = subprocess.run(cmd, capture_output=True, text=True, timeout=TRAIN_TIMEOUT, **kw)

    short = results["0.1"]
    line = [l for l in short.stderr.splitlines() if l.startswith("vargrpo: error: process 1 waited")]
    assert short.returncode == 1 and len(line) == 1, short.stderr[-3000:]
    assert "--dist-timeout 0.1 minutes" in line[0] and "raise --dist-timeout" in line[0]
    assert "Traceback" not in short.stderr, short.stderr[-3000:]  # process 0: one line too
    assert policy_state(tmp_path / "run_0.1")["step"] == 1  # process 0 got as far as its save
    assert results["1"].returncode == 0, results["1"].stderr[-3000:]
    assert policy_state(tmp_path / "run_1")["step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["launcher, Ctrl-C", "run.sh, SIGTERM"])
def test_signals_under_torchrun_exit_130_and_143(tmp_path, how):
    """Ctrl-C in a terminal (SIGINT to the process group: torchrun and both trainers, twice each as
    torchrun passes it on) and a scheduler's SIGTERM to `bash run.sh brightness`: the trainers save,
    and the command exits 130 / 143 (torchrun alone exits 1 with a SignalException)."""
    run = tmp_path / "run"
    flags = [*TINY, "--out", str(run), "--steps", "1000", "--image-every", "0"]
    if how.startswith("launcher"):
        cmd, kw = torchrun("vargrpo.py", "train", *flags, "--labels-per-step", "4", "--minibatch", "8", launcher=True)
        sig = signal.SIGINT
    else:
        cmd, kw = ["bash", "run.sh", "brightness", *flags], dict(cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        sig = signal.SIGTERM
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        wait_for_first_step(proc, run)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal does
        else:
            proc.send_signal(sig)  # bash (exec'd into the launcher) alone
        err = proc.communicate(timeout=TRAIN_TIMEOUT)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err[-3000:]
    step = policy_state(run)["step"]
    assert 1 <= step < 1000 and f"stopped after step {step}" in one_error_line(err) and "Traceback" not in err


# ---- Settings: --config, and numbers and settings that cannot be meant


def test_config_replays_a_run_and_refuses_unknown_keys(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    vg.main(["train", *TINY, "--out", str(a), "--steps", "2", "--seed", "3", "--beta", "0.07"])
    vg.main(["train", "--config", str(a / "args.json"), "--out", str(b)])
    assert {**json.loads((a / "args.json").read_text()), "out": str(b)} == json.loads((b / "args.json").read_text())
    assert [r["reward/mean"] for r in read_metrics(a)] == [r["reward/mean"] for r in read_metrics(b)]
    vg.main(["train", "--config", str(a / "args.json"), "--out", str(tmp_path / "c"), "--steps", "1", "--lr", "5e-4"])
    assert json.loads((tmp_path / "c" / "args.json").read_text())["lr"] == 5e-4  # flags given win
    (tmp_path / "bad.json").write_text(json.dumps({"lr": 1e-4, "learning_rate": 3}))
    code, err = run_main(["train", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "unknown settings learning_rate" in one_error_line(err)


def test_a_config_never_supplies_out_or_resume(tiny_run, tmp_path, capsys):
    """Loss: `train --config runA/args.json --seed 1 --overwrite` without --out replaced runA (its
    --out came from the config)."""
    run = copy_run(tiny_run, tmp_path / "runA")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_main(["train", "--config", str(run / "args.json"), "--seed", "1", "--overwrite"], capsys)
    assert code == 2 and "--out DIR is required" in one_error_line(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("value, shown", [('"3"', '"3"'), ("null", "null"), ("2.5", "2.5")])
def test_config_with_a_wrong_type_names_the_key(tmp_path, capsys, value, shown):
    (tmp_path / "c.json").write_text('{"lr": 1e-4, "steps": %s}' % value)
    code, err = run_main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "r")], capsys)
    line = one_error_line(err)
    assert code == 2 and f"'steps' is {shown}, not a whole number" in line and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@given(key=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_config_files_with_unknown_keys_are_refused(tmp_path_factory, key):
    assume(key not in {f.name for f in dataclasses.fields(vg.TrainArgs)})
    path = tmp_path_factory.mktemp("c") / "args.json"
    path.write_text(json.dumps({"lr": 1e-4, key: 1}))
    with pytest.raises(vg.UsageError, match=f"unknown settings {key}"):
        vr.read_config(str(path), vg.TrainArgs)


@pytest.mark.parametrize("flags, message", [
    (["--labels-per-step", "3", "--minibatch", "8"], "must divide labels\\*group = 12"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--preset", "d17"], "--preset 'd17'"),
    (["--clip-eps", "1.5"], "0 < --clip-eps < 1"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
    (["--reward", "brightnes"], "cannot parse reward term 'brightnes'"),
    (["--vmr-k", "3"], "--vmr-k only act with --vmr"),
    (["--mp-keep", "0.3"], "--mp-keep only act with"),
    (["--micro-batch", "-2"], "--micro-batch must be >= 0, got -2"),
    (["--micro-batch", "3"], "--micro-batch 3 must divide the per-process minibatch 4"),
    (["--device", "gpu"], "--device 'gpu': use cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    (["--beta", "nan"], "--beta: not a finite number"),
    (["--adv-eps", "nan"], "--adv-eps: not a finite number"),
    (["--lr", "inf"], "--lr: not a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm: not a finite number"),
    (["--lr", "1e6"], "--lr 1e\\+06: AdamW at a learning rate >= 1 diverges"),
    (["--reward", "1e999*brightness"], "bad weight '1e999'"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--keep-last", "0"], "--keep-last must be > 0"),
    (["--sample-batch", "-4"], "--sample-batch must be >= 0"),
    (["--vmr", "--vmr-k", "1"], "--vmr-k >= 2"),
    (["--fsdp"], "--fsdp shards the model across torchrun's processes: launch with torchrun"),
    (["--weights-dir", "/nonexistent/weights"], "--weights-dir /nonexistent/weights: no such folder"),
    (["--weights-dir", "."], "--weights-dir . does nothing here: the tiny preset"),  # it was ignored
])
def test_absurd_settings_are_refused(tmp_path, capsys, flags, message):
    """A bad flag, NaN / inf or a setting that cannot be meant: one clear line, exit 2, nothing written."""
    code, err = run_main(["train", *TINY, "--out", str(tmp_path / "r"), "--steps", "1", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, one_error_line(err)), err
    assert not (tmp_path / "r").exists()  # nothing written


@given(name=st.sampled_from(["lr", "beta", "adv_eps", "max_grad_norm", "temperature", "weight_decay", "panw_alpha",
                             "clip_eps", "vmr_eta", "mp_keep"]),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_every_non_finite_float_setting_is_refused(name, value):
    with pytest.raises(vg.UsageError, match=f"--{name.replace('_', '-')}: not a finite number"):
        vr.check_train_args(vg.TrainArgs(**{name: value}), 1, vg.PRESETS)


# ---- The run folder's rules: atomic_write, run_state


@given(content=st.binary(max_size=64), fail=st.booleans())
def test_atomic_write_is_all_or_nothing(tmp_path_factory, content, fail):
    path = tmp_path_factory.mktemp("w") / "file.bin"
    path.write_bytes(b"old")

    def write(f):
        f.write(content)
        if fail:
            raise OSError(28, "No space left on device")
    if fail:
        with pytest.raises(vg.RunFailed, match="No space left on device"):
            vr.atomic_write(path, write)
    else:
        vr.atomic_write(path, write)
    assert path.read_bytes() == (b"old" if fail else content) and not list(path.parent.glob("*.tmp"))


files_st = st.lists(st.sampled_from(["args.json", "metrics.jsonl", "images/photo.jpg", "notes.txt", ".vargrpo.lock",
                                     "checkpoints/last.pt", "checkpoints/x.bin"]), unique=True, max_size=4)


@given(files=files_st, args_is_a_run=st.booleans())
@settings(max_examples=30)
def test_run_state_classifies_folders(tmp_path_factory, files, args_is_a_run):
    d = tmp_path_factory.mktemp("f")
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text(json.dumps({"reward": "x", "preset": "tiny", "steps": 1}) if f == "args.json" and args_is_a_run else "x")
    real = [f for f in files if f != ".vargrpo.lock"]
    expect = "new" if not real else "run" if (("args.json" in files and args_is_a_run) or "checkpoints/last.pt" in files) else "other"
    if real == ["args.json"] and args_is_a_run:
        expect = "new"  # a start that stopped before writing anything but its settings
    assert vr.run_state(d) == expect


# ---- Pre-trained weights' files: read_state_dict, load_checked


def test_load_checked_reads_a_trainer_wrapper_and_names_key_mismatches(tmp_path):
    """read_state_dict unwraps the official trainer's checkpoint; load_checked names missing and
    unexpected keys."""
    vae, var = random_model((1, 2), depth=1, seed=5)
    torch.save({"trainer": {"var_wo_ddp": var.state_dict(), "vae_local": vae.state_dict()}, "args": {}}, tmp_path / "ar.pth")
    sd = vg.read_state_dict(tmp_path / "ar.pth")
    fresh = vg.VAR(var.config, vae)
    vg.load_checked(fresh, sd, "ar.pth")
    labels, idx = labels_for(var, 2, 0), torch.randint(0, 32, (2, 5))
    assert torch.equal(fresh(labels, idx), var(labels, idx))
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(vg.CheckpointError, match="missing \\(1\\): head.bias; unexpected \\(1\\): extra.weight"):
        vg.load_checked(fresh, sd, "ar.pth")


# ---- How many rows a sample() call takes: sample_row_bytes, rows_that_fit, groups_per_sample_call

MiB, GiB = 2**20, 2**30


@given(free=st.integers(0, 2**40), more=st.integers(0, 2**38), G=st.integers(1, 64),
       preset=st.sampled_from(["tiny", "digits", "d16", "d30"]), dtype_bytes=st.sampled_from([2, 4]))
def test_rows_that_fit_are_whole_groups_at_least_one_and_grow_with_free_memory(free, more, G, preset, dtype_bytes):
    config = vg.VARConfig.preset(preset)
    rows = vr.rows_that_fit(free, config, dtype_bytes, G)
    assert rows >= G and rows % G == 0
    assert vr.rows_that_fit(free + more, config, dtype_bytes, G) >= rows
    if rows > G:  # more than the one group it always gets: they fit
        fixed = 18 * config.depth * config.embed_dim ** 2 * (dtype_bytes < 4) * dtype_bytes
        assert rows * vr.sample_row_bytes(config, dtype_bytes) + fixed <= vr.SAMPLE_MEMORY_SHARE * free


def test_sample_row_bytes_of_d16_is_the_readmes():
    """The README's per-row column: d16 under bf16 autocast 42.5 MiB of KV cache + 13 MiB at the
    last scale; in fp32 twice the cache."""
    d16 = vg.VARConfig.preset("d16")
    assert vr.sample_row_bytes(d16, 2) == 2 * 16 * 680 * 1024 * 2 + 4 * 256 * (1024 + 3 * 4096)
    assert vr.sample_row_bytes(d16, 2) / MiB == pytest.approx(55.5)
    assert vr.sample_row_bytes(d16, 4) / MiB == pytest.approx(85.0 + 17.3125)
    assert vr.rows_that_fit(40 * GiB, d16, 2, 16) == 640  # 0.9 x 40 GiB - 0.56 GiB of bf16 weights: 653 rows


def test_groups_per_sample_call_on_the_cpu_and_given():
    tiny = vg.VARConfig.preset("tiny")
    assert vr.groups_per_sample_call(0, 4, 7, tiny, torch.device("cpu")) == 7  # 0 on the CPU: all of them
    assert vr.groups_per_sample_call(9, 4, 7, tiny, "cpu") == 2
    assert vr.groups_per_sample_call(3, 4, 7, tiny, "cpu") == 1


MEASURE = r"""
import re, sys, torch, vargrpo as vg
torch.set_num_threads(1)
config = vg.VARConfig.preset("tiny")
if sys.argv[1] == "wide":
    config = vg.VARConfig(depth=1, patch_nums=(1, 2, 3, 4), vocab_size=4096, z_channels=8, vae_ch=32, num_classes=10)
vae, var = vg.build_vae_var(config, seed=0)
for B in (10, int(sys.argv[2])):  # a warm-up call first: one-time allocations (thread pools, kernels)
    labels = torch.arange(B) % config.num_classes
    vg.sample(var, labels, temperature=0.7, generator=torch.Generator().manual_seed(0), decode=False)
# this process's own peak (VmHWM: reset by exec; ru_maxrss keeps the forking pytest's, which is larger)
print(int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_sample_row_bytes_against_the_measured_cpu_peak(which):
    """fp32 on this CPU: the peak memory (VmHWM) of sample() with 500 and 1,500 rows (each in
    its own process, after a warm-up call), the slope per row. glibc returns freed blocks at once with a fixed mmap threshold, so the peak
    RSS is the peak of live tensors. tiny: the attention term is the larger (measured 0.85 of the
    formula: it counts casts fp32 does not make); 'wide' (V = 4096, C = 64): the logits term
    (measured 1.00)."""
    config = vg.VARConfig.preset("tiny")
    if which == "wide":
        config = vg.VARConfig(depth=1, patch_nums=(1, 2, 3, 4), vocab_size=4096, z_channels=8, vae_ch=32,
                              num_classes=10)
    peaks = []
    for rows in (500, 1500):  # each in a fresh process
        res = subprocess.run([sys.executable, "-c", MEASURE, which, str(rows)], cwd=ROOT, capture_output=True,
                             text=True, timeout=REFUSAL_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                      "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert res.returncode == 0, res.stderr[-2000:]
        peaks.append(int(res.stdout))
    measured = (peaks[1] - peaks[0]) / 1000
    assert 0.75 <= measured / vr.sample_row_bytes(config, 4) <= 1.05, measured


# ---- How many samples an update pass takes: update_sample_bytes, micro_batch_that_fits, and what a
# run holds on one GPU (gpu_memory_plan: docs/memory.md's tables)

SAVED_SHAPES = {"V=64": dict(depth=2, patch_nums=(1, 2, 3, 4, 6, 8), vocab_size=64),
                "V=512": dict(depth=3, patch_nums=(1, 2, 4, 8), vocab_size=512)}


@pytest.mark.parametrize("shape", list(SAVED_SHAPES))
def test_update_sample_bytes_counts_what_autograd_keeps_in_fp32(shape):
    """fp32 on the CPU, where every tensor autograd saves is 4 bytes: the bytes a teacher-forced pass
    saves for its backward per sample (B = 3 minus B = 1, halved; the weights left out), against
    update_sample_bytes without the logits tensors that exist only in the backward or beside the pass
    (all but the one it saves). Measured 0.97 of it on both shapes; one block tensor (4 bytes per
    token and channel) more or less in the formula falls outside 0.95-1.0."""
    import vargrpo_tools as tools
    config = vg.VARConfig(z_channels=8, vae_ch=32, num_classes=10, **SAVED_SHAPES[shape])
    vae, var = vg.build_vae_var(config)
    weights = [*var.parameters(), *var.buffers(), *vae.parameters(), *vae.buffers()]
    saved = {}
    for B in (1, 3):
        labels = torch.zeros(B, dtype=torch.long)
        idx = torch.zeros(B, config.seq_len, dtype=torch.long)

        def logprobs():
            return vg.token_logprobs(var, labels, idx, 0.7)

        saved[B] = tools.saved_bytes(logprobs, weights)
    measured = (saved[3] - saved[1]) / 2
    unsaved_logits = (vr.LOGITS_TENSORS - 1) * 4 * config.seq_len * config.vocab_size
    counted = vr.update_sample_bytes(config, 4) - unsaved_logits
    assert 0.95 <= measured / counted <= 1.0, measured / counted


def test_update_sample_bytes_of_d16_and_d30():
    """Under CUDA autocast 66 bytes per token and channel of each block (96 in fp32), the head's 12 and
    6 fp32 logits tensors: d30 about 2.5 GiB per sample, d16 0.75; checkpointing keeps each block's
    input and one block's set."""
    d16, d30 = vg.VARConfig.preset("d16"), vg.VARConfig.preset("d30")
    L, V = 680, 4096
    for config in (d16, d30):
        C, D = config.embed_dim, config.depth
        logits = 6 * 4 * L * V
        assert vr.update_sample_bytes(config, 2) == D * L * C * 66 + 12 * L * C + logits
        assert vr.update_sample_bytes(config, 4) == D * L * C * 96 + 12 * L * C + logits
        assert vr.update_sample_bytes(config, 2, checkpointing=True) == (D * 4 + 66) * L * C + 12 * L * C + logits
        assert vr.update_sample_bytes(config, 2, kl_exact=True) == vr.update_sample_bytes(config, 2) + 12 * 4 * L * V
    assert 2.3 * GiB <= vr.update_sample_bytes(d30, 2) <= 2.6 * GiB
    assert vr.update_sample_bytes(d16, 2) / GiB == pytest.approx(0.755, abs=0.01)


@given(free=st.integers(0, 2**40), more=st.integers(0, 2**38), share=st.integers(1, 64),
       pending=st.integers(0, 2**36), preset=st.sampled_from(["tiny", "d16", "d30"]),
       dtype_bytes=st.sampled_from([2, 4]), checkpointing=st.booleans(), kl_exact=st.booleans())
def test_micro_batch_that_fits_is_the_largest_divisor_of_the_share_that_fits(
        free, more, share, pending, preset, dtype_bytes, checkpointing, kl_exact):
    config = vg.VARConfig.preset(preset)
    kw = dict(checkpointing=checkpointing, kl_exact=kl_exact)
    micro = vr.micro_batch_that_fits(free, share, config, dtype_bytes, pending, **kw)
    assert 1 <= micro <= share and share % micro == 0
    per_sample = vr.update_sample_bytes(config, dtype_bytes, **kw)
    fixed = pending + vr.weight_cast_bytes(config, dtype_bytes)
    budget = vr.SAMPLE_MEMORY_SHARE * free - fixed
    if micro > 1:  # more than the one sample it always gets: they fit
        assert micro * per_sample <= budget
    larger = [d for d in range(micro + 1, share + 1) if share % d == 0]
    assert not larger or larger[0] * per_sample > budget  # the next divisor would not fit
    assert vr.micro_batch_that_fits(free + more, share, config, dtype_bytes, pending, **kw) >= micro


@pytest.mark.parametrize("k", [3, 7, 10])
def test_micro_batch_that_fits_takes_exactly_what_fits(k):
    """Free memory for k samples and a half, after the gradients and the weight casts, with a
    share that k and k - 1 divide (5040 = 7!): exactly k samples per pass; a quarter sample
    less, k - 1."""
    config = vg.VARConfig.preset("d16")
    per_sample = vr.update_sample_bytes(config, 2)
    fixed = 3 * 2**30 + vr.weight_cast_bytes(config, 2)

    def free_for(samples):
        return math.ceil((fixed + samples * per_sample) / vr.SAMPLE_MEMORY_SHARE)

    micro = vr.micro_batch_that_fits(free_for(k + 0.5), 5040, config, 2, 3 * 2**30)
    fewer = vr.micro_batch_that_fits(free_for(k - 0.25), 5040, config, 2, 3 * 2**30)
    assert (micro, fewer) == (k, k - 1)


def test_micro_batch_on_80_gb_d30_and_d16():
    """On an 80 GB card with a CLIP reward, bf16: d30 fits 10 samples per pass (about 2.5 GiB
    each next to 43 GiB of static memory and its casts and gradients), so --micro-batch 0 takes 8 of
    the paper's 32; d16 fits 76 and takes all 32; 40 GB does not hold d30 at all."""
    import vargrpo_tools as tools
    d30 = tools.memory_plan("d30", "80 GB")
    assert d30.samples_fit == 10 and d30.micro_batch == 8
    assert d30.pass_fixed["weight casts"] / GiB == pytest.approx(3.71, abs=0.01)
    assert d30.resident["CLIP"] / GiB == pytest.approx(1.59, abs=0.01)
    d16 = tools.memory_plan("d16", "80 GB")
    assert d16.samples_fit == 76 and d16.micro_batch == 32
    assert d16.pass_fixed["weight casts"] / GiB == pytest.approx(0.5625)
    assert tools.memory_plan("d30", "40 GB").samples_fit == 0


def test_micro_batch_size_on_the_cpu_and_given():
    """--micro-batch N is N; 0 on the CPU is the process's whole share."""
    vae, policy, ref = vg.build_models(vg.TrainArgs(preset="tiny"), "cpu")
    assert vr.micro_batch_size(policy, vg.TrainArgs(micro_batch=0), 8, "cpu") == 8
    assert vr.micro_batch_size(policy, vg.TrainArgs(micro_batch=2), 8, torch.device("cpu")) == 2


def test_micro_batch_size_on_a_gpu_reads_its_free_memory(monkeypatch):
    """0 on a GPU (its memory queries stood in for): the free memory plus what the allocator
    holds unused, at 2 bytes a weight under bf16 autocast and 4 under --dtype fp32."""
    with torch.device("meta"):
        vae, policy = vg.build_vae_var(vg.VARConfig.preset("d16"))
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 9 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 3 * gib)
    pending = vr.pending_update_bytes(policy, policy.config)

    wants = []
    for dtype, dtype_bytes, kl in (("bf16", 2, "k3"), ("fp32", 4, "k3"), ("bf16", 2, "exact")):
        a = vg.TrainArgs(micro_batch=0, dtype=dtype, kl=kl)
        got = vr.micro_batch_size(policy, a, 5040, "cuda")
        wants.append(vr.micro_batch_that_fits(26 * gib, 5040, policy.config, dtype_bytes,
                                              pending, kl_exact=kl == "exact"))
        assert got == wants[-1], (dtype, kl)
    assert len(set(wants)) == 3, wants  # the test tells them apart
    sizes = [vr.micro_batch_that_fits(free * gib, 5040, policy.config, 2, pending)
             for free in (14, 20, 26, 32)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_pending_update_bytes_are_the_gradients_not_yet_allocated():
    """Before a backward pass (gradients set to None) the update still has to allocate 4 bytes per
    trainable parameter; after it, nothing."""
    vae, policy, ref = vg.build_models(vg.TrainArgs(preset="tiny"), "cpu")
    params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert vr.pending_update_bytes(policy, policy.config) == 4 * params
    labels, idx = torch.arange(2), torch.zeros(2, policy.config.seq_len, dtype=torch.long)
    vg.token_logprobs(policy, labels, idx).sum().backward()
    assert vr.pending_update_bytes(policy, policy.config) == 0


@pytest.mark.parametrize("preset", ["tiny", "digits", "d16", "d20", "d24", "d30"])
def test_var_param_count_is_the_models(preset):
    import vargrpo_tools as tools
    config = vg.VARConfig.preset(preset)
    assert vr.var_param_count(config) == tools.param_counts(preset)[0]


def test_clip_l14_params_is_open_clips_count():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    with torch.device("meta"):
        clip = CLIP(**open_clip.get_model_config("ViT-L-14-quickgelu"))
    assert sum(p.numel() for p in clip.parameters()) == vr.CLIP_L14_PARAMS


def run_sh_preset(name: str) -> vg.TrainArgs:
    """The settings `bash run.sh NAME` trains with: its preset line's flags, parsed as the trainer
    parses them."""
    text = (ROOT / "run.sh").read_text()
    line = next(l for l in text.splitlines() if l.strip().startswith(f"{name}) preset {name} "))
    flags = shlex.split(line.split(f"preset {name} ", 1)[1].split(" -- ")[0])
    args, given = vr.parse_train_args(["train", *flags, "--out", "x"], vg.TrainArgs)
    return args


@pytest.mark.parametrize("name", ["painting", "aesthetic+painting"])
def test_run_sh_d30_presets_fit_one_80_gb_gpu(name):
    """`bash run.sh painting` and `aesthetic+painting` (d30, a CLIP reward, the defaults of run.sh's
    line) on one 80 GB GPU, worked out: the update (weights, AdamW, reference, VQVAE, CLIP, gradients,
    bf16 weight casts, --micro-batch 0's samples with their logits temporaries, 2 GiB for the CUDA
    context), a sample() call of whole groups and the reference's pass all fit. The whole minibatch in
    one pass (what --micro-batch 0 meant before) would not."""
    import reward_models

    a = run_sh_preset(name)
    assert a.preset == "d30" and a.micro_batch == 0
    names = {n for _, n, _ in reward_models.parse_spec(a.reward)}
    clip = vr.CLIP_L14_PARAMS if names & {"clip", "aesthetic"} else 0
    assert clip
    import vargrpo_tools as tools
    config = vg.VARConfig.preset(a.preset)
    vae_params = tools.param_counts(a.preset)[1]
    card = 80 * 10**9
    m = vr.gpu_memory_plan(config, vae_params, card, a.minibatch, group_size=a.group_size,
                           rows=a.labels_per_step * a.group_size, clip_params=clip,
                           checkpointing=a.grad_checkpointing,
                           kl_exact=a.kl == "exact")
    assert m.samples_fit >= 1 and m.update_peak <= card
    assert m.sample_rows >= a.group_size and m.sample_peak <= card
    assert m.reference_peak <= card
    whole = sum(m.resident.values()) + sum(m.pass_fixed.values()) + a.minibatch * m.per_sample
    assert vr.CUDA_CONTEXT_BYTES + whole > card


def test_docs_memory_tables_are_what_bench_memory_plan_prints():
    """docs/memory.md's computed tables are `python vargrpo_tools.py bench --memory-plan`'s output."""
    import vargrpo_tools as tools
    doc = (ROOT / "docs" / "memory.md").read_text()
    for line in tools.memory_plan_tables():
        assert line in doc, line


# ---- RunFolder: a new run never touches files that are not a run's


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path, capsys):
    """Fault: --out names a folder with a user's files, some with run-file names (images/, args.json)."""
    d = tmp_path / "d"
    (d / "images").mkdir(parents=True)
    (d / "images" / "photo.jpg").write_text("x")
    (d / "args.json").write_text("my own notes")
    for extra in ([], ["--overwrite"]):  # --overwrite does not make it a run either
        code, err = run_main(["train", *TINY, "--out", str(d), "--steps", "1", *extra], capsys)
        assert code == 2 and "holds files that are not a vargrpo run" in err and len(err.strip().splitlines()) == 1, err
    assert (d / "images" / "photo.jpg").read_text() == "x" and (d / "args.json").read_text() == "my own notes"
    assert sorted(p.name for p in d.iterdir()) == ["args.json", "images"]  # not even a lock file


def test_overwrite_removes_exactly_the_runs_files(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")  # 2 steps, a checkpoint every step
    (run / "notes.txt").write_text("keep me")
    (run / "images" / "mine.png").write_text("keep me too")
    code, err = run_main(["train", *TINY, "--out", str(run), "--steps", "1"], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert len(read_metrics(run)) == 2
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1", "--overwrite", "--seed", "5"])
    assert (run / "notes.txt").read_text() == "keep me" and (run / "images" / "mine.png").read_text() == "keep me too"
    assert len(read_metrics(run)) == 1 and policy_state(run)["step"] == 1 and policy_state(run)["args"]["seed"] == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.pt", "last.safetensors", "step_000001.pt", "step_000001.safetensors"]  # step 2 of the old run is gone
    assert sorted(p.name for p in (run / "images").iterdir()) == ["mine.png", "step_000000.png"]


USERS_FILES = ["checkpoints/step_000003_backup_good.pt", "images/step_000000_for_paper.png",
               "checkpoints/step_000003_keep.pt", "checkpoints/step_000001.pt.bak"]


def test_overwrite_and_keep_last_touch_only_exact_run_names(tiny_run, tmp_path):
    """Loss: --overwrite deleted a user's files whose names start like run files (the patterns matched
    step_*), --keep-last rotation too; and the old run's eval results stayed beside the new run."""
    run = copy_run(tiny_run, tmp_path / "run")
    for name in USERS_FILES:
        (run / name).write_text("the user's")
    for name in ("eval.md", "eval.json", "eval_fine-tuned_all.png", "summary.json", "after.png"):
        (run / name).write_text("the old run's")
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1", "--overwrite", "--image-every", "0"])
    assert all((run / name).read_text() == "the user's" for name in USERS_FILES)
    assert not any((run / name).exists() for name in ("eval.md", "eval.json", "eval_fine-tuned_all.png", "summary.json"))
    vg.main(["train", "--resume", str(run), "--steps", "3", "--save-every", "1", "--keep-last", "1"])
    assert all((run / name).read_text() == "the user's" for name in USERS_FILES)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("last")) == sorted(
        [Path(n).name for n in USERS_FILES if n.startswith("checkpoints")] + ["step_000003.pt", "step_000003.safetensors"])


def test_a_refused_start_leaves_no_trace(tiny_run, tmp_path, capsys):
    """Faults: a reward that cannot be built, a wrong-shaped weights file (both found after the folder
    is locked): no folder is left, an existing one is as it was (--overwrite included: the old run
    is removed only once the new one has loaded), and the corrected command then runs there."""
    new = tmp_path / "new"
    code, err = run_main(["train", *TINY, "--reward", "clip:", "--out", str(new), "--steps", "1"], capsys)
    assert code == 2 and "clip needs a prompt" in one_error_line(err) and not new.exists()
    wrong = tmp_path / "wrong_weights"
    wrong.mkdir()
    (wrong / "var_digits.safetensors").write_bytes((tiny_run / "checkpoints" / "last.safetensors").read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(["train", *TINY, "--preset", "digits", "--weights-dir", str(wrong), "--out", str(empty),
                          "--steps", "1"], capsys)
    assert code == 2 and "var_digits.safetensors" in one_error_line(err) and list(empty.iterdir()) == []
    run = copy_run(tiny_run, tmp_path / "run")

    def files():  # the lock file holds who locked it last, no data
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != vr.LOCK_NAME}
    before = files()
    code, err = run_main(["train", *TINY, "--reward", "clip:", "--out", str(run), "--steps", "1", "--overwrite"], capsys)
    assert code == 2 and files() == before
    for out in (new, empty):  # the corrected command
        vg.main(["train", *TINY, "--out", str(out), "--steps", "1", "--image-every", "0"])
        assert policy_state(out)["step"] == 1


def test_resume_that_would_do_nothing_is_refused(tiny_run, tmp_path, capsys):
    """Silent: `--resume RUN --steps 5` of a run at step 12 exited 0 without a word."""
    run = copy_run(tiny_run, tmp_path / "run")  # at step 2 of 2
    for extra in (["--steps", "1"], ["--steps", "2"], []):
        code, err = run_main(["train", "--resume", str(run), *extra], capsys)
        assert code == 2 and "is at step 2 already; pass --steps N with N > 2" in one_error_line(err)


def test_resume_refuses_a_foreign_checkpoint(tiny_run, tmp_path, capsys):
    """Silent: a last.pt copied in from another run trained with its own reward and seed while
    args.json said another."""
    run = copy_run(tiny_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["args"] = {**ckpt["args"], "seed": 7, "reward": "dark"}
    save_edited(ckpt, last)
    code, err = run_main(["train", "--resume", str(run), "--steps", "3"], capsys)
    line = one_error_line(err)
    assert code == 2 and "belongs to another run" in line and "--reward, --seed" in line, err


def test_resume_without_metrics_says_so(tiny_run, tmp_path, capsys):
    """Silent: metrics.jsonl deleted, then --resume: the log restarted mid-run without a word."""
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    vg.main(["train", "--resume", str(run), "--steps", "3", "--image-every", "0"])
    assert "metrics.jsonl is missing: the log starts again at step 2" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run)] == [2]


def test_tensorboard_folder_that_is_a_file_or_read_only(tiny_run, tmp_path, capsys, read_only):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "tb").write_text("not a folder")
    code, err = run_main(["train", "--resume", str(run), "--steps", "3", "--tracker", "tensorboard"], capsys)
    assert code == 2 and f"{run / 'tb'} is a file" in one_error_line(err)
    (run / "tb").unlink()
    read_only((run / "tb").mkdir() or run / "tb")
    code, err = run_main(["train", "--resume", str(run), "--steps", "3", "--tracker", "tensorboard"], capsys)
    assert code == 2 and f"cannot write in {run / 'tb'} (Read-only file system)" in one_error_line(err)
    assert policy_state(run)["step"] == 2


def test_run_sh_demo_refuses_an_existing_run(tiny_run, tmp_path):
    """Fault: `bash run.sh demo --out DIR` where DIR holds a real run (it used to pass --overwrite)."""
    run = copy_run(tiny_run, tmp_path / "important")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    res = subprocess.run(["bash", "run.sh", "demo", "--out", str(run)], cwd=ROOT, capture_output=True, text=True,
                         timeout=REFUSAL_TIMEOUT)
    assert res.returncode == 2 and "already holds a run" in res.stderr, res.stderr[-2000:]
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_out_that_is_a_file_or_not_writable(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("data")
    code, err = run_main(["train", *TINY, "--out", str(f), "--steps", "1"], capsys)
    assert code == 2 and "is a file, not a folder" in one_error_line(err) and f.read_text() == "data"
    code, err = run_main(["train", *TINY, "--out", "/sys/vargrpo_run", "--steps", "1"], capsys)  # EPERM, also as root
    assert code == 2 and "cannot write in /sys/vargrpo_run" in one_error_line(err)


@pytest.fixture
def small_fs(tmp_path):
    """A 96 KiB tmpfs (root and mount needed; skipped where they are not)."""
    yield from tmpfs(tmp_path / "mnt", "96k")


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full device")
def test_disk_full_names_the_cause_and_leaves_no_tmp(tiny_run, tmp_path, capsys):
    """Fault: the checkpoint write fails with ENOSPC (its .tmp path is made to point at /dev/full)."""
    run = copy_run(tiny_run, tmp_path / "run")  # at step 2
    (run / "checkpoints" / "step_000003.pt.tmp").symlink_to("/dev/full")
    code, err = run_main(["train", "--resume", str(run), "--steps", "3"], capsys)
    line = one_error_line(err)
    assert code == 1 and "No space left on device" in line and "step_000003.pt" in line, err
    assert not list(run.rglob("*.tmp")) and policy_state(run)["step"] == 2  # the good checkpoint is intact
    vg.main(["train", "--resume", str(run), "--steps", "3"])  # space again: it continues
    assert policy_state(run)["step"] == 3 and len(read_metrics(run)) == 3


@pytest.fixture
def fs_4mib(tmp_path):
    """A 4 MiB tmpfs: room for a tiny run's settings, log and grids, not for its 7.7 MB checkpoint."""
    yield from tmpfs(tmp_path / "mnt4", "4m")


def test_disk_full_with_space_left_before_any_checkpoint(fs_4mib, capsys):
    """Fault: the first checkpoint does not fit, with MiBs still free: torch.save's "unexpected pos"
    was shown, with advice about checkpoints that did not exist."""
    code, err = run_main(["train", *TINY, "--out", str(fs_4mib / "run"), "--steps", "2", "--save-every", "1"], capsys)
    line = one_error_line(err)
    assert code == 1 and "step_000001.pt: No space left on device" in line and "unexpected pos" not in line, err
    assert "no checkpoint was written yet" in line and "--resume" not in line and not list(fs_4mib.rglob("*.tmp"))


def test_a_really_full_disk(small_fs, capsys):
    code, err = run_main(["train", *TINY, "--out", str(small_fs / "run"), "--steps", "1"], capsys)
    assert code == 1 and "No space left on device" in one_error_line(err), err
    assert not list(small_fs.rglob("*.tmp"))


# ---- RunFolder: one trainer per folder (the lock)


@pytest.mark.slow
def test_second_trainer_on_a_locked_folder_is_refused(tmp_path):
    """Fault: a second trainer on the same --out while the first runs (as --overwrite and as --resume)."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "1000", "--save-every", "1"],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + TRAIN_TIMEOUT
        while not (run / "checkpoints" / "last.pt").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        for extra in (["--out", str(run), *TINY, "--overwrite", "--steps", "2"], ["--resume", str(run)]):
            code, err = train_cli(*extra)
            line = one_error_line(err)
            assert code == 2 and "is in use by another trainer" in line and f"pid {first.pid}" in line, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=TRAIN_TIMEOUT)
    assert first.returncode == 128 + signal.SIGTERM
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(len(rows))) == list(range(policy_state(run)["step"]))


@pytest.mark.slow
def test_two_trainers_started_together_one_wins(tmp_path):
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "3",
                               "--seed", str(seed)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for seed in (1, 2)]
    results = [(p.wait(timeout=TRAIN_TIMEOUT), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another trainer" in loser or "already holds a run" in loser
    winner_seed = policy_state(run)["args"]["seed"]
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2] and json.loads((run / "args.json").read_text())["seed"] == winner_seed


# ---- RunFolder: resume


def test_resume_is_bit_identical_and_runs_are_never_overwritten(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    vg.main(["train", *TINY, "--out", str(straight), "--steps", "4"])
    vg.main(["train", *TINY, "--out", str(split), "--steps", "2", "--save-every", "1", "--keep-last", "1"])
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == [
        "last.pt", "last.safetensors", "step_000002.pt", "step_000002.safetensors"]
    vg.main(["train", "--resume", str(split), "--steps", "4"])
    a, b = policy_state(straight), policy_state(split)
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [m["reward/mean"] for m in read_metrics(straight)] == [m["reward/mean"] for m in read_metrics(split)]
    for name in ["images/step_000003.png", "args.json", "checkpoints/last.safetensors"]:
        assert (split / name).is_file(), name
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        vg.main(["train", *TINY, "--out", str(straight), "--steps", "1"])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vg.main(["train", "--resume", str(split), "--lr", "0.5"])
    assert "--lr cannot change" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vg.main(["train", "--resume", str(split), "--out", str(tmp_path / "elsewhere")])
    assert "continues in that directory; drop --out" in capsys.readouterr().err
    (split / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        vg.main(["train", "--resume", str(split)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "not a readable PyTorch checkpoint" in err, err


def test_resume_drops_a_torn_line_and_later_steps(tmp_path):
    """Fault: a crash mid-write left half a line in metrics.jsonl, after lines of steps not checkpointed."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(straight), "--steps", "3"])
    vg.main(["train", *TINY, "--out", str(run), "--steps", "3", "--save-every", "2"])
    (run / "checkpoints" / "last.pt").unlink()
    os.link(run / "checkpoints" / "step_000002.pt", run / "checkpoints" / "last.pt")  # as if killed before step 3's save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/mea')
    vg.main(["train", "--resume", str(run)])
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    assert [r["reward/mean"] for r in read_metrics(run)] == [r["reward/mean"] for r in read_metrics(straight)]


def test_resume_of_the_wrong_checkpoint_says_so_in_one_line(tiny_run, tmp_path, capsys):
    """Faults: a checkpoint with a wrong-shaped tensor, a file without the run's settings."""
    run = copy_run(tiny_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    good = torch.load(last, weights_only=True)
    bad = {**good, "model": {**good["model"], "head.weight": torch.zeros(3, 3)}}
    save_edited(bad, last)
    code, err = run_main(["train", "--resume", str(run), "--steps", "3"], capsys)
    assert code == 2 and "does not match VAR: wrong shape (1): head.weight (3, 3) vs (64, 128)" in one_error_line(err)
    torch.save({k: v for k, v in good.items() if k != "args"}, last)
    code, err = run_main(["train", "--resume", str(run), "--steps", "3"], capsys)
    assert code == 2 and "not a vargrpo run checkpoint" in one_error_line(err)


def test_resume_refuses_weights_of_another_preparation(digits_run, tmp_path, capsys):
    """Silent: --resume RUN --weights-dir OTHER (another preparation of the preset) swapped
    the VQVAE and the KL reference; the KL jumped, no word. A run records the sha256 of
    every weights file it loaded (the VQVAE, the pre-trained VAR, its reward's judge); a
    resume that loads another is refused in one line naming both, and a copy of the same
    files resumes."""
    run = copy_run(digits_run, tmp_path / "run")
    shipped = json.loads((ROOT / "weights" / "digits.json").read_text())["sha256"]
    recorded = policy_state(run)["weights"]
    assert {k: v["sha256"] for k, v in recorded.items()} == {
        "VQVAE": shipped["vae_digits.safetensors"],
        "VAR": shipped["var_digits.safetensors"],
        "DigitJudge": shipped["judge_digits.safetensors"]}

    other = another_preparation(tmp_path / "other")
    resume = ["train", "--resume", str(run), "--steps", "3", "--weights-dir"]
    code, err = run_main([*resume, str(other)], capsys)
    line = one_error_line(err)
    was = ROOT / "weights" / "var_digits.safetensors"
    assert code == 2 and f"started from {was} (sha256" in line and "new run" in line
    assert f"not {other / 'var_digits.safetensors'} (sha256" in line

    judge_only = tmp_path / "judge_only"  # the reward's judge from another preparation
    judge_only.mkdir()
    state = load_file(str(ROOT / "weights" / "judge_digits.safetensors"))
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_file(changed, str(judge_only / "judge_digits.safetensors"))
    code, err = run_main([*resume, str(judge_only)], capsys)
    line = one_error_line(err)
    assert code == 2 and f"not {judge_only / 'judge_digits.safetensors'} (sha256" in line
    assert policy_state(run)["step"] == 2 and len(read_metrics(run)) == 2  # nothing trained

    same = tmp_path / "same"
    shutil.copytree(ROOT / "weights", same)
    code, err = run_main([*resume, str(same)], capsys)
    assert code == 0 and policy_state(run)["step"] == 3, err
    now = {**recorded["VAR"], "file": str(same / "var_digits.safetensors")}
    assert policy_state(run)["weights"]["VAR"] == now


def test_resume_refuses_a_damaged_checkpoint_and_names_the_previous_one(tiny_run, tmp_path,
                                                                         capsys):
    """Silent: one bit flipped inside a weight of last.pt resumed and trained on the changed
    weights. Every save records the sha256 of its contents; a resume refuses another content
    in one line naming the file and how to resume from the previous checkpoint (it never
    falls back on its own)."""
    run = copy_run(tiny_run, tmp_path / "run")
    ck = run / "checkpoints"
    (ck / "last.pt").unlink()
    os.link(ck / "step_000002.pt", ck / "last.pt")  # a hard link, as the run left it
    flip_a_weight_bit(ck / "last.pt")
    resume = ["train", "--resume", str(run), "--steps", "3"]
    code, err = run_main(resume, capsys)
    line = one_error_line(err)
    assert code == 2 and f"error: {ck / 'last.pt'} is damaged" in line
    assert f"ln -f {ck / 'step_000001.pt'} {ck / 'last.pt'}" in line
    assert len(read_metrics(run)) == 2

    (ck / "last.pt").unlink()  # the advice followed
    os.link(ck / "step_000001.pt", ck / "last.pt")
    code, err = run_main(resume, capsys)
    assert code == 0 and policy_state(run)["step"] == 3
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2]


# ---- RunFolder: what a run writes (its files, TensorBoard, the safetensors export)


def test_run_files_cover_everything_a_run_writes(tmp_path):
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "2", "--save-every", "1", "--tracker", "tensorboard"])
    written = {p for p in run.rglob("*") if p.is_file() and p.name != vr.LOCK_NAME}
    assert written and written == set(vr.run_files(run)), written ^ set(vr.run_files(run))


def test_tensorboard_mirrors_the_metrics_and_the_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "3", "--tracker", "tensorboard", "--vmr", "--image-every", "2"])
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    rows = read_metrics(run)
    reward = events.Scalars("reward/mean")
    assert [e.step for e in reward] == [0, 1, 2]
    assert [e.value for e in reward] == pytest.approx([r["reward/mean"] for r in rows], rel=1e-6)
    numeric = {k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "step"}
    assert numeric <= set(events.Tags()["scalars"])  # every metrics.jsonl value is mirrored
    assert "vmr/stage/text_summary" in events.Tags()["tensors"]
    images = events.Images("samples")
    assert [i.step for i in images] == [0, 2] and images[0].width > 0 and images[0].encoded_image_string[:4] == b"\x89PNG"


def test_safetensors_export_round_trips_and_loads_like_pretrained_weights(tiny_run, tmp_path):
    import shutil
    from safetensors.torch import load_file
    import vargrpo_tools as tools
    pt, st = policy_state(tiny_run), tiny_run / "checkpoints" / "last.safetensors"
    exported = load_file(str(st))
    assert exported.keys() == pt["model"].keys() and all(torch.equal(exported[k], pt["model"][k]) for k in exported)
    vae, policy, _ = vg.build_models(vg.TrainArgs(preset="tiny"), "cpu")
    vg.load_checked(policy, exported, st)  # strict: the official key layout
    weights = tmp_path / "weights"  # the --weights-dir path, as for official files
    weights.mkdir()
    shutil.copy(st, weights / "var_tiny.safetensors")
    torch.save(vae.state_dict(), weights / "vae_tiny.pth")
    vae2, var2 = vg.load_pretrained("tiny", weights)
    labels, idx = torch.tensor([1, 7]), torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(var2(labels, idx), policy(labels, idx))
    run = tools.load_run_checkpoint(str(st))  # eval --ckpt accepts it
    assert run.step == 2 and run.settings == json.loads((tiny_run / "args.json").read_text())


# ---- RunFolder: a failing reward, a diverged policy, a reward that cannot tell samples apart


class FlakyReward(torch.nn.Module):
    """luma, with NaN for every 3rd image, and raising on chosen calls."""
    calls = 0
    fail_on = ()

    def forward(self, images):
        FlakyReward.calls += 1
        if FlakyReward.calls in FlakyReward.fail_on:
            raise RuntimeError("reward server down")
        import reward_models as rm
        r = rm.luma(images)
        r[::3] = float("nan")
        return r


@pytest.fixture
def flaky(monkeypatch):
    import reward_models as rm
    monkeypatch.setitem(rm.REGISTRY, "flaky", lambda arg, device, **o: FlakyReward())
    FlakyReward.calls = 0
    return FlakyReward


def test_nonfinite_rewards_and_a_failing_reward(tmp_path, capsys, flaky):
    flaky.fail_on = (2,)  # the second call fails once: retried, the run goes on
    m = vg.main(["train", *TINY, "--reward", "flaky", "--out", str(tmp_path / "a"), "--steps", "2"])
    err = capsys.readouterr().err
    assert "retrying once" in err and "non-finite rewards; those samples get no gradient" in err
    assert m["reward/nonfinite"] > 0 and len(read_metrics(tmp_path / "a")) == 2 and math.isfinite(m["loss/loss"])
    flaky.calls, flaky.fail_on = 0, (2, 3)  # fails twice in step 1 (call 1 = step 0)
    with pytest.raises(SystemExit) as e:
        vg.main(["train", *TINY, "--reward", "flaky", "--out", str(tmp_path / "b"), "--steps", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "raised twice at step 1" in err and "--resume" in err
    assert policy_state(tmp_path / "b")["step"] == 1


def test_a_diverged_policy_stops_the_run_with_one_line(tiny_run, tmp_path, capsys,
                                                      monkeypatch):
    """Fault: the policy's weights went non-finite (as a diverged run's would; here once
    resumed, as a checkpoint holding inf is refused when it loads): sampling is never fed
    NaN probabilities (on a GPU that is an asynchronous device assert), the run stops,
    exit 1."""
    run = copy_run(tiny_run, tmp_path / "run")  # at step 2
    load_checkpoint = vr.Run.load_checkpoint

    def diverged(self, policy):
        load_checkpoint(self, policy)
        with torch.no_grad():
            policy.head.bias[3] = torch.inf
    monkeypatch.setattr(vr.Run, "load_checkpoint", diverged)
    code, err = run_main(["train", "--resume", str(run), "--steps", "4"], capsys)
    line = one_error_line(err)
    assert code == 1 and "step 2: the sampling distribution" in line and "went non-finite" in line and "--lr" in line
    assert (run / "checkpoints" / "step_000002.pt").is_file() and len(read_metrics(run)) == 3


def test_zero_advantage_everywhere_warns_once(tmp_path, capsys):
    """Fault: a reward that is the same for every sample (weighted by 0)."""
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--reward", "0*brightness", "--out", str(run), "--steps", "3", "--image-every", "0"])
    err = capsys.readouterr().err
    assert all(r["adv/abs_max"] == 0 and r["adv/zero_std_group_frac"] == 1 for r in read_metrics(run))
    assert err.count("every advantage is 0") == 1, err
    vg.main(["train", *TINY, "--out", str(tmp_path / "normal"), "--steps", "2", "--image-every", "0"])
    for r in read_metrics(tmp_path / "normal"):  # distinct rewards: unit-std groups, no flat group
        assert r["adv/zero_std_group_frac"] == 0 and r["adv/abs_max"] >= r["adv/std"] > 0.9 and abs(r["adv/mean"]) < 1e-6
        assert r["reward/min"] <= r["reward/mean"] <= r["reward/max"] and r["policy/clip_frac"] <= 1


# ---- StopRequest: Ctrl-C / SIGTERM finish the step, save, and exit as shells report signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupts_save_and_exit_with_the_shell_code(tmp_path, sig):
    """Ctrl-C, SIGTERM, and SIGHUP (the terminal closed): the step finishes, a checkpoint is
    saved, one line, exit 130 / 143 / 129."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "1000"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_first_step(proc, run)
    proc.send_signal(sig)
    err = proc.communicate(timeout=TRAIN_TIMEOUT)[1]
    assert proc.returncode == 128 + sig, err[-2000:]  # 130 / 143: a scheduler tells it from a finished run
    step = policy_state(run)["step"]
    assert 1 <= step < 1000 and f"stopped after step {step}" in err and len(read_metrics(run)) == step


# ---- Property: runs, interrupts, resumes and overwrites never lose a saved step

action_st = st.lists(st.sampled_from(["new", "resume", "interrupt", "overwrite", "resume_more"]), min_size=2, max_size=5)


class StopAt(torch.nn.Module):
    """brightness, sending this process SIGINT when the reward is called for the n-th time (an
    interrupt mid-run, through the real signal handler)."""
    calls, at = 0, 0

    def forward(self, images):
        StopAt.calls += 1
        if StopAt.calls == StopAt.at:
            os.kill(os.getpid(), signal.SIGINT)
        import reward_models
        return reward_models.luma(images)


@settings(max_examples=6)
@given(actions=action_st, stop_after=st.integers(1, 2))
def test_no_sequence_of_actions_loses_a_saved_step(tmp_path_factory, monkeypatch, actions, stop_after):
    import reward_models
    monkeypatch.setitem(reward_models.REGISTRY, "stop_at", lambda arg, ctx: StopAt())
    run = tmp_path_factory.mktemp("seq") / "run"
    flags = [*TINY, "--reward", "stop_at", "--image-every", "0"]
    saved = 0  # the newest step on disk; only --overwrite may lower it
    for act in actions:
        StopAt.calls, StopAt.at = 0, (stop_after if act == "interrupt" else 0)
        argv = {"new": ["--out", str(run), *flags, "--steps", "2"],
                "overwrite": ["--out", str(run), *flags, "--steps", "1", "--overwrite"],
                "interrupt": ["--out", str(run), *flags, "--steps", "4"] if saved == 0 else ["--resume", str(run), "--steps", "6"],
                "resume": ["--resume", str(run)], "resume_more": ["--resume", str(run), "--steps", str(saved + 1)]}[act]
        try:
            vg.main(["train", *argv])
            code = 0
        except SystemExit as e:
            code = e.code
        now = policy_state(run)["step"] if (run / "checkpoints" / "last.pt").exists() else 0
        if act == "overwrite" and code == 0:
            saved = now
        assert now >= saved, (act, code, now, saved)
        assert code in (0, 2, 130), code  # done, refused, or interrupted after saving
        if now:
            assert [r["step"] for r in read_metrics(run)][:now] == list(range(now))  # the log covers every saved step
        saved = max(saved, now)


# ---- The launcher owns its trainers: a second Ctrl-C aborts them all, none outlives it

# brightness, blocking for an hour from its second call on process BLOCK_RANK (as a reward stuck on
# a server would): the first call is step 0's
BLOCKING = """import os, sys, time, torch, reward_models as rm, vargrpo as vg
calls = [0]
class Blocking(torch.nn.Module):
    def forward(self, images):
        calls[0] += 1
        if os.environ.get("RANK", "0") == os.environ["BLOCK_RANK"] and calls[0] > 1:
            time.sleep(3600)
        return rm.luma(images)
rm.REGISTRY["blocking"] = lambda arg, ctx: Blocking()
vg.main(sys.argv[1:])
"""
ABORT_TIMEOUT = 60  # the launcher's grace is 3 s; a hung launcher would wait an hour


def children(pid: int) -> list:
    """The processes whose parent is pid (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gone_within(pids, seconds: float) -> list:
    """The pids still alive after `seconds`."""
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def launch_blocking(tmp_path, block_rank: str, launcher=True):
    """`python vargrpo_run.py torchrun` (2 gloo processes; launcher=False: one plain `python`
    trainer) with the blocking reward, its stderr in a file (a pipe would stay open as long as
    any trainer lives); returns (proc, run, stderr file) once step 0 is logged."""
    script = tmp_path / "blocking.py"
    script.write_text(BLOCKING)
    run = tmp_path / "run"
    flags = [str(script), "train", *TINY, "--labels-per-step", "4", "--minibatch", "8", "--reward", "blocking",
             "--image-every", "0", "--out", str(run), "--steps", "1000"]
    env = {"PYTHONPATH": str(ROOT), "BLOCK_RANK": block_rank}
    if launcher:
        cmd, kw = torchrun(*flags, launcher=True, env=env)
    else:
        cmd, kw = [sys.executable, *flags], dict(cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, stderr=f, start_new_session=True, **kw)
    wait_for_first_step(proc, run)
    return proc, run, err


def end_all(proc, pids):
    for pid in [proc.pid, *pids]:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_launcher_second_ctrl_c_aborts_every_trainer_even_a_blocked_one(tmp_path):
    """Ctrl-C twice at the launcher while process 1 is stuck in its reward (process 0 waits
    for it in a collective): the launcher exits 130 within seconds with one line, and no
    trainer outlives it (it used to return with both trainers still running, the stuck one for
    up to an hour)."""
    proc, run, err = launch_blocking(tmp_path, block_rank="1")
    trainers = children(proc.pid)
    try:
        assert len(trainers) == 2, trainers
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does
        time.sleep(1.5)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=ABORT_TIMEOUT)
        left = gone_within(trainers, 10)
    finally:
        end_all(proc, trainers)
    text = err.read_text()
    assert proc.returncode == 130 and not left, (left, text[-3000:])
    line = one_error_line(text)
    assert "Ctrl-C aborted the run without saving" in line and "Traceback" not in text, text[-3000:]
    assert not (run / "checkpoints" / "last.pt").exists()
    assert f"--config {run}/args.json --out {run} --overwrite" in line  # no checkpoint yet


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_trainers_die_with_their_launcher(tmp_path):
    """kill -9 of the launcher: its trainers die with it (they used to train on as orphans)."""
    proc, run, err = launch_blocking(tmp_path, block_rank="none")
    trainers = children(proc.pid)
    try:
        assert len(trainers) == 2, trainers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = gone_within(trainers, 10)
    finally:
        end_all(proc, trainers)
    assert not left, err.read_text()[-3000:]


@pytest.mark.slow
def test_second_ctrl_c_in_one_process_is_one_line(tmp_path):
    """A plain `python vargrpo.py train` stuck in its reward: Ctrl-C, then Ctrl-C again aborts
    with one line and exit 130 (it used to print a 45-line KeyboardInterrupt traceback)."""
    proc, run, err = launch_blocking(tmp_path, block_rank="0", launcher=False)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=ABORT_TIMEOUT)
    finally:
        end_all(proc, [])
    text = err.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    assert "Ctrl-C aborted the run without saving the step in progress" in one_error_line(text)


@pytest.mark.slow
def test_resume_of_a_folder_a_live_run_holds_names_the_holder(tmp_path):
    """`--resume DIR` while DIR's trainer runs, before its first checkpoint: refused in one line
    naming the folder and the holder's pid (it used to say the run had stopped before its first
    checkpoint and advise --overwrite)."""
    proc, run, err = launch_blocking(tmp_path, block_rank="none", launcher=False)
    try:
        assert not (run / "checkpoints" / "last.pt").exists()
        code, text = train_cli("--resume", str(run), "--steps", "5")
    finally:
        end_all(proc, [])
    line = one_error_line(text)
    assert code == 2 and f"{run} is in use by another trainer (pid {proc.pid} " in line, text


# ---- Rewards checked at the boundary: what they return, the classes they read


@pytest.mark.parametrize("returned, said", [
    (lambda images: images.mean((1, 2, 3))[1:], "a tensor of shape (7,) (torch.float32)"),
    (lambda images: images.mean(), "a 0-d tensor (torch.float32)"),
    (lambda images: images.mean((1, 2, 3)).tolist(), "a list of 8"),
    (lambda images: (images.mean((1, 2, 3)) > 0.5).long(), "a tensor of shape (8,) (torch.int64)"),
])
def test_a_reward_returning_the_wrong_thing_is_one_line_before_anything_is_saved(tmp_path, capsys, monkeypatch,
                                                                                  returned, said):
    """Fault: a custom reward returns B-1 values, a 0-d tensor, a list: one line saying what a
    reward must return and what it returned, exit 2, no retry and no checkpoint (it used to be
    "the reward raised ..." with torch's message, retried, and a step-0 checkpoint)."""
    import reward_models as rm

    class Wrong(torch.nn.Module):
        def forward(self, images):
            return returned(images)

    monkeypatch.setitem(rm.REGISTRY, "wrong", lambda arg, ctx: Wrong())
    run = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--reward", "wrong", "--reward-batch", "8", "--out", str(run),
                          "--steps", "2"], capsys)
    line = one_error_line(err)
    assert code == 2 and "must return a (B,) float tensor, one value per image" in line, err
    assert f"for 8 images it returned {said}" in line and "retrying" not in err
    assert not (run / "checkpoints").exists() and vr.run_state(run) == "new"


@pytest.mark.parametrize("preset, reward", [("d16", "digit:correct"), ("numbers", "digit:bold"),
                                            ("numbers", "ocr:1")])
def test_a_reward_made_for_other_classes_is_refused_before_sampling(tmp_path, capsys, preset, reward):
    """digit:correct (the digits 0-9) on a 1000-class preset, the digits judge on the numbers
    00-99: refused in one line before any weights load or sample is drawn, nothing written (it
    used to sample, fail at step 0, save a step-0 checkpoint and advise --resume)."""
    run = tmp_path / "run"
    code, err = run_main(["train", "--preset", preset, "--device", "cpu", "--reward", reward, "--out", str(run)],
                         capsys)
    line = one_error_line(err)
    assert code == 2 and "is made for the classes 0-9" in line and f"--preset {preset} draws" in line, err
    assert not run.exists()


# ---- A run's args.json, the lock file, and advice that can be followed


def test_resume_writes_a_missing_args_json_again_from_the_checkpoint(tiny_run, tmp_path, capsys):
    """Fault: args.json deleted from a run: --resume says so in one line and writes it again from
    the checkpoint (it trained on without a word and never wrote it again)."""
    run = copy_run(tiny_run, tmp_path / "run")
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").unlink()
    settings = policy_state(run)["args"]
    vg.main(["train", "--resume", str(run), "--steps", "3"])
    assert f"{run}/args.json was missing: written again from" in capsys.readouterr().err
    assert json.loads((run / "args.json").read_text()) == settings
    assert {k: settings[k] for k in ("preset", "reward", "seed", "lr")} == {k: saved[k] for k in ("preset", "reward", "seed", "lr")}
    (run / "args.json").write_text("{not json")
    code, err = run_main(["train", "--resume", str(run), "--steps", "4"], capsys)
    assert code == 2 and "args.json is unreadable" in one_error_line(err)


def test_advice_names_only_what_the_user_can_do(tiny_run, tmp_path, capsys):
    """Messages that named what cannot be done: resuming an --fsdp run in one process said "or
    drop --fsdp" (a saved setting no flag turns off); a tiny state dict as var_d16.pth said "use
    the preset it was made for (d2 ...)" (there is no d2); a lock file that cannot be opened was
    blamed on the folder; a .safetensors file renamed .pth got torch's text and "partial
    download, delete it"."""
    run = copy_run(tiny_run, tmp_path / "run")
    ckpt = policy_state(run)
    ckpt["args"]["fsdp"] = True
    save_edited(ckpt, run / "checkpoints" / "last.pt")
    code, err = run_main(["train", "--resume", str(run), "--steps", "3"], capsys)
    line = one_error_line(err)
    assert code == 2 and "resume it under torchrun" in line and "drop --fsdp" not in line, line

    tiny_sd = ckpt["model"]
    with pytest.raises(vr.CheckpointError) as e:
        vr.check_depth(tiny_sd, 16, "var_d16.pth")
    assert "depth-2" in str(e.value) and "d2" not in str(e.value).replace("depth-2", ""), e.value
    d16_like = {f"blocks.{i}.w": torch.zeros(1) for i in range(16)}
    with pytest.raises(vr.CheckpointError, match="use --preset d16"):
        vr.check_depth(d16_like, 3, "var_digits.pth")

    from safetensors.torch import save_file
    renamed = tmp_path / "var_digits.pth"
    save_file(tiny_sd, str(renamed))
    with pytest.raises(vr.CheckpointError) as e:
        vr.read_state_dict(renamed)
    assert "is a safetensors file named .pth; rename it var_digits.safetensors" in str(e.value), e.value
    assert "partial download" not in str(e.value)

    locked = tmp_path / "locked"
    (locked / vr.LOCK_NAME).mkdir(parents=True)  # a lock file that cannot be opened
    code, err = run_main(["train", *TINY, "--out", str(locked), "--steps", "1"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"cannot open the lock file {locked / vr.LOCK_NAME}" in line, line
