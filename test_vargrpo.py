"""Tests for vargrpo.py, in the file's order. Run: bash run.sh test  (slow ones: -m slow / -m 'not slow').

Reference data comes from ../shared (the official VAR code's outputs); tests that need it skip
cleanly when it is absent.
"""
import http.server
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import vargrpo as vg

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = Path(__file__).resolve().parent.parent / "shared"
FIXTURE = SHARED / "fixtures" / "official_var_tiny.pt"
LAYOUTS = SHARED / "fixtures" / "official_var_layouts.json"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason="../shared/fixtures absent")
needs_layouts = pytest.mark.skipif(not LAYOUTS.is_file(), reason="../shared/fixtures absent")


# ----------------------------------------------------------------------------------------------
# helpers: small random models whose every weight matters


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
    cfg = vg.VARConfig(depth=depth, patch_nums=tuple(patch_nums), vocab_size=vocab, z_channels=4,
                       vae_ch=32, num_classes=num_classes)
    vae, var = vg.build_vae_var(cfg, seed=seed)
    return vae, (randomize_(var, seed) if randomize else var)


patch_nums_st = st.lists(st.integers(1, 5), min_size=2, max_size=4, unique=True).map(lambda xs: tuple(sorted(xs)))


def labels_for(var, B, seed):
    return torch.randint(0, var.cfg.num_classes, (B,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# config


def test_presets_and_config_errors():
    assert vg.VARConfig.preset("d16") == vg.VARConfig()
    d30 = vg.VARConfig.preset("d30")
    assert (d30.embed_dim, d30.num_heads, d30.seq_len, d30.image_size) == (1920, 30, 680, 256)
    assert vg.VARConfig.preset("tiny").seq_len == 30 and vg.VARConfig.preset("tiny").image_size == 64
    with pytest.raises(ValueError, match="unknown preset 'd17'"):
        vg.VARConfig.preset("d17")
    with pytest.raises(ValueError, match="strictly increasing"):
        vg.VARConfig(patch_nums=(1, 3, 2))
    with pytest.raises(ValueError, match="multiple of 32"):
        vg.VARConfig(vae_ch=48)


# ----------------------------------------------------------------------------------------------
# scale bookkeeping


@given(patch_nums_st)
def test_block_causal_mask(patch_nums):
    bias = vg.block_causal_bias(patch_nums)
    s = vg.scale_ids(patch_nums)
    L = sum(p * p for p in patch_nums)
    assert bias.shape == (L, L) and s.shape == (L,)
    for i in range(L):
        for j in range(L):
            assert (bias[i, j] == 0) == (s[i] >= s[j]) and (bias[i, j] == 0 or bias[i, j] == -math.inf)
    ends = [e for _, e in vg.scale_begin_ends(patch_nums)]
    assert ends[-1] == L and all(s[e - 1] == si for si, e in enumerate(ends))


def test_phi_index_matches_official_ticks():
    # What the official PhiPartiallyShared picks (run on the official code): argmin over ticks
    # linspace(1/12, 11/12, 4) of |tick - si/(K-1)|, the first on ties (K=10, si=2 and 7 are ties).
    assert [vg.phi_index(si, 4) for si in range(4)] == [0, 1, 2, 3]
    assert [vg.phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_split_scales_rejects_partial_scale():
    with pytest.raises(ValueError, match="scale boundary"):
        vg.split_scales(torch.zeros(2, 7, dtype=torch.long), (1, 2, 3))


# ----------------------------------------------------------------------------------------------
# layouts: our state_dicts equal the official checkpoints' keys, shapes and dtypes


def layout(module):
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in module.state_dict().items()}


@needs_layouts
@pytest.mark.parametrize("name", ["var_d16", "var_d20", "var_d24", "var_d30", "vae_ch160v4096z32"])
def test_state_dict_layout_equals_official(name):
    official = json.loads(LAYOUTS.read_text())[name]
    cfg = vg.VARConfig.preset("d16" if name.startswith("vae") else name[4:])
    with torch.device("meta"):
        vae = vg.VQVAE(cfg)
        var = vg.VAR(cfg, vae)
    ours = layout(vae if name.startswith("vae") else var)
    assert ours.keys() == official.keys()
    assert ours == official


def test_d36_preset_builds():
    cfg = vg.VARConfig.preset("d36")
    with torch.device("meta"):
        var = vg.VAR(cfg, vg.VQVAE(cfg))
    sd = var.state_dict()
    assert "blocks.35.ada_gss" in sd and "shared_ada_lin.1.weight" in sd and sd["pos_1LC"].shape == (1, 2240, 2304)


# ----------------------------------------------------------------------------------------------
# exactness against the official code's outputs on a tiny random model


@pytest.fixture(scope="module")
def official():
    f = torch.load(FIXTURE, weights_only=False)  # plain dicts/lists/tensors written by the official code
    c = f["config"]
    cfg = vg.VARConfig(depth=c["depth"], patch_nums=tuple(c["patch_nums"]), vocab_size=c["V"], z_channels=c["Cvae"],
                       vae_ch=c["ch"], num_classes=c["num_classes"])
    vae, var = vg.build_vae_var(cfg)
    vae.load_state_dict(f["vae_state_dict"], strict=True)
    var.load_state_dict(f["var_state_dict"], strict=True)
    return f, vae, var


@needs_fixture
def test_official_teacher_forcing(official):
    f, vae, var = official
    idx = torch.cat(f["idx_per_scale"], dim=1)
    assert torch.equal(vae.quantize.idx_to_var_input(f["idx_per_scale"]), f["var_input"])
    logits = vg.token_logits(var, f["labels"], idx)
    assert (logits - f["teacher_forced_logits"]).abs().max() <= 1e-5


@needs_fixture
def test_official_decode_and_encode(official):
    f, vae, _ = official
    idx = torch.cat(f["idx_per_scale"], dim=1)
    assert torch.allclose(vae.quantize.idx_to_fhat(f["idx_per_scale"]), f["fhat"], atol=1e-6, rtol=0)
    # measured: 6.4e-6 here; the fixture itself is 7.1e-6 from a float64 decode, ours 3.0e-6
    assert (vae.idx_to_img(idx) - f["decoded_images_01"]).abs().max() <= 1e-5
    assert torch.equal(vae.img_to_idx(f["encoder_input_m11"]), torch.cat(f["encoder_idx_per_scale"], dim=1))


@needs_fixture
@pytest.mark.parametrize("name", ["plain", "cfg_topk_topp"])
def test_official_sampler_reproduced(official, name):
    f, vae, var = official
    rec = f["samples_g_seed_42"][name]
    out = vg.sample(var, f["labels"], temperature=1.0, generator=torch.Generator().manual_seed(42), **rec["kwargs"])
    assert (out.images - rec["images"]).abs().max() <= 1e-5
    for si, h in enumerate(vg.split_scales(out.idx, var.cfg.patch_nums)):  # the same tokens were drawn
        assert torch.equal(vae.quantize.embed(h), rec["h_per_scale"][si])


# ----------------------------------------------------------------------------------------------
# VAR: teacher forcing properties


@given(patch_nums=patch_nums_st, depth=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_later_scales_never_change_earlier_logits(patch_nums, depth, seed):
    vae, var = random_model(patch_nums, depth, seed=seed)
    g = torch.Generator().manual_seed(seed)
    L, V = var.cfg.seq_len, var.cfg.vocab_size
    idx = torch.randint(0, V, (2, L), generator=g)
    labels = labels_for(var, 2, seed)
    si = int(torch.randint(1, len(patch_nums), (1,), generator=g))
    bg = var.begin_ends[si][0]
    changed = idx.clone()
    changed[:, bg:] = torch.randint(0, V, (2, L - bg), generator=g)
    a, b = vg.token_logits(var, labels, idx), vg.token_logits(var, labels, changed)
    assert torch.equal(a[:, :var.begin_ends[si][1]], b[:, :var.begin_ends[si][1]])  # scale si sees only < si
    assume(not torch.equal(idx[:, bg:var.begin_ends[si][1]], changed[:, bg:var.begin_ends[si][1]]))
    if si + 1 < len(patch_nums):  # ... and the next scale does see them
        assert not torch.allclose(a[:, var.begin_ends[si + 1][0]:], b[:, var.begin_ends[si + 1][0]:])
    # a prefix pass gives the same logits as the full pass on those tokens
    torch.testing.assert_close(vg.token_logits(var, labels, idx[:, :bg]), a[:, :bg], rtol=1e-5, atol=1e-5)


def test_teacher_forcing_is_deterministic_and_trainable():
    vae, var = random_model((1, 2, 4), depth=2, seed=3)
    labels, idx = labels_for(var, 3, 0), torch.randint(0, 32, (3, 21), generator=torch.Generator().manual_seed(1))
    a, b = vg.token_logits(var, labels, idx), vg.token_logits(var, labels, idx)
    assert torch.equal(a, b)
    vg.token_logprobs(var, labels, idx).sum().backward()
    assert all(p.grad is not None for p in var.parameters())
    assert all(p.grad is None for p in vae.parameters()) and not any(p.requires_grad for p in vae.parameters())
    assert not any(k.startswith("vae") or "_vae" in k for k in var.state_dict())  # the VQVAE is not in the VAR's state


# ----------------------------------------------------------------------------------------------
# logits processing, sampling and log-probs


@given(seed=st.integers(0, 2**16), temperature=st.floats(0.3, 3.0), cfg=st.sampled_from([0.0, 1.5]),
       top_k=st.sampled_from([0, 1, 5]), top_p=st.sampled_from([0.0, 0.5, 0.9]))
def test_process_logits_is_a_distribution(seed, temperature, cfg, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(2, 3, 16, generator=g) * 3, torch.randn(2, 3, 16, generator=g) * 3
    out = vg.process_logits(cond, uncond if cfg else None, cfg_t=cfg * 0.5, temperature=temperature, top_k=top_k, top_p=top_p)
    p = out.softmax(-1)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3))
    kept = torch.isfinite(out).sum(-1)
    assert (kept >= 1).all()
    if top_k:
        assert (kept <= top_k).all()  # continuous random logits: no ties at the k-th value
    if top_p:  # the kept set carries at least mass p of the pre-top-p distribution, minimally
        pre = vg.process_logits(cond, uncond if cfg else None, cfg_t=cfg * 0.5, temperature=temperature, top_k=top_k).softmax(-1)
        mass = (pre * torch.isfinite(out)).sum(-1)
        assert (mass >= top_p - 1e-5).all()
        smallest_kept = torch.where(torch.isfinite(out), pre, torch.inf).amin(-1)
        assert ((mass - smallest_kept) < top_p + 1e-5).all()  # dropping the least likely kept token would fall below p
    assert torch.equal(cond, cond.clone())  # inputs untouched


@given(patch_nums=patch_nums_st, depth=st.integers(1, 3), seed=st.integers(0, 2**16),
       temperature=st.floats(0.25, 2.0), cfg=st.sampled_from([0.0, 0.0, 1.5, 4.0]),
       top_k=st.sampled_from([0, 0, 3, 20]), top_p=st.sampled_from([0.0, 0.0, 0.8, 0.96]))
def test_sampling_logprobs_equal_teacher_forced(patch_nums, depth, seed, temperature, cfg, top_k, top_p):
    """The live check behind PPO ratios: log-probs recorded while sampling (KV cache, scale by scale)
    equal the teacher-forced ones (one masked pass), for every sampling setting."""
    vae, var = random_model(patch_nums, depth, seed=seed)
    labels = labels_for(var, 3, seed)
    kw = dict(temperature=temperature, cfg=cfg, top_k=top_k, top_p=top_p)
    out = vg.sample(var, labels, generator=torch.Generator().manual_seed(seed), decode=False, **kw)
    assert out.idx.shape == out.logprobs.shape == (3, var.cfg.seq_len) and out.images is None
    tf = vg.token_logprobs(var, labels, out.idx, **kw)
    assert (out.logprobs <= 0).all() and torch.isfinite(out.logprobs).all()
    assert (out.logprobs - tf).abs().max() <= 1e-4


@given(seed=st.integers(0, 2**16), mode=st.sampled_from(["top_k=1", "temperature->0"]))
def test_greedy_limits_equal_argmax(seed, mode):
    vae, var = random_model((1, 2, 3), depth=2, seed=seed)
    labels = labels_for(var, 4, seed)
    kw = dict(top_k=1) if mode == "top_k=1" else dict(temperature=1e-4)
    out = vg.sample(var, labels, generator=torch.Generator().manual_seed(seed), decode=False, **kw)
    logits = vg.token_logits(var, labels, out.idx)
    top2 = logits.topk(2, dim=-1).values
    assume((top2[..., 0] - top2[..., 1]).min() > 1e-2)  # no near-ties
    assert torch.equal(out.idx, logits.argmax(-1))


def test_cfg0_runs_one_batch_and_cfg_runs_two():
    vae, var = random_model((1, 2), depth=1, seed=0)
    seen = []
    hook = var.head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    vg.sample(var, labels_for(var, 3, 0), decode=False)
    vg.sample(var, labels_for(var, 3, 0), cfg=1.5, decode=False)
    hook.remove()
    assert seen == [3, 3, 6, 6]


@given(seed=st.integers(0, 2**16), n_prefix_scales=st.integers(1, 3))
def test_prefix_continuation(seed, n_prefix_scales):
    vae, var = random_model((1, 2, 3, 4), depth=2, seed=seed)
    labels = labels_for(var, 2, seed)
    first = vg.sample(var, labels, generator=torch.Generator().manual_seed(seed), decode=False)
    l = var.begin_ends[n_prefix_scales - 1][1]
    g = torch.Generator().manual_seed(seed + 1)
    cont = vg.sample(var, labels, generator=g, prefix_idx=first.idx[:, :l], decode=False)
    assert torch.equal(cont.idx[:, :l], first.idx[:, :l])
    torch.testing.assert_close(cont.logprobs[:, :l], first.logprobs[:, :l], rtol=0, atol=1e-5)
    torch.testing.assert_close(cont.logprobs, vg.token_logprobs(var, labels, cont.idx), rtol=0, atol=1e-4)
    # the prefix consumed no randomness: the suffix equals drawing scale by scale from a fresh generator
    g2 = torch.Generator().manual_seed(seed + 1)
    again = vg.sample(var, labels, generator=g2, prefix_idx=first.idx[:, :l], decode=False)
    assert torch.equal(again.idx, cont.idx)


def test_sampling_argument_errors():
    vae, var = random_model((1, 2), depth=1)
    labels = labels_for(var, 2, 0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vg.sample(var, labels, temperature=0)
    with pytest.raises(ValueError, match="0 <= top_p < 1"):
        vg.sample(var, labels, top_p=1.0)
    with pytest.raises(ValueError, match="scale boundary"):
        vg.sample(var, labels, prefix_idx=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(B, 3, 32, 32\\)"):
        vae.img_to_idx(torch.zeros(1, 3, 64, 64))


# ----------------------------------------------------------------------------------------------
# VQVAE round trip for every preset's tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "d16", "d36"])
def test_vqvae_round_trip_shapes_and_determinism(preset):
    cfg = vg.VARConfig.preset(preset)  # d16..d30 share one tokenizer; d36 is the 512 px one
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = vg.VQVAE(cfg).eval().requires_grad_(False)
    S = cfg.image_size
    x = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        idx = vae.img_to_idx(x)
        assert idx.shape == (1, cfg.seq_len) and idx.dtype == torch.long
        assert ((0 <= idx) & (idx < cfg.vocab_size)).all()
        img = vae.idx_to_img(idx)
        assert img.shape == (1, 3, S, S) and 0 <= img.min() and img.max() <= 1
        assert torch.equal(vae.idx_to_img(vae.img_to_idx(x)), img)


# ----------------------------------------------------------------------------------------------
# checkpoint loading and its errors


def save_tiny_checkpoints(folder: Path, depth_name="d16", seed=0):
    """A tiny model saved under an official file name (for the error paths)."""
    vae, var = random_model((1, 2), depth=1, seed=seed)
    torch.save(var.state_dict(), folder / f"var_{depth_name}.pth")
    torch.save(vae.state_dict(), folder / vg.VAE_FILE)
    return vae, var


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARGRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VARGRPO_OFFLINE", raising=False)
    monkeypatch.setattr(vg, "OFFICIAL_URL", "http://127.0.0.1:9/{}")  # nothing listens on port 9
    return tmp_path


def test_missing_file_offline_says_name_url_and_flag(isolated_cache, monkeypatch):
    with pytest.raises(vg.CheckpointError) as e:
        vg.load_pretrained(16, weights_dir=isolated_cache / "nowhere")
    msg = str(e.value)
    assert "var_d16.pth" in msg and "http://127.0.0.1:9/var_d16.pth" in msg and "--weights-dir" in msg
    assert "\n" not in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vg.CheckpointError, match="offline mode is on.*--weights-dir"):
        vg.load_pretrained(16)


def test_wrong_depth_names_the_depth(isolated_cache):
    save_tiny_checkpoints(isolated_cache, "d16")  # a depth-1 model under the d16 name
    with pytest.raises(vg.CheckpointError, match="holds a depth-1 VAR .*not depth 16"):
        vg.load_pretrained(16, weights_dir=isolated_cache)
    d20 = {f"blocks.{i}.attn.q_bias": torch.zeros(1) for i in range(20)}
    torch.save(d20, isolated_cache / "var_d16.pth")
    with pytest.raises(vg.CheckpointError, match="depth-20 .*--preset d20"):
        vg.load_pretrained(16, weights_dir=isolated_cache)


def test_old_file_without_scale_mul(isolated_cache):
    save_tiny_checkpoints(isolated_cache, "d16")
    old = {f"blocks.{i}.attn.q_bias": torch.zeros(1) for i in range(16)}
    torch.save(old, isolated_cache / "var_d16.pth")
    with pytest.raises(vg.CheckpointError, match="no blocks.\\*.attn.scale_mul_1H11.*old VAR version"):
        vg.load_pretrained(16, weights_dir=isolated_cache)


def test_truncated_and_non_checkpoint_files(isolated_cache):
    save_tiny_checkpoints(isolated_cache, "d16")
    path = isolated_cache / "var_d16.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(vg.CheckpointError, match="not a readable PyTorch checkpoint.*partial download"):
        vg.load_pretrained(16, weights_dir=isolated_cache)
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(vg.CheckpointError, match="not a readable PyTorch checkpoint"):
        vg.load_pretrained(16, weights_dir=isolated_cache)
    torch.save({"step": torch.tensor(3), "note": "hello"}, path)
    with pytest.raises(vg.CheckpointError, match="holds no model state_dict"):
        vg.read_state_dict(path)


def test_trainer_wrapper_and_key_mismatch(tmp_path):
    vae, var = random_model((1, 2), depth=1, seed=5)
    torch.save({"trainer": {"var_wo_ddp": var.state_dict(), "vae_local": vae.state_dict()}, "args": {}}, tmp_path / "ar.pth")
    sd = vg.read_state_dict(tmp_path / "ar.pth")
    fresh = vg.VAR(var.cfg, vae)
    vg.load_checked(fresh, sd, "ar.pth")
    labels, idx = labels_for(var, 2, 0), torch.randint(0, 32, (2, 5))
    assert torch.equal(vg.token_logits(fresh, labels, idx), vg.token_logits(var, labels, idx))
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(vg.CheckpointError, match="missing \\(1\\): head.bias; unexpected \\(1\\): extra.weight"):
        vg.load_checked(fresh, sd, "ar.pth")


@pytest.mark.slow
def test_load_pretrained_d16_end_to_end_with_download(isolated_cache, monkeypatch):
    """A random VAR-d16 + VQVAE saved as the official files, served over HTTP, downloaded into the
    cache, loaded strictly: the loaded model computes exactly what the saved one did."""
    src = isolated_cache / "server"
    src.mkdir()
    cfg = vg.VARConfig.preset("d16")
    vae, var = vg.build_vae_var(cfg, seed=1)
    torch.save(var.state_dict(), src / "var_d16.pth")
    torch.save(vae.state_dict(), src / vg.VAE_FILE)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(src), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(vg, "OFFICIAL_URL", f"http://127.0.0.1:{server.server_port}/{{}}")
    try:
        vae2, var2 = vg.load_pretrained(16)
    finally:
        server.shutdown()
    assert (isolated_cache / "cache" / "var_d16.pth").is_file() and not list((isolated_cache / "cache").glob("*.part"))
    labels, idx = torch.tensor([3]), torch.randint(0, 4096, (1, 30))
    assert torch.equal(vg.token_logits(var2, labels, idx), vg.token_logits(var, labels, idx))
    assert not any(p.requires_grad for p in vae2.parameters()) and var2.vae is vae2
    vg.load_pretrained(16)  # second call: found in the cache, no server needed
