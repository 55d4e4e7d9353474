"""Settings and fixtures shared by test_vargrpo.py and tests/: the suite on the CPU (the GPU tier
apart), one thread per test process, and artefacts several tests read, built once per session.

The suite runs on the CPU, also on a machine with GPUs: its tolerances are fp32's, and its
two-process tests would otherwise put NCCL ranks on GPUs that are not there. `pytest -m gpu` (bash
run.sh test -m gpu) alone shows the tests the GPU: the tests marked `gpu` (tests/test_gpu.py), on
one GPU. torch is imported only once that is decided (pytest_configure), so that
CUDA_VISIBLE_DEVICES is set before it loads; the trainers the tests start inherit it."""
import os

import pytest

# One thread per process, here and in the trainers the tests start: the tests' models are tiny and
# gain nothing from more, and on a machine whose cores are busy (a training run beside the tests)
# threads waiting on each other cost far more: 5 steps of the digits tokenizer took 94 s with 2
# threads and 11 s with 1, on 2 cores with one busy. VARGRPO_TEST_THREADS=N sets another count.
THREADS = os.environ.get("VARGRPO_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS

# why this run skips the gpu tests ("" when it runs them; set by pytest_configure)
gpu_skip_reason = ""


def pytest_configure(config):
    """The GPU hidden unless the run is the GPU tier (-m gpu), then torch imported."""
    global gpu_skip_reason
    gpu_run = config.getoption("markexpr", "").strip() == "gpu"
    if not gpu_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        gpu_skip_reason = "the suite runs on the CPU; `bash run.sh test -m gpu` runs them on a GPU"

    import torch
    torch.set_num_threads(int(THREADS))

    if gpu_run and not torch.cuda.is_available():
        import vargrpo_run as vr
        gpu_skip_reason = f"no usable CUDA GPU ({vr.why_no_cuda()})"


def pytest_collection_modifyitems(config, items):
    """Each gpu test skipped, with the reason, where this run does not run them."""
    if not gpu_skip_reason:
        return

    skip = pytest.mark.skip(reason=gpu_skip_reason)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line where gpu tests were skipped: why. (Read from the skip reasons: under
    pytest-xdist the workers collect, not this process.)"""
    skipped = terminalreporter.stats.get("skipped", [])
    gpu = [r for r in skipped if gpu_skip_reason
           and str(r.longrepr[-1]).endswith(gpu_skip_reason)]
    if gpu:
        terminalreporter.write_line(f"{len(gpu)} gpu tests skipped: {gpu_skip_reason}")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 2-step run of the tiny preset (TINY settings, a checkpoint and a grid at every
    step). Read it; a test that changes a run works on a copy (helpers.copy_run)."""
    import vargrpo as vg
    from helpers import TINY

    run = tmp_path_factory.mktemp("shared") / "tiny_run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "2", "--save-every", "1"])
    return run


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A finished 2-step run of the digits preset on the shipped weights, its reward the digits
    judge's (DIGITS settings, a checkpoint at every step): a run that records three weights files.
    Read it; a test that changes a run works on a copy (helpers.copy_run)."""
    import vargrpo as vg
    from helpers import DIGITS

    run = tmp_path_factory.mktemp("shared") / "digits_run"
    vg.main(["train", *DIGITS, "--out", str(run), "--steps", "2", "--save-every", "1"])
    return run
