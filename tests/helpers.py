"""Shared by the tests: the hypothesis profile, paths to ../shared, small random models, run helpers,
subprocess timeouts."""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip is imported: no ~45 s of hub retries

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings, strategies as st

import vargrpo as vg

ROOT = Path(vg.__file__).resolve().parent
# CI: no shrinking (a failing property test can shrink for minutes and, for big tensors, exhaust memory);
# HYPOTHESIS_PROFILE=dev shrinks failures to a minimal example.
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "official_var_tiny.pt"
LAYOUTS = SHARED / "fixtures" / "official_var_layouts.json"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason="../shared/fixtures absent")
needs_layouts = pytest.mark.skipif(not LAYOUTS.is_file(), reason="../shared/fixtures absent")
HEAD = SHARED / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
needs_head = pytest.mark.skipif(not HEAD.is_file(), reason="../shared/weights absent")


def randomize_(var: vg.VAR, seed: int, std: float = 0.15):
    """Overwrite every VAR weight with N(0, std) noise (seeded): the official init starts every
    block at ~identity (gamma 1e-5), which would make context-dependence tests vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in var.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + (math.log(4.0) if "scale_mul" in name else 0.0))
    return var


def random_model(patch_nums=(1, 2, 3), depth=1, vocab=32, seed=0, num_classes=5, randomize=True):
    config = vg.VARConfig(depth=depth, patch_nums=tuple(patch_nums), vocab_size=vocab, z_channels=4,
                          vae_ch=32, num_classes=num_classes)
    vae, var = vg.build_vae_var(config, seed=seed)
    return vae, (randomize_(var, seed) if randomize else var)


patch_nums_st = st.lists(st.integers(1, 5), min_size=2, max_size=4, unique=True).map(lambda xs: tuple(sorted(xs)))


def labels_for(var, B, seed):
    return torch.randint(0, var.config.num_classes, (B,), generator=torch.Generator().manual_seed(seed))


TINY = ["--preset", "tiny", "--reward", "brightness", "--labels-per-step", "2", "--group-size", "4",
        "--minibatch", "4", "--lr", "1e-3", "--beta", "0.05", "--temperature", "1.0", "--image-every", "1"]


def read_metrics(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def policy_state(run):
    return torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=True)


def copy_run(run, dest):
    """A copy of a finished run (the session's tiny_run) that a test may change; --resume of the copy
    writes into the copy (a resumed run's folder is the one given)."""
    shutil.copytree(run, dest)
    return Path(dest)


# A timeout in a test guards against a hang, not against slowness: each is >= 3x the time measured on
# a loaded 2-core machine (and >= 600 s for anything that trains); VARGRPO_TEST_TIMEOUT_SCALE=N
# multiplies them all on a slower machine.
TIMEOUT_SCALE = float(os.environ.get("VARGRPO_TEST_TIMEOUT_SCALE", "1"))


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def outcome_seed(default: int) -> int:
    """The seed of a test of a learned outcome: its own (default), or
    VARGRPO_TEST_SEED, to re-run it on other trajectories (a stand-in for
    another CPU's last bits)."""
    return int(os.environ.get("VARGRPO_TEST_SEED", default))


def normalise_rows(w_NL):
    """Each row divided by its sum (an all-zero row stays 0), through vg.token_weights."""
    N, L = w_NL.shape
    return vg.token_weights(torch.ones(L), torch.ones(L), w_NL, torch.ones(N))


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder): that folder made read-only by a read-only bind mount (which binds root as
    well; skipped where mounting is not allowed)."""
    mounts = []

    def make(folder):
        if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount here")
        mounts.append(folder)
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount read-only here")
        return folder
    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def exit_and_stderr(main, argv, capsys):
    """main(argv) in this process: (its exit code, its stderr)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def tmpfs(folder, size: str):
    """A tmpfs of `size` mounted at `folder` (made here), unmounted when the generator resumes; skips
    the test where mounting is not allowed (it needs root)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


DIGITS = ["--preset", "digits", "--reward", "digit:correct", "--labels-per-step", "2",
          "--group-size", "2", "--minibatch", "4"]


def another_preparation(folder: Path) -> Path:
    """A copy of the shipped digits files in `folder` whose VAR comes from another
    preparation: other weights, recorded in its own digits.json (the folder is consistent in
    itself)."""
    import hashlib
    from safetensors.torch import load_file, save_file
    folder.mkdir()
    record = json.loads((ROOT / "weights" / "digits.json").read_text())
    for name in record["sha256"]:
        shutil.copy(ROOT / "weights" / name, folder / name)
    state = load_file(str(folder / "var_digits.safetensors"))
    state["head.weight"] = state["head.weight"] * 1.5  # sharper logits: another distribution
    save_file(state, str(folder / "var_digits.safetensors"))
    data = (folder / "var_digits.safetensors").read_bytes()
    record["sha256"]["var_digits.safetensors"] = hashlib.sha256(data).hexdigest()
    (folder / "digits.json").write_text(json.dumps(record))
    return folder


def flip_a_weight_bit(path: Path):
    """One bit flipped in the lowest byte of a float32 inside the largest tensor of a .pt (a
    zip of uncompressed storages) or a .safetensors file: the weight stays finite, a little
    changed."""
    import struct
    import zipfile
    data = bytearray(path.read_bytes())
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as z:
            storages = [i for i in z.infolist() if "/data/" in i.filename]
        info = max(storages, key=lambda i: i.file_size)
        local = info.header_offset  # a local file header: 30 bytes, the name, the extra field
        name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
        start = local + 30 + name_len + extra_len
    else:
        header_len = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + header_len])
        offsets = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        begin, end = max(offsets, key=lambda o: o[1] - o[0])
        start = 8 + header_len + begin
    data[start + 16] ^= 1
    path.write_bytes(bytes(data))


def save_edited(ckpt: dict, path: Path):
    """An edited run checkpoint saved with the checksum that a save of these contents
    records (vargrpo_run.state_sha256): a checkpoint another run could have written. The old
    file is removed first (last.pt is a hard link to a step's file)."""
    import vargrpo_run as vr
    body = {k: v for k, v in ckpt.items() if k != "sha256"}
    Path(path).unlink(missing_ok=True)
    torch.save({**body, "sha256": vr.state_sha256(body)}, path)
