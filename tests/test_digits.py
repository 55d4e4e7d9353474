"""The digits model: the rendered data, the training steps of the tokenizer, the judges and
the VAR, the shipped weights, prepare (its quick weights shared by the tests that follow it), and the
demo on them.

A test of a learned outcome (a training that lowers a loss, a judge
that beats chance, a demo that raises a reward) holds on any CPU: its
settings learn robustly and it checks a statistic with a margin. Its
seed is helpers.outcome_seed(its own): VARGRPO_TEST_SEED=N runs it on
another seed, a stand-in for another CPU's last bits; so does forcing
the kernels down with ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reward_models as rm
import vargrpo as vg
import vargrpo_tools as vt
from helpers import (DIGITS, TINY, copy_run, exit_and_stderr, flip_a_weight_bit, outcome_seed,
                     timeout)

ROOT = Path(vg.__file__).resolve().parent
WEIGHTS = ROOT / "weights"
# small batches, and fp32: on a CPU without bf16 units bf16 autocast is ~2x slower (the shipped
# recipe's bf16 is for CPUs that have them)
SMALL = replace(vt.DigitsRecipe(), tok_batch=8, judge_batch=64, var_batch=16, bf16=False)
CONFIG = vg.VARConfig.preset("digits")
# Subprocess timeouts (guards against a hang): >= 3x the time measured on 2 cores with the other one
# busy, one thread, and >= 600 s for anything that trains. Measured there: the quick preparation below
# 343 s, prepare --preset digits7 --quick 119 s, the demo on quick weights 24 s, the shipped demo 53 s.
PREPARE_TIMEOUT = timeout(1800)
REFUSAL_TIMEOUT = timeout(300)
DEMO_TIMEOUT = timeout(600)
SHIPPED_DEMO_TIMEOUT = timeout(3600)


def test_dataset_is_deterministic_balanced_and_varied():
    a_u8, a_y, a_bold = vt.render_digits(60, seed=5)
    b_u8, b_y, b_bold = vt.render_digits(60, seed=5)
    assert torch.equal(a_u8, b_u8) and torch.equal(a_y, b_y) and torch.equal(a_bold, b_bold)
    assert a_u8.shape == (60, 3, 64, 64) and a_u8.dtype == torch.uint8
    assert torch.bincount(a_y, minlength=10).tolist() == [6] * 10  # class-balanced
    c_u8, c_y, _ = vt.render_digits(60, seed=6)  # another seed: other images (the held-out split is seed + 998)
    assert not torch.equal(a_u8, c_u8) and not torch.equal(a_y, c_y)
    lum = a_u8.float().mean((1, 2, 3))
    assert lum.min() < 100 and lum.max() > 150  # light and dark backgrounds both occur
    assert (a_u8.float().std((2, 3)).mean(1) > 20).all()  # every image draws something (contrast)
    assert a_bold.min() >= 0.5 and a_bold.max() <= 2.2 and a_bold.std() > 0.2


@pytest.mark.slow
def test_tokenizer_training_reduces_reconstruction_error():
    seed = outcome_seed(2)
    r = replace(SMALL, seed=seed - 1)
    images, _, _ = vt.render_digits(128, seed=seed)
    held, _, _ = vt.render_digits(32, seed=seed + 1)
    x = vt.to_m11(held)

    def error(vae):
        with torch.no_grad():
            return F.mse_loss(vae.idx_to_img(vt.tokenize(vae, held)) * 2 - 1, x).item()
    start = vt.train_tokenizer(images, CONFIG, r, steps=1, log=lambda s: None)
    trained = vt.train_tokenizer(images, CONFIG, r, steps=60, log=lambda s: None)
    assert error(trained) < 0.6 * error(start), (error(start), error(trained))
    assert not any(p.requires_grad for p in trained.parameters())


@pytest.mark.slow
def test_var_training_reduces_cross_entropy():
    seed = outcome_seed(2)
    r = replace(SMALL, seed=seed - 1)
    images, labels, _ = vt.render_digits(200, seed=seed)
    vae = vt.train_tokenizer(images, CONFIG, r, steps=1, log=lambda s: None)
    idx_NL = vt.tokenize(vae, images)
    assert idx_NL.shape == (200, CONFIG.seq_len) and idx_NL.max() < CONFIG.vocab_size

    def ce(var):
        with torch.no_grad():
            return F.cross_entropy(var(labels[:64], idx_NL[:64]).flatten(0, 1), idx_NL[:64].flatten()).item()
    start = vt.train_var(vae, idx_NL, labels, CONFIG, r, steps=1, log=lambda s: None)
    trained = vt.train_var(vae, idx_NL, labels, CONFIG, r, steps=40, log=lambda s: None)
    assert ce(trained) < ce(start) - 0.5, (ce(start), ce(trained))


@pytest.mark.slow
def test_judge_beats_chance_on_held_out_digits():
    seed = outcome_seed(2)
    r = replace(SMALL, seed=seed - 1)
    images, labels, boldness = vt.render_digits(2000, seed=seed)
    held, held_y, held_bold = vt.render_digits(300, seed=seed + 998)
    judge = vt.train_judge(images, labels, boldness, r, steps=150)
    acc = vt.judge_accuracy(judge, held.float() / 255, held_y)
    assert acc > 0.5, acc  # chance: 0.1
    bold = judge(held.float() / 255)  # the reward: boldness in the training set's units
    assert torch.corrcoef(torch.stack([bold, held_bold]))[0, 1] > 0.5


@pytest.mark.slow
def test_second_judge_is_another_model_and_beats_chance():
    seed = outcome_seed(2)
    r = replace(SMALL, seed=seed - 1)
    images, labels, _ = vt.render_digits(2000, seed=seed + 2000)
    held, held_y, _ = vt.render_digits(300, seed=seed + 998)
    judge2 = vt.train_judge2(images, labels, r, steps=150)
    assert not isinstance(judge2, rm.DigitJudge) and vt.judge_accuracy(judge2, held.float() / 255, held_y) > 0.5


def test_digits7_has_a_horizon_and_its_own_files():
    config = vg.VARConfig.preset("digits7")
    assert config.image_size == 64 and config.num_scales == 7 and config.seq_len == 155
    vae = vg.VQVAE(config).eval()
    assert vt.img_to_idx(vae, torch.zeros(2, 3, 64, 64)).shape == (2, 155)  # 8x: an 8x8 last scale
    assert vt.DIGITS_RECIPES["digits"] == vt.DigitsRecipe()  # the shipped model's recipe is the default
    assert vt.digits_files(vt.DIGITS_RECIPES["digits"]) == vt.DIGITS_FILES
    assert vt.digits_files(vt.DIGITS_RECIPES["digits7"]) == {
        "vae": "vae_digits7.safetensors", "var": "var_digits7.safetensors",
        "judge": "judge_digits.safetensors", "judge2": "judge2_digits.safetensors"}


# ---- digit:correct, the label-aware reward (reward(images, labels)), and the second judge


def test_digit_correct_reads_the_asked_digit():
    """Labels reach the reward: the judge's probability of the asked digit is high for the drawn digit and
    low for another; its logged accuracy is the judge's top-1 on the asked digit."""
    images_u8, labels, _ = vt.render_digits(60, seed=5, res=32)
    images = images_u8.float() / 255
    reward = rm.build_reward("digit:correct", "cpu")
    right, logs = reward(images, labels, return_components=True)
    wrong = reward(images, (labels + 1) % 10)
    assert right.min() >= 0 and right.max() <= 1 and right.mean() > 0.9 and wrong.mean() < 0.1
    judge = rm.load_digit_judge()
    torch.testing.assert_close(right, judge.heads(images)[0].softmax(-1)[torch.arange(60), labels])
    read = judge.heads(images)[0].argmax(-1)
    assert torch.equal(logs["digit:correct/accuracy"], (read == labels).float())
    assert reward(images, (labels + 1) % 10, return_components=True)[1]["digit:correct/accuracy"].sum() == (read == (labels + 1) % 10).sum()


def test_sums_mix_label_aware_and_label_blind_rewards():
    images_u8, labels, _ = vt.render_digits(8, seed=6, res=32)
    images = images_u8.float() / 255
    total, parts = rm.build_reward("0.5*brightness+2*digit:correct+digit:bold", "cpu")(images, labels, return_components=True)
    expect = 0.5 * rm.luma(images) + 2 * rm.build_reward("digit:correct", "cpu")(images, labels) + rm.load_digit_judge()(images)
    torch.testing.assert_close(total, expect)
    assert {"brightness", "digit:correct", "digit:bold", "digit:correct/accuracy"} <= set(parts)
    blind = rm.build_reward("brightness+digit:bold", "cpu")
    assert not blind.needs_labels and torch.equal(blind(images), blind(images, labels))  # label-blind: labels ignored


def test_label_aware_reward_errors_are_one_line():
    images = torch.rand(4, 3, 32, 32)
    reward = rm.build_reward("brightness+digit:correct", "cpu")
    for labels, match in ((None, "scores an image against its class label: pass labels="),
                          (torch.arange(3), "4 images but labels of shape \\(3,\\); give one label per image"),
                          (torch.arange(8).view(4, 2), "4 images but labels of shape \\(4, 2\\)"),
                          (torch.tensor([0, 1, 2, 10]), "reads the digits 0-9; got labels 0..10")):
        with pytest.raises(ValueError, match=match) as e:
            reward(images, labels)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="digit:bold and digit:correct"):
        rm.build_reward("digit:wrong", "cpu")


def test_shipped_second_judge_reads_both_image_sizes():
    """judge2_digits.safetensors (built by prepare --preset digits7) serves the 32 px and the 64 px presets."""
    judge2 = rm.load_digit_judge2()
    for res in (32, 64):
        held, held_y, _ = vt.render_digits(200, seed=vt.DigitsRecipe().seed + 998, res=res)
        assert vt.judge_accuracy(judge2, held.float() / 255, held_y) >= 0.95, res
    with pytest.raises(FileNotFoundError, match="no second digits judge there"):
        rm.load_digit_judge2(path=WEIGHTS / "missing.safetensors")


# The files `vargrpo_tools.py prepare` wrote and the repository ships (weights/): their hashes, so that
# a changed file is noticed; keys and shapes are checked by loading them strictly.
SHIPPED_SHA256 = json.loads((WEIGHTS / "digits.json").read_text())["sha256"] if (WEIGHTS / "digits.json").is_file() else {}


def test_shipped_digits_weights_are_what_the_code_expects():
    assert set(SHIPPED_SHA256) == set(vt.DIGITS_FILES.values()), "weights/digits.json lists the shipped files"
    for name, digest in SHIPPED_SHA256.items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    assert sum((WEIGHTS / name).stat().st_size for name in SHIPPED_SHA256) < 20e6
    vae, var = vg.load_pretrained("digits")  # strict: every key, every shape
    judge = rm.load_digit_judge()
    assert var.config == CONFIG and sum(p.numel() for p in var.parameters()) > 1e6
    record = json.loads((WEIGHTS / "digits.json").read_text())
    assert vg.VARConfig(**record["config"]) == CONFIG and not record["quick"]  # (ch_mult came later: its default)
    res = record["results"]  # the quality bar, as measured by prepare on held-out data
    assert res["reconstruction_accuracy"] >= 0.9 and res["sample_accuracy_t1"] >= 0.8 and res["sample_accuracy_cfg"] >= 0.9
    held, held_y, _ = vt.render_digits(200, seed=vt.DigitsRecipe().seed + 998)  # and they still measure so here
    assert vt.judge_accuracy(judge, held.float() / 255, held_y) >= 0.95
    assert vt.judge_accuracy(judge, vae.idx_to_img(vt.tokenize(vae, held)), held_y) >= 0.85


def test_shipped_digits7_weights_are_what_the_code_expects():
    """The digits7 model (a horizon for VMR: 7 scales, 155 tokens): its files' sha256 as prepare recorded
    them, strict keys and shapes, its quality, and the shipped total under 30 MB."""
    record = json.loads((WEIGHTS / "digits7.json").read_text())
    files = vt.digits_files(vt.DIGITS_RECIPES["digits7"])
    assert set(record["sha256"]) == set(files.values()) and not record["quick"]
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    recipe = json.loads(json.dumps(vt.asdict(vt.DIGITS_RECIPES["digits7"])))
    added = {k: v for k, v in recipe.items() if k not in record["recipe"]}  # fields added since, at their defaults
    assert added == {"digits": 1, "save_every": 50, "reuse_judge2": False}
    assert record["recipe"] == {k: v for k, v in recipe.items() if k not in added}  # the recipe that built them
    vae, var = vg.load_pretrained("digits7")  # strict: every key, every shape
    assert var.config == vg.VARConfig.preset("digits7") == vg.VARConfig(**{**record["config"], "ch_mult": tuple(record["config"]["ch_mult"])})
    res = record["results"]
    assert res["reconstruction_accuracy"] >= 0.95 and 0.7 <= res["sample_accuracy_t1"] < 0.95  # room to improve
    assert res["judge2_sample_accuracy_t1"] >= 0.7
    held, held_y, _ = vt.render_digits(100, seed=vt.DigitsRecipe().seed + 998, res=64)
    assert vt.judge_accuracy(rm.load_digit_judge(), vae.idx_to_img(vt.tokenize(vae, held)), held_y) >= 0.9
    shipped = [p for p in WEIGHTS.iterdir() if p.suffix == ".safetensors"]
    assert sum(p.stat().st_size for p in shipped) < 30e6


def shipped_copy(folder: Path, record="digits.json") -> Path:
    """A copy of the shipped files of a digits preset and their record, in `folder`."""
    folder.mkdir()
    for name in [record, *json.loads((WEIGHTS / record).read_text())["sha256"]]:
        shutil.copy(WEIGHTS / name, folder / name)
    return folder


def cli(*args, timeout_s=REFUSAL_TIMEOUT, **kw):
    """A command in a fresh process (one thread): its CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, **kw)


def one_line(err: str, prog: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith(f"{prog}:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_weights_are_checked_against_their_record_when_they_load(tmp_path):
    """Silent: a changed byte in a shipped weights file trained normally. Every file that a
    <preset>.json beside it records is hashed when it loads (14 MB: cheap), naming the file."""
    folder = shipped_copy(tmp_path / "weights")
    for name in ("var_digits.safetensors", "judge_digits.safetensors"):
        data = bytearray((folder / name).read_bytes())
        data[-1] ^= 1
        (folder / name).write_bytes(bytes(data))
    with pytest.raises(vg.CheckpointError, match=f"{folder / 'var_digits.safetensors'} is not the file .*digits.json records"):
        vg.load_pretrained("digits", weights_dir=folder)
    with pytest.raises(ValueError, match="judge_digits.safetensors is not the file"):
        rm.load_digit_judge(weights_dir=folder)
    res = cli("vargrpo.py", "train", "--preset", "digits", "--weights-dir", str(folder), "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "var_digits.safetensors is not the file" in one_line(res.stderr, "vargrpo")
    assert not (tmp_path / "run").exists()
    for record in WEIGHTS.glob("*.json"):  # the shipped files pass the same check
        for name in json.loads(record.read_text()).get("sha256", {}):
            rm.check_recorded_sha256(WEIGHTS / name)


def test_a_weight_file_holding_inf_is_blamed_on_the_file(tmp_path):
    """Fault: a weights file (without a record) holding inf: it was blamed on the learning rate."""
    from safetensors.torch import load_file, save_file
    folder = shipped_copy(tmp_path / "weights")
    (folder / "digits.json").unlink()
    state = load_file(str(folder / "var_digits.safetensors"))
    state["head.weight"][0, 0] = float("inf")
    save_file(state, str(folder / "var_digits.safetensors"))
    res = cli("vargrpo.py", "train", "--preset", "digits", "--weights-dir", str(folder), "--out", str(tmp_path / "run"))
    line = one_line(res.stderr, "vargrpo")
    assert res.returncode == 2 and "var_digits.safetensors: head.weight holds inf or NaN" in line and "--lr" not in line


@pytest.mark.parametrize("record", ["removed", "not JSON"])
def test_a_missing_or_unreadable_record_is_said_once(tmp_path, capsys, record):
    """Silent: without weights/digits.json, or with one that is not JSON, a changed
    var_digits.safetensors trained without a word. A weights folder whose record is missing
    or unreadable says so once, in one line (three files load from it), and the run records
    the sha256 of what it loaded."""
    folder = shipped_copy(tmp_path / "weights")
    flip_a_weight_bit(folder / "var_digits.safetensors")
    if record == "removed":
        (folder / "digits.json").unlink()
    else:
        (folder / "digits.json").write_text('{"sha256": {"var_digits.safetensors": ')
    run = tmp_path / "run"
    train = ["train", *DIGITS, "--weights-dir", str(folder), "--out", str(run), "--steps", "1"]
    code, err = exit_and_stderr(vg.main, train, capsys)
    said = [l for l in err.splitlines() if str(folder.resolve()) in l]
    why = {"removed": "no <preset>.json there records it",
           "not JSON": "digits.json is not readable JSON"}[record]
    assert code == 0 and len(said) == 1, err
    assert said[0].startswith("[vargrpo]") and why in said[0]
    changed = hashlib.sha256((folder / "var_digits.safetensors").read_bytes()).hexdigest()
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["weights"]["VAR"]["sha256"] == changed


def test_a_pth_beside_the_recorded_safetensors_is_resolved_by_the_record(tmp_path, capsys):
    """Silent: a var_digits.pth (ignored by git) beside the recorded var_digits.safetensors
    won, never hashed: the run's pre-trained model and KL reference changed. The record
    decides which of the two loads, and only the file it names loads; with no record, two
    candidates are refused in one line naming both."""
    from safetensors.torch import load_file
    folder = shipped_copy(tmp_path / "weights")
    shipped = load_file(str(folder / "var_digits.safetensors"))
    other = {**shipped, "head.bias": shipped["head.bias"] + 0.5}
    torch.save(other, folder / "var_digits.pth")
    _, var = vg.load_pretrained("digits", weights_dir=folder)
    assert torch.equal(var.head.bias, shipped["head.bias"])
    (folder / "var_digits.safetensors").rename(tmp_path / "away.safetensors")
    with pytest.raises(vg.CheckpointError, match="var_digits.pth is not the file .*digits.json records"):
        vg.load_pretrained("digits", weights_dir=folder)  # only the file the record names

    (tmp_path / "away.safetensors").rename(folder / "var_digits.safetensors")
    (folder / "digits.json").unlink()
    run = tmp_path / "run"
    train = ["train", *DIGITS, "--weights-dir", str(folder), "--out", str(run), "--steps", "1"]
    code, err = exit_and_stderr(vg.main, train, capsys)
    line = one_line(err, "vargrpo")
    assert code == 2 and f"{folder} holds both var_digits.pth and var_digits.safetensors" in line
    assert not run.exists()


def test_a_missing_weight_file_is_named_as_prepare_writes_it(tmp_path):
    with pytest.raises(vg.CheckpointError, match="vae_none.safetensors \\(or vae_none.pth\\) is not in"):
        vg.find_or_download("vae_none.pth", tmp_path)


def test_prepare_out_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    res = cli("vargrpo_tools.py", "prepare", "--quick", "--out", str(tmp_path / "a_file"))
    assert res.returncode == 2 and "is a file" in one_line(res.stderr, "vargrpo_tools") and "[prepare]" not in res.stdout


def test_prepare_ctrl_c_says_one_line(tmp_path):
    """Ctrl-C during prepare: exit 130, one line, no traceback, no model file written in --out
    (at most the progress it goes on from when run again)."""
    out = tmp_path / "weights"
    proc = subprocess.Popen([sys.executable, "vargrpo_tools.py", "prepare", "--quick", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert "[prepare]" in proc.stdout.readline()  # at work
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=REFUSAL_TIMEOUT)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "prepare interrupted by Ctrl-C" in one_line(err, "vargrpo_tools")
    assert [p.name for p in out.iterdir()] in ([], [".prepare-digits"])


# prepare, killed (SIGKILL) as soon as it has written its first file (the VQVAE), at 1 step of each part
KILLED_PREPARE = ("import dataclasses, os, signal, sys, safetensors.torch, vargrpo_tools as vt\n"
                  "vt.DIGITS_RECIPES['digits'] = dataclasses.replace(vt.DigitsRecipe(), quick_steps=(1, 1, 1), bf16=False)\n"
                  "real = safetensors.torch.save_file\n"
                  "def save_then_die(*args, **kw):\n"
                  "    real(*args, **kw)\n"
                  "    os.kill(os.getpid(), signal.SIGKILL)\n"
                  "safetensors.torch.save_file = save_then_die\n"
                  "vt.main(sys.argv[1:])\n")


@pytest.mark.slow
def test_prepare_killed_after_the_vqvae_leaves_no_mixed_model(tmp_path):
    """Loss: `prepare --overwrite` killed right after writing the VQVAE left it beside the old VAR, judge and
    digits.json, and that mixed model loaded (eval reported 10% accuracy). Now the files are replaced
    together, and a mix would be refused at load by the recorded hashes."""
    folder = shipped_copy(tmp_path / "weights")
    res = cli("-c", KILLED_PREPARE, "prepare", "--quick", "--overwrite", "--out", str(folder), timeout_s=PREPARE_TIMEOUT)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    record = json.loads((folder / "digits.json").read_text())["sha256"]
    consistent = all(hashlib.sha256((folder / n).read_bytes()).hexdigest() == h for n, h in record.items())
    try:
        vg.load_pretrained("digits", weights_dir=folder)
        rm.load_digit_judge(weights_dir=folder)
        loaded = True
    except (vg.CheckpointError, ValueError):
        loaded = False
    assert consistent and loaded or not loaded, "a mixed model loads"
    assert consistent  # killed before the renames: the old model, whole


# `prepare --quick` with fewer steps, in fp32 (on a CPU without bf16 units ~2x faster): the
# files, the record and the loading are what the tests below read, not the model's quality
# (the shipped model's demo is test_demo_on_the_shipped_digits_model)
QUICK_PREPARE = ("import dataclasses, sys, vargrpo_tools as vt\n"
                 "quick = dataclasses.replace(vt.DigitsRecipe(), quick_steps=(10, 10, 10), bf16=False)\n"
                 "vt.DIGITS_RECIPES['digits'] = quick\n"
                 "vt.main(sys.argv[1:])\n")


@pytest.fixture(scope="session")
def quick_weights(tmp_path_factory):
    """`vargrpo_tools.py prepare --quick` (a few steps of each part) into a folder, once for the
    tests that use it: (the folder, prepare's stdout)."""
    out = tmp_path_factory.mktemp("quick") / "weights"
    res = subprocess.run([sys.executable, "-c", QUICK_PREPARE, "prepare", "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=PREPARE_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


@pytest.mark.slow
def test_prepare_quick_writes_the_files_it_records(quick_weights):
    out, stdout = quick_weights
    record = json.loads((out / "digits.json").read_text())
    assert record["quick"] and set(record["sha256"]) == set(vt.DIGITS_FILES.values())
    for name, digest in record["sha256"].items():
        assert f"wrote {out / name}" in stdout
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    vae, var = vg.load_pretrained("digits", weights_dir=out)  # strict: every key, every shape
    assert var.config == CONFIG


def test_prepare_refuses_a_folder_that_holds_its_files(tmp_path):
    out = tmp_path / "weights"
    out.mkdir()
    (out / vt.DIGITS_FILES["var"]).write_bytes(b"a model someone made")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = subprocess.run([sys.executable, "vargrpo_tools.py", "prepare", "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=REFUSAL_TIMEOUT)
    assert res.returncode == 2 and "already holds" in res.stderr and "--overwrite" in res.stderr, res.stderr[-2000:]
    assert vt.DIGITS_FILES["var"] in res.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced


@pytest.fixture(scope="session")
def quick_demo(quick_weights, tmp_path_factory):
    """The demo (2 steps) on the quick weights, through --weights-dir: its run folder."""
    out, _ = quick_weights
    run = tmp_path_factory.mktemp("demo") / "demo"
    seed = str(outcome_seed(0))
    flags = ["--weights-dir", str(out), "--out", str(run),
             "--steps", "2", "--seed", seed, "--save-every", "1"]
    res = subprocess.run([sys.executable, "vargrpo_tools.py", "demo", *flags],
                         cwd=ROOT, capture_output=True, text=True,
                         timeout=DEMO_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_demo_finds_its_judges_before_training(tmp_path, monkeypatch, capsys):
    """Fault: the judge's file missing: the demo trained, then raised FileNotFoundError."""
    monkeypatch.setattr(rm, "DIGIT_JUDGE", tmp_path / "gone" / "judge_digits.safetensors")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        vt.main(["demo", "--out", str(tmp_path / "demo")])
    assert e.value.code == 2 and "no digits judge there" in one_line(capsys.readouterr().err, "vargrpo_tools")
    assert not (tmp_path / "demo").exists()


def test_demo_resume_advice_names_only_flags_given(tiny_run, tmp_path, capsys):
    """The demo's default --out (runs/demo) is no flag the user gave: resume advice never says to drop it."""
    run = copy_run(tiny_run, tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        vt.main(["demo", "--resume", str(run)])
    line = one_line(capsys.readouterr().err, "vargrpo_tools")
    assert e.value.code == 2 and "is at step 2 already" in line and "--out" not in line


@pytest.mark.slow
def test_demo_sigterm_saves_and_exits_143(tmp_path):
    run = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "vargrpo_tools.py", "demo", "--out", str(run), "--steps", "1000",
                             "--image-every", "0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + DEMO_TIMEOUT
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=DEMO_TIMEOUT)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "stopped after step" in one_line(err, "vargrpo_tools"), err[-2000:]
    assert (run / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_demo_runs_on_prepared_weights_through_weights_dir(quick_demo):
    """The demo reads the folder --weights-dir names (the quick weights): it trains its steps,
    measures its fixed samples before and after, and draws its pictures."""
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert summary["steps"] == 2, summary
    for key in ("reward_before", "reward_after", "class_acc_before", "class_acc_after"):
        assert 0 <= summary[key] <= 1, summary
    assert json.loads((quick_demo / "args.json").read_text())["weights_dir"]
    assert all((quick_demo / f).is_file() for f in ("before.png", "after.png", "reward_curve.png"))


@pytest.mark.slow
def test_eval_of_the_demo_on_quick_weights(quick_demo, quick_weights):
    """Table 1 columns of the digits model, at its inference settings."""
    out, _ = quick_weights
    vt.main(["eval", "--ckpt", str(quick_demo), "--weights-dir", str(out), "--samples-per-class", "3", "--batch", "15"])
    res = json.loads((quick_demo / "eval.json").read_text())
    assert {k: res["settings"][k] for k in vt.DIGITS_CFG} == vt.DIGITS_CFG
    assert [(r["model"], r["images"]) for r in res["results"]] == [("pre-trained", 30), ("fine-tuned", 30)]
    assert all(0 <= r["judge_accuracy"] <= 1 and 0 <= r["reward"] <= 1 for r in res["results"])
    assert "| model | labels | images | reward `brightness` | judge class accuracy |" in (quick_demo / "eval.md").read_text()


@pytest.mark.slow
def test_demo_on_the_shipped_digits_model(tmp_path):
    """Acceptance of `bash run.sh demo` on a seed the README does not report: the mean reward of the
    last 3 steps is >= 0.15 above the first step's, and the judge still reads >= 80% of the digits."""
    run = tmp_path / "demo"
    seed = str(outcome_seed(3))
    flags = ["--seed", seed, "--out", str(run)]
    res = subprocess.run(["bash", "run.sh", "demo", *flags], cwd=ROOT,
                         capture_output=True, text=True,
                         timeout=SHIPPED_DEMO_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == vt.DEMO_FLAGS["steps"] and "mean reward: first step" in res.stdout
    assert summary["reward_last"] - summary["reward_first"] >= 0.15, summary
    assert summary["class_acc_after"] >= 0.8, summary
    assert summary["class_acc2_after"] >= 0.8, summary  # the second judge agrees


@pytest.mark.slow
def test_demo_digit_correct_on_digits7_raises_both_judges(tmp_path):
    """On the model with room above its 86.5% T=1 accuracy, 20 steps of
    `demo --reward digit:correct`, read on the demo's 200 fixed samples
    (the same labels and seed before and after): the reward rises by
    >= 0.04 and both judges read more of the asked digits. Measured on
    seeds 0-3 (on an AVX2 CPU, one thread): the reward
    +0.083 to +0.117, the judge +0.065 to +0.125, the second judge
    +0.040 to +0.135. One step's 32 samples are too few to compare the
    first step with the last (0.875 -> 0.990 on seed 0, 0.781 -> 0.917
    on seed 3)."""
    run = tmp_path / "demo"
    seed = str(outcome_seed(0))
    flags = ["--preset", "digits7", "--reward", "digit:correct",
             "--steps", "20", "--seed", seed, "--out", str(run)]
    res = subprocess.run(["bash", "run.sh", "demo", *flags], cwd=ROOT,
                         capture_output=True, text=True,
                         timeout=SHIPPED_DEMO_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    rise = summary["reward_after"] - summary["reward_before"]
    assert rise >= 0.04, summary
    assert summary["class_acc_after"] > summary["class_acc_before"], summary
    assert summary["class_acc2_after"] > summary["class_acc2_before"], summary


def test_prepare_never_replaces_a_file_another_record_lists(tmp_path):
    """prepare --preset digits --overwrite into a folder that also holds digits7 would replace
    judge_digits.safetensors, which digits7.json records too: refused before any work, in one
    line naming the file and the record."""
    folder = tmp_path / "weights"
    folder.mkdir()
    record = json.loads((WEIGHTS / "digits7.json").read_text())
    for name in ["digits7.json", *record["sha256"]]:
        shutil.copy(WEIGHTS / name, folder / name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = cli("vargrpo_tools.py", "prepare", "--quick", "--overwrite", "--out", str(folder))
    line = one_line(res.stderr, "vargrpo_tools")
    assert res.returncode == 2 and "judge_digits.safetensors is part of the model" in line
    assert "digits7.json" in line and "[prepare]" not in res.stdout
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
