"""vargrpo: reinforcement-learning fine-tuning of next-scale VAR image
models, in one file.

Reference implementation of
  [GRPO-VAR] Gallici & Saez de Ocariz Borde, "Fine-Tuning Next-Scale Visual Autoregressive
             Models with Group Relative Policy Optimization" (2025), and
  [VAR-RL]   "VAR RL Done Right" (arXiv 2601.02256): value as middle return (VMR),
             per-action normalisation weighting (PANW) and mask propagation (MP),
on a re-implementation of VAR (Tian et al. 2024) that loads the official checkpoints
(FoundationVision/VAR: vae_ch160v4096z32.pth, var_d16.pth .. var_d30.pth) with strict key
matching.

Launch lines (1 process, CPU ok; 1 node of 8 GPUs; 2 nodes, R = 0, 1):
  python vargrpo.py train --preset digits --reward brightness --out runs/b --lr 1e-4
  torchrun --nproc-per-node=8 vargrpo.py train --preset d16 --reward aesthetic --out runs/aes
  torchrun --nnodes=2 --node-rank=R --nproc-per-node=8 --rdzv-backend=c10d \\
      --rdzv-endpoint=HOST:29500 vargrpo.py train ...
Evaluation, the ablation, benchmarks, plots and the digits model live in vargrpo_tools.py;
the run folder, signals, downloads and argument checks in vargrpo_run.py.

Choices and deviations from the official VAR code, cited as [C1] ...:
 1. No label dropout and no drop-path: RL needs a deterministic teacher-forced pass that
    equals the sampling distribution.
 2. One attention path: torch SDPA with the official block-causal mask for teacher forcing,
    an explicit KV cache for sampling.
 3. Without classifier-free guidance (CFG, cfg == 0) the sampler runs the conditional batch
    only (the official one also runs the unconditional half).
 4. Temperature (absent from the official sampler) divides the logits after CFG and before
    top-k / top-p, so top-p acts on the distribution actually sampled from.
 5. Under autocast the head (adaLN + linear) and all after it (logits, the sampling softmax,
    log-probs) run in fp32: log-probabilities feed ratios. The sampler's KV cache is kept in
    the autocast dtype (memory).
 6. The VQVAE is frozen and held by the VAR as a plain reference (`var.vae`), outside its
    state_dict and parameters, so the VAR state_dict is exactly the official one.
Choices within the papers (where they are silent):
 7. Group std is the population std (ddof 0) plus eps = 1e-4; a group of equal rewards gets
    A = 0.
 8. The loss averages each sample's tokens with weights summing to 1 (uniform: the token
    mean), then the samples; the KL and the ratio use the tempered policy (the one sampled
    from), for pi and pi_ref.
 9. Every group of G samples draws from its own generator seeded by (seed, step, group), and
    every minibatch holds the same samples whatever the number of processes: a run does not
    depend on it (up to float summation order). Labels per step and minibatch sizes are
    global.
10. VMR reuses each group sample as the first of its prefix's n completions; prefix and
    suffix steps alternate by the schedule; the prefix's KV cache is recomputed (~8% of the
    tokens). Each stage's loss, its per-token KL included, covers that stage's tokens only.
11. Mask propagation starts from the reward's region when every term of the reward scores a
    region, else from gradient saliency; a reward with a flat or no gradient keeps every
    token.
12. AdamW with the official VAR parameter groups: no weight decay on embeddings,
    position/level embeddings, scale_mul, biases and other 1-D tensors (decay 0.01, torch's
    default, elsewhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import vargrpo_run
from vargrpo_run import (
    Run, Update, all_gather_cat, arg, clip_grad_norm, command_line,
    load_weight_files, my_micro_batches, timed,
)


# ---- Config
@dataclass(frozen=True)
class VARConfig:
    """The shapes of a VQVAE + VAR pair (the model is described in VAR below)."""

    depth: int = 16  # transformer blocks; width = 64 * depth, heads = depth (official)
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # side of each scale's token grid
    vocab_size: int = 4096  # V: VQVAE codebook size
    z_channels: int = 32  # Cvae: codebook vector size
    vae_ch: int = 160  # VQVAE base width
    num_classes: int = 1000  # class labels; index num_classes is the null (CFG) class
    # VQVAE channel multiple per level: 2^(levels - 1) downsampling (official: 16x)
    ch_mult: tuple = (1, 1, 2, 2, 4)

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        check_config(self)  # one ValueError naming what is wrong

    embed_dim = property(lambda self: 64 * self.depth)  # C (official: 64 * depth)
    num_heads = property(lambda self: self.depth)  # head_dim is always 64
    num_scales = property(lambda self: len(self.patch_nums))  # K
    seq_len = property(lambda self: sum(p * p for p in self.patch_nums))  # L
    image_size = property(lambda self: 2 ** (len(self.ch_mult) - 1) * self.patch_nums[-1])

    @staticmethod
    def preset(name: str) -> "VARConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]


def check_config(c: VARConfig):
    """A VARConfig's sizes: one ValueError naming what is wrong."""
    patch_nums = c.patch_nums
    rising = all(hi > lo for lo, hi in zip(patch_nums, patch_nums[1:]))
    if len(patch_nums) < 2 or not rising or patch_nums[0] < 1:
        raise ValueError(f"patch_nums must be >= 2 strictly increasing positive sides, got {patch_nums}")

    sizes = (c.depth, c.z_channels, c.num_classes)
    if min(sizes) < 1 or c.vocab_size < 2 or c.vae_ch % 32:
        raise ValueError(
            f"invalid VARConfig {c}: depth, vocab_size, z_channels, num_classes must be"
            " positive and vae_ch a multiple of 32 (GroupNorm with 32 groups)"
        )


PRESETS = {
    "d16": VARConfig(depth=16),
    "d20": VARConfig(depth=20),
    "d24": VARConfig(depth=24),
    "d30": VARConfig(depth=30),
    # the CPU demo's model, trained on rendered digits by `vargrpo_tools.py prepare`
    # (weights/): 64 px, 4 scales, 30 tokens
    "digits": VARConfig(depth=3, patch_nums=(1, 2, 3, 4), vocab_size=512, z_channels=8,
                        vae_ch=32, num_classes=10),
    # digits with a horizon (prepare --preset digits7), and two-digit numbers 00-99
    # (--preset numbers): 64 px, an 8x tokenizer, 7 scales, 155 tokens
    "digits7": VARConfig(depth=3, patch_nums=(1, 2, 3, 4, 5, 6, 8), vocab_size=512,
                         z_channels=8, vae_ch=32, num_classes=10, ch_mult=(1, 1, 2, 2)),
    "numbers": VARConfig(depth=3, patch_nums=(1, 2, 3, 4, 5, 6, 8), vocab_size=512,
                         z_channels=8, vae_ch=32, num_classes=100, ch_mult=(1, 1, 2, 2)),
    # CPU tests and smoke runs, random weights: 64 px, 30 tokens, 4 scales (the official
    # fixture's shape)
    "tiny": VARConfig(depth=2, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=64,
                      num_classes=10),
}


# ---- Scale bookkeeping. L = all tokens of all scales, l = the tokens of one scale, si =
# scale index, pn = side of that scale's grid.
def scale_begin_ends(patch_nums) -> list[tuple[int, int]]:
    """[(begin, end)] of each scale's tokens in the flattened sequence (row-major within a
    scale)."""
    begin_ends = []
    end = 0
    for pn in patch_nums:
        begin_ends.append((end, end + pn * pn))
        end += pn * pn
    return begin_ends


def scale_ids(patch_nums) -> torch.Tensor:
    """si_L: (L,) long, the scale index of every token."""
    parts = [torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)]
    return torch.cat(parts)


def block_causal_bias(patch_nums) -> torch.Tensor:
    """(L, L) additive attention bias: 0 where query scale >= key scale, -inf elsewhere: a
    token sees every token of its own and all coarser scales, nothing of finer scales."""
    si_L = scale_ids(patch_nums).float()
    return torch.where(si_L[:, None] >= si_L[None, :], 0.0, -torch.inf)


def split_scales(idx_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """(B, L) -> [(B, pn*pn)] per scale; L may stop at the end of any scale (a prefix)."""
    begin_ends = scale_begin_ends(patch_nums)
    ends = [e for _, e in begin_ends]
    L = idx_BL.shape[1]
    if L not in ends:
        raise ValueError(f"token sequence of length {L} does not end at a scale boundary {ends}")
    return [idx_BL[:, b:e] for b, e in begin_ends if e <= L]


# ---- VQVAE: the frozen multi-scale tokenizer. Encoder and decoder are the official taming-
# style CNNs (two res-blocks per level, attention at the lowest resolution); the quantizer
# is VAR's multi-scale one.
def group_norm(C: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=C, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Identity()
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x_BChw):
        # the frozen tokenizer runs without autograd: save the copies
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x_BChw), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, residual."""

    def __init__(self, C: int):
        super().__init__()
        self.norm = group_norm(C)
        self.qkv = nn.Conv2d(C, 3 * C, 1)
        self.proj_out = nn.Conv2d(C, C, 1)

    def forward(self, x_BChw):
        B, C, h, w = x_BChw.shape
        qkv = self.qkv(self.norm(x_BChw)).view(B, 3, C, h * w)
        q, k, v = qkv.transpose(2, 3).unbind(1)  # (B, hw, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, hw, C)
        out = out.transpose(1, 2).reshape(B, C, h, w)
        return x_BChw + self.proj_out(out)


def cnn_level(c_in, c_out, n_blocks, attn, resample) -> nn.Module:
    """One resolution level: n res-blocks (each followed by attention at the lowest level),
    then a 2x 'downsample' (strided conv) or 'upsample' (nearest, conv), named as in the
    official files."""
    level = nn.Module()
    blocks = [ResnetBlock(c_in, c_out)]
    blocks += [ResnetBlock(c_out, c_out) for _ in range(n_blocks - 1)]

    level.block = nn.ModuleList(blocks)
    n_attn = n_blocks if attn else 0
    level.attn = nn.ModuleList([AttnBlock(c_out) for _ in range(n_attn)])

    if resample == "downsample":
        level.downsample = nn.Module()
        level.downsample.conv = nn.Conv2d(c_out, c_out, 3, 2, 0)
    if resample == "upsample":
        level.upsample = nn.Module()
        level.upsample.conv = nn.Conv2d(c_out, c_out, 3, 1, 1)
    return level


def run_level(level: nn.Module, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    if hasattr(level, "downsample"):
        return level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
    if hasattr(level, "upsample"):
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return level.upsample.conv(h)
    return h


def cnn_mid(C: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(C, C)
    mid.attn_1 = AttnBlock(C)
    mid.block_2 = ResnetBlock(C, C)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, ch_mult):
        super().__init__()
        chs = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        levels = []
        for i in range(len(ch_mult)):
            resample = "downsample" if i != last else None
            levels.append(cnn_level(chs[i], chs[i + 1], 2, i == last, resample))
        self.down = nn.ModuleList(levels)
        self.mid = cnn_mid(chs[-1])
        self.norm_out = group_norm(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())
        return self.conv_out(h)


class Decoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, ch_mult):
        super().__init__()
        chs = [ch * m for m in ch_mult]
        last = len(ch_mult) - 1

        self.conv_in = nn.Conv2d(z_channels, chs[-1], 3, 1, 1)
        self.mid = cnn_mid(chs[-1])

        # self.up[i] runs from the coarsest level (i = last) down to 0; each takes the
        # channels of the level above
        levels = []
        for i in range(len(ch_mult)):
            resample = "upsample" if i != 0 else None
            c_in = chs[min(i + 1, last)]
            levels.append(cnn_level(c_in, chs[i], 3, i == last, resample))
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = run_level(level, h)
        h = F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())
        return self.conv_out(h)


class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv3x3(h), r = 0.5: VAR's refinement of each upsampled scale."""

    def __init__(self, C: int, resi_ratio: float = 0.5):
        super().__init__(C, C, 3, 1, 1)
        self.resi_ratio = resi_ratio

    def forward(self, h_BChw):
        refined = super().forward(h_BChw).mul(self.resi_ratio)
        return h_BChw.mul(1 - self.resi_ratio) + refined


def phi_index(si: int, num_scales: int, num_phi: int = 4) -> int:
    """Which of the 4 shared Phi convs refines scale si (official PhiPartiallyShared): the
    convs sit at ticks linspace(1/12, 11/12, 4); scale si uses the tick nearest to si/(K-1),
    the first one on a tie (in float64 exactly as numpy does: ties occur, e.g. K=10, si=2)."""
    third = 1 / 3 / num_phi
    step = (1 - third - third) / (num_phi - 1)
    ticks = [i * step + third for i in range(num_phi - 1)]
    ticks.append(1 - third)  # np.linspace's ticks, bit for bit
    gaps = [abs(tick - si / (num_scales - 1)) for tick in ticks]
    return gaps.index(min(gaps))


class VectorQuantizer(nn.Module):
    """Multi-scale residual quantizer: f_hat = sum_k Phi_k(up(h_k)),
    h_k = embedding(r_k): every scale's tokens r_k are looked up,
    upsampled (bicubic) to the finest grid, refined by Phi, and summed.
    Encoding quantizes the area-downsampled residual f - f_hat at each
    scale in turn (vargrpo_tools.f_to_idx)."""

    def __init__(self, vocab_size: int, Cvae: int, patch_nums):
        super().__init__()
        K = len(patch_nums)
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.quant_resi = nn.Module()
        # official share_quant_resi = 4
        phis = [Phi(Cvae) for _ in range(4)]
        self.quant_resi.qresi_ls = nn.ModuleList(phis)
        self.phi_idx = [phi_index(si, K) for si in range(K)]
        # unused; present in the official files
        ema = torch.zeros(K, vocab_size)
        self.register_buffer("ema_vocab_hit_SV", ema)

    def add_scale(self, f_hat_BChw, h_BChw, si: int):
        """f_hat + Phi_si(up(h_si)); up = bicubic to the finest grid (none at the last scale)."""
        side = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
        phi = self.quant_resi.qresi_ls[self.phi_idx[si]]
        return f_hat_BChw + phi(h_BChw)

    def embed(self, idx_Bl):
        """(B, pn*pn) tokens -> (B, Cvae, pn, pn) codebook vectors."""
        B, l = idx_Bl.shape
        pn = math.isqrt(l)
        h_BlC = self.embedding(idx_Bl)
        return h_BlC.transpose(1, 2).reshape(B, -1, pn, pn)

    def partial_sums(self, idx_per_scale):
        """f_hat after each of the given scales: [(B, Cvae, H, H)]."""
        B = idx_per_scale[0].shape[0]
        side = self.patch_nums[-1]
        Cvae = self.embedding.weight.shape[1]
        device = idx_per_scale[0].device
        f_hat = torch.zeros(B, Cvae, side, side, device=device)
        sums = []
        for si, idx_Bl in enumerate(idx_per_scale):
            f_hat = self.add_scale(f_hat, self.embed(idx_Bl), si)
            sums.append(f_hat)
        return sums

    def idx_to_var_input(self, idx_per_scale):
        """Teacher-forcing input: for scales 1..K-1, the area-downsampled partial sum of the
        scales before it. Returns (B, L - 1, Cvae) for the given scales but the last (None
        if only one)."""
        if len(idx_per_scale) == 1:
            return None
        sums = self.partial_sums(idx_per_scale[:-1])
        parts = []
        for si, f_hat in enumerate(sums):
            parts.append(area_down(f_hat, self.patch_nums[si + 1]))
        return torch.cat(parts, dim=1)


def area_down(f_BChw, pn: int):
    """Area-downsample the finest-grid map to pn x pn and flatten it: (B, pn*pn, C)."""
    B, C = f_BChw.shape[:2]
    f_BCpp = F.interpolate(f_BChw, size=(pn, pn), mode="area")
    return f_BCpp.view(B, C, pn * pn).transpose(1, 2)


class VQVAE(nn.Module):
    """The frozen tokenizer: multi-scale tokens -> images. State dict = official (the encoder
    is there for the layout; encoding images, used to pretrain a model, is
    vargrpo_tools.img_to_idx)."""

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        Cvae = config.z_channels
        self.encoder = Encoder(config.vae_ch, Cvae, config.ch_mult)
        self.decoder = Decoder(config.vae_ch, Cvae, config.ch_mult)
        self.quantize = VectorQuantizer(config.vocab_size, Cvae, config.patch_nums)
        self.quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1)

    def fhat_to_img(self, f_hat_BChw):
        """Decoded image in [0, 1]."""
        img = self.decoder(self.post_quant_conv(f_hat_BChw))
        return img.clamp(-1, 1).add(1).mul(0.5)

    def idx_to_img(self, idx_BL):
        """Tokens (B, L) -> images (B, 3, H, W) in [0, 1]."""
        L = self.config.seq_len
        if idx_BL.shape[1] != L:
            raise ValueError(f"idx_to_img expects all {L} tokens, got {idx_BL.shape[1]}")
        idx_per_scale = split_scales(idx_BL, self.config.patch_nums)
        return self.fhat_to_img(self.quantize.partial_sums(idx_per_scale)[-1])


# ---- VAR: a class-conditional transformer over the concatenated scales, with adaptive
# LayerNorm.
class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q and k (official attn_l2_norm): q is multiplied
    by a learned per-head exp(min(scale_mul, ln 100)) and the softmax scale is 1. k has no
    bias."""

    def __init__(self, C: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = C // num_heads
        scale_mul = torch.full((1, num_heads, 1, 1), 4.0).log()
        self.scale_mul_1H11 = nn.Parameter(scale_mul)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x_BlC, attn_bias=None, kv_cache=None):
        """attn_bias: (l, l) mask, True = visible (teacher forcing). kv_cache: [k, v] of
        earlier scales, extended in place (sampling: a scale attends to all earlier scales
        and itself, no mask)."""
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias)
        qkv = qkv.view(B, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, hd)

        scale = self.scale_mul_1H11.clamp_max(math.log(100)).exp()
        q = F.normalize(q, dim=-1).mul(scale)
        k = F.normalize(k, dim=-1)

        if kv_cache is not None:
            # cached in v's dtype, autocast's (CUDA's normalize returns fp32 k) [C5]
            k = k.to(v.dtype)
            if kv_cache[0] is not None:
                k = torch.cat((kv_cache[0], k), dim=2)
                v = torch.cat((kv_cache[1], v), dim=2)
            kv_cache[0] = k
            kv_cache[1] = v

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, scale=1.0
        )  # (B, H, l, hd)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * Attn(LN(x)(1 + scale1) + shift1);
    x += gamma2 * FFN(LN(x)(1 + scale2) + shift2), with
    (gamma1, gamma2, scale1, scale2, shift1, shift2) =
    Linear(SiLU(class embedding)), in this order."""

    def __init__(self, C: int, num_heads: int):
        super().__init__()
        self.C = C
        self.attn = SelfAttention(C, num_heads)
        self.ffn = FFN(C, 4 * C)
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x_BlC, cond_BD, attn_bias=None, kv_cache=None):
        ada_B16C = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        # (B, 1, C) each
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        h = self.ln_wo_grad(x_BlC).mul(scale1 + 1).add_(shift1)
        x_BlC = x_BlC + self.attn(h, attn_bias, kv_cache).mul_(gamma1)
        h = self.ln_wo_grad(x_BlC).mul(scale2 + 1).add_(shift2)
        return x_BlC + self.ffn(h).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1 + scale) + shift, (scale, shift) = Linear(SiLU(class embedding))."""

    def __init__(self, C: int):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC, cond_BD):
        ada_B12C = self.ada_lin(cond_BD).view(-1, 1, 2, self.C)
        scale, shift = ada_B12C.unbind(2)
        return self.ln_wo_grad(x_BlC) * (scale + 1) + shift


class VAR(nn.Module):
    """Next-scale prediction: token map r_k (all pn_k^2 tokens of scale k) ~ p(r_k | class,
    r_<k).

    The input of scale k > 0 is word_embed(area-downsample of the partial reconstruction
    from scales < k); scale 0's is the class embedding + pos_start. Plus absolute position
    and scale (level) embeddings. A block-causal mask lets each scale see itself and all
    coarser scales."""

    def __init__(self, config: VARConfig, vae: VQVAE):
        super().__init__()
        self.config = config
        C = config.embed_dim
        K = config.num_scales
        L = config.seq_len

        self.begin_ends = scale_begin_ends(config.patch_nums)
        self.first_l = config.patch_nums[0] ** 2
        # a plain reference: not a submodule, not in the state_dict [C6]
        self._vae = (vae,)

        self.word_embed = nn.Linear(config.z_channels, C)
        # row num_classes = the null class (CFG)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)

        blocks = [AdaLNSelfAttn(C, config.num_heads) for _ in range(config.depth)]
        self.blocks = nn.ModuleList(blocks)
        si_1L = scale_ids(config.patch_nums).view(1, L)
        self.register_buffer("lvl_1L", si_1L)
        bias_11LL = block_causal_bias(config.patch_nums).view(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", bias_11LL)

        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, config.vocab_size)
        # recompute each block in the backward pass (less memory)
        self.grad_checkpointing = False

    @property
    def vae(self) -> VQVAE:
        return self._vae[0]

    def head_logits(self, x_BlC, cond_BD):
        """fp32 logits (B, l, V) [C5]."""
        device_type = x_BlC.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            h = self.head_nm(x_BlC.float(), cond_BD.float())
            return self.head(h)

    def forward(self, labels_B, idx_BL):
        """Teacher forcing, one pass: logits (B, l, V) of the tokens idx_BL (all scales, or the
        first scales only), each predicted from the class and the tokens of coarser scales."""
        B, l = idx_BL.shape
        cond_BD = self.class_emb(labels_B)
        start_B1C = cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
        x_BlC = start_B1C + self.pos_start.expand(B, -1, -1)

        idx_per_scale = split_scales(idx_BL, self.config.patch_nums)
        # (B, l - first_l, Cvae)
        var_input = self.vae.quantize.idx_to_var_input(idx_per_scale)
        if var_input is not None:
            x_var_BlC = self.word_embed(var_input.float())
            x_BlC = torch.cat((x_BlC, x_var_BlC), dim=1)

        lvl_pos_1lC = self.lvl_embed(self.lvl_1L[:, :l]) + self.pos_1LC[:, :l]
        x_BlC = x_BlC + lvl_pos_1lC

        # block-causal, as a boolean mask
        visible_ll = self.attn_bias_for_masking[0, 0, :l, :l] == 0
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x_BlC = torch.utils.checkpoint.checkpoint(
                    block, x_BlC, cond_BD, visible_ll, use_reentrant=False
                )
            else:
                x_BlC = block(x_BlC, cond_BD, visible_ll)
        return self.head_logits(x_BlC, cond_BD)


def build_vae_var(config: VARConfig, seed: int = 0):
    """A random VQVAE (frozen) and VAR, PyTorch's default init (the official one:
    vargrpo_tools.official_init_), on the CPU, seeded locally (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(config).eval().requires_grad_(False)
        return vae, VAR(config, vae)


def unwrap(model: nn.Module) -> nn.Module:
    """The VAR inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# ---- Pre-trained weights. The files (.pth or .safetensors) are found or downloaded by
# vargrpo_run.load_weight_files and load with strict key matching into the classes above.
def load_pretrained(preset: str = "d16", weights_dir=None, device="cpu"):
    """The pre-trained (VQVAE, VAR) of a preset ('d16' .. 'd30': the official files; 'digits':
    the CPU demo's, shipped in weights/), loaded strictly, on `device`."""
    config = VARConfig.preset(preset)
    # no random init of billions of weights that are overwritten anyway
    with torch.device("meta"):
        vae = VQVAE(config)
        var = VAR(config, vae)

    # found or downloaded, read, checked, loaded with strict key matching
    load_weight_files(var, vae, preset, weights_dir)
    vae.to(device).eval().requires_grad_(False)
    return vae, var.to(device)


# ---- The distribution sampled from. One function, used by the sampler and by the log-prob
# recomputation, so that "old" log-probs recorded at sampling equal teacher-forced ones.
def process_logits(logits_BlV, uncond_BlV=None, *, cfg_t=0.0,
                   temperature=1.0, top_k=0, top_p=0.0):
    """Logits of the distribution VAR samples from (-inf = excluded),
    in this order:
      1. classifier-free guidance (CFG):
         l = (1 + t) l_cond - t l_uncond, t = cfg * si / (K - 1)
         (a linear ramp over the scales, as VAR)
      2. temperature: l / tau                                   [C4]
      3. top-k: keep l >= the k-th largest logit (ties kept)
      4. top-p: drop the least likely tokens while their total
         probability is <= 1 - p (the kept mass is >= p)
    cfg_t: a float, or a tensor broadcastable to (B, l, 1) holding t
    per token."""
    if uncond_BlV is not None:
        logits_BlV = (1 + cfg_t) * logits_BlV - cfg_t * uncond_BlV
    if temperature != 1.0:
        logits_BlV = logits_BlV / temperature

    if top_k > 0:
        k = min(top_k, logits_BlV.shape[-1])
        top_Blk = logits_BlV.topk(k, dim=-1, sorted=False).values
        kth_Bl1 = top_Blk.amin(-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -torch.inf)

    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1)  # ascending
        cum_BlV = sorted_BlV.softmax(-1).cumsum(-1)
        drop_sorted = cum_BlV <= 1 - top_p
        drop_sorted[..., -1] = False
        drop_BlV = drop_sorted.scatter(-1, order_BlV, drop_sorted)
        logits_BlV = logits_BlV.masked_fill(drop_BlV, -torch.inf)
    return logits_BlV


def check_sampling(temperature, cfg, top_k, top_p):
    """One ValueError for settings no distribution has."""
    ok = 0 < temperature < math.inf and 0 <= cfg < math.inf
    if not (ok and top_k >= 0 and 0 <= top_p < 1):
        raise ValueError(
            "need temperature > 0, cfg >= 0, top_k >= 0 and"
            f" 0 <= top_p < 1; got temperature={temperature},"
            f" cfg={cfg}, top_k={top_k}, top_p={top_p}"
        )


# ---- Sampling (KV cache, one scale per step) and teacher-forced log-probs (one pass).
@dataclass
class Rollout:
    labels: torch.Tensor  # (B,) class labels
    idx: torch.Tensor  # (B, L) tokens, all scales concatenated
    logprobs: torch.Tensor  # (B, L) of each token, under the distribution sampled from
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1], or None with decode=False
    nonfinite: torch.Tensor  # () tokens whose distribution was not finite (drawn uniformly)


@torch.no_grad()
def sample(var, labels_B, *, temperature=1.0, cfg=0.0, top_k=0, top_p=0.0, generator=None,
           prefix_idx=None, decode=True) -> Rollout:
    """Draw one image per label, scale by scale: one multinomial per scale over the (B*l, V)
    probabilities (the official sampler's RNG call order).

    generator: one, or a list of n generators for n equal groups of consecutive rows: each
    group then draws exactly as a call with its rows alone would. prefix_idx (B, l): the
    first scales are taken from it (no RNG used). A non-finite distribution (a diverged
    policy) is replaced by the uniform one and counted."""
    check_sampling(temperature, cfg, top_k, top_p)
    model = unwrap(var)
    config = model.config
    quant = model.vae.quantize
    device = model.pos_1LC.device
    B = labels_B.shape[0]
    K = config.num_scales
    V = config.vocab_size
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if B % len(gens):
        raise ValueError(f"{B} rows cannot be split among {len(gens)} generators")

    n_prefix = 0
    if prefix_idx is not None:  # it must end at a scale boundary
        split_scales(prefix_idx, config.patch_nums)
        n_prefix = prefix_idx.shape[1]
        if len(prefix_idx) != B:
            raise ValueError(f"prefix_idx has {len(prefix_idx)} rows for {B} labels")

    # [C3]: no unconditional half without CFG
    guided = cfg != 0
    null_B = torch.full_like(labels_B, config.num_classes)
    labels_in = torch.cat((labels_B, null_B)) if guided else labels_B
    cond_BD = model.class_emb(labels_in)
    lvl_pos_1LC = model.lvl_embed(model.lvl_1L) + model.pos_1LC
    first_l = model.first_l
    x_BlC = cond_BD.unsqueeze(1).expand(-1, first_l, -1)
    x_BlC = x_BlC + model.pos_start.expand(len(labels_in), -1, -1)
    x_BlC = x_BlC + lvl_pos_1LC[:, :first_l]

    kv_caches = [[None, None] for _ in model.blocks]
    side = config.patch_nums[-1]
    f_hat = torch.zeros(B, config.z_channels, side, side, device=device)
    idx_BL = torch.empty(B, config.seq_len, dtype=torch.long, device=device)
    logp_BL = torch.empty(B, config.seq_len, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    for si, (bg, ed) in enumerate(model.begin_ends):
        for block, kv in zip(model.blocks, kv_caches):
            x_BlC = block(x_BlC, cond_BD, None, kv)
        logits_BlV = model.head_logits(x_BlC, cond_BD)
        uncond_BlV = logits_BlV[B:] if guided else None
        logits_BlV = process_logits(logits_BlV[:B], uncond_BlV, cfg_t=cfg * (si / (K - 1)),
                                    temperature=temperature, top_k=top_k, top_p=top_p)

        if ed <= n_prefix:
            idx_Bl = prefix_idx[:, bg:ed]
        else:
            probs_BlV = logits_BlV.softmax(dim=-1)
            finite_Bl1 = probs_BlV.sum(-1, keepdim=True).isfinite()  # no (B, l, V) temporaries
            nonfinite += (~finite_Bl1).sum()
            probs_BlV = torch.where(finite_Bl1, probs_BlV, 1.0 / V)
            idx_Bl = draw(probs_BlV, gens)
        idx_BL[:, bg:ed] = idx_Bl
        logp_BL[:, bg:ed] = logits_BlV.log_softmax(-1).gather(-1, idx_Bl.unsqueeze(-1))[..., 0]

        f_hat = quant.add_scale(f_hat, quant.embed(idx_Bl), si)
        if si < K - 1:
            # the next scale's input: the partial reconstruction, area-downsampled
            nb, ne = model.begin_ends[si + 1]
            pn = config.patch_nums[si + 1]
            x_BlC = model.word_embed(area_down(f_hat, pn))
            x_BlC = x_BlC + lvl_pos_1LC[:, nb:ne]
            if guided:
                x_BlC = x_BlC.repeat(2, 1, 1)

    # free the KV cache before the decoder allocates its feature maps
    del kv_caches, x_BlC, logits_BlV
    images = model.vae.fhat_to_img(f_hat) if decode else None
    return Rollout(labels_B, idx_BL, logp_BL, images, nonfinite)


def draw(probs_BlV, gens) -> torch.Tensor:
    """One multinomial draw per token, (B, l): the i-th of len(gens) equal groups of
    consecutive rows from gens[i], each group's (rows * l, V) probabilities in one call."""
    B, l, V = probs_BlV.shape
    draws = []
    for probs_blV, gen in zip(probs_BlV.chunk(len(gens)), gens):
        draws.append(torch.multinomial(probs_blV.reshape(-1, V), 1, generator=gen))
    return torch.cat(draws).view(B, l)


def token_logprobs(var, labels_B, idx_BL, temperature=1.0, *, cfg=0.0,
                   top_k=0, top_p=0.0, return_logits=False):
    """log pi(idx_t | label, coarser scales) of every token, (B, L), under the distribution
    `sample` draws from with these settings, in one teacher-forced pass (differentiable;
    with CFG, conditional and null class as one batch). return_logits: also the processed
    logits, as (logp_BL, logits_BLV) (the trainer's entropy and exact KL)."""
    check_sampling(temperature, cfg, top_k, top_p)
    config = unwrap(var).config
    L = idx_BL.shape[1]
    uncond_BLV = None
    if cfg == 0:
        logits_BLV = var(labels_B, idx_BL)
    else:
        null_B = torch.full_like(labels_B, config.num_classes)
        both_BLV = var(torch.cat((labels_B, null_B)), idx_BL.repeat(2, 1))
        logits_BLV, uncond_BLV = both_BLV.chunk(2)

    si_L = scale_ids(config.patch_nums)[:L].to(logits_BLV.device)
    ramp_L = si_L.double() / (config.num_scales - 1)
    cfg_t = (cfg * ramp_L).float().view(1, L, 1)
    logits_BLV = process_logits(
        logits_BLV, uncond_BLV, cfg_t=cfg_t, temperature=temperature,
        top_k=top_k, top_p=top_p,
    )

    chosen_BL = logits_BLV.gather(-1, idx_BL.unsqueeze(-1))[..., 0]
    logp_BL = chosen_BL - logits_BLV.logsumexp(-1)
    if return_logits:
        return logp_BL, logits_BLV
    return logp_BL


# ---- The RL maths [GRPO-VAR eq. 1-2], as pure functions: tensors in, tensors out. Each one
# runs pasted alone into a file that imports math, torch and torch.nn.functional as F. Sign
# convention: we maximise J; the loss is -J.
def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the G samples of one
    group (a row)  [GRPO-VAR eq. 2].

    Population std (ddof 0), in float64. A group whose rewards are all equal gets A = 0
    exactly (not rounding noise blown up by the division); non-finite rewards are left out
    of their group's statistics and get A = 0. The same A is used for every token of the
    sample [GRPO-VAR 4.2]. Returns A (N, G) float32."""
    r = rewards_NG.double()
    valid = torch.isfinite(r)
    n_valid = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n_valid
    centred = torch.where(valid, r - mean, 0.0)
    std = (centred.square().sum(dim=1, keepdim=True) / n_valid).sqrt()

    hi = torch.where(valid, r, -torch.inf).amax(dim=1, keepdim=True)
    lo = torch.where(valid, r, torch.inf).amin(dim=1, keepdim=True)
    # all equal, or fewer than two finite rewards
    flat = ~(hi > lo)
    return torch.where(flat, 0.0, centred / (std + eps)).float()


def clipped_surrogate(logp_BL, old_logp_BL, adv_B, clip_eps=0.2):
    """PPO's clipped objective per token  [GRPO-VAR eq. 1]:
        min(rho A, clip(rho, 1 - eps, 1 + eps) A),
        rho = pi / pi_old = exp(logp - old_logp),
    A broadcast from the sample to its tokens. A token whose clipped
    term is the smaller one gives no gradient. Returns (B, L)."""
    ratio = torch.exp(logp_BL - old_logp_BL)
    A = adv_B.unsqueeze(1)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.minimum(ratio * A, clipped * A)


def kl_k3(logp_BL, ref_logp_BL):
    """Per-token KL estimate  [GRPO-VAR eq. 1]:
        k3 = pi_ref/pi - log(pi_ref/pi) - 1 = expm1(d) - d,
        d = ref_logp - logp.
    >= 0, and exactly 0 where pi = pi_ref; averaged over tokens drawn
    from pi it estimates KL(pi || pi_ref). As a loss its gradient,
    1 - pi_ref/pi per token, is in expectation that of KL(pi_ref || pi),
    not of KL(pi || pi_ref) (kl_exact's)."""
    log_ratio = ref_logp_BL - logp_BL
    return torch.expm1(log_ratio) - log_ratio


def kl_exact(logits_BLV, ref_logits_BLV):
    """Per-token KL(pi || pi_ref) of [GRPO-VAR eq. 1] exactly,
        sum_v pi_v (log pi_v - log pi_ref_v),
    with its true gradient. Computed as the sum over pi's support of
    pi_v k3_v plus pi_ref's mass off it (equal, as
    sum_v pi_v (pi_ref_v / pi_v - 1) = 0 there): every term is >= 0,
    so it never dips below 0."""
    logp = logits_BLV.log_softmax(-1)
    ref_logp = ref_logits_BLV.log_softmax(-1)
    p = logp.exp()
    log_ratio = ref_logp - logp
    k3 = torch.expm1(log_ratio) - log_ratio
    return torch.where(p > 0, p * k3, ref_logp.exp()).sum(-1)


def entropy(logits_BLV):
    """Per-token entropy of the policy, -sum_v pi_v log pi_v: logged, not in the loss (the KL
    "also acts as an entropy bonus" [GRPO-VAR 5.4])."""
    logp = logits_BLV.log_softmax(-1)
    plogp = torch.where(logp > -torch.inf, logp.exp() * logp, 0.0)
    return -plogp.sum(-1)


def grpo_loss(surrogate_BL, kl_BL, pg_weights_BL=None, beta=0.2, kl_weights_BL=None):
    """loss = -J,  [GRPO-VAR eq. 1]
        J = (1/B) sum_b sum_t [ w_bt surrogate_bt - beta u_bt kl_bt ].
    w: policy-gradient token weights, each sample's summing to 1
    (default 1/L: the token mean; PANW and mask propagation change it);
    a sample with w = 0 gets no policy gradient. u: KL token weights,
    default w (mask propagation keeps the KL outside its mask)."""
    L = surrogate_BL.shape[1]
    if pg_weights_BL is None:  # the token mean
        pg_weights_BL = torch.full_like(surrogate_BL, 1.0 / L)
    if kl_weights_BL is None:
        kl_weights_BL = pg_weights_BL
    pg_B = (pg_weights_BL * surrogate_BL).sum(1)
    objective_B = pg_B - beta * (kl_weights_BL * kl_BL).sum(1)
    return -objective_B.mean()


# ---- Beyond vanilla GRPO [VAR-RL]: per-action normalisation weighting (PANW), value as
# middle return (VMR) and mask propagation (MP). Pure functions; the trainer uses them
# through the token weights (PANW, VMR stage, MP) and the advantages (VMR).
def panw_weights(patch_nums, alpha: float) -> torch.Tensor:
    """PANW token weights (L,)  [VAR-RL PANW]: a token of scale si (a pn x pn grid) weighs
    k_si = (pn^2)^(-alpha), normalised so that one sample's L weights sum to 1. alpha = 0:
    the plain token mean (1/L); alpha = 1: every scale gets an equal share 1/K."""
    sizes = []
    for pn in patch_nums:
        sizes.append(torch.full((pn * pn,), float(pn * pn), dtype=torch.float64))
    k_L = torch.cat(sizes).pow(-alpha)
    return (k_L / k_L.sum()).float()


def stage_mask(patch_nums, stage, split_m: int) -> torch.Tensor:
    """(L,) 1 on the tokens a step trains, 0 elsewhere  [VAR-RL VMR]: all (stage None: plain
    GRPO), the prefix scales 0..m-1 (a VMR 'prefix' step) or the suffix scales m..K-1 (a
    'suffix' step)."""
    K = len(patch_nums)
    si_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])
    begin = 0
    end = K
    if stage == "prefix":
        end = split_m
    if stage == "suffix":
        begin = split_m
    return ((si_L >= begin) & (si_L < end)).float()


def token_weights(panw_L, stage_L, mask_NL, valid_N):
    """The token weights of one step, normalised once  [VAR-RL PANW, MP]:
        w_nt = valid_n panw_t stage_t mask_nt / sum_t' (same),
    each sample's row summing to 1; a row with no weight left (a
    non-finite reward, or nothing in its mask) is all 0: that sample
    gets no gradient. mask_NL = 1 gives the KL weights, the MP mask the
    policy-gradient weights. Returns (N, L)."""
    w_NL = panw_L * stage_L * mask_NL
    total_N1 = w_NL.sum(dim=1, keepdim=True)
    safe_N1 = torch.where(total_N1 > 0, total_N1, 1.0)
    w_NL = torch.where(total_N1 > 0, w_NL / safe_N1, 0.0)
    return w_NL * valid_N[:, None]


def middle_value(rewards_Nn: torch.Tensor, eta: float) -> torch.Tensor:
    """Value as middle return  [VAR-RL VMR, eq. 10]:
        V_m(s_m) = eta log( (1/K) sum_k exp(R_k / eta) ),
    a soft maximum of the K on-policy completions' rewards R_k of one
    prefix s_m (a row; the paper's K is n = --vmr-k here, K being the
    scales). It lies between their mean (eta -> inf) and their max
    (eta -> 0). Computed in float64 with logsumexp."""
    r = rewards_Nn.double()
    n_comp = r.shape[1]
    value = eta * (torch.logsumexp(r / eta, dim=1) - math.log(n_comp))
    return value.to(rewards_Nn.dtype)


def default_vmr_split(patch_nums) -> int:
    """VMR's middle scale m (prefix = scales 0..m-1)  [VAR-RL VMR]: the scale boundary nearest
    8% of the tokens (VAR-RL's m256 fraction). For the 256 px models that is after the 5x5
    scale: 55 of 680."""
    ends = np.cumsum([pn * pn for pn in patch_nums]).tolist()
    L = ends[-1]
    ends = ends[:-1]  # the prefix must leave a suffix
    gaps = [abs(e - 0.08 * L) for e in ends]
    return 1 + gaps.index(min(gaps))


def propagate_mask(mask_fine_BHW: torch.Tensor, patch_nums):
    """Mask propagation  [VAR-RL MP]: a binary mask on the finest token grid (B, pn_K, pn_K) ->
    a mask on every token of every scale (B, L). A coarser token is relevant if any
    finest-scale token its area covers is relevant: area-downsample the binary mask and
    threshold > 0."""
    m_B1HW = (mask_fine_BHW > 0).float().unsqueeze(1)
    B = m_B1HW.shape[0]
    parts = []
    for pn in patch_nums:
        m_B1pp = F.interpolate(m_B1HW, size=(pn, pn), mode="area")
        parts.append((m_B1pp > 0).float().view(B, pn * pn))
    return torch.cat(parts, dim=1)


def initial_mask(reward, images_B3HW, pn: int, keep: float,
                 labels_B=None):
    """The reward-relevant finest-grid mask (B, pn, pn) that mask propagation starts from
    [VAR-RL MP; C11].

    Each image's region if every term of the reward scores one (`reward.region_masks`: a
    box, or the text boxes an OCR finds); else gradient saliency |d reward / d image| summed
    over channels, area-pooled to the token grid, its top `keep` fraction of cells kept, ties
    kept (a flat saliency, or no gradient, keeps every cell). It is where the reward is most
    sensitive, not a proof that other tokens cannot change it (the decoder mixes areas). A
    label-aware reward is called with `labels_B`."""
    B = len(images_B3HW)
    device = images_B3HW.device
    region_BHW = None
    if hasattr(reward, "region_masks"):
        region_BHW = reward.region_masks(images_B3HW, labels_B)
    if region_BHW is not None:
        region_B1HW = region_BHW[:, None].float()
        pooled = F.interpolate(region_B1HW, size=(pn, pn), mode="area")
        return (pooled[:, 0] > 0).float()

    x = images_B3HW.detach().float().requires_grad_(True)
    inputs = (x,) if labels_B is None else (x, labels_B)
    grad = None
    with torch.enable_grad():
        r = reward(*inputs)
        if r.requires_grad:
            grad = torch.autograd.grad(r.sum(), x, allow_unused=True)[0]
    # a reward without a gradient (a threshold, or not differentiable)
    if grad is None:
        return torch.ones(B, pn, pn, device=device)
    saliency = grad.abs().sum(1, keepdim=True)
    cells = F.interpolate(saliency, size=(pn, pn), mode="area")
    cells_BN = cells[:, 0].view(B, -1)
    n_kept = max(1, round(keep * pn * pn))
    kth_B1 = cells_BN.topk(n_kept, dim=1).values[:, -1:]
    return (cells_BN >= kth_B1).float().view(B, pn, pn)


# ---- Random streams: every draw from a generator seeded by (seed, stream, ...) [C9].
STREAM_LABELS = 1
STREAM_SAMPLE = 2
STREAM_ORDER = 3
STREAM_SUBSET = 5


def derive_seed(*keys: int) -> int:
    """A seed for one random stream, mixed from integers (seed, step, stream, ...)."""
    seq = np.random.SeedSequence([int(k) for k in keys])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


# ---- Settings: `python vargrpo.py train --help` lists them; defaults: the GRPO-VAR paper's.
@dataclass
class TrainArgs:
    reward: str = arg("brightness", "reward spec: brightness, bright, dark, aesthetic,"
        " clip:PROMPT, brightness:region=x0,y0,x1,y1, digit:bold, digit:correct (digits"
        " presets), or weighted sums such as 0.5*aesthetic+clip:a painting")
    preset: str = arg("d16", "model: d16 d20 d24 d30 (official weights, --weights-dir), digits"
        " (the CPU demo's, weights/) or tiny (random, tests)")
    out: str = arg("", "run directory: new, empty, or a run to replace with --overwrite")
    steps: int = arg(1000, "training steps (one step = one rollout batch and its updates)")
    seed: int = arg(0, "seed of every random stream: labels, sampling, minibatch order")
    labels_per_step: int = arg(32, "class labels drawn per step, GLOBAL: split across"
        " processes, a group never spans two [paper: 32]")
    group_size: int = arg(16, "G: samples per label; advantages are normalised within these"
        " groups [paper: 16]")
    minibatch: int = arg(32, "samples per optimizer step, global [paper: 32];"
        " labels*G/minibatch updates per step")
    micro_batch: int = arg(0, "samples per forward/backward on each process, dividing minibatch/processes"
        " (0 = on a GPU the largest that fits its free memory, docs/memory.md; on the CPU all)")
    sample_batch: int = arg(0, "rows per sample() call on each process, in whole groups (0 = as"
        " many as fit in the GPU's free memory; on the CPU all of the process's rows)")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    lr: float = arg(0.0001, "AdamW learning rate [paper: 1e-4]")
    weight_decay: float = arg(0.01, "AdamW weight decay of weight matrices (torch default; the"
        " paper does not say) [C12]")
    beta: float = arg(0.2, "KL coefficient [paper: 0.2]")
    kl: str = arg("k3", "per-token KL to the pre-trained model: k3 (estimator, as the paper;"
        " its gradient is that of KL(ref||pi)) or exact (whole vocabulary, KL(pi||ref))", choices=("k3", "exact"))
    clip_eps: float = arg(0.2, "PPO clip range epsilon [paper: 0.2]")
    temperature: float = arg(0.7, "sampling temperature while training (no CFG / top-k /"
        " top-p) [paper: 0.7]")
    adv_eps: float = arg(0.0001, "epsilon added to the group std")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this (0 = off; the paper does"
        " not clip)")
    reward_batch: int = arg(64, "images per reward-model (and decoder) call")
    clip_model: str = arg(None, "open_clip model of the CLIP rewards (default"
        " ViT-L-14-quickgelu; 'tiny-random' or a JSON config for CPU smoke runs)", type=str)
    clip_pretrained: str = arg("openai", "open_clip weights tag of --clip-model ('none' = random)")
    clip_weights: str = arg(None, "local open_clip checkpoint file for --clip-model (no"
        " download)", type=str)
    aesthetic_head: str = arg(None, "local sac+logos+ava1-l14-linearMSE.pth (else cache, else"
        " download)", type=str)
    panw_alpha: float = arg(0.0, "PANW: a scale-t token weighs (h_t w_t)^-alpha, normalised"
        " per sample; 0 = off (token mean), 1 = equal share per scale [VAR-RL: 1]")
    vmr: bool = arg(False, "VMR: value as middle return, alternating prefix and suffix updates")
    vmr_m: int = arg(0, "VMR split: the prefix is scales 0..m-1 (0 = the boundary nearest 8%%"
        " of the tokens)")
    vmr_k: int = arg(2, "VMR: on-policy completions per prefix for the middle value [VAR-RL: 2]")
    vmr_eta: float = arg(1.0, "VMR: temperature eta of the soft middle value [VAR-RL: 1]")
    vmr_schedule: str = arg("3:1", "VMR: prefix updates : suffix updates, repeating [VAR-RL"
        " 'fine-grained': 3:1]")
    mask_propagation: bool = arg(False, "MP: policy-gradient weight only on reward-relevant"
        " tokens, propagated fine to coarse")
    mp_keep: float = arg(0.5, "MP: fraction of finest-grid cells kept by gradient saliency"
        " (rewards without a region)")
    label_subset: str = arg("all", "train on all classes, or 'half': a fixed 50%% of them,"
        " seeded by --seed [GRPO-VAR Table 1]", choices=("all", "half"))
    save_every: int = arg(100, "checkpoint every this many steps (and at the end, and on"
        " Ctrl-C / SIGTERM)")
    keep_last: int = arg(3, "checkpoints to keep")
    image_every: int = arg(50, "write a PNG grid of samples every this many steps (0 = off)")
    tracker: str = arg("none", "live curves: tensorboard mirrors metrics.jsonl and the grids"
        " to DIR/tb", choices=("none", "tensorboard"))
    resume: str = arg(None, "continue the run in this directory from its last checkpoint", type=str)
    overwrite: bool = arg(False, "allow --out to name a directory that holds a run: exactly"
        " that run's files are replaced")
    weights_dir: str = arg(None, "folder with the pre-trained .pth / .safetensors files (else"
        " cache, else download)", type=str)
    random_init: bool = arg(False, "start from random weights (seed 0) instead of the"
        " pre-trained ones: benchmarks, smoke tests")
    grad_checkpointing: bool = arg(False, "recompute each transformer block in the backward"
        " pass (less activation memory)")
    fsdp: bool = arg(False, "shard weights, gradients and AdamW state (and the reference) across"
        " the torchrun processes, FSDP2: d30 on 40 GB cards (README)")
    dist_timeout: float = arg(60.0, "minutes a process may wait for the others (rank 0 alone saves: 32 GB for d30)")
    device: str = arg(None, "cpu or cuda (default: cuda; without one, d16-d30 stop, digits/tiny use the CPU)", type=str)
    dtype: str = arg("auto", "autocast dtype for the model: auto (bf16 on GPU, fp32 on CPU),"
        " bf16, fp32", choices=("auto", "bf16", "fp32"))


# ---- The trainer [GRPO-VAR 4]: `train` holds the loop and one step (1 sample, 2 reward, 3
# advantages, 4 token weights, 5 the clipped update: policy_update, below it, 6 log and
# save); the run machinery sits behind `run`. The step's other parts follow, in step order.
def train(args: TrainArgs, given=frozenset()) -> dict:
    """GRPO fine-tuning of a VAR [GRPO-VAR 4], with VMR / PANW / MP [VAR-RL] when switched on.
    `given`: the flags set on the command line. Returns the last step's metrics."""
    metrics = {}
    with Run(args, given, PRESETS) as run:  # processes, signals; leaving it unlocks DIR
        with run.starting():  # every process starts, or none does (nothing is written)
            args, reward = run.open(args, given)  # new / overwritten / resumed
            vae, policy, ref = build_models(args, run.device)  # tokenizer, pi_theta, pi_ref
            run.load_checkpoint(policy)  # resumed: the checkpoint's weights

        # DDP or --fsdp (the update trains run.model; saving uses `policy`); AdamW
        opt, start = run.distribute(policy, ref, make_optimizer)
        pool = label_pool(args, policy.config.num_classes)
        patch_nums = policy.config.patch_nums
        n_local = args.labels_per_step // run.dist.world
        # this process's groups, by global index
        group_ids = list(range(run.dist.rank * n_local, (run.dist.rank + 1) * n_local))
        amp = run.amp  # autocast: bf16 on GPUs, fp32 on the CPU (--dtype)

        for step in range(start, args.steps):
            # VMR [VAR-RL]: None (plain GRPO), or this step's stage, split and prefix
            vmr = vmr_plan(step, args, policy)

            # 1 sample: G images per label from the current policy (pi_old), their
            #   log-probs recorded; VMR: n - 1 more completions of each sample's prefix
            sampler, per_call = run.sampling_policy(policy)  # the step's clock starts
            labels_n = step_labels(pool, args, step)[group_ids].to(run.device)
            with amp():
                roll = rollout(sampler, labels_n, group_ids, args, step, per_call, vmr)
            images = decode(vae, roll.idx, args.reward_batch, run.device)

            # 2 reward (retried once if it raises); MP [VAR-RL]: the tokens it depends on
            scored = run.retry(step, score, reward, images, roll.labels, patch_nums, args)

            # 3 advantages (eq. 2, or VMR's middle value): one per sample, for its tokens
            returns_NG = advantage_groups(scored.rewards, vmr, args, n_local)
            adv_NG = group_advantages(returns_NG, args.adv_eps)

            # 4 token weights (PANW x VMR stage x MP), each sample's summing to 1; pi_ref
            batch = update_batch(roll, returns_NG, adv_NG, scored.mp_mask, vmr, ref, args,
                                 amp)

            # 5 the clipped update with the per-token KL (eq. 1), per minibatch
            update = policy_update(run.model, opt, ref, batch, args, step, amp)

            # 6 metrics, logged; a diverged policy stops the run; saved every
            #   --save-every steps, and on Ctrl-C / SIGTERM (then stopped)
            metrics = run.after_step(step, vmr, images, roll, scored, adv_NG, batch, update)
    return metrics


@timed("update")
def policy_update(model, opt, ref, batch: UpdateBatch, args: TrainArgs,
                  step: int, amp) -> Update:
    """Step 5: --ppo-epochs passes over the step's samples, one optimizer step per minibatch
    [GRPO-VAR eq. 1], pi_theta and pi_ref tempered as sampled [C8]. One seeded global order
    makes the minibatches the same whatever the number of processes [C9]; each process trains
    its share of each, DDP averages the shares. A non-finite gradient stops it, untaken."""
    config = unwrap(model).config
    device = batch.idx.device
    params = [p for p in model.parameters() if p.requires_grad]
    update = Update(scale_ids(config.patch_nums).to(device), config.num_scales)
    n_minibatches = len(batch.idx) // args.minibatch

    for epoch in range(args.ppo_epochs):
        seed = derive_seed(args.seed, step, STREAM_ORDER, epoch)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(batch.idx), generator=gen)

        for mb in range(n_minibatches):
            opt.zero_grad(set_to_none=True)
            # this process's share, in micro-batches whose gradients add up
            for ids, part, sync in my_micro_batches(model, order, mb, args, device):
                labels = batch.labels[ids]
                idx = batch.idx[ids]
                with sync:  # DDP: the last micro-batch all-reduces the sum
                    with amp():
                        logp, logits = token_logprobs(model, labels, idx, args.temperature,
                                                      return_logits=True)
                    surrogate = clipped_surrogate(logp, batch.old_logp[ids],
                                                  batch.adv[ids], args.clip_eps)

                    if args.kl == "k3":
                        kl = kl_k3(logp, batch.ref_logp[ids])
                    else:  # the whole vocabulary of pi_ref, per micro-batch
                        with torch.no_grad(), amp():
                            ref_logits = token_logprobs(ref, labels, idx, args.temperature,
                                                        return_logits=True)[1]
                        kl = kl_exact(logits, ref_logits)

                    loss = part * grpo_loss(surrogate, kl, batch.pg_w[ids], args.beta,
                                            batch.kl_w[ids])
                    loss.backward()

                ent = None
                if epoch == 0 and mb == 0:  # still the sampling policy: its entropy
                    ent = entropy(logits.detach())
                update.add(ids, logp, kl, surrogate, loss, ent)

            norm = clip_grad_norm(params, args.max_grad_norm)
            if not torch.isfinite(norm):  # the one host read of an update
                update.nonfinite = f"the loss gradient (update {mb + 1} of epoch {epoch + 1})"
                return update
            opt.step()
            update.grad_norms.append(norm)
    return update


# ---- Setting up: models, optimizer, labels.
def build_models(args: TrainArgs, device):
    """(vae, policy, ref): frozen tokenizer, policy, frozen pre-trained VAR."""
    config = VARConfig.preset(args.preset)
    if args.preset == "tiny" or args.random_init:
        vae, ref = build_vae_var(config, seed=0)
    else:
        vae, ref = load_pretrained(args.preset, args.weights_dir)
    policy = VAR(ref.config, vae)
    policy.load_state_dict(ref.state_dict())
    policy.grad_checkpointing = args.grad_checkpointing
    ref.requires_grad_(False)
    return vae.to(device), policy.to(device), ref.to(device)


def make_optimizer(policy: VAR, args: TrainArgs, device: str):
    """AdamW with the official VAR parameter groups [C12]: no weight decay on embeddings,
    scale_mul and 1-D tensors, so rows without a gradient (null, unseen classes) stay."""
    no_decay_names = ("class_emb", "lvl_embed", "pos_", "scale_mul")
    decay = []
    no_decay = []
    for name, p in policy.named_parameters():
        if p.ndim < 2 or any(k in name for k in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)

    groups = [
        dict(params=decay, weight_decay=args.weight_decay),
        dict(params=no_decay, weight_decay=0.0),
    ]
    fused = True if device.startswith("cuda") else None
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused)


def label_pool(args: TrainArgs, num_classes: int) -> torch.Tensor:
    """The classes a run trains on: all, or a fixed seeded half [GRPO-VAR Table 1]."""
    if args.label_subset == "all":
        return torch.arange(num_classes)
    gen = torch.Generator().manual_seed(derive_seed(args.seed, STREAM_SUBSET))
    half = torch.randperm(num_classes, generator=gen)[:num_classes // 2]
    return half.sort().values


@dataclass(frozen=True)
class VMRPlan:
    """One VMR step [VAR-RL VMR]: its stage, the middle scale m, the prefix's tokens."""

    stage: str  # 'prefix' or 'suffix'
    split_m: int
    prefix_len: int


def vmr_plan(step: int, args: TrainArgs, policy: VAR):
    """None (plain GRPO), or the step's VMR plan: P prefix then S suffix steps (P:S)."""
    if not args.vmr:
        return None
    split_m = args.vmr_m or default_vmr_split(policy.config.patch_nums)
    prefix_len = policy.begin_ends[split_m - 1][1]
    n_prefix, n_suffix = map(int, args.vmr_schedule.split(":"))
    in_prefix = step % (n_prefix + n_suffix) < n_prefix
    stage = "prefix" if in_prefix else "suffix"
    return VMRPlan(stage, split_m, prefix_len)


# ---- Step 1: sample.
def step_labels(pool, args: TrainArgs, step: int) -> torch.Tensor:
    """The step's labels, all processes' (uniform over the pool)."""
    seed = derive_seed(args.seed, step, STREAM_LABELS)
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (args.labels_per_step,), generator=gen)]


@timed("sample")
def rollout(policy: VAR, labels_n, group_ids, args: TrainArgs, step: int,
            per_call: int, vmr: VMRPlan | None = None) -> Rollout:
    """G samples of each label and their log-probs.

    Group i (a global index) draws from its own generator seeded by (seed, step, i), so its
    samples do not depend on which process draws them, nor with which others [C9]; up to
    `per_call` groups share a sample() call. VMR: n = --vmr-k completions of each sample's
    prefix, the sample being the first: G*n rows per label, prefix j's completion c at row
    j*n + c."""
    G = args.group_size
    n_comp = args.vmr_k if vmr else 1
    prefix_len = vmr.prefix_len if vmr else None
    gens = []
    for i in group_ids:
        seed = derive_seed(args.seed, step, STREAM_SAMPLE, i)
        gens.append(torch.Generator(labels_n.device).manual_seed(seed))

    idx = []
    logp = []
    labels = []
    nonfinite = 0
    for begin in range(0, len(group_ids), per_call):
        labels_B = labels_n[begin:begin + per_call].repeat_interleave(G)
        kw = dict(temperature=args.temperature, generator=gens[begin:begin + per_call],
                  decode=False)
        outs = [sample(policy, labels_B, **kw)]
        prefix_Bl = outs[0].idx[:, :prefix_len]
        for _ in range(n_comp - 1):
            outs.append(sample(policy, labels_B, prefix_idx=prefix_Bl, **kw))

        # row j*n + c: completion c of sample j
        idx.append(torch.stack([o.idx for o in outs], 1).flatten(0, 1))
        logp.append(torch.stack([o.logprobs for o in outs], 1).flatten(0, 1))
        labels.append(labels_B.repeat_interleave(n_comp))
        nonfinite = nonfinite + sum(o.nonfinite for o in outs)

    logp_NL = torch.cat(logp).float()
    return Rollout(torch.cat(labels), torch.cat(idx), logp_NL, None, nonfinite)


@timed("decode")
@torch.no_grad()
def decode(vae: VQVAE, idx_NL, batch: int, device: str):
    """Tokens -> images in [0, 1] (fp32), `batch` at a time; the decoder in bf16 on GPUs."""
    on_gpu = str(device).startswith("cuda")
    images = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
        for i in range(0, len(idx_NL), batch):
            images.append(vae.idx_to_img(idx_NL[i:i + batch]).float())
    return torch.cat(images)


# ---- Step 2: reward, and the mask-propagation mask.
@dataclass
class Scored:
    rewards: torch.Tensor  # (N,)
    components: dict  # {name: (N,)} the terms of a summed reward
    mp_mask: torch.Tensor | None  # (N, L) MP's token mask, or None


@timed("reward")
def score(reward, images, labels_N, patch_nums, args: TrainArgs) -> Scored:
    """The rewards of the images (of classes `labels_N`), in --reward-batch chunks, and with
    --mask-propagation the reward-relevant tokens [VAR-RL MP]: the finest grid's mask,
    propagated to every scale. Label-blind rewards ignore the labels."""
    chunk = args.reward_batch
    chunks = [images[i:i + chunk] for i in range(0, len(images), chunk)]
    labels = [labels_N[i:i + chunk] for i in range(0, len(images), chunk)]
    with torch.no_grad():
        outs = [reward(c, y, return_components=True) for c, y in zip(chunks, labels)]

    components = {}
    for name in outs[0][1]:
        parts = [c[name].float() for _, c in outs]
        components[name] = torch.cat(parts)
    rewards = torch.cat([r.float() for r, _ in outs])

    mp_mask = None
    if args.mask_propagation:
        fine = [initial_mask(reward, c, patch_nums[-1], args.mp_keep, y)
                for c, y in zip(chunks, labels)]
        mp_mask = propagate_mask(torch.cat(fine), patch_nums)
    return Scored(rewards.to(images.device), components, mp_mask)


# ---- Step 3: advantages.
def advantage_groups(rewards_N, vmr, args: TrainArgs, n_labels: int):
    """The rows that group_advantages normalises [GRPO-VAR eq. 2; VAR-RL VMR]: R over a label's
    G samples (VMR suffix steps: G*n); VMR prefix steps: the middle value V_m of each prefix
    (from its n = --vmr-k completions) over the label's G prefixes. Returns (n_labels, .)."""
    if vmr and vmr.stage == "prefix":
        completions_Nn = rewards_N.view(-1, args.vmr_k)
        values_N = middle_value(completions_Nn, args.vmr_eta)
        return values_N.view(n_labels, args.group_size)
    return rewards_N.view(n_labels, -1)


# ---- Step 4: token weights, pi_ref's log-probs, and what the update trains on.
@dataclass
class UpdateBatch:
    """What step 5 trains on: one row per sample."""

    labels: torch.Tensor  # (N,)
    idx: torch.Tensor  # (N, L) tokens
    old_logp: torch.Tensor  # (N, L) log-probs at sampling, pi_old
    adv: torch.Tensor  # (N,) the sample's advantage, for its tokens
    pg_w: torch.Tensor  # (N, L) policy-gradient token weights, rows summing to 1 (or 0)
    kl_w: torch.Tensor  # (N, L) KL token weights, likewise
    ref_logp: torch.Tensor | None = None  # (N, L) log pi_ref, the frozen model (k3 KL)


def update_batch(roll: Rollout, returns_NG, adv_NG, mp_mask, vmr, ref,
                 args: TrainArgs, amp) -> UpdateBatch:
    """Step 4: all processes' rows, their token weights (PANW x VMR stage x MP), pi_ref."""
    stage = vmr.stage if vmr else None
    split_m = vmr.split_m if vmr else 0
    rows = slice(None)
    if stage == "prefix":  # one row per prefix
        rows = slice(None, None, args.vmr_k)
    adv_N = adv_NG.flatten()
    valid_N = torch.isfinite(returns_NG).flatten()
    device = adv_N.device

    patch_nums = ref.config.patch_nums
    panw_L = panw_weights(patch_nums, args.panw_alpha).to(device)
    stage_L = stage_mask(patch_nums, stage, split_m).to(device)
    ones_NL = torch.ones(len(adv_N), len(panw_L), device=device)
    pg_mask_NL = ones_NL if mp_mask is None else mp_mask[rows]

    batch = UpdateBatch(
        labels=roll.labels[rows],
        idx=roll.idx[rows],
        old_logp=roll.logprobs[rows],
        adv=adv_N,
        pg_w=token_weights(panw_L, stage_L, pg_mask_NL, valid_N),
        kl_w=token_weights(panw_L, stage_L, ones_NL, valid_N),
    )
    if args.kl == "k3":
        batch.ref_logp = reference_logprobs(ref, batch.labels, batch.idx, args, amp)

    # every process's rows in global group order, so that minibatches do not depend on
    # the number of processes [C9] (a few MB even at 512 samples of 680 tokens)
    rows = {k: all_gather_cat(v) for k, v in vars(batch).items() if v is not None}
    return UpdateBatch(**rows)


def reference_logprobs(ref, labels_N, idx_NL, args: TrainArgs, amp,
                       chunk: int = 64) -> torch.Tensor:
    """log pi_ref (N, L) of this process's rows for the k3 KL, `chunk` rows a pass [C8]."""
    parts = []
    with torch.no_grad(), amp():
        for i in range(0, len(idx_NL), chunk):
            labels = labels_N[i:i + chunk]
            idx = idx_NL[i:i + chunk]
            parts.append(token_logprobs(ref, labels, idx, args.temperature))
    return torch.cat(parts)


# ---- Command line. Evaluation, ablation, plots: `python vargrpo_tools.py --help`.
def main(argv=None):
    """`python vargrpo.py train ...`, also under torchrun; a user's mistake, a failed run or a
    signal ends in one line and its exit code (vargrpo_run.command_line)."""
    return command_line(argv, TrainArgs, train)


# names that live in vargrpo_run, importable from here as before
MOVED_TO_RUN = (
    "VAE_FILE", "CheckpointError", "PeerFailed", "RunFailed", "Stopped", "UsageError",
    "find_or_download", "load_checked", "make_reward", "read_state_dict",
)


def __getattr__(name):
    if name in MOVED_TO_RUN:
        import vargrpo_run

        return getattr(vargrpo_run, name)
    raise AttributeError(f"module 'vargrpo' has no attribute {name!r}")


if __name__ == "__main__":
    main()
