"""Property-based tests of the RL maths, the sampler, the masks and the run folder's rules, and the
tests of the defects a review found (each would fail on the code before its fix)."""
import contextlib
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import vargrpo as vg
import vargrpo_run as vr
from helpers import TINY, labels_for, normalise_rows, patch_nums_st, policy_state, random_model, read_metrics

seeds = st.integers(0, 2**16)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- KL: value, gradient, and which KL the gradient belongs to


@given(seed=seeds, closeness=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 4.0]))
def test_k3_gradient_is_the_analytic_one(seed, closeness):
    """d k3 / d logp = 1 - pi_ref / pi (a k3 with the right value and no gradient fails here)."""
    g = gen(seed)
    logp = (-torch.rand(3, 9, generator=g) * 4).requires_grad_(True)
    ref = logp.detach() + closeness * torch.randn(3, 9, generator=g)
    (grad,) = torch.autograd.grad(vg.kl_k3(logp, ref).sum(), logp)
    torch.testing.assert_close(grad, 1 - torch.exp(ref - logp.detach()), rtol=1e-5, atol=1e-6)


@given(seed=seeds, closeness=st.sampled_from([1e-2, 0.3, 2.0]))
def test_k3_gradient_belongs_to_the_reverse_kl(seed, closeness):
    """E_{v ~ pi}[grad k3] = grad KL(pi_ref || pi), not grad KL(pi || pi_ref) (which kl_exact has)."""
    g = gen(seed)
    logits = torch.randn(2, 11, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = logits.detach() + closeness * torch.randn(2, 11, generator=g, dtype=torch.float64)
    ref_logp = ref.log_softmax(-1)
    grad = lambda f: torch.autograd.grad(f(logits.log_softmax(-1)), logits)[0]
    g_k3 = grad(lambda logp: (logp.exp().detach() * vg.kl_k3(logp, ref_logp)).sum())  # every token, weighted by pi (fixed)
    g_rev = grad(lambda logp: (ref_logp.exp() * (ref_logp - logp)).sum())
    g_fwd = grad(lambda logp: (logp.exp() * (logp - ref_logp)).sum())
    (g_exact,) = torch.autograd.grad(vg.kl_exact(logits, ref).sum(), logits)
    torch.testing.assert_close(g_k3, g_rev)
    torch.testing.assert_close(g_exact, g_fwd)
    if closeness >= 0.3:  # near pi_ref the two KLs agree to second order
        assert (g_k3 - g_fwd).norm() > 0.05 * g_fwd.norm()


@given(seed=seeds, closeness=st.sampled_from([0.0, 1e-5, 0.1, 3.0]))
def test_expected_k3_is_the_exact_kl(seed, closeness):
    g = gen(seed)
    logits = torch.randn(4, 13, generator=g, dtype=torch.float64)
    ref = logits + closeness * torch.randn(4, 13, generator=g, dtype=torch.float64)
    logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
    torch.testing.assert_close((logp.exp() * vg.kl_k3(logp, ref_logp)).sum(-1), vg.kl_exact(logits, ref))
    assert (vg.kl_exact(logits, ref) >= 0).all() and (closeness > 0 or (vg.kl_exact(logits, ref) == 0).all())


@given(seed=seeds, V=st.integers(2, 40))
def test_entropy_is_between_zero_and_log_v(seed, V):
    logits = torch.randn(3, 5, V, generator=gen(seed)) * 5
    h = vg.entropy(logits)
    assert (h >= -1e-6).all() and (h <= math.log(V) + 1e-5).all()
    torch.testing.assert_close(vg.entropy(torch.zeros(1, V)), torch.tensor([math.log(V)]))


# ---- group advantages, the clipped objective, the loss


@given(seed=seeds, G=st.integers(2, 8))
def test_advantages_follow_the_reward_order(seed, G):
    r = torch.randn(5, G, generator=gen(seed))
    A = vg.group_advantages(r)
    i, j = torch.triu_indices(G, G, 1)
    assert torch.equal(torch.sign(A[:, i] - A[:, j]), torch.sign(r[:, i] - r[:, j]))


@given(seed=seeds, eps=st.floats(0.05, 0.4), a=st.floats(-3, 3))
def test_clipped_objective_is_monotone_in_the_ratio(seed, eps, a):
    """For A > 0 the objective never decreases as the ratio grows (and never increases for A < 0)."""
    assume(abs(a) > 1e-3)
    logratio = torch.linspace(-1, 1, 41)
    obj = vg.clipped_surrogate(logratio[None], torch.zeros(1, 41), torch.tensor([a]), eps)[0]
    d = obj.diff()
    assert ((d >= -1e-7) if a > 0 else (d <= 1e-7)).all()
    assert obj.max() <= max(a * (1 + eps), a * math.exp(-1)) + 1e-6 if a > 0 else True


@given(seed=seeds, beta=st.floats(0.0, 2.0))
def test_loss_gradient_is_the_weighted_advantage_at_ratio_one(seed, beta):
    """At the first inner step (pi = pi_old = pi_ref) the loss gradient on logp is -w A / B."""
    g = gen(seed)
    logp = (-torch.rand(3, 6, generator=g) * 3).requires_grad_(True)
    adv = torch.randn(3, generator=g)
    w = normalise_rows(torch.rand(3, 6, generator=g))
    loss = vg.grpo_loss(vg.clipped_surrogate(logp, logp.detach(), adv), vg.kl_k3(logp, logp.detach()), w, beta)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -w * adv[:, None] / 3)


@given(seed=seeds)
def test_normalise_rows(seed):
    w = torch.rand(4, 7, generator=gen(seed)) * (torch.rand(4, 1, generator=gen(seed + 1)) > 0.3)
    n = normalise_rows(w)
    assert (n >= 0).all() and torch.allclose(n.sum(1), (w.sum(1) > 0).float())
    torch.testing.assert_close(normalise_rows(3.5 * w), n)


# ---- VAR-RL: PANW, VMR, MP


@given(patch_nums=patch_nums_st, alpha=st.floats(0.0, 2.0), data=st.data())
def test_stage_weights_split_panw(patch_nums, alpha, data):
    m = data.draw(st.integers(1, len(patch_nums) - 1))
    pre, suf = (vg.panw_weights(patch_nums, alpha) * vg.stage_mask(patch_nums, "prefix", m)), (vg.panw_weights(patch_nums, alpha) * vg.stage_mask(patch_nums, "suffix", m))
    torch.testing.assert_close(pre + suf, vg.panw_weights(patch_nums, alpha))
    end = vg.scale_begin_ends(patch_nums)[m - 1][1]
    assert (pre[end:] == 0).all() and (suf[:end] == 0).all() and (pre[:end] > 0).all()


@given(patch_nums=patch_nums_st)
def test_default_vmr_split_leaves_both_stages(patch_nums):
    assert 1 <= vg.default_vmr_split(patch_nums) <= len(patch_nums) - 1


@given(seed=seeds, K=st.integers(2, 5), eta=st.floats(0.05, 20.0), c=st.floats(-5, 5), s=st.floats(0.2, 5))
def test_middle_value_shift_and_scale(seed, K, eta, c, s):
    r = torch.randn(3, K, generator=gen(seed), dtype=torch.float64)
    torch.testing.assert_close(vg.middle_value(r + c, eta), vg.middle_value(r, eta) + c)
    torch.testing.assert_close(vg.middle_value(s * r, s * eta), s * vg.middle_value(r, eta))


@given(patch_nums=patch_nums_st, seed=seeds)
def test_propagate_mask_is_monotone(patch_nums, seed):
    H = patch_nums[-1]
    small = (torch.rand(2, H, H, generator=gen(seed)) < 0.3).float()
    big = torch.maximum(small, (torch.rand(2, H, H, generator=gen(seed + 1)) < 0.3).float())
    assert (vg.propagate_mask(small, patch_nums) <= vg.propagate_mask(big, patch_nums)).all()


@given(seed=seeds, keep=st.floats(0.05, 1.0))
def test_saliency_mask_keeps_the_top_fraction(seed, keep):
    g = gen(seed)
    weights = torch.rand(1, 1, 64, 64, generator=g)  # a reward whose pixel-gradient is `weights`
    reward = lambda x: (x * weights).sum((1, 2, 3))
    mask = vg.initial_mask(reward, torch.rand(2, 3, 64, 64, generator=g), 4, keep)
    n_keep = max(1, round(keep * 16))
    sal = torch.nn.functional.interpolate(weights, size=(4, 4), mode="area").flatten()
    assert torch.equal(mask[0].flatten() > 0, sal >= sal.topk(n_keep).values[-1]) and torch.equal(mask[0], mask[1])


def test_mask_propagation_keeps_the_whole_reward_of_a_combined_spec():
    """Defect: for region+brightness the region alone was the mask, though a third of the reward's
    gradient lies outside it. A region mask now stands for a reward only if every term is a region."""
    import reward_models as rm
    images = torch.rand(2, 3, 64, 64, generator=gen(0))
    combined = rm.build_reward("brightness:region=0,0,0.5,0.5+brightness", "cpu", differentiable=True)
    assert combined.region_mask(64, 64) is None
    x = images.clone().requires_grad_(True)
    combined(x).sum().backward()
    outside = x.grad.clone()
    outside[..., :32, :32] = 0
    assert outside.abs().sum() / x.grad.abs().sum() > 0.3  # 37.5% of the gradient is outside the region
    mask = vg.initial_mask(combined, images, 4, keep=0.5)
    assert mask[:, 2:, 2:].sum() > 0  # tokens far from the region keep their policy gradient
    two_regions = rm.build_reward("brightness:region=0,0,0.25,0.25+2*brightness:region=0.5,0.5,1,1", "cpu")
    expect = torch.zeros(4, 4)
    expect[0, 0], expect[2:, 2:] = 1, 1
    assert torch.equal(vg.initial_mask(two_regions, images, 4, 0.5)[0], expect)  # all regions: their union


# ---- sampling: batched per-group generators, logits processing


@given(seed=seeds, groups=st.integers(1, 4), G=st.integers(1, 3), temperature=st.sampled_from([0.7, 1.0]))
@settings(max_examples=15)
def test_sample_with_one_generator_per_group_equals_per_group_calls(seed, groups, G, temperature):
    vae, var = random_model((1, 2, 3), depth=1, seed=seed)
    labels = labels_for(var, groups * G, seed)
    gens = lambda: [gen(seed + 7 * k) for k in range(groups)]
    together = vg.sample(var, labels, temperature=temperature, generator=gens(), decode=False)
    apart = [vg.sample(var, labels[k * G:(k + 1) * G], temperature=temperature, generator=g, decode=False)
             for k, g in enumerate(gens())]
    assert torch.equal(together.idx, torch.cat([a.idx for a in apart]))
    torch.testing.assert_close(together.logprobs, torch.cat([a.logprobs for a in apart]), rtol=0, atol=1e-5)


@given(seed=seeds, vmr=st.booleans(), sample_batch=st.sampled_from([0, 4, 8, 9, 16]))
@settings(max_examples=10)
def test_batched_rollout_equals_the_per_group_rollout(seed, vmr, sample_batch):
    """Issue 8: the rollout's rows do not depend on how many groups share a sample() call."""
    a = vg.TrainArgs(preset="tiny", group_size=4, temperature=0.7, seed=seed, sample_batch=sample_batch, vmr=vmr)
    vae, policy, _ = vg.build_models(a, "cpu")
    labels, groups = torch.tensor([3, 1, 4, 1, 5]), [10, 11, 12, 13, 14]
    prefix_len = 5 if vmr else None
    batched = vg.rollout(policy, labels, groups, a, step=2, prefix_len=prefix_len)
    per_group = vg.rollout(policy, labels, groups, vg.TrainArgs(**{**dataclasses.asdict(a), "sample_batch": 4}), 2, prefix_len)
    assert torch.equal(batched.idx, per_group.idx) and torch.equal(batched.labels, per_group.labels)
    torch.testing.assert_close(batched.logprobs, per_group.logprobs, rtol=0, atol=1e-5)


@given(seed=seeds, temperature=st.floats(0.2, 3.0))
def test_temperature_and_top_k_keep_the_argmax(seed, temperature):
    logits = torch.randn(2, 5, 17, generator=gen(seed)) * 3
    out = vg.process_logits(logits, temperature=temperature, top_k=17)
    torch.testing.assert_close(out, logits / temperature)
    assert torch.equal(vg.process_logits(logits, temperature=temperature, top_k=3).argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(vg.process_logits(logits, torch.randn(2, 5, 17, generator=gen(seed + 1)), cfg_t=0.0), logits)


@given(seed=seeds, depth=st.integers(1, 2))
@settings(max_examples=8)
def test_grad_checkpointing_gives_the_same_values_and_gradients(seed, depth):
    """Issue 11: --grad-checkpointing recomputes each block in backward; fp32 results agree to 1e-6."""
    vae, var = random_model((1, 2, 3), depth=depth, seed=seed)
    labels, idx = labels_for(var, 3, seed), torch.randint(0, 32, (3, 14), generator=gen(seed))
    out = {}
    for ckpt in (False, True):
        var.zero_grad(set_to_none=True)
        var.grad_checkpointing = ckpt
        logp = vg.token_logprobs(var, labels, idx, 0.7)
        logp.sum().backward()
        out[ckpt] = (logp.detach(), {n: p.grad.clone() for n, p in var.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    for n, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], grad, rtol=0, atol=1e-6, msg=n)


# ---- the run folder's rules and helpers


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
    assert vr.run_state(d) == expect


@given(name=st.sampled_from(["lr", "beta", "adv_eps", "max_grad_norm", "temperature", "weight_decay", "panw_alpha",
                             "clip_eps", "vmr_eta", "mp_keep"]),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_every_non_finite_float_setting_is_refused(name, value):
    with pytest.raises(vg.UsageError, match=f"--{name.replace('_', '-')}: not a finite number"):
        vr.check_train_args(vg.TrainArgs(**{name: value}), 1, vg.PRESETS)


@given(key=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_config_files_with_unknown_keys_are_refused(tmp_path_factory, key):
    assume(key not in {f.name for f in dataclasses.fields(vg.TrainArgs)})
    path = tmp_path_factory.mktemp("c") / "args.json"
    path.write_text(json.dumps({"lr": 1e-4, key: 1}))
    with pytest.raises(vg.UsageError, match=f"unknown settings {key}"):
        vr.read_config(str(path), vg.TrainArgs)


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


@given(keys=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 5)), min_size=2, max_size=20, unique=True))
def test_derived_seeds_differ_for_different_streams(keys):
    assert len({vg.derive_seed(*k) for k in keys}) == len(keys)


def test_run_files_cover_everything_a_run_writes(tmp_path):
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "2", "--save-every", "1", "--tracker", "tensorboard"])
    written = {p for p in run.rglob("*") if p.is_file() and p.name != vr.LOCK_NAME}
    covered = {p for pattern in vr.RUN_FILES for p in run.glob(pattern)}
    assert written and written <= covered, written - covered


# ---- defects found by the review


def test_unused_class_rows_never_change(tmp_path):
    """Defect: weight decay shrank class embeddings that get no gradient (the null class; unseen
    classes with --label-subset half). Official VAR groups: no decay on embeddings and 1-D tensors."""
    run = tmp_path / "run"
    vg.main(["train", *TINY, "--out", str(run), "--steps", "3", "--label-subset", "half", "--weight-decay", "0.5",
             "--image-every", "0"])
    seen = vg.label_pool(vg.TrainArgs(label_subset="half", seed=0), 10)
    unseen = sorted(set(range(10)) - set(seen.tolist()))
    before = vg.build_models(vg.TrainArgs(preset="tiny"), "cpu")[2].state_dict()
    after = policy_state(run)["model"]
    for row in unseen + [10]:  # 10 = the null class
        assert torch.equal(after["class_emb.weight"][row], before["class_emb.weight"][row]), row
    assert not torch.equal(after["class_emb.weight"][seen], before["class_emb.weight"][seen])
    assert not torch.equal(after["blocks.0.ffn.fc1.weight"], before["blocks.0.ffn.fc1.weight"])


def test_trainer_computes_ratios_at_the_sampling_temperature(tmp_path):
    """The paper trains at T = 0.7: if the loss dropped the temperature, pi / pi_old at the first
    minibatch (before any update) would not be 1."""
    run = tmp_path / "run"
    vg.main(["train", *TINY[:-4], "--temperature", "0.7", "--image-every", "0", "--out", str(run), "--steps", "2"])
    assert all(r["policy/ratio_dev_first_minibatch"] < 1e-5 for r in read_metrics(run))
    assert json.loads((run / "args.json").read_text())["temperature"] == 0.7
    # the check is live: under bf16 autocast (CPU) the policy's log-probs differ from the sampler's a little
    vg.main(["train", *TINY[:-4], "--temperature", "0.7", "--image-every", "0", "--out", str(tmp_path / "bf16"),
             "--steps", "2", "--dtype", "bf16"])
    assert all(1e-4 < r["policy/ratio_dev_first_minibatch"] < 0.1 for r in read_metrics(tmp_path / "bf16"))


def test_defaults_are_the_papers():
    """GRPO-VAR section 5: clip 0.2, beta 0.2, lr 1e-4, temperature 0.7, 32 labels x 16 samples, minibatch 32;
    the pure functions' defaults agree with the trainer's."""
    a = vg.TrainArgs()
    assert (a.clip_eps, a.beta, a.lr, a.temperature, a.labels_per_step, a.group_size, a.minibatch) == (0.2, 0.2, 1e-4, 0.7, 32, 16, 32)
    obj = vg.clipped_surrogate(torch.tensor([[math.log(1.5), math.log(0.5)]]), torch.zeros(1, 2), torch.tensor([1.0]))
    torch.testing.assert_close(obj, torch.tensor([[1.2, 0.5]]))  # clipped at 1 + 0.2 above, unclipped below for A > 0
    r = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(vg.group_advantages(r), torch.tensor([[-0.5, 0.5]]) / (0.5 + 1e-4))  # eps 1e-4
    s, k = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(vg.grpo_loss(s, k), -(torch.tensor(1.5) - 0.2 * 0.5))  # beta 0.2, token mean


@given(seed=seeds, k=st.integers(1, 8))
def test_exact_kl_and_entropy_with_excluded_tokens(seed, k):
    """Top-k leaves tokens of probability 0 (logit -inf) in the policy: they add nothing (not NaN),
    and the entropy's gradient is the analytic one, -p (log p + H)."""
    g = gen(seed)
    logits = vg.process_logits(torch.randn(2, 3, 10, generator=g, dtype=torch.float64) * 2, top_k=k)
    ref = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    kl = vg.kl_exact(logits, ref)
    p, logp, ref_logp = logits.softmax(-1), logits.log_softmax(-1), ref.log_softmax(-1)
    textbook = torch.where(p > 0, p * (logp - ref_logp), 0.0).sum(-1)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, textbook)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(vg.entropy(x).sum(), x)
    p, logp = x.detach().softmax(-1), x.detach().log_softmax(-1)
    torch.testing.assert_close(grad, -p * (logp + vg.entropy(x.detach())[..., None]))


def test_saliency_edge_cases():
    """A reward whose graph does not reach the image keeps every cell; the entropy of a top-k policy
    counts only its support."""
    images = torch.rand(2, 3, 64, 64, generator=gen(3))
    scale = torch.nn.Parameter(torch.ones(()))
    blind = lambda x: scale.expand(len(x))  # differentiable, but not in the image
    assert torch.equal(vg.initial_mask(blind, images, 4, 0.25), torch.ones(2, 4, 4))
    logits = vg.process_logits(torch.randn(3, 10, generator=gen(5)), top_k=4)
    p = logits.softmax(-1)
    torch.testing.assert_close(vg.entropy(logits), -(p[p > 0].view(3, 4) * p[p > 0].view(3, 4).log()).sum(-1))


@given(seed=seeds, kl=st.sampled_from(["k3", "exact"]), temperature=st.sampled_from([0.7, 1.0]))
@settings(max_examples=6)
def test_loss_terms_are_the_papers_pieces(seed, kl, temperature):
    """Step 5's per-token pieces: log-probs of the tempered policy, the chosen KL to the reference,
    the clipped objective against the recorded old log-probs."""
    vae, policy = random_model((1, 2, 3), depth=1, seed=seed)
    _, ref = random_model((1, 2, 3), depth=1, seed=seed + 1)
    ref.vae.load_state_dict(vae.state_dict())
    g = gen(seed)
    labels, idx = torch.tensor([0, 1, 2]), torch.randint(0, 32, (3, 14), generator=g)
    old = vg.token_logprobs(policy, labels, idx, temperature).detach() + 0.1 * torch.randn(3, 14, generator=g)
    b = vg.UpdateBatch(labels=labels, idx=idx, old_logp=old, adv=torch.randn(3, generator=g), pg_w=torch.ones(3, 14), kl_w=torch.ones(3, 14))
    a = vg.TrainArgs(kl=kl, temperature=temperature, clip_eps=0.2)
    t = vg.loss_terms(policy, ref, b, torch.arange(3), a, contextlib.nullcontext)
    logp, logits = vg.token_logprobs(policy, labels, idx, temperature, return_logits=True)
    ref_logp, ref_logits = vg.token_logprobs(ref, labels, idx, temperature, return_logits=True)
    expect = vg.kl_k3(logp, ref_logp) if kl == "k3" else vg.kl_exact(logits, ref_logits)
    torch.testing.assert_close(t.kl, expect)
    torch.testing.assert_close(t.surrogate, vg.clipped_surrogate(logp, old, b.adv, 0.2))
    assert not torch.allclose(vg.kl_k3(logp, ref_logp), vg.kl_exact(logits, ref_logits))  # the choice matters
