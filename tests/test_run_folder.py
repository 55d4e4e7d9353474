"""Nothing lost, nothing silent: the run folder's rules, its lock, I/O errors, numeric guards, exit
codes, and a property test that random sequences of runs, interrupts, resumes and overwrites never
lose a saved step. Each test names the fault it injects."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vargrpo as vg
import vargrpo_run as vr
from helpers import ROOT, TINY, policy_state, read_metrics


def train_cli(*args, cwd=ROOT, timeout=300, env=None):
    """`python vargrpo.py train ...` in a fresh process: (exit code, stderr)."""
    res = subprocess.run([sys.executable, "vargrpo.py", "train", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return res.returncode, res.stderr


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("vargrpo:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def run_main(argv, capsys):
    """vg.main in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        vg.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ---- a new run never touches files that are not a run's


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


def test_overwrite_removes_exactly_the_runs_files(tmp_path, capsys):
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "2", "--save-every", "1"])
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


def test_run_sh_demo_refuses_an_existing_run(tmp_path):
    """Fault: `bash run.sh demo --out DIR` where DIR holds a real run (it used to pass --overwrite)."""
    run = tmp_path / "important"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1"])
    before = (run / "checkpoints" / "last.pt").read_bytes()
    res = subprocess.run(["bash", "run.sh", "demo", "--out", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300)
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
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full device")
def test_disk_full_names_the_cause_and_leaves_no_tmp(tmp_path, capsys):
    """Fault: the checkpoint write fails with ENOSPC (its .tmp path is made to point at /dev/full)."""
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1"])
    (run / "checkpoints" / "step_000002.pt.tmp").symlink_to("/dev/full")
    code, err = run_main(["train", "--resume", str(run), "--steps", "2"], capsys)
    line = one_error_line(err)
    assert code == 1 and "No space left on device" in line and "step_000002.pt" in line, err
    assert not list(run.rglob("*.tmp")) and policy_state(run)["step"] == 1  # the good checkpoint is intact
    vg.main(["train", "--resume", str(run), "--steps", "2"])  # space again: it continues
    assert policy_state(run)["step"] == 2 and len(read_metrics(run)) == 2


def test_a_really_full_disk(small_fs, capsys):
    code, err = run_main(["train", *TINY, "--out", str(small_fs / "run"), "--steps", "1"], capsys)
    assert code == 1 and "No space left on device" in one_error_line(err), err
    assert not list(small_fs.rglob("*.tmp"))


# ---- one trainer per folder


def test_second_trainer_on_a_locked_folder_is_refused(tmp_path):
    """Fault: a second trainer on the same --out while the first runs (as --overwrite and as --resume)."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "1000", "--save-every", "1"],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.pt").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        for extra in (["--out", str(run), *TINY[2:], "--overwrite", "--steps", "2"], ["--resume", str(run)]):
            code, err = train_cli(*extra)
            line = one_error_line(err)
            assert code == 2 and "is in use by another trainer" in line and f"pid {first.pid}" in line, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(len(rows))) == list(range(policy_state(run)["step"]))


def test_two_trainers_started_together_one_wins(tmp_path):
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "3",
                               "--seed", str(seed)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another trainer" in loser or "already holds a run" in loser
    winner_seed = policy_state(run)["args"]["seed"]
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2] and json.loads((run / "args.json").read_text())["seed"] == winner_seed


# ---- resume: what comes after the checkpoint, torn lines, wrong files


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


def test_resume_or_eval_of_the_wrong_checkpoint(tmp_path, capsys):
    """Faults: a checkpoint of another architecture, a wrong-shaped tensor, a file without the run's settings."""
    import vargrpo_tools as tools
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1"])
    last = run / "checkpoints" / "last.pt"
    good = torch.load(last, weights_only=True)
    bad = {**good, "model": {**good["model"], "head.weight": torch.zeros(3, 3)}}
    last.unlink()
    torch.save(bad, last)
    code, err = run_main(["train", "--resume", str(run), "--steps", "2"], capsys)
    assert code == 2 and "does not match VAR: wrong shape (1): head.weight (3, 3) vs (64, 128)" in one_error_line(err)
    torch.save({k: v for k, v in good.items() if k != "args"}, last)
    code, err = run_main(["train", "--resume", str(run), "--steps", "2"], capsys)
    assert code == 2 and "not a vargrpo run checkpoint" in one_error_line(err)
    torch.save({"model": good["model"]}, tmp_path / "weights_only.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tools.main(["eval", "--ckpt", str(tmp_path / "weights_only.pt")])
    assert e.value.code == 2 and "not a vargrpo run checkpoint" in capsys.readouterr().err
    other = {**good, "model": {k.replace("blocks.1.", "blocks.7."): v for k, v in good["model"].items()}}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        tools.main(["eval", "--ckpt", str(tmp_path / "other.pt")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "missing" in err and "unexpected" in err and len(err.splitlines()) == 1


# ---- numbers and settings that cannot be meant


@pytest.mark.parametrize("flags, message", [
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
    (["--mp-keep", "0.3"], "--mp-keep only act with"),
    (["--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
])
def test_absurd_settings_are_refused(tmp_path, capsys, flags, message):
    code, err = run_main(["train", *TINY, "--out", str(tmp_path / "r"), "--steps", "1", *flags], capsys)
    import re
    assert code == 2 and re.search(message, one_error_line(err)), err
    assert not (tmp_path / "r").exists()  # nothing written


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


# ---- a diverged policy, interrupts


def test_update_with_a_nonfinite_gradient_is_not_taken():
    """Fault: the loss is not finite (an old log-prob of -inf gives an infinite ratio)."""
    a = vg.TrainArgs(preset="tiny", group_size=2, minibatch=4, temperature=1.0, lr=1e-3)
    vae, policy, ref = vg.build_models(a, "cpu")
    opt = vg.make_optimizer(policy, a, "cpu")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (4, 30), generator=g)
    labels = torch.tensor([0, 0, 1, 1])
    old = vg.token_logprobs(policy, labels, idx).detach()
    old[1, 3] = -torch.inf
    w = torch.full((4, 30), 1 / 30)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    batch = vg.UpdateBatch(labels=labels, idx=idx, old_logp=old, adv=torch.tensor([1.0, -1.0, 0.5, -0.5]), pg_w=w, kl_w=w)
    stats = vg.policy_update(policy, ref, opt, batch, a, 0, vr.Dist(), contextlib.nullcontext)
    assert stats.nonfinite == "the loss gradient (update 1 of epoch 1)" and not stats.grad_norms
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_a_diverged_policy_stops_the_run_with_one_line(tmp_path, capsys):
    """Fault: the policy's weights went non-finite (as a diverged run's would): sampling is never fed
    NaN probabilities (on a GPU that is an asynchronous device assert), the run stops, exit 1."""
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1"])
    good = policy_state(run)
    good["model"]["head.bias"][3] = torch.inf
    (run / "checkpoints" / "last.pt").unlink()
    torch.save(good, run / "checkpoints" / "last.pt")
    code, err = run_main(["train", "--resume", str(run), "--steps", "3"], capsys)
    line = one_error_line(err)
    assert code == 1 and "step 1: the sampling distribution" in line and "went non-finite" in line and "--lr" in line
    assert (run / "checkpoints" / "step_000001.pt").is_file() and len(read_metrics(run)) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupts_save_and_exit_with_the_shell_code(tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "vargrpo.py", "train", *TINY, "--out", str(run), "--steps", "1000"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig, err[-2000:]  # 130 / 143: a scheduler tells it from a finished run
    step = policy_state(run)["step"]
    assert 1 <= step < 1000 and f"stopped after step {step}" in err and len(read_metrics(run)) == step


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


# ---- property: runs, interrupts, resumes and overwrites never lose a saved step

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
