"""Tests of vargrpo_tools.py in its order: model helpers (img_to_idx), reading a run's checkpoint,
evaluation (Table 1), the VAR-RL ablation, the benchmark, gpu-check. The digits model, prepare and the demo
have their own file, tests/test_digits.py.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import vargrpo as vg
import vargrpo_tools as tools
from helpers import (HEAD, ROOT, TINY, another_preparation, copy_run, exit_and_stderr,
                     flip_a_weight_bit, needs_head, random_model, read_only, save_edited,
                     timeout)


def tools_main(argv, capsys):
    """tools.main in this process: (exit code, stderr)."""
    return exit_and_stderr(tools.main, argv, capsys)


def one_line(err: str, prog="vargrpo_tools") -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith(f"{prog}:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---- Model helpers: img_to_idx


def test_img_to_idx_rejects_an_image_of_the_wrong_size():
    vae, _ = random_model((1, 2), depth=1)
    with pytest.raises(ValueError, match="shape \\(B, 3, 32, 32\\)"):
        tools.img_to_idx(vae, torch.zeros(1, 3, 64, 64))


# ---- Reading a run's checkpoint (eval --ckpt)


def test_eval_of_the_wrong_checkpoint_says_so_in_one_line(tiny_run, tmp_path, capsys):
    """Faults: a file without the run's settings, a checkpoint of another architecture."""
    good = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({"model": good["model"]}, tmp_path / "weights_only.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tools.main(["eval", "--ckpt", str(tmp_path / "weights_only.pt")])
    assert e.value.code == 2 and "not a vargrpo run checkpoint" in capsys.readouterr().err
    other = {**good, "model": {k.replace("blocks.1.", "blocks.7."): v for k, v in good["model"].items()}}
    save_edited(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        tools.main(["eval", "--ckpt", str(tmp_path / "other.pt")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "missing" in err and "unexpected" in err and len(err.splitlines()) == 1


def test_eval_of_a_safetensors_with_broken_or_missing_metadata(tiny_run, tmp_path, capsys):
    """Faults: an export whose settings are not JSON, one without them: one line each (a JSONDecodeError
    and a KeyError before)."""
    from safetensors.torch import load_file, save_file
    weights = load_file(str(tiny_run / "checkpoints" / "last.safetensors"))
    for name, meta in (("broken", {"vargrpo_args": "{not json", "vargrpo_step": "2"}), ("no_step", {"vargrpo_args": "{}"}),
                       ("none", None)):
        save_file(weights, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        code, err = tools_main(["eval", "--ckpt", str(tmp_path / f"{name}.safetensors")], capsys)
        assert code == 2 and "has no readable vargrpo settings in its metadata" in one_line(err), err


EVAL_ONE = ["--samples-per-class", "1", "--max-classes", "1"]


def test_eval_refuses_weights_of_another_preparation(digits_run, tmp_path, capsys):
    """Silent: eval --weights-dir OTHER decoded a run's policy with a VQVAE it never saw and
    took another KL reference (100% -> 10% accuracy, exit 0). eval checks the files it loads
    against the run's record (the VQVAE, the pre-trained VAR, its reward's judge) and
    refuses others in one line naming both, before sampling; the run's own files
    evaluate."""
    other = another_preparation(tmp_path / "other")
    out = tmp_path / "eval"
    evaluate = ["eval", "--ckpt", str(digits_run), *EVAL_ONE, "--out", str(out)]
    code, err = tools_main([*evaluate, "--weights-dir", str(other)], capsys)
    line = one_line(err)
    was = ROOT / "weights" / "var_digits.safetensors"
    assert code == 2 and f"started from {was} (sha256" in line
    assert f"not {other / 'var_digits.safetensors'} (sha256" in line
    assert not (out / "eval.md").exists()

    judge_only = tmp_path / "judge_only"  # the reward's judge from another preparation
    judge_only.mkdir()
    state = load_file(str(ROOT / "weights" / "judge_digits.safetensors"))
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_file(changed, str(judge_only / "judge_digits.safetensors"))
    code, err = tools_main([*evaluate, "--weights-dir", str(judge_only)], capsys)
    line = one_line(err)
    assert code == 2 and f"not {judge_only / 'judge_digits.safetensors'} (sha256" in line

    code, err = tools_main(evaluate, capsys)
    assert code == 0 and (out / "eval.md").is_file(), err


def test_eval_refuses_a_damaged_checkpoint_or_export(digits_run, tmp_path, capsys):
    """Silent: one bit flipped inside a weight of last.safetensors evaluated normally. Every
    save records the sha256 of what it saved (in the .pt, in the export's metadata); eval
    refuses another content in one line naming the file, and a checkpoint holding NaN."""
    out = ["--out", str(tmp_path / "eval")]
    for name in ("last.safetensors", "last.pt"):
        damaged = tmp_path / name
        shutil.copy(digits_run / "checkpoints" / name, damaged)
        flip_a_weight_bit(damaged)
        code, err = tools_main(["eval", "--ckpt", str(damaged), *EVAL_ONE, *out], capsys)
        assert code == 2 and f"error: {damaged} is damaged" in one_line(err), name

    ckpt = torch.load(digits_run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["model"]["head.bias"][0] = math.nan  # saved with its checksum: refused all the same
    save_edited(ckpt, tmp_path / "nan.pt")
    code, err = tools_main(["eval", "--ckpt", str(tmp_path / "nan.pt"), *EVAL_ONE, *out],
                           capsys)
    assert code == 2 and "nan.pt: head.bias holds inf or NaN values" in one_line(err)


def test_eval_refuses_an_export_whose_floats_became_integers(digits_run, tmp_path, capsys):
    """Silent: a .safetensors export whose float weights were cast to int32 loaded and
    evaluated (0% accuracy, exit 0): names and shapes were checked, dtypes were not. A float
    weight never loads from an integer tensor (here without a checksum, as a converter that
    drops unknown metadata writes it); with the export's checksum the file is named as
    damaged first."""
    from safetensors import safe_open
    export = digits_run / "checkpoints" / "last.safetensors"
    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    cast = {k: v.to(torch.int32) if v.is_floating_point() else v
            for k, v in load_file(str(export)).items()}
    converted = tmp_path / "int32.safetensors"
    unsealed = {k: v for k, v in meta.items() if k != "vargrpo_sha256"}
    save_file(cast, str(converted), metadata=unsealed)
    evaluate = ["eval", "--ckpt", str(converted), *EVAL_ONE, "--out", str(tmp_path / "eval")]
    code, err = tools_main(evaluate, capsys)
    line = one_line(err)
    assert code == 2 and f"{converted} does not match VAR: wrong dtype" in line
    assert "int32 vs float32" in line

    save_file(cast, str(converted), metadata=meta)
    code, err = tools_main(evaluate, capsys)
    assert code == 2 and f"error: {converted} is damaged" in one_line(err)
    assert not (tmp_path / "eval" / "eval.md").exists()


# ---- Evaluation [GRPO-VAR Table 1]


def test_eval_refuses_batch_0(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tools.main(["eval", "--ckpt", str(tmp_path / "no_run"), "--batch", "0"])
    assert e.value.code == 2 and "--batch >= 1" in capsys.readouterr().err


def test_eval_checks_its_folder_and_settings_before_sampling(tiny_run, tmp_path, capsys, read_only):
    """Faults: --out a file, a read-only run folder (it failed after sampling), --cfg nan (it sampled
    with NaN guidance): one line, exit 2, before any model is loaded."""
    (tmp_path / "a_file").write_text("mine")
    code, err = tools_main(["eval", "--ckpt", str(tiny_run), "--out", str(tmp_path / "a_file")], capsys)
    assert code == 2 and "is a file" in one_line(err) and (tmp_path / "a_file").read_text() == "mine"
    code, err = tools_main(["eval", "--ckpt", str(tiny_run), "--cfg", "nan"], capsys)
    assert code == 2 and "--cfg: not a finite number" in one_line(err)
    code, err = tools_main(["eval", "--ckpt", str(tiny_run), "--weights-dir", str(tmp_path)], capsys)
    assert code == 2 and "does nothing here: the tiny preset" in one_line(err)  # it was ignored
    run = read_only(copy_run(tiny_run, tmp_path / "run"))
    t0 = time.perf_counter()
    code, err = tools_main(["eval", "--ckpt", str(run)], capsys)
    assert code == 2 and f"cannot write in {run} (Read-only file system)" in one_line(err)
    assert time.perf_counter() - t0 < timeout(60)  # said at once, not after sampling


@needs_head
@pytest.mark.slow
def test_eval_table_seen_unseen(tmp_path, capsys):
    """Train 1 step on half of the classes, then `eval`: 4 rows (pre-trained / fine-tuned x seen /
    unseen), JSON + Markdown + grids; ResNet top-5 counted against the labels (a rigged classifier
    whose top-5 are classes 0-4 scores exactly the share of labels in 0-4)."""
    import torchvision
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "1", "--label-subset", "half"])
    seen = vg.label_pool(vg.TrainArgs(label_subset="half", seed=0), 10).tolist()
    r50 = torchvision.models.resnet50()
    torch.nn.init.zeros_(r50.fc.weight)
    with torch.no_grad():
        r50.fc.bias.copy_(torch.cat([torch.arange(5, 0, -1).float(), torch.zeros(995)]))
    torch.save(r50.state_dict(), tmp_path / "r50.pth")
    tools.main(["eval", "--ckpt", str(run), "--samples-per-class", "2", "--clip-model", "tiny-random",
                "--aesthetic-head", str(HEAD), "--resnet-weights", str(tmp_path / "r50.pth"), "--batch", "10"])
    table = capsys.readouterr().out
    res = json.loads((run / "eval.json").read_text())
    rows = {(r["model"], r["subset"]): r for r in res["results"]}
    assert set(rows) == {(m, s) for m in ("pre-trained", "fine-tuned") for s in ("seen", "unseen")}

    def in_top5(classes):
        return sum(c < 5 for c in classes) / len(classes)
    unseen = sorted(set(range(10)) - set(seen))
    assert rows["fine-tuned", "seen"]["resnet50_top5"] == pytest.approx(in_top5(seen))
    assert rows["pre-trained", "unseen"]["resnet50_top5"] == pytest.approx(in_top5(unseen))
    assert all(r["images"] == 10 and 1 < r["aesthetic"] < 10 for r in rows.values())
    assert "| fine-tuned (tiny) | unseen | 10 |" in table and (run / "eval.md").read_text().strip() in table
    assert (run / "eval_fine-tuned_unseen.png").is_file() and (run / "eval_pre-trained_seen.png").is_file()


@needs_head
def test_eval_reads_a_safetensors_export(tiny_run, tmp_path, capsys):
    import torchvision
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    tools.main(["eval", "--ckpt", str(tiny_run / "checkpoints" / "last.safetensors"), "--samples-per-class", "1",
                "--max-classes", "2", "--clip-model", "tiny-random", "--aesthetic-head", str(HEAD),
                "--resnet-weights", str(tmp_path / "r50.pth"), "--out", str(tmp_path / "eval")])
    assert "| fine-tuned (tiny) | all | 2 |" in capsys.readouterr().out


# ---- Ablation [VAR-RL]


@pytest.mark.slow
def test_ablation_smoke(tmp_path):
    """Every method and the m sweep run for each reward (per-reward seeds), each final policy is scored
    by the reward and both judges, and the tables hold a mean and 95% interval per method."""
    tools.main(["ablate", "--preset", "tiny", "--seeds", "0,1", "--seeds", "0", "--budget", "32", "--vmr-m", "2",
                "--sweep-seeds", "0", "--eval-samples", "10", "--out", str(tmp_path),
                "--reward", "digit:correct", "--reward", "brightness:region=0.25,0.25,0.75,0.75"])
    for folder, seeds, sweep in (("digit_correct", 2, True), ("brightness_region_0.25_0.25_0.75_0.75", 1, False)):
        table = (tmp_path / folder / "ablation.md").read_text()
        assert table in (tmp_path / "ablation.md").read_text()
        methods = [*tools.ABLATION_METHODS, *(["+vmr m=2"] if sweep else [])]
        for name in methods:
            assert f"| {name} | {seeds if name != '+vmr m=2' else 1} |" in table
        summary = json.loads((tmp_path / folder / "ablation.json").read_text())
        assert (tmp_path / folder / "ablation.png").is_file() and list(summary) == ["pre-trained", *methods]
        for name in methods:
            for row in summary[name]["per_seed"]:
                assert 0 <= row["judge"] <= 1 and 0 <= row["judge2"] <= 1 and math.isfinite(row["reward"])
    with pytest.raises(tools.UsageError, match="--seeds given 3 times for 2 rewards"):
        tools.ablation_runs(tools.main.__globals__["argparse"].Namespace(
            reward=["a", "b"], seeds=["0", "1", "2"], preset="tiny", vmr_m="", sweep_seeds="0"))


def test_mean_ci95_is_the_t_interval():
    m, h = tools.mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-4)  # t(0.975, 2) * s / sqrt(n)
    assert math.isnan(tools.mean_ci95([0.5])[1])
    for df, q in tools.T975.items():  # each quantile: Student's t CDF at q is 0.975 (numerical integration)
        x = torch.linspace(0, q, 200001, dtype=torch.float64)
        pdf = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + x ** 2 / df) ** (-(df + 1) / 2)
        assert 0.5 + torch.trapezoid(pdf, x).item() == pytest.approx(0.975, abs=2e-5), df


# ---- Benchmark: its rows run (a failing row prints "failed" in the table instead of stopping it)


@pytest.mark.slow
def test_bench_rows_and_memory_table(capsys):
    whats = ["sample cfg=0", "sample cfg+top-k/p", "teacher-forced fwd", "teacher-forced fwd+bwd",
             "teacher-forced fwd+bwd, grad checkpointing", "GRPO step"]
    for what in whats:
        r = tools.bench_row("tiny", what, 2, "cpu")
        assert r["seconds"] > 0 and r["throughput"] > 0 and r["peak_mem"] > 0, (what, r)
    assert tools.bench_row("-", "reward brightness", 4, "cpu")["throughput"] > 0
    tools.main(["bench", "--memory", "--presets", "tiny"])
    out = capsys.readouterr().out
    assert "| tiny | 0.6 M |" in out and out.count("GiB") == 4


# ---- gpu-check (bash run.sh gpu-check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    """`bash run.sh gpu-check` on a machine without a usable GPU: one line saying why and how to run
    the check on the CPU, exit 2, nothing written."""
    res = subprocess.run(["bash", "run.sh", "gpu-check", "--out", "should_not_exist.json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout(300))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "no usable CUDA GPU" in lines[0] and "--device cpu --preset tiny" in lines[0]
    assert not (ROOT / "should_not_exist.json").exists()


@pytest.mark.parametrize("train_ends", ["returns", "raises"])
def test_gpu_check_variant_puts_back_what_it_patches(train_ends, monkeypatch):
    """gpu-check wraps the trainer's parts and replaces RunFolder.save while its trainer runs
    (here a stand-in that sees the patches); after it, returning or raising, every name is the
    original again."""
    import vargrpo_run as vr
    names = ("rollout", "decode", "score", "policy_update", "sample")
    originals = {name: getattr(vg, name) for name in names}
    save = vr.RunFolder.save
    step_metrics = vr.step_metrics
    seen = []

    def stand_in(a):
        seen.append({name: getattr(vg, name) is originals[name] for name in names})
        seen.append([vr.RunFolder.save is save, vr.step_metrics is step_metrics])
        if train_ends == "raises":
            raise RuntimeError("the trainer failed")

    monkeypatch.setattr(vg, "train", stand_in)
    with pytest.raises((RuntimeError, IndexError)):  # IndexError: no step's metrics
        tools.gpu_check_variant("tiny", "cpu", "plain")
    assert seen == [dict.fromkeys(names, False), [False, False]]  # patched while it ran
    assert all(getattr(vg, name) is originals[name] for name in names)
    assert vr.RunFolder.save is save and vr.step_metrics is step_metrics


@pytest.mark.slow
def test_gpu_check_on_the_cpu_writes_one_json(tmp_path):
    """`gpu-check --device cpu --preset tiny`: the three variants run (each in its own process,
    --fsdp under torchrun with one gloo process) and the JSON holds every number, positive and
    finite (took 64-100 s on 2 busy cores)."""
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "vargrpo_tools.py", "gpu-check", "--device", "cpu", "--preset", "tiny",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=timeout(900), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["preset"] == "tiny" and report["dtype"] == "bf16"
    assert set(report["variants"]) == {"plain", "grad_checkpointing", "fsdp"}
    numbers = ("step_s", "sample_s", "decode_s", "reward_s", "update_s", "samples_per_s", "peak_memory_bytes",
               "ratio_dev_first_minibatch", "rows_per_sample_call", "sample_calls_per_step", "launches_per_step")
    for name, v in report["variants"].items():
        assert "error" not in v, (name, v)
        for k in numbers:
            assert math.isfinite(v[k]) and v[k] > 0, (name, k, v[k])
        assert set(v["launches"]) == {"sample", "decode", "reward", "update"} and all(n > 0 for n in v["launches"].values())
        assert sum(v["launches"].values()) == v["launches_per_step"]
        assert v["step_s"] == pytest.approx(sum(v[p + "_s"] for p in ("sample", "decode", "reward", "update")), rel=1e-6)
        assert v["rows_per_sample_call"] == 16 and v["sample_calls_per_step"] == 1  # 4 labels x 4, one call
        assert 1e-5 < v["ratio_dev_first_minibatch"] < 0.1  # bf16 autocast: live, and small
    # recomputing each block in the backward pass launches more
    assert report["variants"]["grad_checkpointing"]["launches"]["update"] > report["variants"]["plain"]["launches"]["update"]


# Stand-ins for the variants' processes (gpu_check_command monkeypatched): plain reports at once,
# grad_checkpointing hangs (and so does a process it starts, as torchrun's trainer would), fsdp
# fails with 40 lines of stderr.
STAND_IN_VARIANT = """import json, subprocess, sys, time
name, pid_file = sys.argv[1:]
if name == "plain":
    print(json.dumps({"device_name": "stand-in", "step_s": 1.0}))
elif name == "grad_checkpointing":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(pid_file, "w").write(str(child.pid))
    time.sleep(600)
else:
    for i in range(40):
        print(f"stderr line {i}", file=sys.stderr)
    sys.exit(3)
"""


def gone(pid: int) -> bool:
    """Whether process pid has ended (absent, or a zombie no one has reaped yet)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_gpu_check_kills_a_hung_variant_and_keeps_every_result(tmp_path, monkeypatch, capsys):
    """A variant that hangs is killed after --child-timeout with the processes it started (its
    error says so); the next variant still runs; the JSON holds each variant's result as soon as
    it is known (written after each); a failed variant's error is its last stderr line, and its last
    30 lines are kept. Exit 1 with one line."""
    script = tmp_path / "variant.py"
    script.write_text(STAND_IN_VARIANT)
    pid_file = tmp_path / "grandchild.pid"
    out = tmp_path / "check.json"

    def stand_in_command(name, device, preset, reward):
        return [sys.executable, str(script), name, str(pid_file)]

    seen_before = {}
    real_child = tools.gpu_check_child

    def child(name, *args):
        seen_before[name] = sorted(json.loads(out.read_text())["variants"])
        return real_child(name, *args)

    monkeypatch.setattr(tools, "gpu_check_command", stand_in_command)
    monkeypatch.setattr(tools, "gpu_check_child", child)
    t0 = time.perf_counter()
    code, err = tools_main(["gpu-check", "--device", "cpu", "--preset", "tiny", "--out", str(out),
                            "--child-timeout", "3"], capsys)
    assert code == 1 and "grad_checkpointing, fsdp failed" in one_line(err)
    assert time.perf_counter() - t0 < 60

    assert seen_before == {"plain": [], "grad_checkpointing": ["plain"],
                           "fsdp": ["grad_checkpointing", "plain"]}
    report = json.loads(out.read_text())
    assert report["unfinished"] == [] and report["device_name"] == "stand-in"
    v = report["variants"]
    assert v["plain"] == {"flags": [], "device_name": "stand-in", "step_s": 1.0}
    assert v["grad_checkpointing"]["error"] == "killed after --child-timeout 3 s (hung or too slow)"
    deadline = time.time() + 10
    while not gone(int(pid_file.read_text())):
        assert time.time() < deadline, "the hung variant's own process was left running"
        time.sleep(0.1)
    assert v["fsdp"]["error"] == "stderr line 39" and v["fsdp"]["exit_code"] == 3
    assert v["fsdp"]["stderr_tail"] == [f"stderr line {i}" for i in range(10, 40)]


def test_gpu_check_parent_creates_no_cuda_context_and_names_what_is_missing(tmp_path, monkeypatch,
                                                                           capsys):
    """On a GPU (stood in for: torch.cuda.is_available patched True) the parent process never
    initialises CUDA (torch.cuda._lazy_init, behind every call that makes a context, raises here):
    the variants report the GPU's name. open_clip missing: one line naming it and its pip package,
    and the variants run the brightness reward."""
    def no_context(*args, **kw):
        raise AssertionError("the gpu-check parent initialised CUDA")

    calls = []

    def stand_in_child(name, flags, device, preset, reward, timeout_s):
        calls.append((name, device, reward))
        return dict(flags=flags, device_name="Stand-in GPU")

    def open_clip_missing():
        return {"open_clip": "open_clip_torch"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_context)
    monkeypatch.setattr(torch.cuda, "init", no_context)
    monkeypatch.setattr(tools, "gpu_check_child", stand_in_child)
    monkeypatch.setattr(tools, "gpu_check_missing", open_clip_missing)
    out = tmp_path / "check.json"
    capsys.readouterr()
    tools.main(["gpu-check", "--out", str(out)])
    printed = [line for line in capsys.readouterr().out.splitlines() if "not installed" in line]

    assert len(printed) == 1 and "open_clip is not installed (pip install open_clip_torch)" in printed[0]
    assert calls == [(name, "cuda", "brightness") for name in ("plain", "grad_checkpointing", "fsdp")]
    report = json.loads(out.read_text())
    assert report["device"] == "cuda" and report["device_name"] == "Stand-in GPU"
    assert report["reward"] == "brightness (open_clip not installed)"


def test_gpu_check_finds_open_clip_here():
    """This environment has every package the check needs (the test above stands in for one that
    does not)."""
    assert tools.gpu_check_missing() == {}


class ProfilerEvent:
    """What count_launches reads of a torch.profiler event."""

    def __init__(self, name, start, end, device_type):
        from torch.autograd.profiler_util import Interval
        self.name = name
        self.time_range = Interval(start, end)
        self.device_type = device_type
        self.cpu_children = []


def test_gpu_check_counts_launches_in_the_cpu_side_ranges():
    """On a GPU the profiler shows each gpu-check range twice, on the CPU and as a device
    annotation at the kernels' later device time: the launches (CPU-side cudaLaunchKernel calls)
    are counted in the CPU range."""
    from torch.autograd import DeviceType

    class Profile:
        def events(self):
            return [ProfilerEvent("gpu-check:update", 0, 100, DeviceType.CPU),
                    ProfilerEvent("cudaLaunchKernel", 10, 11, DeviceType.CPU),
                    ProfilerEvent("cudaLaunchKernel", 20, 21, DeviceType.CPU),
                    ProfilerEvent("gpu-check:update", 500, 600, DeviceType.CUDA),
                    ProfilerEvent("cudaLaunchKernel", 550, 551, DeviceType.CPU)]

    counted = tools.count_launches(Profile(), "cuda")
    assert counted["launches"] == {"update": 2} and counted["launches_per_step"] == 2


def test_ablate_names_the_flag_of_a_default_sweep_that_does_not_fit(tmp_path, capsys):
    """tiny has 4 scales: the default --vmr-m 2,5 does not fit it; the line says what does."""
    argv = ["ablate", "--preset", "tiny", "--seeds", "0", "--out", str(tmp_path / "a")]
    code, err = tools_main(argv, capsys)
    line = one_line(err)
    assert code == 2 and "1..3 of tiny" in line and "--vmr-m ''" in line
    assert not (tmp_path / "a").exists()


def test_demo_help_lists_its_flags_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        tools.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--steps" in out and "the demo's defaults" in out


def test_plot_of_a_missing_run_is_one_line(tmp_path, capsys):
    code, err = tools_main(["plot", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "metrics.jsonl does not exist: name a run folder" in one_line(err)


# ---- What the tools never overwrite, and the one line they say first


def test_ablate_refuses_an_earlier_ablation_without_overwrite(tmp_path, capsys):
    """ablate into a folder that holds an earlier ablation is refused, in one line, before any
    work, unless --overwrite: its runs and tables stay."""
    (tmp_path / "ablation.md").write_text("the earlier table")
    argv = ["ablate", "--preset", "tiny", "--out", str(tmp_path), "--budget", "32", "--vmr-m", "2"]
    code, err = tools_main(argv, capsys)
    assert code == 2 and "pass --overwrite" in one_line(err)
    assert (tmp_path / "ablation.md").read_text() == "the earlier table"


@pytest.mark.parametrize("flags", [["--seeds", "a,b"], ["--seeds", ""], ["--sweep-seeds", "x"],
                                   ["--vmr-m", "two"], ["--preset", "d99"]])
def test_ablate_flags_are_parsed_with_their_types(tmp_path, capsys, flags):
    code, err = exit_and_stderr(tools.main, ["ablate", "--out", str(tmp_path), *flags], capsys)
    assert code == 2 and "Traceback" not in err
    assert "error: argument" in err.strip().splitlines()[-1]


def test_bench_refuses_an_unknown_preset_before_measuring(capsys):
    code, err = exit_and_stderr(tools.main, ["bench", "--presets", "tiny,foo"], capsys)
    assert code == 2 and "unknown preset 'foo'" in err and "Traceback" not in err
    assert "device:" not in capsys.readouterr().out


def test_gpu_check_checks_its_out_before_measuring(tmp_path, capsys, read_only):
    """--out an existing folder, a file that exists (a user's, without --overwrite), or in a
    read-only folder: one line at once, not after the minutes of measuring."""
    t0 = time.perf_counter()
    argv = ["gpu-check", "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path)]
    code, err = tools_main(argv, capsys)
    assert code == 2 and "is a folder; name the JSON file" in one_line(err)
    (tmp_path / "locked").mkdir()
    locked = read_only(tmp_path / "locked")
    code, err = tools_main([*argv[:-1], str(locked / "check.json")], capsys)
    assert code == 2 and "cannot write in" in one_line(err)
    mine = tmp_path / "mine.json"
    mine.write_text('{"x": 1}')
    code, err = tools_main([*argv[:-1], str(mine)], capsys)
    assert code == 2 and "exists; pass --overwrite" in one_line(err)
    assert mine.read_text() == '{"x": 1}'
    assert time.perf_counter() - t0 < 30  # nothing was measured (a variant takes ~20 s)


@pytest.fixture(scope="module")
def quick_eval(tmp_path_factory):
    """eval flags for a tiny run: 2 classes, 1 sample each, a tiny random CLIP, the LAION head
    and random ResNet-50 weights."""
    import torchvision
    r50 = tmp_path_factory.mktemp("r50") / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    return ["--samples-per-class", "1", "--max-classes", "2", "--clip-model", "tiny-random",
            "--aesthetic-head", str(HEAD), "--resnet-weights", str(r50)]


@needs_head
def test_eval_writes_beside_a_checkpoint_outside_a_run(tiny_run, tmp_path, quick_eval):
    """eval --ckpt a/b/ck.pt writes its tables beside the checkpoint, in a/b/, and leaves a
    user's a/eval.md alone."""
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    (folder / "ck.pt").write_bytes((tiny_run / "checkpoints" / "last.pt").read_bytes())
    (tmp_path / "a" / "eval.md").write_text("mine")
    tools.main(["eval", "--ckpt", str(folder / "ck.pt"), *quick_eval])
    assert (tmp_path / "a" / "eval.md").read_text() == "mine"
    assert "| fine-tuned (tiny) |" in (folder / "eval.md").read_text()
    record = json.loads((folder / "eval.json").read_text())
    assert record["run"] == str(folder.resolve())


@needs_head
def test_eval_never_replaces_another_runs_tables(tiny_run, tmp_path, capsys, quick_eval):
    """eval --ckpt runA --out runB is refused in one line: runB's own eval.md stays, as does an
    eval.md that eval did not write. The same run evaluated again replaces its own tables."""
    run_a = copy_run(tiny_run, tmp_path / "run_a")
    run_b = copy_run(tiny_run, tmp_path / "run_b")
    quick = quick_eval
    tools.main(["eval", "--ckpt", str(run_b), *quick])
    before = (run_b / "eval.md").read_text()
    code, err = tools_main(["eval", "--ckpt", str(run_a), "--out", str(run_b), *quick], capsys)
    assert code == 2 and "is not an evaluation of" in one_line(err)
    assert (run_b / "eval.md").read_text() == before
    (run_a / "eval.md").write_text("a note of the user's")
    code, err = tools_main(["eval", "--ckpt", str(run_a), *quick], capsys)
    assert code == 2 and "a file of yours" in one_line(err)
    tools.main(["eval", "--ckpt", str(run_b), *quick])  # its own: replaced


def test_eval_device_cuda_without_a_gpu_is_one_line(tiny_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    code, err = tools_main(["eval", "--ckpt", str(tiny_run), "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: torch cannot use a CUDA GPU" in one_line(err)


def test_plot_without_args_json_or_into_a_read_only_run(tiny_run, tmp_path, capsys, read_only):
    """plot of a run without args.json titles the curve by the folder; a read-only run folder
    is one line that names --out, and --out writes the curve elsewhere."""
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "args.json").unlink()
    (run / "reward_curve.png").unlink(missing_ok=True)
    tools.main(["plot", str(run)])
    assert (run / "reward_curve.png").is_file()
    locked = read_only(copy_run(tiny_run, tmp_path / "locked"))
    code, err = tools_main(["plot", str(locked)], capsys)
    assert code == 2 and "cannot write" in one_line(err) and "pass --out" in one_line(err)
    tools.main(["plot", str(locked), "--out", str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").is_file()


# ---- Signals: every tool ends in one line

# eval, sending itself a signal as it starts sampling (a real signal, through the tool's handler)
SIGNAL_IN_EVAL = """import os, signal, sys, vargrpo as vg, vargrpo_tools as tools
real = vg.sample
def sample(*args, **kw):
    os.kill(os.getpid(), int(os.environ["SEND"]))
    return real(*args, **kw)
vg.sample = sample
tools.main(sys.argv[1:])
"""


@needs_head
def test_eval_and_prepare_say_one_line_on_sigterm(tiny_run, tmp_path, quick_eval):
    """SIGTERM during eval (as it samples) and during prepare: one line, exit 143, no traceback
    (both died silently, as SIGTERM's default does)."""
    script = tmp_path / "eval_signalled.py"
    script.write_text(SIGNAL_IN_EVAL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SEND": str(int(signal.SIGTERM))}
    res = subprocess.run([sys.executable, str(script), "eval", "--ckpt", str(tiny_run), "--out", str(tmp_path / "ev"),
                          *quick_eval], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    line = one_line(res.stderr)
    assert res.returncode == 143 and "eval interrupted by SIGTERM; eval.md and eval.json were not written" in line
    assert not (tmp_path / "ev" / "eval.md").exists()

    out = tmp_path / "weights"
    proc = subprocess.Popen([sys.executable, "vargrpo_tools.py", "prepare", "--quick", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "[prepare]" in proc.stdout.readline()  # at work
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=600)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "prepare interrupted by SIGTERM" in one_line(err), err[-2000:]
    assert [p.name for p in out.iterdir()] in ([], [".prepare-digits"])


# the demo, sending itself a signal as it draws its first picture
SIGNAL_IN_DEMO = """import os, signal, sys, vargrpo_tools as tools
real = tools.preview
def preview(*args, **kw):
    os.kill(os.getpid(), int(os.environ["SEND"]))
    return real(*args, **kw)
tools.preview = preview
tools.main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_during_its_pictures_says_the_run_is_saved(tmp_path, sig):
    """Ctrl-C / SIGTERM while the demo draws its pictures, after the training saved: the one
    line says the run and its checkpoint are saved (it said "nothing was saved")."""
    script = tmp_path / "demo_signalled.py"
    script.write_text(SIGNAL_IN_DEMO)
    run = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SEND": str(int(sig))}
    res = subprocess.run([sys.executable, str(script), "demo", *TINY, "--steps", "1", "--out", str(run)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    line = one_line(res.stderr)
    assert res.returncode == 128 + sig and "nothing was saved" not in line, res.stderr[-2000:]
    assert f"interrupted while drawing its pictures; the run and its checkpoint are saved in {run}" in line
    assert (run / "checkpoints" / "last.pt").is_file()
