"""vargrpo: reinforcement-learning fine-tuning of next-scale VAR image models, in one file.

Reference implementation of
  [GRPO-VAR] Gallici & Saez de Ocariz Borde, "Fine-Tuning Next-Scale Visual Autoregressive Models
             with Group Relative Policy Optimization" (2025), and
  [VAR-RL]   "VAR RL Done Right" (arXiv 2601.02256): VMR, PANW and mask propagation,
on a re-implementation of VAR (Tian et al. 2024) that loads the official checkpoints
(FoundationVision/VAR: vae_ch160v4096z32.pth, var_d16.pth .. var_d30.pth) with strict key matching.

Launch lines (evaluation, the ablation, benchmarks, plots and the digits model: vargrpo_tools.py):
  python vargrpo.py train --preset digits --reward brightness --out runs/b --lr 1e-4   # 1 process, CPU ok
  torchrun --nproc-per-node=8 vargrpo.py train --preset d16 --reward aesthetic --out runs/aes   # 1 node
  torchrun --nnodes=2 --node-rank=R --nproc-per-node=8 --rdzv-backend=c10d \
      --rdzv-endpoint=HOST:29500 vargrpo.py train ...                                  # 2 nodes, R = 0, 1

Choices and deviations from the official VAR code, referenced below as [C1] ...:
 1. No label dropout and no drop-path: RL needs a deterministic teacher-forced pass that equals the sampling
    distribution (they are pre-training regularisers).
 2. One attention path: torch SDPA with the official block-causal mask for teacher forcing, an explicit KV cache
    for sampling. No flash-attn / xformers / fused kernels.
 3. With cfg == 0 the sampler runs the conditional batch only (the official one also runs the unconditional half).
 4. Temperature (absent from the official sampler) divides the logits after CFG and before top-k / top-p, so
    top-p acts on the distribution actually sampled from.
 5. The head (adaLN + linear) always runs in fp32, also under autocast: log-probabilities feed ratios.
 6. The VQVAE is frozen and held by the VAR as a plain reference (`var.vae`), outside its state_dict and
    parameters, so the VAR state_dict is exactly the official one.
Choices within the papers (where they are silent):
 7. Group std is the population std (ddof 0) plus eps = 1e-4; a group of equal rewards gets A = 0.
 8. The loss averages each sample's tokens with weights summing to 1 (uniform: the token mean), then the samples;
    the KL and the ratio use the tempered policy (the one sampled from), for pi and pi_ref.
 9. Every group of G samples draws from its own generator seeded by (seed, step, group), and every minibatch holds
    the same samples whatever the number of processes: a run does not depend on it (up to float summation
    order). Labels per step and minibatch sizes are global.
10. VMR reuses each group sample as the first of its prefix's K completions; prefix and suffix steps alternate by
    the schedule; the prefix's KV cache is recomputed (~8% of the tokens). Each stage's loss, its per-token KL
    included, covers that stage's tokens only.
11. Mask propagation starts from the reward's region when every term of the reward scores a region, else from
    gradient saliency; a reward with a flat or no gradient keeps every token.
12. AdamW with the official VAR parameter groups: no weight decay on embeddings, position/level embeddings,
    scale_mul, biases and other 1-D tensors (decay 0.01, torch's default, elsewhere).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ---- Config
@dataclass(frozen=True)
class VARConfig:
    """Next-scale prediction: token r_k (all pn_k^2 tokens of scale k) ~ p(r_k | class, r_<k). The input of scale
    k > 0 is word_embed(area-downsample of the partial reconstruction from scales < k); scale 0's is the class embedding
    + pos_start; plus position and scale (level) embeddings. A block-causal mask: each scale sees itself and coarser ones."""
    depth: int = 16                 # transformer blocks; width = 64 * depth, heads = depth (official)
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # side of each scale's token grid
    vocab_size: int = 4096          # V: VQVAE codebook size
    z_channels: int = 32            # Cvae: codebook vector size
    vae_ch: int = 160               # VQVAE base width (multiples 1,1,2,2,4 -> 16x downsampling)
    num_classes: int = 1000         # class labels; index num_classes is the null (CFG) class
    ch_mult: tuple = (1, 1, 2, 2, 4)  # VQVAE channel multiple per level; 2^(levels-1) downsampling (official: 16x)

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        pn = self.patch_nums
        if len(pn) < 2 or any(b <= a for a, b in zip(pn, pn[1:])) or pn[0] < 1:
            raise ValueError(f"patch_nums must be >= 2 strictly increasing positive sides, got {pn}")
        if self.depth < 1 or self.vocab_size < 2 or self.z_channels < 1 or self.num_classes < 1 or self.vae_ch % 32:
            raise ValueError(f"invalid VARConfig {self}: depth, vocab_size, z_channels, num_classes must be positive "
                             "and vae_ch a multiple of 32 (GroupNorm with 32 groups)")

    embed_dim = property(lambda self: 64 * self.depth)      # C (official: width = 64 * depth)
    num_heads = property(lambda self: self.depth)           # head_dim is always 64
    num_scales = property(lambda self: len(self.patch_nums))  # K
    seq_len = property(lambda self: sum(p * p for p in self.patch_nums))  # L
    image_size = property(lambda self: 2 ** (len(self.ch_mult) - 1) * self.patch_nums[-1])

    @staticmethod
    def preset(name: str) -> "VARConfig":
        if name in PRESETS:
            return PRESETS[name]
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

PRESETS = {
    "d16": VARConfig(depth=16), "d20": VARConfig(depth=20), "d24": VARConfig(depth=24), "d30": VARConfig(depth=30),
    # the CPU demo's model, trained on rendered digits by `vargrpo_tools.py prepare` (weights/): 64 px, 30 tokens
    "digits": VARConfig(depth=3, patch_nums=(1, 2, 3, 4), vocab_size=512, z_channels=8, vae_ch=32, num_classes=10),
    # a digits model with a horizon (vargrpo_tools.py prepare --preset digits7): 64 px, 8x tokenizer, 7 scales, 155 tokens
    "digits7": VARConfig(depth=3, patch_nums=(1, 2, 3, 4, 5, 6, 8), vocab_size=512, z_channels=8, vae_ch=32, num_classes=10, ch_mult=(1, 1, 2, 2)),
    # CPU tests and smoke runs, random weights: 64 px, 30 tokens, 4 scales (the official fixture's shape).
    "tiny": VARConfig(depth=2, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=64, num_classes=10),
}

# ---- Scale bookkeeping. L = all tokens of all scales, l = the tokens of one scale, si = scale index.
def scale_begin_ends(patch_nums) -> list[tuple[int, int]]:
    """[(begin, end)] of each scale's tokens in the flattened sequence (row-major within a scale)."""
    ends = np.cumsum([pn * pn for pn in patch_nums]).tolist()
    return list(zip([0] + ends[:-1], ends))

def scale_ids(patch_nums) -> torch.Tensor:
    """(L,) long: the scale index of every token."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])

def block_causal_bias(patch_nums) -> torch.Tensor:
    """(L, L) additive attention bias: 0 where query scale >= key scale, -inf elsewhere: a token
    sees every token of its own and all coarser scales, nothing of finer scales."""
    s_L = scale_ids(patch_nums).float()
    return torch.where(s_L[:, None] >= s_L[None, :], 0.0, -torch.inf)

def split_scales(idx_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """(B, L) -> [(B, pn*pn)] per scale; L may stop at the end of any scale (a prefix)."""
    ends = [e for _, e in scale_begin_ends(patch_nums)]
    if idx_BL.shape[1] not in ends:
        raise ValueError(f"token sequence of length {idx_BL.shape[1]} does not end at a scale boundary {ends}")
    return [idx_BL[:, b:e] for b, e in scale_begin_ends(patch_nums) if e <= idx_BL.shape[1]]

# ---- VQVAE: the frozen multi-scale tokenizer. Encoder/decoder are the official taming-style CNNs (channel multipliers
# 1,1,2,2,4; two res-blocks per level; attention at the lowest resolution); the quantizer is VAR's multi-scale one.
def group_norm(C: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=C, eps=1e-6, affine=True)

class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BChw):
        inplace = not torch.is_grad_enabled()  # the frozen tokenizer runs without autograd: save the copies
        h = self.conv1(F.silu(self.norm1(x_BChw), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return self.nin_shortcut(x_BChw) + h

class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, residual."""
    def __init__(self, C: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = group_norm(C), nn.Conv2d(C, 3 * C, 1), nn.Conv2d(C, C, 1)

    def forward(self, x_BChw):
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).view(B, 3, C, h * w).transpose(2, 3).unbind(1)  # (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)                                        # (B, hw, C)
        return x_BChw + self.proj_out(out.transpose(1, 2).reshape(B, C, h, w))

def cnn_level(c_in: int, c_out: int, n_blocks: int, attn: bool, resample: str | None) -> nn.Module:
    """One resolution level: n res-blocks (each followed by attention at the lowest level), then a
    2x 'downsample' (strided conv) or 'upsample' (nearest, conv), named as in the official files."""
    level = nn.Module()
    level.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks)])
    level.attn = nn.ModuleList([AttnBlock(c_out) for _ in range(n_blocks if attn else 0)])
    if resample:
        setattr(level, resample, nn.Module())
        getattr(level, resample).conv = nn.Conv2d(c_out, c_out, 3, *((2, 0) if resample == "downsample" else (1, 1)))
    return level

def run_level(level: nn.Module, h):
    for i, block in enumerate(level.block):
        h = level.attn[i](block(h)) if len(level.attn) else block(h)
    if hasattr(level, "downsample"):
        return level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
    return level.upsample.conv(F.interpolate(h, scale_factor=2, mode="nearest")) if hasattr(level, "upsample") else h

def cnn_mid(C: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(C, C), AttnBlock(C), ResnetBlock(C, C)
    return mid

class Encoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, ch_mult=(1, 1, 2, 2, 4)):
        super().__init__()
        chs, last = [ch] + [ch * m for m in ch_mult], len(ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList([cnn_level(chs[i], chs[i + 1], 2, i == last, "downsample" if i != last else None)
                                   for i in range(len(ch_mult))])
        self.mid, self.norm_out, self.conv_out = cnn_mid(chs[-1]), group_norm(chs[-1]), nn.Conv2d(chs[-1], z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))

class Decoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, ch_mult=(1, 1, 2, 2, 4)):
        super().__init__()
        chs, last = [ch * m for m in ch_mult], len(ch_mult) - 1
        self.conv_in, self.mid = nn.Conv2d(z_channels, chs[-1], 3, 1, 1), cnn_mid(chs[-1])
        # self.up[i] runs from the coarsest level (i = 4) down to 0; each takes the channels of the level above
        self.up = nn.ModuleList([cnn_level(chs[min(i + 1, last)], chs[i], 3, i == last, "upsample" if i != 0 else None)
                                 for i in range(len(ch_mult))])
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))

class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv3x3(h), r = 0.5: VAR's refinement of each upsampled scale."""
    def __init__(self, C: int, resi_ratio: float = 0.5):
        super().__init__(C, C, 3, 1, 1)
        self.resi_ratio = resi_ratio

    def forward(self, h_BChw):
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)

def phi_index(si: int, num_scales: int, num_phi: int = 4) -> int:
    """Which of the 4 shared Phi convs refines scale si (official PhiPartiallyShared): the convs sit
    at ticks linspace(1/12, 11/12, 4); scale si uses the tick nearest to si/(K-1), the first one on
    a tie (computed in float64 exactly as numpy does: ties occur, e.g. K=10, si=2)."""
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))

class VectorQuantizer(nn.Module):
    """Multi-scale residual quantizer: f_hat = sum_k Phi_k(up(h_k)), h_k = embedding(r_k): every
    scale's tokens r_k are looked up, upsampled (bicubic) to the finest grid, refined by Phi, and
    summed. Encoding quantizes the area-downsampled residual f - f_hat at each scale in turn."""
    def __init__(self, vocab_size: int, Cvae: int, patch_nums):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.quant_resi = nn.Module()
        self.quant_resi.qresi_ls = nn.ModuleList([Phi(Cvae) for _ in range(4)])  # official share_quant_resi = 4
        self.phi_idx = [phi_index(si, len(patch_nums)) for si in range(len(patch_nums))]
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))  # unused; in official files

    def add_scale(self, f_hat_BChw, h_BChw, si: int):
        """f_hat + Phi_si(up(h_si)); up = bicubic to the finest grid (none at the last scale)."""
        H = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return f_hat_BChw + self.quant_resi.qresi_ls[self.phi_idx[si]](h_BChw)

    def embed(self, idx_Bl):
        """(B, pn*pn) tokens -> (B, Cvae, pn, pn) codebook vectors."""
        B, l = idx_Bl.shape
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, math.isqrt(l), math.isqrt(l))

    def partial_sums(self, idx_per_scale):
        """f_hat after each of the given scales: [(B, Cvae, H, H)]."""
        B, H = idx_per_scale[0].shape[0], self.patch_nums[-1]
        f_hat, out = torch.zeros(B, self.embedding.weight.shape[1], H, H, device=idx_per_scale[0].device), []
        for si, idx_Bl in enumerate(idx_per_scale):
            f_hat = self.add_scale(f_hat, self.embed(idx_Bl), si)
            out.append(f_hat)
        return out

    def idx_to_var_input(self, idx_per_scale):
        """Teacher-forcing input: for scales 1..K-1, the area-downsampled partial sum of the scales
        before it. Returns (B, L - 1, Cvae) for the given scales but the last (None if only one)."""
        sums = self.partial_sums(idx_per_scale[:-1]) if len(idx_per_scale) > 1 else []
        return torch.cat([area_down(f, self.patch_nums[si + 1]) for si, f in enumerate(sums)], dim=1) if sums else None

def area_down(f_BChw, pn: int):
    """Area-downsample the finest-grid map to pn x pn and flatten it: (B, pn*pn, C)."""
    B, C = f_BChw.shape[:2]
    return F.interpolate(f_BChw, size=(pn, pn), mode="area").view(B, C, pn * pn).transpose(1, 2)

class VQVAE(nn.Module):
    """The frozen tokenizer: multi-scale tokens -> images. State dict = official (the encoder is there
    for the layout; encoding images, used to pretrain a model, is vargrpo_tools.img_to_idx)."""
    def __init__(self, config: VARConfig):
        super().__init__()
        self.config, Cvae = config, config.z_channels
        self.encoder = Encoder(config.vae_ch, Cvae, config.ch_mult)
        self.decoder = Decoder(config.vae_ch, Cvae, config.ch_mult)
        self.quantize = VectorQuantizer(config.vocab_size, Cvae, config.patch_nums)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(Cvae, Cvae, 3, 1, 1), nn.Conv2d(Cvae, Cvae, 3, 1, 1)

    def fhat_to_img(self, f_hat_BChw):
        """Decoded image in [0, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1).add(1).mul(0.5)

    def idx_to_img(self, idx_BL):
        """Tokens (B, L) -> images (B, 3, H, W) in [0, 1]."""
        if idx_BL.shape[1] != self.config.seq_len:
            raise ValueError(f"idx_to_img expects all {self.config.seq_len} tokens, got {idx_BL.shape[1]}")
        return self.fhat_to_img(self.quantize.partial_sums(split_scales(idx_BL, self.config.patch_nums))[-1])

# ---- VAR: a class-conditional transformer over the concatenated scales, with adaptive LayerNorm.
class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q and k (official attn_l2_norm): q is multiplied by a
    learned per-head exp(min(scale_mul, ln 100)) and the softmax scale is 1. k has no bias."""
    def __init__(self, C: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x_BlC, attn_bias=None, kv_cache=None):
        """attn_bias: (l, l) mask, True = visible (teacher forcing); kv_cache: [k, v] of earlier scales,
        extended in place (sampling: a scale attends to all earlier scales and itself, no mask)."""
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (B, H, l, hd) each
        q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(math.log(100)).exp())
        k = F.normalize(k, dim=-1)
        if kv_cache is not None:
            if kv_cache[0] is not None:
                k, v = torch.cat((kv_cache[0], k), dim=2), torch.cat((kv_cache[1], v), dim=2)
            kv_cache[0], kv_cache[1] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)  # (B, H, l, hd)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))

class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * Attn(LN(x)(1 + scale1) + shift1); x += gamma2 * FFN(LN(x)(1 + scale2) + shift2),
    with (gamma1, gamma2, scale1, scale2, shift1, shift2) = Linear(SiLU(class embedding)) (this order)."""
    def __init__(self, C: int, num_heads: int):
        super().__init__()
        self.C, self.attn, self.ffn = C, SelfAttention(C, num_heads), FFN(C, 4 * C)
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x_BlC, cond_BD, attn_bias=None, kv_cache=None):
        ada_B16C = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)  # (B, 1, C) each
        x_BlC = x_BlC + self.attn(self.ln_wo_grad(x_BlC).mul(scale1 + 1).add_(shift1), attn_bias, kv_cache).mul_(gamma1)
        return x_BlC + self.ffn(self.ln_wo_grad(x_BlC).mul(scale2 + 1).add_(shift2)).mul(gamma2)

class AdaLNBeforeHead(nn.Module):
    """LN(x)(1 + scale) + shift, (scale, shift) = Linear(SiLU(class embedding))."""
    def __init__(self, C: int):
        super().__init__()
        self.C, self.ln_wo_grad = C, nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BlC) * (scale + 1) + shift

class VAR(nn.Module):
    """Next-scale prediction: token r_k (all pn_k^2 tokens of scale k) ~ p(r_k | class, r_<k).

    The input of scale k > 0 is word_embed(area-downsample of the partial reconstruction from
    scales < k); scale 0 is the class embedding + pos_start. Plus absolute position and scale
    (level) embeddings. A block-causal mask lets each scale see itself and all coarser scales.
    """
    def __init__(self, config: VARConfig, vae: VQVAE):
        super().__init__()
        self.config = config
        C, K, L = config.embed_dim, config.num_scales, config.seq_len
        self.begin_ends = scale_begin_ends(config.patch_nums)
        self.first_l = config.patch_nums[0] ** 2
        self._vae = (vae,)  # a plain reference: not a submodule, not in the state_dict [C6]
        self.word_embed = nn.Linear(config.z_channels, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)  # row num_classes = null class (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)
        self.blocks = nn.ModuleList([AdaLNSelfAttn(C, config.num_heads) for _ in range(config.depth)])
        self.register_buffer("lvl_1L", scale_ids(config.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(config.patch_nums).view(1, 1, L, L))
        self.head_nm, self.head = AdaLNBeforeHead(C), nn.Linear(C, config.vocab_size)
        self.grad_checkpointing = False  # recompute each block in the backward pass (less activation memory)

    vae = property(lambda self: self._vae[0])

    def head_logits(self, x_BlC, cond_BD):
        """fp32 logits (B, l, V) [C5]."""
        with torch.autocast(device_type=x_BlC.device.type, enabled=False):
            return self.head(self.head_nm(x_BlC.float(), cond_BD.float()))

    def forward(self, labels_B, idx_BL):
        """Teacher forcing, one pass: logits (B, l, V) of the tokens idx_BL (all scales, or the first
        scales only), each predicted from the class and the tokens of coarser scales."""
        B, l = idx_BL.shape
        cond_BD = self.class_emb(labels_B)
        x_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        var_input = self.vae.quantize.idx_to_var_input(split_scales(idx_BL, self.config.patch_nums))  # (B, l - first_l, Cvae)
        if var_input is not None:
            x_BlC = torch.cat((x_BlC, self.word_embed(var_input.float())), dim=1)
        x_BlC = x_BlC + (self.lvl_embed(self.lvl_1L[:, :l]) + self.pos_1LC[:, :l])
        visible_ll = self.attn_bias_for_masking[0, 0, :l, :l] == 0  # block-causal, as a boolean mask
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_BlC = torch.utils.checkpoint.checkpoint(block, x_BlC, cond_BD, visible_ll, use_reentrant=False)
            else:
                x_BlC = block(x_BlC, cond_BD, visible_ll)
        return self.head_logits(x_BlC, cond_BD)

def build_vae_var(config: VARConfig, seed: int = 0) -> tuple[VQVAE, VAR]:
    """A random VQVAE and VAR (PyTorch's default init; the official one is vargrpo_tools.official_init_),
    on the CPU, seeded locally (the global RNG is left as it was). The VQVAE is frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(config).eval().requires_grad_(False)
        return vae, VAR(config, vae)

def unwrap(model: nn.Module) -> nn.Module:
    """The VAR inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)

# ---- Pre-trained weights: --weights-dir, the repository's weights/ folder, the cache, else the official
# repository on the Hugging Face hub. Files (.pth or .safetensors) load with strict key matching.
OFFICIAL_REPO, OFFICIAL_ENDPOINT, VAE_FILE = "FoundationVision/var", "https://huggingface.co", "vae_ch160v4096z32.pth"
OFFICIAL_PRESETS = ("d16", "d20", "d24", "d30")

class CheckpointError(RuntimeError):
    """A weights file that cannot be used; the message ends with what to do (exit code 2)."""

def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

def find_or_download(filename: str, weights_dir=None) -> Path:
    """`filename` (or the .safetensors of that name) in weights_dir, weights/ beside this file or the cache; else an
    official file is downloaded into the cache (huggingface_hub: never a partial file under the real name)."""
    cache = Path(os.environ.get("VARGRPO_CACHE") or Path.home() / ".cache" / "vargrpo")
    folders = [Path(d) for d in (weights_dir, Path(__file__).resolve().parent / "weights", cache) if d]
    for path in [f / name for f in folders for name in (filename, Path(filename).stem + ".safetensors")]:
        if path.is_file():
            return path
    url, where = f"{OFFICIAL_ENDPOINT}/{OFFICIAL_REPO}/resolve/main/{filename}", " or ".join(str(f) for f in folders)
    todo = f"download {url} yourself and pass --weights-dir naming its folder (or put it in {cache})"
    if filename not in [VAE_FILE] + [f"var_{p}.pth" for p in OFFICIAL_PRESETS]:
        raise CheckpointError(f"{filename} is not in {where}; pass --weights-dir naming the folder that holds it")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("VARGRPO_OFFLINE") == "1":
        raise CheckpointError(f"{filename} is not in {where} and offline mode is on; {todo}")
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(OFFICIAL_REPO, filename, local_dir=cache, endpoint=OFFICIAL_ENDPOINT))
    except Exception as e:  # offline, unreachable, 404, disk full: huggingface_hub raises many types
        raise CheckpointError(f"{filename} is not in {where} and downloading {url} failed ({first_line(e)}); {todo}") from None

def load_pth(path, hint: str):
    """torch.load(path, weights_only=True) onto the CPU; a file it cannot read is one CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)}); {hint}") from None

def read_state_dict(path) -> dict:
    """The state_dict in a .safetensors or .pth file: a plain state_dict, the official training
    script's wrapper (ckpt['trainer']['var_wo_ddp']) or a vargrpo checkpoint (ckpt['model'])."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)}); export it again") from None
    obj = load_pth(path, "if it is a partial download, delete it and fetch it again")
    if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not (isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())):
        raise CheckpointError(f"{path} holds no model state_dict; pass an official VAR/VQVAE .pth file")
    return obj

def load_checked(module: nn.Module, state_dict: dict, path, assign: bool = False):
    """load_state_dict(strict=True), with a one-line error naming what differs."""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(ks)}): {', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''}"
                 for name, ks in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if ks]
        raise CheckpointError(f"{path} does not match {type(module).__name__}: {'; '.join(parts)}; "
                              "check that the file and the preset/config belong together")
    module.load_state_dict(state_dict, strict=True, assign=assign)

def load_pretrained(preset: str = "d16", weights_dir=None, device="cpu") -> tuple[VQVAE, VAR]:
    """The pre-trained VQVAE and VAR of a preset ('d16' .. 'd30': the official files; 'digits': the
    CPU demo's, shipped in weights/), loaded strictly, on `device`."""
    config, vae_file = VARConfig.preset(preset), VAE_FILE if preset in OFFICIAL_PRESETS else f"vae_{preset}.pth"
    var_path, vae_path = find_or_download(f"var_{preset}.pth", weights_dir), find_or_download(vae_file, weights_dir)
    var_sd, vae_sd = ({k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(p).items()} for p in (var_path, vae_path))
    depth = max((int(k.split(".")[1]) + 1 for k in var_sd if k.startswith("blocks.")), default=0)
    if depth != config.depth:  # the errors a user can cause with a real file, each with what to do
        raise CheckpointError(f"{var_path} holds a depth-{depth} VAR (by its shapes), not depth {config.depth}; "
                              f"use the preset it was made for (d{depth} for an official file)")
    with torch.device("meta"):  # no random init of billions of weights that are overwritten anyway
        vae = VQVAE(config)
        var = VAR(config, vae)
    load_checked(var, var_sd, var_path, assign=True)
    load_checked(vae, vae_sd, vae_path, assign=True)
    vae.to(device).eval().requires_grad_(False)
    return vae, var.to(device)

# ---- The distribution sampled from. One function, used by the sampler and by the log-prob
# recomputation, so that "old" log-probs recorded at sampling equal teacher-forced ones.
def process_logits(logits_BlV, uncond_BlV=None, *, cfg_t=0.0, temperature=1.0, top_k=0, top_p=0.0):
    """Logits of the distribution VAR samples from (-inf = excluded), in this order:
      1. CFG: l = (1 + t) l_cond - t l_uncond, t = cfg * si / (K - 1) (linear ramp over scales, VAR)
      2. temperature: l / tau                                                         [C4]
      3. top-k: keep l >= the k-th largest logit (ties at the boundary kept)
      4. top-p: drop the least likely tokens while their total probability is <= 1 - p (the kept mass is >= p)
    cfg_t: float, or a tensor broadcastable to (B, l, 1) holding t per token."""
    if uncond_BlV is not None:
        logits_BlV = (1 + cfg_t) * logits_BlV - cfg_t * uncond_BlV
    if temperature != 1.0:
        logits_BlV = logits_BlV / temperature
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, logits_BlV.shape[-1]), dim=-1, sorted=False).values.amin(-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1)  # ascending
        drop_sorted = sorted_BlV.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        logits_BlV = logits_BlV.masked_fill(drop_sorted.scatter(-1, order_BlV, drop_sorted), -torch.inf)
    return logits_BlV

def check_sampling_args(temperature, cfg, top_k, top_p):
    if not (0 < temperature < math.inf and 0 <= cfg < math.inf and top_k >= 0 and 0 <= top_p < 1):
        raise ValueError(f"need temperature > 0, cfg >= 0, top_k >= 0 and 0 <= top_p < 1; "
                         f"got temperature={temperature}, cfg={cfg}, top_k={top_k}, top_p={top_p}")

# ---- Sampling (KV cache, one scale per step) and teacher-forced log-probs (one pass).
@dataclass
class Rollout:
    labels: torch.Tensor          # (B,) class labels
    idx: torch.Tensor             # (B, L) tokens, all scales concatenated
    logprobs: torch.Tensor        # (B, L) log-prob of each token under the distribution sampled from
    images: torch.Tensor | None   # (B, 3, H, W) in [0, 1], or None with decode=False
    nonfinite: torch.Tensor       # () tokens whose distribution was not finite (drawn uniformly instead)

@torch.no_grad()
def sample(var, labels_B, *, temperature=1.0, cfg=0.0, top_k=0, top_p=0.0, generator=None,
           prefix_idx=None, decode=True) -> Rollout:
    """Draw one image per label, scale by scale: one multinomial per scale over the (B*l, V) probabilities (the official
    sampler's RNG call order). `generator` may be a list of n generators for n equal groups of consecutive rows: each
    group then draws exactly as a call with its rows alone would. With prefix_idx (B, l), the first scales are taken
    from it (no RNG used). A non-finite distribution (a diverged policy) is replaced by the uniform one and counted."""
    check_sampling_args(temperature, cfg, top_k, top_p)
    model = unwrap(var)
    config, quant = model.config, model.vae.quantize
    device, B, K, V = model.pos_1LC.device, labels_B.shape[0], config.num_scales, config.vocab_size
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    n_prefix = 0 if prefix_idx is None else len(split_scales(prefix_idx, config.patch_nums)) and prefix_idx.shape[1]
    problem = (f"the VAR is on {device}, its VQVAE on {quant.embedding.weight.device}: move both (vae.to(device))"
               if quant.embedding.weight.device != device else f"{B} rows cannot be split among {len(gens)} generators"
               if B % len(gens) else f"prefix_idx has {len(prefix_idx)} rows for {B} labels" if n_prefix and len(prefix_idx) != B else "")
    if problem:
        raise ValueError(problem)
    guided = cfg != 0  # [C3]: no unconditional half without CFG
    labels_in = torch.cat((labels_B, torch.full_like(labels_B, config.num_classes))) if guided else labels_B
    cond_BD = model.class_emb(labels_in)
    lvl_pos_1LC = model.lvl_embed(model.lvl_1L) + model.pos_1LC
    x_BlC = (cond_BD.unsqueeze(1).expand(-1, model.first_l, -1) + model.pos_start.expand(len(labels_in), -1, -1)
             + lvl_pos_1LC[:, :model.first_l])
    kv_caches, H = [[None, None] for _ in model.blocks], config.patch_nums[-1]
    f_hat = torch.zeros(B, config.z_channels, H, H, device=device)
    idx_BL = torch.empty(B, config.seq_len, dtype=torch.long, device=device)
    logp_BL, nonfinite = torch.empty(B, config.seq_len, device=device), torch.zeros((), dtype=torch.long, device=device)
    for si, (bg, ed) in enumerate(model.begin_ends):
        for block, kv in zip(model.blocks, kv_caches):
            x_BlC = block(x_BlC, cond_BD, None, kv)
        logits_BlV = model.head_logits(x_BlC, cond_BD)
        logits_BlV = process_logits(logits_BlV[:B], logits_BlV[B:] if guided else None, cfg_t=cfg * (si / (K - 1)),
                                    temperature=temperature, top_k=top_k, top_p=top_p)
        if ed <= n_prefix:
            idx_Bl = prefix_idx[:, bg:ed]
        else:
            probs_BlV = logits_BlV.softmax(dim=-1)
            finite_Bl1 = torch.isfinite(probs_BlV).all(-1, keepdim=True)
            nonfinite += (~finite_Bl1).sum()
            probs_BlV = torch.where(finite_Bl1, probs_BlV, 1.0 / V)
            idx_Bl = torch.cat([torch.multinomial(p.reshape(-1, V), num_samples=1, generator=g)
                                for p, g in zip(probs_BlV.chunk(len(gens)), gens)]).view(B, ed - bg)
        idx_BL[:, bg:ed] = idx_Bl
        logp_BL[:, bg:ed] = logits_BlV.log_softmax(-1).gather(-1, idx_Bl.unsqueeze(-1)).squeeze(-1)
        f_hat = quant.add_scale(f_hat, quant.embed(idx_Bl), si)
        if si < K - 1:  # the next scale's input: the partial reconstruction, area-downsampled
            nb, ne = model.begin_ends[si + 1]
            x_BlC = model.word_embed(area_down(f_hat, config.patch_nums[si + 1])) + lvl_pos_1LC[:, nb:ne]
            x_BlC = x_BlC.repeat(2, 1, 1) if guided else x_BlC
    del kv_caches, x_BlC, logits_BlV  # free the KV cache before the decoder allocates its feature maps
    return Rollout(labels_B, idx_BL, logp_BL, model.vae.fhat_to_img(f_hat) if decode else None, nonfinite)

def token_logprobs(var, labels_B, idx_BL, temperature=1.0, *, cfg=0.0, top_k=0, top_p=0.0, return_logits=False):
    """log pi(idx_t | label, coarser scales) for every token, (B, L), under the distribution `sample` draws from with
    these settings, in one teacher-forced pass (differentiable; with CFG, conditional and null class as one batch).
    return_logits: also the processed logits, as (logp_BL, logits_BLV) (the trainer's entropy and exact KL)."""
    check_sampling_args(temperature, cfg, top_k, top_p)
    config, l = unwrap(var).config, idx_BL.shape[1]
    if cfg == 0:
        logits_BlV, uncond_BlV = var(labels_B, idx_BL), None
    else:
        null_B = torch.full_like(labels_B, config.num_classes)
        logits_BlV, uncond_BlV = var(torch.cat((labels_B, null_B)), idx_BL.repeat(2, 1)).chunk(2)
    si_l = scale_ids(config.patch_nums)[:l].to(logits_BlV.device)
    cfg_t = (cfg * (si_l.double() / (config.num_scales - 1))).float().view(1, l, 1)
    logits_BlV = process_logits(logits_BlV, uncond_BlV, cfg_t=cfg_t, temperature=temperature, top_k=top_k, top_p=top_p)
    logp_Bl = logits_BlV.gather(-1, idx_BL.unsqueeze(-1)).squeeze(-1) - logits_BlV.logsumexp(-1)
    return (logp_Bl, logits_BlV) if return_logits else logp_Bl

# ---- The RL maths [GRPO-VAR eq. 1-2], as pure functions: tensors in, tensors out. Each one runs pasted alone into a
# file that imports math, torch and torch.nn.functional as F. Sign convention: we maximise J; the loss is -J.
def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the G samples of one group (a row)  [GRPO-VAR eq. 2].

    Population std (ddof 0), in float64. A group whose rewards are all equal gets A = 0 exactly (not rounding noise
    blown up by the division); non-finite rewards are left out of their group's statistics and get A = 0. The same A
    is used for every token of the sample [GRPO-VAR 4.2]. Returns A (N, G) float32."""
    r = rewards_NG.double()
    valid = torch.isfinite(r)
    n = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n
    centred = torch.where(valid, r - mean, 0.0)
    std = (centred.square().sum(dim=1, keepdim=True) / n).sqrt()
    hi = torch.where(valid, r, -torch.inf).amax(dim=1, keepdim=True)
    lo = torch.where(valid, r, torch.inf).amin(dim=1, keepdim=True)
    flat = ~(hi > lo)  # all equal, or fewer than two finite rewards
    return torch.where(flat, 0.0, centred / (std + eps)).float()

def clipped_surrogate(logp_BL, old_logp_BL, adv_B, clip_eps=0.2):
    """PPO's clipped objective per token  [GRPO-VAR eq. 1]:
        min(rho A, clip(rho, 1 - eps, 1 + eps) A),  rho = pi / pi_old = exp(logp - old_logp),
    A broadcast from the sample to its tokens. A token whose clipped term is the smaller one gives
    no gradient. Returns (B, L)."""
    ratio, A = torch.exp(logp_BL - old_logp_BL), adv_B.unsqueeze(1)
    return torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)

def kl_k3(logp_BL, ref_logp_BL):
    """Per-token KL estimate k3 = pi_ref/pi - log(pi_ref/pi) - 1  [GRPO-VAR eq. 1], as expm1(d) - d, d = ref_logp - logp:
    >= 0, and exactly 0 where pi = pi_ref; averaged over tokens drawn from pi it estimates KL(pi || pi_ref). As a loss
    its gradient, 1 - pi_ref/pi per token, is in expectation that of KL(pi_ref || pi), not of KL(pi || pi_ref) (kl_exact's)."""
    d = ref_logp_BL - logp_BL
    return torch.expm1(d) - d

def kl_exact(logits_BLV, ref_logits_BLV):
    """Per-token KL(pi || pi_ref) of [GRPO-VAR eq. 1] exactly, sum_v pi_v (log pi_v - log pi_ref_v), with
    its true gradient. Computed as sum over pi's support of pi_v k3_v plus pi_ref's mass off it (equal,
    as sum_v pi_v (pi_ref_v / pi_v - 1) = 0 there): every term is >= 0, so it never dips below 0."""
    logp, ref_logp = logits_BLV.log_softmax(-1), ref_logits_BLV.log_softmax(-1)
    p, d = logp.exp(), ref_logp - logp
    return torch.where(p > 0, p * (torch.expm1(d) - d), ref_logp.exp()).sum(-1)

def entropy(logits_BLV):
    """Per-token entropy of the policy, -sum_v pi_v log pi_v."""
    logp = logits_BLV.log_softmax(-1)
    return -torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1)

def grpo_loss(surrogate_BL, kl_BL, token_weights_BL=None, beta=0.2, kl_weights_BL=None):
    """loss = -J,  J = (1/B) sum_b sum_t [ w_bt surrogate_bt - beta u_bt kl_bt ]   [GRPO-VAR eq. 1].
    w: policy-gradient token weights, each sample's summing to 1 (default 1/L: the token mean; PANW and mask
    propagation change it); a sample with w = 0 gets no policy gradient. u: KL token weights, default w (mask
    propagation keeps the KL outside its mask)."""
    w = torch.full_like(surrogate_BL, 1.0 / surrogate_BL.shape[1]) if token_weights_BL is None else token_weights_BL
    u = w if kl_weights_BL is None else kl_weights_BL
    return -((w * surrogate_BL).sum(1) - beta * (u * kl_BL).sum(1)).mean()

# ---- Beyond vanilla GRPO [VAR-RL]: per-action normalisation weighting (PANW), value as middle return (VMR) and mask
# propagation (MP). Pure functions; the trainer uses them through the token weights (PANW, MP) and advantages (VMR).
def panw_weights(patch_nums, alpha: float) -> torch.Tensor:
    """PANW token weights (L,)  [VAR-RL, PANW]: a token of scale t (an h_t x w_t grid) weighs
    k_t = (h_t w_t)^(-alpha), normalised so that one sample's L weights sum to 1.
    alpha = 0: the plain token mean (1/L); alpha = 1: every scale gets an equal share 1/K."""
    n_L = torch.cat([torch.full((pn * pn,), float(pn * pn), dtype=torch.float64) for pn in patch_nums])
    k_L = n_L.pow(-alpha)
    return (k_L / k_L.sum()).float()

def middle_value(rewards_NK: torch.Tensor, eta: float) -> torch.Tensor:
    """Value as middle return  [VAR-RL, Eq. 10]: V_m(s_m) = eta log( (1/K) sum_k exp(R_k / eta) ),
    a soft maximum of the K on-policy completions' rewards of one prefix (a row). It lies between
    their mean (eta -> inf) and their max (eta -> 0). Computed in float64 with logsumexp."""
    r = rewards_NK.double()
    return (eta * (torch.logsumexp(r / eta, dim=1) - math.log(r.shape[1]))).to(rewards_NK.dtype)

def propagate_mask(mask_fine_BHW: torch.Tensor, patch_nums) -> torch.Tensor:
    """Mask propagation  [VAR-RL, MP]: a binary mask on the finest token grid (B, pn_K, pn_K) ->
    a mask on every token of every scale (B, L). A coarser token is relevant if any finest-scale
    token its area covers is relevant: area-downsample the binary mask and threshold > 0."""
    m = (mask_fine_BHW > 0).float().unsqueeze(1)  # (B, 1, H, W)
    B = m.shape[0]
    return torch.cat([(F.interpolate(m, size=(pn, pn), mode="area") > 0).float().view(B, pn * pn)
                      for pn in patch_nums], dim=1)

def normalise_rows(w_BL: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum; an all-zero row stays zero (that sample gets no gradient)."""
    s = w_BL.sum(dim=1, keepdim=True)
    return torch.where(s > 0, w_BL / torch.where(s > 0, s, 1.0), 0.0)

def default_vmr_split(patch_nums) -> int:
    """The middle scale m (prefix = scales 0..m-1): the scale boundary nearest 8% of the tokens
    (VAR-RL's m256 fraction). For the 256 px models that is after the 5x5 scale: 55 of 680 tokens."""
    ends = [e for _, e in scale_begin_ends(patch_nums)][:-1]  # the prefix must leave a suffix
    L = sum(p * p for p in patch_nums)
    return 1 + min(range(len(ends)), key=lambda i: abs(ends[i] - 0.08 * L))

def stage_weights(patch_nums, alpha: float, stage, split_m: int) -> torch.Tensor:
    """(L,) PANW weights of the tokens a step trains: all (plain GRPO), the prefix scales 0..m-1
    (a VMR prefix step) or the suffix scales m..K-1 (a suffix step); other tokens weigh 0."""
    s_L = scale_ids(patch_nums)
    first, end = {None: (0, len(patch_nums)), "prefix": (0, split_m), "suffix": (split_m, len(patch_nums))}[stage]
    return panw_weights(patch_nums, alpha) * ((s_L >= first) & (s_L < end)).float()

def initial_mask(reward, images_B3HW: torch.Tensor, pn: int, keep: float) -> torch.Tensor:
    """The reward-relevant finest-grid mask (B, pn, pn) that mask propagation starts from: the reward's region if every
    term of the reward scores one (`reward.region_mask`) [C11]; else gradient saliency |d reward / d image| summed over
    channels, area-pooled to the token grid, its top `keep` fraction of cells kept, ties kept (a flat saliency, or no
    gradient, keeps every cell). It is where the reward is most sensitive, not a proof that other tokens cannot change
    it (the decoder mixes areas)."""
    B, _, H, W = images_B3HW.shape
    region = reward.region_mask(H, W, images_B3HW.device) if hasattr(reward, "region_mask") else None
    if region is not None:
        pooled = F.interpolate(region[None, None].float(), size=(pn, pn), mode="area")[:, 0]
        return (pooled > 0).float().expand(B, pn, pn)
    x = images_B3HW.detach().float().requires_grad_(True)
    with torch.enable_grad():
        r = reward(x)
        grad = torch.autograd.grad(r.sum(), x, allow_unused=True)[0] if r.requires_grad else None
    if grad is None:  # a reward without a gradient (a threshold, or not built differentiable)
        return torch.ones(B, pn, pn, device=images_B3HW.device)
    flat = F.interpolate(grad.abs().sum(1, keepdim=True), size=(pn, pn), mode="area")[:, 0].view(B, -1)
    kth = flat.topk(max(1, round(keep * pn * pn)), dim=1).values[:, -1:]
    return (flat >= kth).float().view(B, pn, pn)

# ---- Distributed helpers. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is rank 0
# of 1 and never touches torch.distributed. A rank that fails ends the run (torchrun stops the rest).
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    main = property(lambda self: self.rank == 0)

def setup_distributed(device=None) -> Dist:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, device)

def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op.upper()))
    return t

def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order)."""
    if not torch.distributed.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)

def derive_seed(*keys: int) -> int:
    """A seed for one explicit random stream, mixed from integers (seed, step, stream, index, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)

STREAM_LABELS, STREAM_SAMPLE, STREAM_ORDER, STREAM_SUBSET = 1, 2, 3, 5

# ---- Settings: `python vargrpo.py train --help` lists them; the defaults are the GRPO-VAR paper's.
def arg(default, help, **extra):
    return field(default=default, metadata=dict(help=help, **extra))

@dataclass
class TrainArgs:
    reward: str = arg("brightness", "reward spec: brightness, bright, dark, aesthetic, clip:PROMPT, brightness:region=x0,y0,x1,y1, or weighted sums such as 0.5*aesthetic+clip:a painting")
    preset: str = arg("d16", "model: d16 d20 d24 d30 (official weights, --weights-dir), digits (the CPU demo's, weights/) or tiny (random, tests)")
    out: str = arg("", "run directory: new, empty, or a run to replace with --overwrite")
    steps: int = arg(1000, "training steps (one step = one rollout batch and its updates)")
    seed: int = arg(0, "seed of every random stream: labels, sampling, minibatch order")
    labels_per_step: int = arg(32, "class labels drawn per step, GLOBAL: split across processes, a group never spans two [paper: 32]")
    group_size: int = arg(16, "G: samples per label; advantages are normalised within these groups [paper: 16]")
    minibatch: int = arg(32, "samples per optimizer step, global [paper: 32]; labels*G/minibatch updates per step")
    micro_batch: int = arg(0, "samples per forward/backward on each process (gradient accumulation); 0 = minibatch/processes")
    sample_batch: int = arg(0, "rows per sample() call on each process, in whole groups (0 = all of the process's rows)")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    lr: float = arg(1e-4, "AdamW learning rate [paper: 1e-4]")
    weight_decay: float = arg(0.01, "AdamW weight decay of weight matrices (torch default; the paper does not say) [C12]")
    beta: float = arg(0.2, "KL coefficient [paper: 0.2]")
    kl: str = arg("k3", "per-token KL to the pre-trained model: k3 (estimator, as the paper; its gradient is that of KL(ref||pi)) or exact (whole vocabulary, KL(pi||ref))", choices=("k3", "exact"))
    clip_eps: float = arg(0.2, "PPO clip range epsilon [paper: 0.2]")
    temperature: float = arg(0.7, "sampling temperature while training (no CFG / top-k / top-p) [paper: 0.7]")
    adv_eps: float = arg(1e-4, "epsilon added to the group std")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this (0 = off; the paper does not clip)")
    reward_batch: int = arg(64, "images per reward-model (and decoder) call")
    clip_model: str = arg(None, "open_clip model of the CLIP rewards (default ViT-L-14-quickgelu; 'tiny-random' or a JSON config for CPU smoke runs)", type=str)
    clip_pretrained: str = arg("openai", "open_clip weights tag of --clip-model ('none' = random)")
    clip_weights: str = arg(None, "local open_clip checkpoint file for --clip-model (no download)", type=str)
    aesthetic_head: str = arg(None, "local sac+logos+ava1-l14-linearMSE.pth (else cache, else download)", type=str)
    panw_alpha: float = arg(0.0, "PANW: a scale-t token weighs (h_t w_t)^-alpha, normalised per sample; 0 = off (token mean), 1 = equal share per scale [VAR-RL: 1]")
    vmr: bool = arg(False, "VMR: value as middle return, alternating prefix and suffix updates")
    vmr_m: int = arg(0, "VMR split: the prefix is scales 0..m-1 (0 = the boundary nearest 8%% of the tokens)")
    vmr_k: int = arg(2, "VMR: on-policy completions per prefix for the middle value [VAR-RL: 2]")
    vmr_eta: float = arg(1.0, "VMR: temperature eta of the soft middle value [VAR-RL: 1]")
    vmr_schedule: str = arg("3:1", "VMR: prefix updates : suffix updates, repeating [VAR-RL 'fine-grained': 3:1]")
    mask_propagation: bool = arg(False, "MP: policy-gradient weight only on reward-relevant tokens, propagated fine to coarse")
    mp_keep: float = arg(0.5, "MP: fraction of finest-grid cells kept by gradient saliency (rewards without a region)")
    label_subset: str = arg("all", "train on all classes, or 'half': a fixed 50%% of them, seeded by --seed [GRPO-VAR Table 1]", choices=("all", "half"))
    save_every: int = arg(100, "checkpoint every this many steps (and at the end, and on Ctrl-C / SIGTERM)")
    keep_last: int = arg(3, "checkpoints to keep")
    image_every: int = arg(50, "write a PNG grid of samples every this many steps (0 = off)")
    tracker: str = arg("none", "live curves: tensorboard mirrors metrics.jsonl and the grids to DIR/tb", choices=("none", "tensorboard"))
    resume: str = arg(None, "continue the run in this directory from its last checkpoint", type=str)
    overwrite: bool = arg(False, "allow --out to name a directory that holds a run: exactly that run's files are replaced")
    weights_dir: str = arg(None, "folder with the pre-trained .pth / .safetensors files (else cache, else download)", type=str)
    random_init: bool = arg(False, "start from random weights (seed 0) instead of the pre-trained ones: benchmarks, smoke tests")
    grad_checkpointing: bool = arg(False, "recompute each transformer block in the backward pass (less activation memory)")
    device: str = arg(None, "cpu or cuda (default: cuda if available)", type=str)
    dtype: str = arg("auto", "autocast dtype for the model: auto (bf16 on GPU, fp32 on CPU), bf16, fp32", choices=("auto", "bf16", "fp32"))


# what a resumed run may change: neither the samples nor the updates depend on it
RESUME_OVERRIDABLE = ("steps", "save_every", "keep_last", "image_every", "tracker", "device", "micro_batch",
                      "sample_batch", "reward_batch", "grad_checkpointing", "weights_dir")

class UsageError(ValueError):
    """A bad flag, file or folder; the message says what to change (exit code 2)."""

def need(ok, message: str):
    if not ok:
        raise UsageError(message)

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")

def check_train_args(a: TrainArgs, world: int):
    """Every setting a user can get wrong: one UsageError naming it and what to do."""
    import reward_models
    for f in fields(a):  # NaN / inf are never meant (they would silently turn checks and clipping off)
        need(not isinstance(getattr(a, f.name), float) or math.isfinite(getattr(a, f.name)), f"{flag(f.name)}: not a finite number")
    try:
        reward_models.parse_spec(a.reward)
    except ValueError as e:
        raise UsageError(f"--reward: {e}") from None
    need(a.preset in PRESETS, f"--preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
    for name in ("steps", "labels_per_step", "minibatch", "ppo_epochs", "lr", "temperature", "save_every", "keep_last",
                 "reward_batch", "adv_eps"):
        need(getattr(a, name) > 0, f"{flag(name)} must be > 0, got {getattr(a, name)}")
    for name in ("sample_batch", "micro_batch", "beta", "max_grad_norm", "weight_decay", "image_every", "panw_alpha"):
        need(getattr(a, name) >= 0, f"{flag(name)} must be >= 0, got {getattr(a, name)}")
    need(a.lr < 1, f"--lr {a.lr:g}: AdamW at a learning rate >= 1 diverges at once; the paper uses 1e-4")
    need(a.group_size >= 2, f"--group-size must be >= 2 (advantages compare samples of one label), got {a.group_size}")
    need(a.labels_per_step % world == 0, f"--labels-per-step {a.labels_per_step} must be divisible by the {world} processes")
    need((a.labels_per_step * a.group_size) % a.minibatch == 0 and a.minibatch % world == 0,
         f"--minibatch {a.minibatch} must divide labels*group = {a.labels_per_step * a.group_size} and be divisible by the {world} processes")
    need(not a.micro_batch or (a.minibatch // world) % a.micro_batch == 0,
         f"--micro-batch {a.micro_batch} must divide the per-process minibatch {a.minibatch // world}")
    need(0 < a.clip_eps < 1 and 0 < a.mp_keep <= 1, f"need 0 < --clip-eps < 1 and 0 < --mp-keep <= 1, got {a.clip_eps}, {a.mp_keep}")
    K = VARConfig.preset(a.preset).num_scales
    need(0 <= a.vmr_m < K and a.vmr_k >= 2 and a.vmr_eta > 0 and re.fullmatch(r"\d+:\d+", a.vmr_schedule)
         and sum(map(int, a.vmr_schedule.split(":"))) > 0, f"need 0 <= --vmr-m < {K} (0 = auto), --vmr-k >= 2, --vmr-eta > 0 "
         f"and --vmr-schedule P:S (e.g. 3:1); got {a.vmr_m}, {a.vmr_k}, {a.vmr_eta}, {a.vmr_schedule!r}")
    need(a.tracker == "none" or importlib.util.find_spec("tensorboard"), "--tracker tensorboard: pip install tensorboard")
    need(a.device is None or re.fullmatch(r"cpu|cuda(:\d+)?", a.device), f"--device {a.device!r}: use cpu, cuda or cuda:N")
    need(not (a.device or "").startswith("cuda") or torch.cuda.is_available(), f"--device {a.device}: this machine has no CUDA GPU")

def resolve_args(a: TrainArgs, given, saved: dict | None) -> TrainArgs:
    """The run's settings: a resumed run's saved ones, with only RESUME_OVERRIDABLE flags changed; idle flags refused."""
    if saved is not None:
        unknown = sorted(set(saved) - {f.name for f in fields(TrainArgs)})
        changed = [k for k in given if k not in RESUME_OVERRIDABLE + ("resume", "out") and getattr(a, k) != saved.get(k)]
        need(not unknown, f"the checkpoint's settings hold {', '.join(unknown)}, unknown to this vargrpo version")
        need(not changed, f"--resume keeps the run's settings; {', '.join(map(flag, changed))} cannot change "
             f"(only {', '.join(map(flag, RESUME_OVERRIDABLE))} can)")
        return TrainArgs(**{**saved, **{k: getattr(a, k) for k in RESUME_OVERRIDABLE if k in given}, "resume": a.resume, "out": a.resume})
    idle = sorted(k for k in given if (k.startswith("vmr_") and not a.vmr) or (k == "mp_keep" and not a.mask_propagation))
    need(not idle, f"{', '.join(map(flag, idle))} only act with --vmr / --mask-propagation; add the switch or drop the flag")
    return a

# ---- The trainer [GRPO-VAR 4]: `train` holds the loop, one step numbered 1 sample, 2 reward,
# 3 advantages, 4 token weights, 5 clipped update with the per-token KL, 6 log and save.
def build_models(a: TrainArgs, device):
    """(vae, policy, ref): the frozen tokenizer, the policy to train, the frozen pre-trained VAR."""
    random = a.preset == "tiny" or a.random_init
    vae, ref = build_vae_var(VARConfig.preset(a.preset), seed=0) if random else load_pretrained(a.preset, a.weights_dir)
    policy = VAR(ref.config, vae)
    policy.load_state_dict(ref.state_dict())
    policy.grad_checkpointing = a.grad_checkpointing
    return vae.to(device), policy.to(device), ref.requires_grad_(False).to(device)

def make_optimizer(policy: VAR, a: TrainArgs, device: str):
    """AdamW with the official VAR parameter groups [C12]: no weight decay on embeddings, scale_mul, biases and 1-D
    tensors, so rows that never get a gradient (the null class; unseen classes with --label-subset half) never change."""
    no_decay = lambda name, p: p.ndim < 2 or any(k in name for k in ("class_emb", "lvl_embed", "pos_", "scale_mul"))
    groups = [dict(params=[p for n, p in policy.named_parameters() if no_decay(n, p) == nd], weight_decay=wd)
              for nd, wd in ((False, a.weight_decay), (True, 0.0))]
    return torch.optim.AdamW(groups, lr=a.lr, fused=True if device.startswith("cuda") else None)

def make_reward(spec: str, device, a, differentiable: bool = False):
    """reward_models.build_reward with the CLIP / aesthetic options of `a`; its errors become one line."""
    import reward_models
    try:
        return reward_models.build_reward(spec, device, differentiable, clip_model=a.clip_model, clip_pretrained=a.clip_pretrained,
                                          clip_weights=a.clip_weights, aesthetic_head=a.aesthetic_head, weights_dir=a.weights_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"reward {spec!r}: {e}") from None

def label_pool(a: TrainArgs, num_classes: int) -> torch.Tensor:
    """The classes a run trains on: all, or a fixed seeded half [GRPO-VAR Table 1, 'seen 50% labels']."""
    g = torch.Generator().manual_seed(derive_seed(a.seed, STREAM_SUBSET))
    return torch.arange(num_classes) if a.label_subset == "all" else torch.randperm(num_classes, generator=g)[:num_classes // 2].sort().values

def train(args: TrainArgs, given=frozenset()) -> dict:
    """GRPO fine-tuning of a VAR [GRPO-VAR 4], with VMR / PANW / MP [VAR-RL] when switched on.
    `given`: the flags set on the command line. Returns the last step's metrics."""
    d, stop, model, m = setup_distributed(args.device), StopRequest(), None, {}
    run = RunFolder(Path(args.resume or args.out), d)
    try:
        args, ckpt = run.open(args, given)  # new / overwritten / resumed; DIR locked while we run
        reward = make_reward(args.reward, d.device, args, differentiable=args.mask_propagation)
        vae, policy, ref = build_models(args, d.device)  # the frozen tokenizer, pi_theta, the frozen pi_ref
        opt, pool = make_optimizer(policy, args, d.device), label_pool(args, policy.config.num_classes)
        start = run.restore(ckpt, policy, opt) if ckpt else 0
        model = policy if d.world == 1 else torch.nn.parallel.DistributedDataParallel(  # saving, sampling: `policy`
            policy, device_ids=[d.local_rank] if d.device.startswith("cuda") else None, gradient_as_bucket_view=True)
        dtype = {"auto": torch.bfloat16 if d.device.startswith("cuda") else None, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
        amp = (lambda: torch.autocast(d.device.split(":")[0], dtype=dtype)) if dtype else nullcontext
        passes = 2 if args.mask_propagation and getattr(reward, "region_mask", lambda *_: None)(8, 8) is None else 1
        n_local = args.labels_per_step // d.world
        groups = list(range(d.rank * n_local, (d.rank + 1) * n_local))  # this rank's global group indices
        split_m = (args.vmr_m or default_vmr_split(policy.config.patch_nums)) if args.vmr else 0  # VMR's middle scale
        prefix_len = policy.begin_ends[split_m - 1][1] if args.vmr else None
        p, sfx = map(int, args.vmr_schedule.split(":"))  # VMR: P prefix steps, then S suffix steps, ...
        for step in range(start, args.steps):
            stage, times, t0 = (None if not args.vmr else "prefix" if step % (p + sfx) < p else "suffix"), {}, time.perf_counter()
            lap = lambda name: times.update({name: synced_time(d.device) - t0 - sum(times.values())})
            # 1 sample: G images per label from the current policy (pi_old), their log-probs recorded;
            #   VMR: K - 1 more completions of each sample's first scales (its prefix)
            g = torch.Generator().manual_seed(derive_seed(args.seed, step, STREAM_LABELS))
            labels = pool[torch.randint(len(pool), (args.labels_per_step,), generator=g)]  # global, uniform
            with amp():
                roll = rollout(policy, labels[groups].to(d.device), groups, args, step, prefix_len)
            lap("sample")
            images = decode(vae, roll.idx, args.reward_batch, d.device)
            lap("decode")
            # 2 reward (retried once if it raises); MP: the reward-relevant tokens
            rewards, comps, mp_mask = run.score(reward, images, policy, opt, args, step)
            lap("reward")
            # 3 advantages (eq. 2, or VMR's middle value): one per sample, for all of its tokens
            values_Ng = advantage_groups(rewards, stage, args, n_local)
            keep = slice(None, None, args.vmr_k) if stage == "prefix" else slice(None)  # prefix: one row per prefix
            adv, valid = group_advantages(values_Ng, args.adv_eps).flatten(), torch.isfinite(values_Ng).flatten()
            # 4 token weights (PANW x stage x MP), each sample's summing to 1 (0: a non-finite reward)
            w_L = stage_weights(policy.config.patch_nums, args.panw_alpha, stage, split_m).to(d.device)
            kl_w = normalise_rows(w_L.expand(len(adv), -1)) * valid[:, None]
            token_w = kl_w if mp_mask is None else normalise_rows(w_L * mp_mask[keep]) * valid[:, None]
            batch = UpdateBatch(labels=roll.labels[keep], idx=roll.idx[keep], old_logp=roll.logprobs[keep],
                                adv=adv, token_w=token_w, kl_w=kl_w).gathered()
            # 5 clipped update with the per-token KL (eq. 1), one optimizer step per minibatch
            stats = policy_update(model, ref, opt, batch, args, step, d, amp)
            lap("update")
            # 6 log and save (a diverged policy stops the run; Ctrl-C / SIGTERM stop it after saving)
            m = step_metrics(step, rewards, comps, values_Ng, batch, stats, times, args, stage, passes)
            run.log(m, step, images)
            run.halt_if_nonfinite(roll.nonfinite, stats, step, policy, opt, args)
            signum = int(all_reduce(torch.tensor([stop.signum], device=d.device), "max").item())
            if signum or (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                run.save(policy, opt, args, step + 1)
            if signum and step + 1 < args.steps:
                raise Stopped(signum, f"stopped after step {step + 1}; continue with --resume {run.out}")
        return m
    finally:
        stop.restore()
        run.close()
        model = None  # the DDP wrapper holds the process group: drop it first
        if torch.distributed.is_initialized():  # ranks leave together: a gloo rank that exits
            torch.distributed.barrier()         # while its peer still talks can abort at exit
            torch.distributed.destroy_process_group()

# ---- the parts of a step, in order
def synced_time(device) -> float:
    """time.perf_counter() once the device has done its queued work (GPU work is asynchronous)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()

def rollout(policy: VAR, labels_n, group_ids, a: TrainArgs, step: int, prefix_len=None) -> Rollout:
    """Step 1: G samples of each label and their log-probs. Group g (a global index) draws from its own generator
    seeded by (seed, step, g), so its samples do not depend on which process draws them, nor with which others [C9];
    up to --sample-batch rows share a sample() call. VMR (prefix_len = the prefix's tokens): K - 1 more completions of
    each sample's prefix, the sample being the first: G*K rows per label, prefix j's completion k at row j*K + k."""
    G, n_comp = a.group_size, (a.vmr_k if prefix_len else 1)
    gens = [torch.Generator(labels_n.device).manual_seed(derive_seed(a.seed, step, STREAM_SAMPLE, g)) for g in group_ids]
    per_call, parts = max(1, a.sample_batch // G) if a.sample_batch else len(group_ids), []
    for c in range(0, len(group_ids), per_call):
        labels_B = labels_n[c:c + per_call].repeat_interleave(G)
        kw = dict(temperature=a.temperature, generator=gens[c:c + per_call], decode=False)
        outs = [sample(policy, labels_B, **kw)]
        outs += [sample(policy, labels_B, prefix_idx=outs[0].idx[:, :prefix_len], **kw) for _ in range(n_comp - 1)]
        parts += [Rollout(labels_B.repeat_interleave(n_comp), torch.stack([o.idx for o in outs], 1).flatten(0, 1),
                          torch.stack([o.logprobs for o in outs], 1).flatten(0, 1).float(), None, sum(o.nonfinite for o in outs))]
    return Rollout(*(torch.cat([getattr(p, k) for p in parts]) for k in ("labels", "idx", "logprobs")), None,
                   sum(p.nonfinite for p in parts))

@torch.no_grad()
def decode(vae: VQVAE, idx_NL, batch: int, device: str):
    """Tokens -> images in [0, 1] (fp32), `batch` at a time; the decoder under bf16 autocast on GPUs."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
        return torch.cat([vae.idx_to_img(idx_NL[i:i + batch]).float() for i in range(0, len(idx_NL), batch)])

def advantage_groups(rewards_N, stage, a: TrainArgs, n_labels: int):
    """Step 3's groups (rows) for group_advantages [GRPO-VAR eq. 2; VAR-RL VMR]: R over a label's G (VMR suffix: G*K)
    samples; VMR prefix steps: the middle value V_m of each prefix (from its K completions) over the label's G prefixes."""
    if stage == "prefix":
        return middle_value(rewards_N.view(-1, a.vmr_k), a.vmr_eta).view(n_labels, a.group_size)
    return rewards_N.view(n_labels, -1)

@dataclass
class UpdateBatch:
    """What step 5 trains on: one row per sample."""
    labels: torch.Tensor    # (N,)
    idx: torch.Tensor       # (N, L) tokens
    old_logp: torch.Tensor  # (N, L) log-probs at sampling, pi_old
    adv: torch.Tensor       # (N,) the sample's advantage, for each of its tokens
    token_w: torch.Tensor   # (N, L) policy-gradient token weights, rows summing to 1 (or 0)
    kl_w: torch.Tensor      # (N, L) KL token weights

    def gathered(self) -> "UpdateBatch":
        """Every process's rows in global group order, so that minibatches do not depend on the
        number of processes [C9] (a few MB even at the paper's 512 samples of 680 tokens)."""
        return UpdateBatch(**{k: all_gather_cat(v) for k, v in vars(self).items()})

@dataclass
class LossTerms:
    logp: torch.Tensor       # (n, L) log pi_theta of the tokens (tempered, as sampled)
    logits: torch.Tensor     # (n, L, V) pi_theta's processed logits (entropy, exact KL)
    kl: torch.Tensor         # (n, L) per-token KL to pi_ref
    surrogate: torch.Tensor  # (n, L) the clipped objective

def loss_terms(model, ref, b: UpdateBatch, ids, a: TrainArgs, amp) -> LossTerms:
    """The per-token pieces of eq. 1 for the samples `ids`, both policies tempered as sampled [C8]."""
    with amp():
        logp, logits = token_logprobs(model, b.labels[ids], b.idx[ids], a.temperature, return_logits=True)
        with torch.no_grad():
            ref_logp, ref_logits = token_logprobs(ref, b.labels[ids], b.idx[ids], a.temperature, return_logits=True)
    kl = kl_k3(logp, ref_logp) if a.kl == "k3" else kl_exact(logits, ref_logits)
    return LossTerms(logp, logits, kl, clipped_surrogate(logp, b.old_logp[ids], b.adv[ids], a.clip_eps))

class UpdateStats:
    """Sums over a step's updates, kept on the device (read once per step, in step_metrics)."""
    def __init__(self, num_scales: int, device):
        self.per_scale = torch.zeros(4, num_scales, device=device)  # kl, clipped, entropy, tokens with KL weight
        self.sums = torch.zeros(2, device=device)                     # ratio, loss
        self.first_dev = torch.zeros((), device=device)               # max |ratio - 1| before the first update
        self.grad_norms, self.nonfinite = [], None

    @torch.no_grad()
    def add(self, t: LossTerms, b: UpdateBatch, ids, sid_L, loss, first: bool):
        on_nL = (b.kl_w[ids] > 0).float()
        ratio = (t.logp - b.old_logp[ids]).exp()
        clipped = t.surrogate < ratio * b.adv[ids, None]  # the clipped term is the smaller: no gradient
        for i, v in enumerate((t.kl, clipped, entropy(t.logits), torch.ones_like(t.kl))):
            self.per_scale[i].index_add_(0, sid_L, (v.float() * on_nL).sum(0))
        self.sums += torch.stack([(ratio * on_nL).sum(), loss.detach().float()])
        if first:  # the policy is still the sampling policy: ratio 1 up to float error
            self.first_dev = torch.maximum(self.first_dev, ((ratio - 1).abs() * on_nL).amax())

def policy_update(model, ref, opt, b: UpdateBatch, a: TrainArgs, step: int, d: Dist, amp) -> UpdateStats:
    """Step 5: --ppo-epochs passes over the step's samples, one optimizer step per minibatch [GRPO-VAR eq. 1]. One seeded
    global order makes the minibatches the same whatever the number of processes; each process takes its share, in
    micro-batches whose gradients add up, and DDP averages the shares. A non-finite gradient stops the updates, untaken."""
    config, share = unwrap(model).config, a.minibatch // d.world
    micro, sid_L = a.micro_batch or share, scale_ids(config.patch_nums).to(b.idx.device)
    params, stats = [p for p in model.parameters() if p.requires_grad], UpdateStats(config.num_scales, b.idx.device)
    for epoch in range(a.ppo_epochs):
        order = torch.randperm(len(b.idx), generator=torch.Generator().manual_seed(derive_seed(a.seed, step, STREAM_ORDER, epoch)))
        for m in range(len(b.idx) // a.minibatch):
            mine = order[m * a.minibatch + d.rank * share:][:share].to(b.idx.device)  # this process's share
            opt.zero_grad(set_to_none=True)
            for c0 in range(0, share, micro):
                ids = mine[c0:c0 + micro]
                with model.no_sync() if d.world > 1 and c0 + micro < share else nullcontext():
                    t = loss_terms(model, ref, b, ids, a, amp)
                    loss = grpo_loss(t.surrogate, t.kl, b.token_w[ids], a.beta, b.kl_w[ids]) * (len(ids) / share)
                    loss.backward()
                stats.add(t, b, ids, sid_L, loss, first=epoch == m == 0)
            norm = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm or math.inf)
            if not torch.isfinite(norm):  # the one host read of an update
                stats.nonfinite = f"the loss gradient (update {m + 1} of epoch {epoch + 1})"
                return stats
            opt.step()
            stats.grad_norms.append(norm)
    return stats

def step_metrics(step, rewards, comps, values_Ng, b: UpdateBatch, u: UpdateStats, times, a: TrainArgs,
                 stage, reward_passes: int) -> dict:
    """One metrics.jsonl line (the README explains each). Call on every rank: it gathers and reduces;
    besides one per optimizer step, its host reads are the step's only ones."""
    r, nan = all_gather_cat(rewards), torch.tensor(math.nan, device=rewards.device)
    fin = r[torch.isfinite(r)] if torch.isfinite(r).any() else nan.view(1)
    kl, clipped, ent, tokens = all_reduce(u.per_scale.clone())
    (ratio_sum, loss_sum), total = all_reduce(u.sums.clone()), tokens.sum().clamp_min(1)
    flat = all_reduce(torch.stack([(group_advantages(values_Ng, a.adv_eps) == 0).all(1).sum().float(),
                                   torch.tensor(float(len(values_Ng)), device=r.device)]))
    dev = {"reward/mean": fin.mean(), "reward/std": fin.std(unbiased=False), "reward/min": fin.min(), "reward/max": fin.max(),
           "reward/nonfinite": (~torch.isfinite(r)).sum(), "adv/mean": b.adv.mean(), "adv/std": b.adv.std(unbiased=False),
           "adv/abs_max": b.adv.abs().max(), "adv/zero_std_group_frac": flat[0] / flat[1],
           "policy/kl": kl.sum() / total, "policy/clip_frac": clipped.sum() / total, "policy/entropy": ent.sum() / total,
           "policy/ratio_mean": ratio_sum / total, "policy/ratio_dev_first_minibatch": all_reduce(u.first_dev.clone(), "max"),
           "loss/loss": loss_sum / (len(r) // len(rewards)) / max(1, len(u.grad_norms)),
           "loss/grad_norm": torch.stack(u.grad_norms).mean() if u.grad_norms else nan,
           **{f"reward/{k}": all_gather_cat(v).nanmean() for k, v in comps.items()},
           **{f"scale/{name}_s{si}": v[si] / tokens[si].clamp_min(1) for si in range(len(kl))
              for name, v in (("kl", kl), ("clip_frac", clipped), ("entropy", ent))}}
    dev.update({"mp/kept_fraction": b.token_w.gt(0).float().mean()} if a.mask_propagation else {})
    m = {"step": step, **dict(zip(dev, torch.stack([v.float() for v in dev.values()]).tolist())), "lr": a.lr}
    samples = (step + 1) * a.labels_per_step * a.group_size * (a.vmr_k if a.vmr else 1)  # sampled, decoded, rewarded
    m.update({"reward/nonfinite": int(m["reward/nonfinite"]), **{f"time/{k}": v for k, v in times.items()},
              "time/step": sum(times.values()), "perf/samples_per_s": len(r) / sum(times.values()),
              "budget/samples": samples, "budget/reward_images": samples * reward_passes})
    return {**m, "vmr/stage": stage} if stage else m

# ---- The run folder. Nothing in DIR but a run's own files is ever touched; a lock keeps a second trainer out;
# checkpoints are atomic and resume exactly; Ctrl-C / SIGTERM stop after a save; a failing reward is retried once.
class RunFailed(RuntimeError):
    """The run cannot go on (a reward that keeps raising, a diverged policy, a disk error); the
    message says what was saved and what to do (exit code 1)."""

class Stopped(RuntimeError):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stopped (exit code 128 + signal, as shells)."""
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

LOCK_NAME = ".vargrpo.lock"
RUN_FILES = ("args.json", "metrics.jsonl", "reward_curve.png", "summary.json", "before.png", "after.png",  # what runs write
             "checkpoints/step_*", "checkpoints/last.*", "checkpoints/*.tmp", "images/step_*.png", "tb/events.out.tfevents.*")

def atomic_write(path: Path, write):
    """write(file) into path.tmp, then rename it to path: a crash never leaves a torn file under the
    real name. An I/O error (disk full, read-only, ...) is one RunFailed naming the path and the cause."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as "unexpected pos": ask the disk
        tmp.unlink(missing_ok=True)
        full = shutil.disk_usage(path.parent).free < 1 << 20 if path.parent.is_dir() else False
        raise RunFailed(f"cannot write {path}: {'No space left on device' if full else getattr(e, 'strerror', None) or first_line(e)}"
                        "; what was written before is intact: fix that (free space, permissions) and continue with --resume") from None

def run_state(out: Path) -> str:
    """'new' (absent, or empty but for our lock), 'run' (a vargrpo run's folder) or 'other'."""
    if not out.exists() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return "new"
    try:
        saved = json.loads((out / "args.json").read_text())
    except (OSError, ValueError):
        saved = None
    is_args = isinstance(saved, dict) and {"reward", "preset", "steps"} <= saved.keys()
    return "run" if is_args or (out / "checkpoints" / "last.pt").is_file() else "other"

class RunFolder:
    def __init__(self, out: Path, d: Dist):
        self.out, self.d, self.lock_fd, self.tb, self.warned = out, d, None, None, False

    def open(self, a: TrainArgs, given):
        """The run's settings and, when resuming, its checkpoint. Rank 0 applies the folder rules: refuse anything
        that could lose a file, lock DIR, check again under the lock (a trainer started at the same moment may have
        claimed it first); --overwrite removes exactly the old run's files; a new run's args.json is written."""
        need(not (a.resume and "out" in given and a.out and Path(a.out).resolve() != Path(a.resume).resolve()),
             f"--resume {a.resume} continues in that directory; drop --out {a.out}")
        need(a.resume or a.out, "--out DIR is required (or --resume DIR)")
        ckpt, last, out = None, self.out / "checkpoints" / "last.pt", self.out
        if a.resume:
            need(last.is_file(), f"--resume {a.resume}: no checkpoints/last.pt there; start a new run with --out instead")
            ckpt = load_pth(last, f"resume from another step: copy one of {last.parent}/step_*.pt to last.pt")
            if not (isinstance(ckpt, dict) and {"model", "optimizer", "step", "args"} <= ckpt.keys()):
                raise CheckpointError(f"{last} is not a vargrpo run checkpoint (it lacks model/optimizer/step/args)")
        self.args = a = resolve_args(a, given, ckpt["args"] if ckpt else None)
        check_train_args(a, self.d.world)
        if not self.d.main:
            return a, ckpt
        need(not out.exists() or out.is_dir(), f"{out} is a file, not a folder; choose a folder for the run")
        for locked in (False, True):
            if locked:
                self.lock()
            state = run_state(out)
            need(not (state == "run" and not a.resume and not a.overwrite), f"{out} already holds a run; continue it with "
                 f"--resume {out}, choose another --out, or pass --overwrite to replace it")
            if state == "other":  # (the names listed only then: out may not exist)
                raise UsageError(f"{out} holds files that are not a vargrpo run ({', '.join(sorted(p.name for p in out.iterdir())[:3])}); choose a new or empty folder")
        if not a.resume:
            for p in [p for pattern in RUN_FILES for p in out.glob(pattern)] if state == "run" else []:
                p.unlink()  # --overwrite: the previous run's files, and nothing else
            for sub in ("checkpoints", "images", "tb"):
                if (out / sub).is_dir() and not any((out / sub).iterdir()):
                    (out / sub).rmdir()
            atomic_write(out / "args.json", lambda f: f.write(json.dumps(asdict(a), indent=1).encode()))
        if a.tracker == "tensorboard":  # live curves: every metrics.jsonl value and the grids, also in DIR/tb
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))
        return a, ckpt

    def lock(self):
        """An exclusive flock on DIR/.vargrpo.lock, held until the trainer exits (kill -9 included)."""
        import fcntl  # POSIX
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock_fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (close() closes the file)
            raise UsageError(f"{self.out} is in use by another trainer ({os.read(self.lock_fd, 300).decode(errors='replace').strip()}); "
                             "wait for it to end or choose another --out") from None
        except OSError as e:
            raise UsageError(f"cannot write in {self.out}: {e.strerror}; choose a folder you can write to") from None
        os.ftruncate(self.lock_fd, 0)
        os.write(self.lock_fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M')}".encode())

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock

    def restore(self, ckpt: dict, policy: VAR, opt) -> int:
        """Policy and optimizer from the checkpoint; the metrics log cut back to the steps it covers
        (a later line is redone now; a torn last line, from a crash mid-write, is dropped)."""
        last, start, path, keep = self.out / "checkpoints" / "last.pt", int(ckpt["step"]), self.out / "metrics.jsonl", []
        load_checked(policy, ckpt["model"], last)
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{last}: its optimizer state does not fit this model ({first_line(e)})") from None
        for line in path.read_text().splitlines() if self.d.main and path.exists() else []:
            try:
                keep += [line] if json.loads(line)["step"] < start else []
            except (ValueError, KeyError, TypeError):
                print(f"[vargrpo] {path}: dropping an unreadable line (a write cut short)", file=sys.stderr)
        if self.d.main:
            atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))
        return start

    def score(self, reward, images, policy, opt, a: TrainArgs, step: int):
        """Step 2: rewards (N,), their components {name: (N,)}, and MP's token mask (N, L) or None. A reward that raises
        is retried once; if it raises again (on any process) the run saves the steps done and stops."""
        error, chunks, pn = None, range(0, len(images), a.reward_batch), policy.config.patch_nums
        for attempt in (1, 2):
            try:
                with torch.no_grad():
                    out = [reward(images[i:i + a.reward_batch], return_components=True) for i in chunks]
                comps = {k: torch.cat([c[k].float() for _, c in out]) for k in out[0][1]}
                mask = None if not a.mask_propagation else propagate_mask(  # [VAR-RL MP] fine grid -> every scale
                    torch.cat([initial_mask(reward, images[i:i + a.reward_batch], pn[-1], a.mp_keep) for i in chunks]), pn)
                error = None
                break
            except Exception as e:  # a user's reward can fail in any way
                error = f"{type(e).__name__}: {first_line(e)}"
                print(f"[vargrpo] the reward raised {error}{'; retrying once' if attempt == 1 else ''}", file=sys.stderr)
        if all_reduce(torch.tensor([float(error is not None)], device=self.d.device), "max").item():
            raise RunFailed(f"the reward raised twice at step {step} ({error or 'on another process'}); saved "
                            f"{self.save(policy, opt, a, step)} (the {step} steps done); fix the reward and continue with --resume {self.out}")
        return torch.cat([r.float() for r, _ in out]).to(self.d.device), comps, mask

    def log(self, m: dict, step: int, images):
        """Step 6 (rank 0): a metrics.jsonl line (and TensorBoard), a sample grid every --image-every steps."""
        if not self.d.main:
            return
        try:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
        except OSError as e:
            raise RunFailed(f"cannot write {self.out / 'metrics.jsonl'}: {e.strerror}; the checkpoints are intact") from None
        print(f"[vargrpo] step {step}: reward {m['reward/mean']:.4f}, KL {m['policy/kl']:.4f}, {m['time/step']:.1f} s", flush=True)
        if m["reward/nonfinite"]:
            print(f"[vargrpo] step {step}: {m['reward/nonfinite']} non-finite rewards; those samples get no gradient", file=sys.stderr)
        if m["adv/abs_max"] == 0 and not self.warned:
            self.warned = True
            print(f"[vargrpo] step {step}: every group's samples got equal rewards, so every advantage is 0 and only "
                  "the KL acts; check that the reward can tell samples apart", file=sys.stderr)
        for k, v in m.items() if self.tb else ():
            self.tb.add_text(k, v, step) if isinstance(v, str) else self.tb.add_scalar(k, v, step)
        if self.args.image_every and step % self.args.image_every == 0:  # one image of each group first
            pick = torch.arange(len(images)).view(self.args.labels_per_step // self.d.world, -1).T.reshape(-1)[:16]
            grid = save_grid(images[pick], self.out / "images" / f"step_{step:06d}.png")
            self.tb.add_image("samples", grid, step) if self.tb else None

    def halt_if_nonfinite(self, sampling_nonfinite, stats: UpdateStats, step: int, policy, opt, a: TrainArgs):
        """A diverged policy (a non-finite sampling distribution or gradient, on any process) stops the run, saving the
        weights (no update was taken with a non-finite gradient)."""
        bad = all_reduce(torch.tensor([float(sampling_nonfinite > 0), float(stats.nonfinite is not None)],
                                      device=self.d.device), "max").tolist()
        if any(bad):
            what = " and ".join(w for w, b in zip(("the sampling distribution", stats.nonfinite or "the loss gradient"), bad) if b)
            finite = all(bool(torch.isfinite(p).all()) for p in policy.parameters())
            saved = f"saved {self.save(policy, opt, a, step)} (the weights after the last finite update)" if finite else "saved nothing"
            raise RunFailed(f"step {step}: {what} went non-finite (the policy diverged); {saved}; start again with a "
                            f"lower --lr (now {a.lr:g}) or a --max-grad-norm")

    def save(self, policy: VAR, opt, a: TrainArgs, step: int):
        """A checkpoint after `step` completed steps (rank 0; returns its path): checkpoints/step_N.pt (policy, optimizer,
        step, settings: an exact resume) and step_N.safetensors (the policy alone, official key layout, settings in its
        metadata), each atomic; last.pt and last.safetensors are hard links to the newest; --keep-last of each kept."""
        if not self.d.main:
            return None
        from safetensors.torch import save as safetensors_bytes
        folder, meta = self.out / "checkpoints", {"vargrpo_args": json.dumps(asdict(a)), "vargrpo_step": str(step)}
        state = {"model": policy.state_dict(), "optimizer": opt.state_dict(), "step": step, "args": asdict(a)}
        weights = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
        for suffix, write in ((".pt", lambda f: torch.save(state, f)),
                              (".safetensors", lambda f: f.write(safetensors_bytes(weights, metadata=meta)))):
            path, link = folder / f"step_{step:06d}{suffix}", folder / f"last{suffix}.tmp"
            atomic_write(path, write)
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
                os.replace(link, folder / f"last{suffix}")
            except OSError:  # a filesystem without hard links
                atomic_write(folder / f"last{suffix}", lambda f: f.write(path.read_bytes()))
            for old in sorted(folder.glob(f"step_*{suffix}"))[:-a.keep_last]:
                old.unlink()
        return folder / "last.pt"

def save_grid(images_B3HW, path: Path, nrow: int = 8) -> torch.Tensor:
    """A PNG grid of images in [0, 1] (upscaled to >= 128 px each); returns it, (3, H, W)."""
    from torchvision.utils import make_grid, save_image
    grid = make_grid(F.interpolate(images_B3HW.float().cpu(), scale_factor=max(1, 128 // images_B3HW.shape[-1])), nrow, 2, pad_value=1)
    atomic_write(path, lambda f: save_image(grid, f, format="PNG"))
    return grid

class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C aborts at once."""
    def __init__(self):  # (handlers can only be set from the main thread)
        on_main = threading.current_thread() is threading.main_thread()
        self.signum, self.previous = 0, {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM) if on_main}

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:  # a second Ctrl-C
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[vargrpo] signal {signum}: finishing this step, saving a checkpoint, then exiting "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

# ---- Command line: `python vargrpo.py train ...`, also under torchrun. Evaluation, ablation,
# benchmark, plots and the digits model: `python vargrpo_tools.py --help`.
def add_dataclass_args(parser, cls):
    """One --flag per dataclass field, its help from the field's metadata. Defaults are suppressed
    so that the namespace holds only the flags actually given."""
    for f in fields(cls):
        meta = dict(f.metadata)
        help = f"{meta.pop('help')} (default: {f.default})"
        kw = dict(action="store_true") if isinstance(f.default, bool) else dict(type=meta.pop("type", type(f.default)), **meta)
        parser.add_argument(flag(f.name), help=help, **kw)

def read_config(path: str) -> dict:
    """--config FILE: a run's args.json (without its resume and overwrite settings); unknown keys are refused."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path}: cannot read it as JSON ({first_line(e)}); pass a run's args.json") from None
    unknown = sorted(set(saved) - {f.name for f in fields(TrainArgs)}) if isinstance(saved, dict) else ["(not a JSON object)"]
    need(not unknown, f"--config {path}: unknown settings {', '.join(unknown)}; it must hold train flags, as a run's args.json does")
    return {k: v for k, v in saved.items() if k not in ("resume", "overwrite")}

def main(argv=None):
    parser = argparse.ArgumentParser(prog="vargrpo.py", description="GRPO fine-tuning of VAR image models")
    p = parser.add_subparsers(dest="command", required=True).add_parser(
        "train", argument_default=argparse.SUPPRESS, help="GRPO fine-tuning (also under torchrun --nproc-per-node=N)",
        description="GRPO fine-tuning of a VAR model (labels per step and minibatch sizes are global). Exit codes: 0 done, "
                    "1 the run failed (what was saved is printed), 2 a bad flag, file or folder (nothing changed), 130 / 143 "
                    "stopped by Ctrl-C / SIGTERM after saving.")
    p.add_argument("--config", metavar="FILE", help="start from a run's args.json; flags given here win")
    add_dataclass_args(p, TrainArgs)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    try:
        config = read_config(args.pop("config")) if "config" in args else {}
        return train(TrainArgs(**{**config, **args}), given=set(args))
    except (UsageError, CheckpointError, RunFailed, Stopped) as e:
        print(f"vargrpo: {'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum if isinstance(e, Stopped) else 1 if isinstance(e, RunFailed) else 2)

if __name__ == "__main__":
    main()
