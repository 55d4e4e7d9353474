"""Settings and fixtures shared by test_vargrpo.py and tests/: one thread per test process, and
artefacts several tests read, built once per session."""
import os

import pytest
import torch

import vargrpo as vg
from helpers import TINY

# One thread per process, here and in the trainers the tests start: the tests' models are tiny and
# gain nothing from more, and on a machine whose cores are busy (a training run beside the tests)
# threads waiting on each other cost far more: 5 steps of the digits tokenizer took 94 s with 2
# threads and 11 s with 1, on 2 cores with one busy. VARGRPO_TEST_THREADS=N sets another count.
THREADS = os.environ.get("VARGRPO_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS
torch.set_num_threads(int(THREADS))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 2-step run of the tiny preset (TINY settings, a checkpoint and a grid at every
    step). Read it; a test that changes a run works on a copy (helpers.copy_run)."""
    run = tmp_path_factory.mktemp("shared") / "tiny_run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "2", "--save-every", "1"])
    return run
