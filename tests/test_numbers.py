"""The numbers model (prepare --preset numbers): two-digit numbers 00-99 drawn by a VAR, the
class being the number. Its rendered data, the judges reading one half of the image each,
and a preparation that goes on where it stopped (the shipped weights take hours on one
thread, so prepare saves its progress)."""
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import reward_models as rm
import vargrpo as vg
import vargrpo_tools as vt
from helpers import timeout

ROOT = Path(vg.__file__).resolve().parent
RECIPE = vt.DIGITS_RECIPES["numbers"]
# guards against a hang: prepare --preset numbers --quick took 196 s here on 2 busy cores
PREPARE_TIMEOUT = timeout(1800)
REFUSAL_TIMEOUT = timeout(300)


def cli(*args, timeout_s=REFUSAL_TIMEOUT):
    """A command in a fresh process (one thread): its CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout_s, env=env,
    )


def test_numbers_are_rendered_as_two_digits_that_the_judge_reads():
    """Labels 0-99, balanced; deterministic from the seed; the first digits judge reads the
    tens in the left half and the units in the right half of (nearly) every render."""
    images_u8, labels, _ = vt.render_digits(300, seed=RECIPE.seed + 998, digits=2)
    again_u8, again, _ = vt.render_digits(300, seed=RECIPE.seed + 998, digits=2)
    assert torch.equal(images_u8, again_u8) and torch.equal(labels, again)
    assert labels.min() == 0 and labels.max() == 99
    assert torch.bincount(labels, minlength=100).tolist() == [3] * 100

    judge = rm.load_digit_judge()
    tens, units = vt.halves(images_u8.float() / 255)
    assert tens.shape == units.shape == (300, 3, 40, 40)
    assert vt.judge_accuracy(judge, tens, labels // 10) >= 0.97
    assert vt.judge_accuracy(judge, units, labels % 10) >= 0.97


def test_prepare_ocr_figures_read_renders_and_not_blanks():
    """prepare's OCR figures of the numbers: word accuracy and NED near 1 on renders of the
    asked numbers, 0 on blank images (nothing read), and near 0 on renders scored against
    their digits swapped ('12' read where '21' was asked is two edits: NED 0)."""
    images_u8, labels, _ = vt.render_digits(40, seed=5, digits=2)
    images = images_u8.float() / 255

    right = vt.ocr_figures(images, labels, "r")
    blank = vt.ocr_figures(torch.zeros_like(images), labels, "b")
    swapped = (labels % 10) * 10 + labels // 10
    other = swapped != labels
    wrong = vt.ocr_figures(images[other], swapped[other], "w")

    assert right["r_word_accuracy"] >= 0.95 and right["r_ned"] >= 0.97
    assert blank == {"b_word_accuracy": 0.0, "b_ned": 0.0}
    assert wrong["w_word_accuracy"] <= 0.05 and wrong["w_ned"] <= 0.1


def test_numbers_preset_shapes():
    config = vg.VARConfig.preset("numbers")
    digits7 = vg.VARConfig.preset("digits7")
    assert config.num_classes == 100 and config.image_size == 64
    assert replace(config, num_classes=10) == digits7
    files = vt.digits_files(RECIPE)
    assert files == {
        "vae": "vae_numbers.safetensors",
        "var": "var_numbers.safetensors",
        "judge": "judge_digits.safetensors",
        "judge2": "judge2_numbers.safetensors",
    }


class Killed(Exception):
    """Stands in for a kill in the middle of a training part."""


def kill_after_saves(monkeypatch, n: int):
    """save_progress writes its file, and the n-th call then 'kills' the process."""
    real = vt.save_progress
    calls = []

    def save_then_kill(path, state):
        real(path, state)
        calls.append(path)
        if len(calls) == n:
            raise Killed

    monkeypatch.setattr(vt, "save_progress", save_then_kill)


def small_var_data(n: int = 64):
    config = vg.VARConfig.preset("tiny")
    vae, _ = vg.build_vae_var(config, seed=0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(config.vocab_size, (n, config.seq_len), generator=g)
    labels = torch.randint(config.num_classes, (n,), generator=g)
    return vae, idx, labels, config


def test_train_var_goes_on_bit_exact_after_a_kill(tmp_path, monkeypatch):
    """A VAR training killed after its first save, run again with the same progress file,
    ends with exactly the weights of an uninterrupted run (weights, AdamW state and the batch
    generator are saved)."""
    vae, idx, labels, config = small_var_data()
    recipe = replace(RECIPE, var_batch=8, save_every=2)
    whole = vt.train_var(vae, idx, labels, config, recipe, steps=6, log=str)

    progress = tmp_path / "var.pt"
    with monkeypatch.context() as patch:
        kill_after_saves(patch, 1)
        with pytest.raises(Killed):
            vt.train_var(vae, idx, labels, config, recipe, steps=6, log=str, progress=progress)
    assert torch.load(progress, weights_only=True)["step"] == 2
    messages = []
    resumed = vt.train_var(vae, idx, labels, config, recipe, steps=6, log=messages.append, progress=progress)
    assert "going on from step 2" in messages[0]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_train_tokenizer_goes_on_bit_exact_after_a_kill(tmp_path, monkeypatch):
    """Likewise the tokenizer, killed once it quantizes (its code usage is saved too)."""
    config = vg.VARConfig(depth=1, patch_nums=(1, 2, 4), vocab_size=32, z_channels=4,
                          vae_ch=32, num_classes=100, ch_mult=(1, 1, 2))  # 16 px
    images_u8, _, _ = vt.render_digits(48, seed=3, res=16, digits=2)
    recipe = replace(RECIPE, tok_batch=4, save_every=3, tok_restart_every=4)
    whole = vt.train_tokenizer(images_u8, config, recipe, steps=8, log=str)

    progress = tmp_path / "tokenizer.pt"
    with monkeypatch.context() as patch:
        kill_after_saves(patch, 2)
        with pytest.raises(Killed):
            vt.train_tokenizer(images_u8, config, recipe, steps=8, log=str, progress=progress)
    saved = torch.load(progress, weights_only=True)
    assert saved["step"] == 6 and saved["quantizing"]
    resumed = vt.train_tokenizer(images_u8, config, recipe, steps=8, log=str, progress=progress)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_prepare_refuses_progress_made_with_other_settings(tmp_path):
    out = tmp_path / "weights"
    work = out / ".prepare-numbers"
    work.mkdir(parents=True)
    (work / "plan.json").write_text(json.dumps({"recipe": {}, "quick": True}))
    res = cli("vargrpo_tools.py", "prepare", "--preset", "numbers", "--quick", "--out", str(out))
    lines = [l for l in res.stderr.splitlines() if l.startswith("vargrpo_tools:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
    assert "progress of a prepare with other settings" in lines[0]
    assert sorted(p.name for p in work.iterdir()) == ["plan.json"]  # left as it was


# prepare, killed (SIGKILL) right after the tokenizer's last progress save: its first part
KILLED_AFTER_TOKENIZER = (
    "import os, signal, sys, vargrpo_tools as vt\n"
    "real = vt.save_progress\n"
    "def save(path, state):\n"
    "    real(path, state)\n"
    "    if path.name == 'tokenizer.pt' and state['step'] == 30:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "vt.save_progress = save\n"
    "vt.main(sys.argv[1:])\n"
)


@pytest.mark.slow
def test_prepare_numbers_quick_killed_then_run_again_completes(tmp_path):
    """prepare --preset numbers --quick, killed after its first part (the tokenizer), leaves
    its model files unwritten and its progress; run again, it goes on from there and writes a
    model that loads strictly, files that match numbers.json, figures in range; the progress
    folder is gone."""
    out = tmp_path / "weights"
    argv = ["prepare", "--preset", "numbers", "--quick", "--out", str(out)]
    res = cli("-c", KILLED_AFTER_TOKENIZER, *argv, timeout_s=PREPARE_TIMEOUT)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == [".prepare-numbers"]
    saved = sorted(p.name for p in (out / ".prepare-numbers").iterdir())
    assert saved == ["plan.json", "tokenizer.pt"]

    res = cli("vargrpo_tools.py", *argv, timeout_s=PREPARE_TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "going on from" in res.stdout and "saved: tokenizer" in res.stdout
    assert "tokenizer: going on from step 30" in res.stdout
    assert not (out / ".prepare-numbers").exists()

    record = json.loads((out / "numbers.json").read_text())
    assert record["quick"] and set(record["sha256"]) == set(vt.digits_files(RECIPE).values())
    for name in record["sha256"]:
        rm.check_recorded_sha256(out / name)
    vae, var = vg.load_pretrained("numbers", weights_dir=out)  # strict keys and shapes
    assert var.config == vg.VARConfig.preset("numbers")
    rm.load_digit_judge2(out / "judge2_numbers.safetensors")
    judge = out / vt.digits_files(RECIPE)["judge"]
    assert judge.read_bytes() == rm.DIGIT_JUDGE.read_bytes()  # reused
    results = record["results"]
    halves = [k for k in results if k.endswith(("_tens", "_units"))]
    assert len(halves) == 16
    assert all(0 <= results[k] <= 1 for k in halves)
    ocr = [k for k in results if k.startswith("ocr_")]
    assert len(ocr) == 4 and all(0 <= results[k] <= 1 for k in ocr)
    assert results["judge_accuracy_heldout_tens"] >= 0.9  # the shipped judge, on renders
