"""The GPU tier: `bash run.sh test -m gpu` on one CUDA GPU (under 10 minutes on one H100). Every
other run hides the GPU (conftest.py) and skips these with one line; without a usable GPU `-m gpu`
skips them with one line saying why. The bounds are stated in each test: bf16 ones are twice what
CPU bf16 autocast measured on the same shapes (CUDA autocast keeps LayerNorm and softmax in fp32,
so it should come out tighter), and each test also checks a mistake it must catch."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import vargrpo as vg
import vargrpo_run as vr
from helpers import ROOT, random_model, read_metrics, timeout

pytestmark = pytest.mark.gpu

# |teacher-forced - sampled| log-prob of one token, nats, under bf16 autocast. CPU bf16 autocast,
# random_model(patch_nums=(1, 2, 3, 4), depth=2, vocab=64), 16 rows at temperature 0.7, seeds 0-2:
# max 0.044-0.045, mean 0.007-0.009.
LOGP_BOUND_BF16 = 0.1
LOGP_MEAN_BOUND_BF16 = 0.02
# in fp32 (TF32 is off for matmuls by default): CPU fp32 agrees to ~1e-6
LOGP_BOUND_FP32 = 1e-3
# max |pi / pi_old - 1| at the first minibatch, where the policy is still the sampling one
RATIO_BOUND_BF16 = math.expm1(LOGP_BOUND_BF16)

TRAIN_TIMEOUT = timeout(600)


def cuda_autocast(dtype):
    """bf16 autocast on the GPU, or nothing for fp32."""
    if dtype == "fp32":
        return torch.autocast("cuda", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16)


def logprob_gap(var, labels, dtype, tf_temperature):
    """|token_logprobs - the sampler's recorded log-probs| of every token: sampled at
    temperature 0.7, teacher-forced at tf_temperature."""
    g = torch.Generator("cuda").manual_seed(0)
    with cuda_autocast(dtype):
        roll = vg.sample(var, labels, temperature=0.7, generator=g, decode=False)
        logp = vg.token_logprobs(var, labels, roll.idx, tf_temperature)
    return (logp.float() - roll.logprobs.float()).abs()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sampler_and_teacher_forcing_agree_on_the_gpu(dtype):
    """The sampler's log-probs (KV cache, one scale at a time) against one teacher-forced pass
    (SDPA with the block-causal mask) on the GPU: max per token <= 0.1 nats under bf16 autocast
    (mean <= 0.02), <= 1e-3 in fp32. Teacher forcing at another temperature (1.0) must miss by
    far more: mean > 10x the bf16 mean bound."""
    vae, var = random_model(patch_nums=(1, 2, 3, 4), depth=2, vocab=64, seed=0)
    var = var.cuda()
    labels = (torch.arange(16) % 5).cuda()

    gap = logprob_gap(var, labels, dtype, 0.7)
    if dtype == "bf16":
        assert gap.max().item() <= LOGP_BOUND_BF16
        assert gap.mean().item() <= LOGP_MEAN_BOUND_BF16
    else:
        assert gap.max().item() <= LOGP_BOUND_FP32

    wrong = logprob_gap(var, labels, dtype, 1.0)
    assert wrong.mean().item() > 10 * LOGP_MEAN_BOUND_BF16


def test_d16_random_init_step_at_a_small_shape(tmp_path):
    """One GRPO step of a random-weight VAR-d16 on the GPU, bf16 (the default there), 2 labels x
    4 samples: it finishes, its loss is finite, the first minibatch's ratio stays within
    expm1(0.1) of 1 (the bf16 bound above) and a checkpoint is written."""
    out = tmp_path / "run"
    metrics = vg.main(["train", "--preset", "d16", "--random-init", "--reward", "brightness",
                       "--labels-per-step", "2", "--group-size", "4", "--minibatch", "8",
                       "--steps", "1", "--image-every", "0", "--device", "cuda", "--out", str(out)])

    assert math.isfinite(metrics["loss/loss"])
    assert metrics["policy/ratio_dev_first_minibatch"] <= RATIO_BOUND_BF16
    assert (out / "checkpoints" / "last.pt").is_file()


def torchrun_on_the_gpu(out, *flags):
    """2 steps of the tiny preset under `torchrun --nproc-per-node=1` on cuda: NCCL."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "vargrpo.py", "train", "--preset", "tiny", "--reward", "brightness",
           "--labels-per-step", "2", "--group-size", "4", "--minibatch", "4", "--steps", "2",
           "--image-every", "0", "--device", "cuda", "--out", str(out), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT)


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_with_nccl_on_one_gpu(tmp_path, flags):
    """The distributed path on one GPU: torchrun, one process, NCCL (set_device(0), the process
    group, the metrics' all-reduces); plain (one process: the policy itself, no DDP wrapper) and
    --fsdp (FSDP2 shards of one, the sampler's gathered copy, the checkpoint gathered whole). Exit
    0, finite metrics, the first minibatch's ratio within expm1(0.1) of 1, and a checkpoint with
    the keys of the unsharded model."""
    out = tmp_path / "run"
    res = torchrun_on_the_gpu(out, *flags)
    assert res.returncode == 0, res.stderr[-3000:]

    for m in read_metrics(out):
        assert math.isfinite(m["loss/loss"])
        assert m["policy/ratio_dev_first_minibatch"] <= RATIO_BOUND_BF16

    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    vae, var = vg.build_vae_var(vg.VARConfig.preset("tiny"))
    assert set(saved) == set(var.state_dict())


def sample_peak(var, rows):
    """Bytes sample() adds at its peak for `rows` rows under bf16 autocast."""
    config = var.config
    labels = (torch.arange(rows) % config.num_classes).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with cuda_autocast("bf16"):
        vg.sample(var, labels, temperature=0.7, decode=False)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_sample_batch_0_fills_the_free_memory_without_running_out():
    """--sample-batch 0 on a random VAR-d16, bf16: groups_per_sample_call's rows (groups of 16)
    run in one sample() call without running out of memory, and use between half and all of the
    free memory it read (90% is its target). sample_row_bytes, the per-row term, within 0.6x-1.05x
    of the measured slope (64 -> 128 rows; the CPU fp32 check measured 0.85-1.00)."""
    config = vg.VARConfig.preset("d16")
    vae, var = vg.build_vae_var(config)
    var = var.cuda()
    sample_peak(var, 16)  # warm-up: kernels, the autocast weight casts, the allocator's pools

    slope = (sample_peak(var, 128) - sample_peak(var, 64)) / 64
    assert 0.6 <= slope / vr.sample_row_bytes(config, 2) <= 1.05

    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    with cuda_autocast("bf16"):
        groups = vr.groups_per_sample_call(0, 16, 10_000, config, "cuda")
    peak = sample_peak(var, groups * 16)
    assert 0.5 * free <= peak <= free


def update_peak(var, rows):
    """Bytes one forward+backward pass of the update adds at its peak for `rows` samples under
    bf16 autocast, its weights' gradients included (set to None before, as the trainer does)."""
    config = var.config
    g = torch.Generator("cuda").manual_seed(0)
    labels = (torch.arange(rows) % config.num_classes).cuda()
    idx = torch.randint(0, config.vocab_size, (rows, config.seq_len), device="cuda", generator=g)
    var.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with cuda_autocast("bf16"):
        logp, logits = vg.token_logprobs(var, labels, idx, 0.7, return_logits=True)
    logp.mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_micro_batch_0_fits_the_update_in_free_memory():
    """--micro-batch 0 on a random VAR-d16, bf16: update_sample_bytes, the per-sample term, within
    0.7x-1.1x of the measured slope (4 -> 8 samples); the micro-batch micro_batch_size picks for a
    share of 720 (many divisors) runs a forward+backward pass without running out of memory, using
    between half and all of the free memory it read (90% is its target)."""
    config = vg.VARConfig.preset("d16")
    vae, var = vg.build_vae_var(config)
    var = var.cuda()
    update_peak(var, 2)  # warm-up: kernels, the allocator's pools

    slope = (update_peak(var, 8) - update_peak(var, 4)) / 4
    assert 0.7 <= slope / vr.update_sample_bytes(config, 2) <= 1.1, slope

    var.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    args = vg.TrainArgs(micro_batch=0, dtype="bf16")
    micro = vr.micro_batch_size(var, args, 720, "cuda")
    assert 720 % micro == 0
    peak = update_peak(var, micro)
    assert 0.5 * free <= peak <= free, (micro, peak, free)


def test_gpu_check_runs_every_variant(tmp_path):
    """`bash run.sh gpu-check`'s command (VAR-d16, random weights, the paper's shape, bf16): exit 0,
    every variant (plain, checkpointing, --fsdp) measured without an error, each first minibatch's
    ratio within expm1(0.1) of 1, its peak memory recorded (allocated <= reserved), the GPU named
    by the variants. Its own bound: under 5 minutes."""
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "vargrpo_tools.py", "gpu-check", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]

    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"plain", "grad_checkpointing", "fsdp"}
    assert report["device_name"] == torch.cuda.get_device_name() and report["unfinished"] == []
    for name, v in report["variants"].items():
        assert "error" not in v, (name, v)
        assert v["ratio_dev_first_minibatch"] <= RATIO_BOUND_BF16, name
        assert 0 < v["peak_memory_bytes"] <= v["peak_memory_reserved_bytes"], name
    assert report["wall_s"] < 300
