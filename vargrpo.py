"""vargrpo: reinforcement-learning fine-tuning of next-scale VAR image models, in one file.

Reference implementation of
  [GRPO-VAR] Gallici & Saez de Ocariz Borde, "Fine-Tuning Next-Scale Visual Autoregressive Models
             with Group Relative Policy Optimization" (2025), and
  [VAR-RL]   "VAR RL Done Right" (arXiv 2601.02256): VMR, PANW and mask propagation,
on top of a re-implementation of VAR (Tian et al. 2024) that loads the official checkpoints
(FoundationVision/VAR: vae_ch160v4096z32.pth, var_d16.pth .. var_d30.pth) with strict key matching.

Launch lines:
  python vargrpo.py bench                                   # speed table for this machine

Read top to bottom: config -> scale bookkeeping -> VQVAE -> VAR -> checkpoint loading ->
logits processing -> sampler -> per-token log-probs -> CLI.

Choices and deviations from the official VAR code (numbered, referenced below as [C1] ...):
 1. No label dropout and no drop-path: they are pre-training regularisers; RL needs a
    deterministic teacher-forced pass that equals the sampling distribution.
 2. One attention path: torch SDPA with the official block-causal additive mask for teacher forcing,
    an explicit KV cache for sampling. No flash-attn / xformers / fused kernels.
 3. With cfg == 0 the sampler runs the conditional batch only (the official code always runs the
    unconditional half too and throws it away).
 4. Temperature (absent from the official sampler) divides the logits after CFG and before top-k /
    top-p, so top-p acts on the distribution actually sampled from.
 5. The head (adaLN + linear) always runs in fp32, also under autocast: log-probabilities feed ratios.
 6. The VQVAE is frozen and held by the VAR as a plain reference (`var.vae`), outside its
    state_dict and parameters, so the VAR state_dict is exactly the official one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VARConfig:
    """Architecture of a VQVAE + VAR pair. Defaults are the official VAR-d16 (256 px)."""
    depth: int = 16                 # transformer blocks; width = 64 * depth, heads = depth (official)
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # side of each scale's token grid
    vocab_size: int = 4096          # V: VQVAE codebook size
    z_channels: int = 32            # Cvae: codebook vector size
    vae_ch: int = 160               # VQVAE base width (multiples 1,1,2,2,4 -> 16x downsampling)
    num_classes: int = 1000         # class labels; index num_classes is the null (CFG) class
    shared_aln: bool = False        # one adaLN projection shared by all blocks (official d36)
    attn_l2_norm: bool = True       # L2-normalised q/k with learned per-head scale (official)

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        pn = self.patch_nums
        if len(pn) < 2 or any(b <= a for a, b in zip(pn, pn[1:])) or pn[0] < 1:
            raise ValueError(f"patch_nums must be >= 2 strictly increasing positive sides, got {pn}")
        if self.depth < 1 or self.vocab_size < 2 or self.z_channels < 1 or self.num_classes < 1:
            raise ValueError(f"invalid VARConfig {self}: depth, vocab_size, z_channels, num_classes must be positive")
        if self.vae_ch % 32:
            raise ValueError(f"vae_ch must be a multiple of 32 (GroupNorm with 32 groups), got {self.vae_ch}")

    embed_dim = property(lambda self: 64 * self.depth)      # C (official: width = 64 * depth)
    num_heads = property(lambda self: self.depth)           # head_dim is always 64
    num_scales = property(lambda self: len(self.patch_nums))  # K
    seq_len = property(lambda self: sum(p * p for p in self.patch_nums))  # L
    image_size = property(lambda self: 16 * self.patch_nums[-1])

    @staticmethod
    def preset(name: str) -> "VARConfig":
        """'d16', 'd20', 'd24', 'd30' (official 256 px), 'd36' (official 512 px), 'tiny' (CPU tests)."""
        if name in PRESETS:
            return PRESETS[name]
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


PRESETS = {
    "d16": VARConfig(depth=16), "d20": VARConfig(depth=20),
    "d24": VARConfig(depth=24), "d30": VARConfig(depth=30),
    # d36 (512 px) follows the official build arguments; its file layout is not checked by a fixture.
    "d36": VARConfig(depth=36, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32), shared_aln=True),
    # The layout of ../shared/fixtures/official_var_tiny.pt: 64 px images, 30 tokens, 4 scales.
    "tiny": VARConfig(depth=2, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=32,
                      num_classes=10),
}


# ----------------------------------------------------------------------------------------------
# Scale bookkeeping. L = all tokens of all scales, l = the tokens of one scale, si = scale index.


def scale_begin_ends(patch_nums) -> list[tuple[int, int]]:
    """[(begin, end)] of each scale's tokens in the flattened sequence (row-major within a scale)."""
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + pn * pn))
        cur += pn * pn
    return out


def scale_ids(patch_nums) -> torch.Tensor:
    """(L,) long: the scale index of every token."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])


def block_causal_bias(patch_nums) -> torch.Tensor:
    """(L, L) additive attention bias: 0 where query scale >= key scale, -inf elsewhere.

    A token sees every token of its own and all coarser scales, nothing of finer scales.
    """
    s_L = scale_ids(patch_nums).float()
    return torch.where(s_L[:, None] >= s_L[None, :], 0.0, -torch.inf)


def split_scales(idx_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """(B, L) -> [(B, pn*pn)] per scale; L may stop at the end of any scale (a prefix)."""
    ends = [e for _, e in scale_begin_ends(patch_nums)]
    if idx_BL.shape[1] not in ends:
        raise ValueError(f"token sequence of length {idx_BL.shape[1]} does not end at a scale boundary {ends}")
    return [idx_BL[:, b:e] for b, e in scale_begin_ends(patch_nums) if e <= idx_BL.shape[1]]


# ----------------------------------------------------------------------------------------------
# VQVAE: the frozen multi-scale tokenizer. Encoder/decoder are the taming-style CNNs of the
# official code (channel multipliers 1,1,2,2,4; two res-blocks per level; self-attention at the
# lowest resolution); the quantizer is VAR's multi-scale residual quantizer.


def group_norm(C: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=C, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BChw):
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(F.silu(self.norm2(h)))
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
        q, k, v = self.qkv(self.norm(x_BChw)).view(B, 3, C, h * w).transpose(2, 3).unbind(1)  # (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)                                        # (B, hw, C)
        return x_BChw + self.proj_out(out.transpose(1, 2).reshape(B, C, h, w))


class Upsample2x(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


CH_MULT = (1, 1, 2, 2, 4)  # official VQVAE: 5 levels, 16x downsampling
NUM_RES_BLOCKS = 2


class Encoder(nn.Module):
    def __init__(self, ch: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = ch
        for level, mult in enumerate(CH_MULT):
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(NUM_RES_BLOCKS):
                down.block.append(ResnetBlock(c_in, ch * mult))
                c_in = ch * mult
                if level == len(CH_MULT) - 1:
                    down.attn.append(AttnBlock(c_in))
            if level != len(CH_MULT) - 1:
                down.downsample = Downsample2x(c_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, z_channels: int):
        super().__init__()
        c_in = ch * CH_MULT[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)
        ups = []
        for level in reversed(range(len(CH_MULT))):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(NUM_RES_BLOCKS + 1):
                up.block.append(ResnetBlock(c_in, ch * CH_MULT[level]))
                c_in = ch * CH_MULT[level]
                if level == len(CH_MULT) - 1:
                    up.attn.append(AttnBlock(c_in))
            if level != 0:
                up.upsample = Upsample2x(c_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)  # self.up[level]; run from the coarsest level down to 0
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv3x3(h), r = 0.5: VAR's refinement of each upsampled scale."""
    def __init__(self, C: int, resi_ratio: float = 0.5):
        super().__init__(C, C, 3, 1, 1)
        self.resi_ratio = resi_ratio

    def forward(self, h_BChw):
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


NUM_PHI = 4  # official share_quant_resi = 4: four Phi convs shared across the scales


def phi_index(si: int, num_scales: int) -> int:
    """Which of the 4 shared Phi convs refines scale si (official PhiPartiallyShared).

    The convs sit at ticks linspace(1/12, 11/12, 4); scale si uses the tick nearest to si/(K-1),
    the first one on a tie (computed in float64 exactly as numpy does: ties occur, e.g. K=10, si=2).
    """
    ticks = np.linspace(1 / 3 / NUM_PHI, 1 - 1 / 3 / NUM_PHI, NUM_PHI)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class PhiPartiallyShared(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(C) for _ in range(NUM_PHI)])


class VectorQuantizer(nn.Module):
    """Multi-scale residual quantizer.

    f_hat = sum_k Phi_k(up(h_k)), h_k = embedding(r_k): every scale's tokens r_k are looked up,
    upsampled (bicubic) to the finest grid, refined by Phi, and summed. Encoding quantizes the
    area-downsampled residual f - f_hat at each scale in turn.
    """
    def __init__(self, vocab_size: int, Cvae: int, patch_nums):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.quant_resi = PhiPartiallyShared(Cvae)
        self.phi_idx = [phi_index(si, len(patch_nums)) for si in range(len(patch_nums))]
        # Pre-training statistics, unused here; kept so official files load with strict=True.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))

    def add_scale(self, f_hat_BChw, h_BChw, si: int):
        """f_hat + Phi_si(up(h_si)); up = bicubic to the finest grid (none at the last scale)."""
        H = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return f_hat_BChw + self.quant_resi.qresi_ls[self.phi_idx[si]](h_BChw)

    def embed(self, idx_Bl):
        """(B, pn*pn) tokens -> (B, Cvae, pn, pn) codebook vectors."""
        B, l = idx_Bl.shape
        pn = math.isqrt(l)
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)

    def idx_to_fhat(self, idx_per_scale):
        B, H = idx_per_scale[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.embedding.weight.shape[1], H, H, device=idx_per_scale[0].device)
        for si, idx_Bl in enumerate(idx_per_scale):
            f_hat = self.add_scale(f_hat, self.embed(idx_Bl), si)
        return f_hat

    def idx_to_var_input(self, idx_per_scale):
        """Teacher-forcing input: for scales 1..K-1, the area-downsampled partial sum of the scales
        before it. Returns (B, L - 1, Cvae) for the given scales but the last (None if only one)."""
        B, H = idx_per_scale[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.embedding.weight.shape[1], H, H, device=idx_per_scale[0].device)
        inputs = []
        for si, idx_Bl in enumerate(idx_per_scale[:-1]):
            f_hat = self.add_scale(f_hat, self.embed(idx_Bl), si)
            inputs.append(area_down(f_hat, self.patch_nums[si + 1]))
        return torch.cat(inputs, dim=1) if inputs else None

    @torch.no_grad()
    def f_to_idx(self, f_BChw):
        """Quantize a latent (B, Cvae, H, H) into [(B, pn*pn)] per scale (nearest codebook vector)."""
        B, C, H, W = f_BChw.shape
        E_VC = self.embedding.weight
        e_sq_V = E_VC.square().sum(dim=1)
        f_rest, f_hat, out = f_BChw.clone(), torch.zeros_like(f_BChw), []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != len(self.patch_nums) - 1 else f_rest
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            dist_NV = torch.addmm(z_NC.square().sum(dim=1, keepdim=True) + e_sq_V, z_NC, E_VC.T, alpha=-2)
            idx_Bl = dist_NV.argmin(dim=1).view(B, pn * pn)
            h_BChw = self.add_scale(torch.zeros_like(f_hat), self.embed(idx_Bl), si)
            f_hat, f_rest = f_hat + h_BChw, f_rest - h_BChw
            out.append(idx_Bl)
        return out


def area_down(f_BChw, pn: int):
    """Area-downsample the finest-grid map to pn x pn and flatten it: (B, pn*pn, C)."""
    B, C = f_BChw.shape[:2]
    return F.interpolate(f_BChw, size=(pn, pn), mode="area").view(B, C, pn * pn).transpose(1, 2)


class VQVAE(nn.Module):
    """The frozen tokenizer: images in [-1, 1] <-> multi-scale tokens. State dict = official."""
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.vae_ch, cfg.z_channels)
        self.decoder = Decoder(cfg.vae_ch, cfg.z_channels)
        self.quantize = VectorQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    @torch.no_grad()
    def img_to_idx(self, img_B3HW):
        """Images in [-1, 1], (B, 3, 16*pn_K, 16*pn_K) -> tokens (B, L), all scales concatenated."""
        S = self.cfg.image_size
        if img_B3HW.ndim != 4 or img_B3HW.shape[1:] != (3, S, S):
            raise ValueError(f"img_to_idx expects images of shape (B, 3, {S}, {S}) in [-1, 1], got {tuple(img_B3HW.shape)}")
        f = self.quant_conv(self.encoder(img_B3HW))
        return torch.cat(self.quantize.f_to_idx(f), dim=1)

    def fhat_to_img(self, f_hat_BChw):
        """Decoded image in [0, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1).add(1).mul(0.5)

    def idx_to_img(self, idx_BL):
        """Tokens (B, L) -> images (B, 3, H, W) in [0, 1]."""
        if idx_BL.shape[1] != self.cfg.seq_len:
            raise ValueError(f"idx_to_img expects all {self.cfg.seq_len} tokens, got {idx_BL.shape[1]}")
        return self.fhat_to_img(self.quantize.idx_to_fhat(split_scales(idx_BL, self.cfg.patch_nums)))


# ----------------------------------------------------------------------------------------------
# VAR: a class-conditional transformer over the concatenated scales, with adaptive LayerNorm.


class SelfAttention(nn.Module):
    """Multi-head attention; with attn_l2_norm, q and k are L2-normalised, q is multiplied by a
    learned per-head exp(min(scale_mul, ln 100)) and the softmax scale is 1. k has no bias."""
    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
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
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if kv_cache is not None:
            if kv_cache[0] is not None:
                k, v = torch.cat((kv_cache[0], k), dim=2), torch.cat((kv_cache[1], v), dim=2)
            kv_cache[0], kv_cache[1] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)  # (B, H, l, hd)
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
    def __init__(self, C: int, num_heads: int, shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.C = C
        self.attn = SelfAttention(C, num_heads, attn_l2_norm)
        self.ffn = FFN(C, 4 * C)
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x_BlC, cond_BD, attn_bias=None, kv_cache=None):
        if self.shared_aln:  # cond_BD is already the shared projection, (B, 1, 6, C)
            ada_B16C = self.ada_gss + cond_BD
        else:
            ada_B16C = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)  # (B, 1, C) each
        x_BlC = x_BlC + self.attn(self.ln_wo_grad(x_BlC) * (scale1 + 1) + shift1, attn_bias, kv_cache) * gamma1
        x_BlC = x_BlC + self.ffn(self.ln_wo_grad(x_BlC) * (scale2 + 1) + shift2) * gamma2
        return x_BlC


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1 + scale) + shift, (scale, shift) = Linear(SiLU(class embedding))."""
    def __init__(self, C: int):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BlC) * (scale + 1) + shift


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """Next-scale prediction: token r_k (all pn_k^2 tokens of scale k) ~ p(r_k | class, r_<k).

    The input of scale k > 0 is word_embed(area-downsample of the partial reconstruction from
    scales < k); scale 0 is the class embedding + pos_start. Plus absolute position and scale
    (level) embeddings. A block-causal mask lets each scale see itself and all coarser scales.
    """
    def __init__(self, cfg: VARConfig, vae: VQVAE):
        super().__init__()
        self.cfg = cfg
        C, K, L = cfg.embed_dim, cfg.num_scales, cfg.seq_len
        self.begin_ends = scale_begin_ends(cfg.patch_nums)
        self.first_l = cfg.patch_nums[0] ** 2
        self._vae = (vae,)  # a plain reference: not a submodule, not in the state_dict [C6]
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # row num_classes = null class (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(C, cfg.num_heads, cfg.shared_aln, cfg.attn_l2_norm)
                                     for _ in range(cfg.depth)])
        self.register_buffer("lvl_1L", scale_ids(cfg.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(cfg.patch_nums).view(1, 1, L, L))
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, cfg.vocab_size)

    @property
    def vae(self) -> VQVAE:
        return self._vae[0]

    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02):
        """The official initialisation: truncated normal std sqrt(1/(3C)) for linear, embedding and
        position weights; head x0.02; adaLN scale/shift x0.5 and gammas x1e-5 (blocks start ~identity);
        attention/FFN output projections / sqrt(2 depth)."""
        std = math.sqrt(1 / self.cfg.embed_dim / 3)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        C, depth = self.cfg.embed_dim, self.cfg.depth
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                if self.cfg.shared_aln:
                    block.ada_gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    block.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                    block.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)

    def cond(self, labels_B):
        """Class embedding (B, C) and what the blocks' adaLN takes."""
        cond_BD = self.class_emb(labels_B)
        return cond_BD, self.shared_ada_lin(cond_BD)

    def head_logits(self, x_BlC, cond_BD):
        """fp32 logits (B, l, V) [C5]."""
        with torch.autocast(device_type=x_BlC.device.type, enabled=False):
            return self.head(self.head_nm(x_BlC.float(), cond_BD.float()))

    def forward(self, labels_B, idx_BL):
        """Teacher forcing, one pass: logits (B, l, V) of the tokens idx_BL (all scales, or the first
        scales only), each predicted from the class and the tokens of coarser scales."""
        idx_per_scale = split_scales(idx_BL, self.cfg.patch_nums)
        B, l = idx_BL.shape
        cond_BD, ada_cond = self.cond(labels_B)
        x_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        var_input = self.vae.quantize.idx_to_var_input(idx_per_scale)  # (B, l - first_l, Cvae)
        if var_input is not None:
            x_BlC = torch.cat((x_BlC, self.word_embed(var_input.float())), dim=1)
        x_BlC = x_BlC + (self.lvl_embed(self.lvl_1L[:, :l]) + self.pos_1LC[:, :l])
        visible_ll = self.attn_bias_for_masking[0, 0, :l, :l] == 0  # block-causal, as a boolean mask
        for block in self.blocks:
            x_BlC = block(x_BlC, ada_cond, visible_ll)
        return self.head_logits(x_BlC, cond_BD)


def build_vae_var(cfg: VARConfig, seed: int = 0) -> tuple[VQVAE, VAR]:
    """A random VQVAE (PyTorch default init) and VAR (official init), both on CPU, seeded locally
    (the global RNG state is left as it was). The VQVAE is frozen (eval, no grad)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(cfg)
        var = VAR(cfg, vae)
        var.init_weights()
    vae.eval().requires_grad_(False)
    return vae, var


def unwrap(model: nn.Module) -> nn.Module:
    """The VAR inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------------------------
# Official checkpoints: weights_dir, then the cache, then the official URL.

OFFICIAL_URL = "https://huggingface.co/FoundationVision/var/resolve/main/{}"
VAE_FILE = "vae_ch160v4096z32.pth"


class CheckpointError(RuntimeError):
    """A weights file that cannot be used; the message ends with what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("VARGRPO_CACHE") or Path.home() / ".cache" / "vargrpo")


def find_or_download(filename: str, weights_dir=None) -> Path:
    """Path of `filename` in weights_dir or the cache; otherwise download it into the cache."""
    folders = [Path(d) for d in (weights_dir, cache_dir()) if d]
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    url = OFFICIAL_URL.format(filename)
    todo = f"download {url} yourself and pass --weights-dir DIR (weights_dir=DIR) naming its folder"
    where = " or ".join(str(f) for f in folders)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("VARGRPO_OFFLINE") == "1":
        raise CheckpointError(f"{filename} is not in {where} and offline mode is on; {todo}")
    dest = cache_dir() / filename
    try:
        _download(url, dest)
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        raise CheckpointError(f"{filename} is not in {where} and downloading {url} failed ({e}); {todo}") from None
    return dest


def _download(url: str, dest: Path):
    from tqdm import tqdm
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)  # atomic: a broken download never leaves a truncated file under the real name


def read_state_dict(path) -> dict:
    """The state_dict in a .pth file: a plain state_dict, the official training-script wrapper
    (ckpt['trainer']['var_wo_ddp']) or a vargrpo checkpoint (ckpt['model'])."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, text file, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}); "
                              "if it is a partial download, delete it and fetch it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not (isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())):
        raise CheckpointError(f"{path} holds no model state_dict; pass an official VAR/VQVAE .pth file")
    return obj


def var_depth_in(state_dict: dict) -> int:
    """The depth a VAR state_dict implies (number of blocks)."""
    ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    return max(ids) + 1 if ids else 0


def load_checked(module: nn.Module, state_dict: dict, path, assign: bool = False):
    """load_state_dict(strict=True), with a one-line error naming what differs."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(ks)}): {', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''}"
                 for name, ks in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if ks]
        raise CheckpointError(f"{path} does not match {type(module).__name__}: {'; '.join(parts)}; "
                              "check that the file and the preset/config belong together")
    module.load_state_dict(state_dict, strict=True, assign=assign)


def check_var_file(state_dict: dict, cfg: VARConfig, path):
    """The load errors a user can cause with a real file, each with what to do."""
    depth = var_depth_in(state_dict)
    if depth != cfg.depth:
        raise CheckpointError(f"{path} holds a depth-{depth} VAR (by its shapes), not depth {cfg.depth}; "
                              f"use --preset d{depth} (load_pretrained(depth={depth})) or the var_d{cfg.depth}.pth file")
    if cfg.attn_l2_norm and "blocks.0.attn.scale_mul_1H11" not in state_dict:
        raise CheckpointError(f"{path} has no blocks.*.attn.scale_mul_1H11: it was saved by an old VAR version "
                              f"(before attn_l2_norm); download the current file from {OFFICIAL_URL.format(Path(path).name)}")


def load_pretrained(depth: int = 16, weights_dir=None, device="cpu") -> tuple[VQVAE, VAR]:
    """The official VQVAE and VAR-d{depth} (16, 20, 24, 30, 36), loaded strictly, on `device`."""
    if f"d{depth}" not in PRESETS:
        raise ValueError(f"no official VAR of depth {depth}; choose 16, 20, 24, 30 or 36")
    cfg = VARConfig.preset(f"d{depth}")
    var_path = find_or_download(f"var_d{depth}.pth", weights_dir)
    vae_path = find_or_download(VAE_FILE, weights_dir)
    var_sd, vae_sd = read_state_dict(var_path), read_state_dict(vae_path)
    check_var_file(var_sd, cfg, var_path)
    with torch.device("meta"):  # no random init of billions of weights that are overwritten anyway
        vae = VQVAE(cfg)
        var = VAR(cfg, vae)
    load_checked(vae, vae_sd, vae_path, assign=True)
    load_checked(var, var_sd, var_path, assign=True)
    vae.to(device).eval().requires_grad_(False)
    return vae, var.to(device)


# ----------------------------------------------------------------------------------------------
# The distribution sampled from. One function, used by the sampler and by the log-prob
# recomputation, so that "old" log-probs recorded at sampling equal teacher-forced ones.


def process_logits(logits_BlV, uncond_BlV=None, *, cfg_t=0.0, temperature=1.0, top_k=0, top_p=0.0):
    """Logits of the distribution VAR samples from (-inf = excluded), in this order:
      1. CFG: l = (1 + t) l_cond - t l_uncond, t = cfg * si / (K - 1) (linear ramp over scales, VAR)
      2. temperature: l / tau                                                         [C4]
      3. top-k: keep l >= the k-th largest logit (ties at the boundary kept)
      4. top-p: drop the least likely tokens while their total probability is <= 1 - p
         (so the kept mass is >= p; the most likely token is always kept)
    cfg_t: float, or a tensor broadcastable to (B, l, 1) holding t per token.
    """
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
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if cfg < 0 or top_k < 0 or not 0 <= top_p < 1:
        raise ValueError(f"need cfg >= 0, top_k >= 0 and 0 <= top_p < 1; got cfg={cfg}, top_k={top_k}, top_p={top_p}")


# ----------------------------------------------------------------------------------------------
# Sampling (KV cache, one scale per step) and teacher-forced log-probs (one pass).


@dataclass
class Rollout:
    labels: torch.Tensor          # (B,) class labels
    idx: torch.Tensor             # (B, L) tokens, all scales concatenated
    logprobs: torch.Tensor        # (B, L) log-prob of each token under the distribution sampled from
    images: torch.Tensor | None   # (B, 3, H, W) in [0, 1], or None with decode=False


@torch.no_grad()
def sample(var, labels_B, *, temperature=1.0, cfg=0.0, top_k=0, top_p=0.0, generator=None,
           prefix_idx=None, decode=True) -> Rollout:
    """Draw one image per label, scale by scale: one multinomial per scale over the (B*l, V)
    probabilities (the official sampler's RNG call order). With prefix_idx (B, l), the first scales
    are taken from it (no RNG used) and sampling continues from there."""
    check_sampling_args(temperature, cfg, top_k, top_p)
    model = unwrap(var)
    cfgm, quant = model.cfg, model.vae.quantize
    device, B, K, V = model.pos_1LC.device, labels_B.shape[0], cfgm.num_scales, cfgm.vocab_size
    if quant.embedding.weight.device != device:
        raise ValueError(f"the VAR is on {device} but its VQVAE on {quant.embedding.weight.device}; move both (vae.to(device))")
    n_prefix = 0 if prefix_idx is None else prefix_idx.shape[1]
    if prefix_idx is not None:
        split_scales(prefix_idx, cfgm.patch_nums)  # validates the scale boundary
        if prefix_idx.shape[0] != B:
            raise ValueError(f"prefix_idx has {prefix_idx.shape[0]} rows for {B} labels")
    guided = cfg != 0  # [C3]: no unconditional half without CFG
    labels_in = torch.cat((labels_B, torch.full_like(labels_B, cfgm.num_classes))) if guided else labels_B
    cond_BD, ada_cond = model.cond(labels_in)
    lvl_pos_1LC = model.lvl_embed(model.lvl_1L) + model.pos_1LC
    x_BlC = (cond_BD.unsqueeze(1).expand(-1, model.first_l, -1) + model.pos_start.expand(len(labels_in), -1, -1)
             + lvl_pos_1LC[:, :model.first_l])
    kv_caches = [[None, None] for _ in model.blocks]
    H = cfgm.patch_nums[-1]
    f_hat = torch.zeros(B, cfgm.z_channels, H, H, device=device)
    idx_BL = torch.empty(B, cfgm.seq_len, dtype=torch.long, device=device)
    logp_BL = torch.empty(B, cfgm.seq_len, device=device)
    for si, (bg, ed) in enumerate(model.begin_ends):
        for block, kv in zip(model.blocks, kv_caches):
            x_BlC = block(x_BlC, ada_cond, None, kv)
        logits_BlV = model.head_logits(x_BlC, cond_BD)
        logits_BlV = process_logits(logits_BlV[:B], logits_BlV[B:] if guided else None, cfg_t=cfg * (si / (K - 1)),
                                    temperature=temperature, top_k=top_k, top_p=top_p)
        if ed <= n_prefix:
            idx_Bl = prefix_idx[:, bg:ed]
        else:
            probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
            idx_Bl = torch.multinomial(probs_NV, num_samples=1, generator=generator).view(B, ed - bg)
        idx_BL[:, bg:ed] = idx_Bl
        logp_BL[:, bg:ed] = logits_BlV.log_softmax(-1).gather(-1, idx_Bl.unsqueeze(-1)).squeeze(-1)
        f_hat = quant.add_scale(f_hat, quant.embed(idx_Bl), si)
        if si < K - 1:  # the next scale's input: the partial reconstruction, area-downsampled
            nb, ne = model.begin_ends[si + 1]
            x_BlC = model.word_embed(area_down(f_hat, cfgm.patch_nums[si + 1])) + lvl_pos_1LC[:, nb:ne]
            if guided:
                x_BlC = x_BlC.repeat(2, 1, 1)
    images = model.vae.fhat_to_img(f_hat) if decode else None
    return Rollout(labels=labels_B, idx=idx_BL, logprobs=logp_BL, images=images)


def token_logits(var, labels_B, idx_BL):
    """Teacher-forced logits (B, L, V) of every token, one forward pass (differentiable)."""
    return var(labels_B, idx_BL)


def token_logprobs(var, labels_B, idx_BL, temperature=1.0, *, cfg=0.0, top_k=0, top_p=0.0):
    """log pi(idx_t | label, coarser scales) for every token, (B, L), under the same distribution
    `sample` draws from with these settings (differentiable). With cfg != 0 the conditional and
    null-class passes run as one batch."""
    check_sampling_args(temperature, cfg, top_k, top_p)
    cfgm = unwrap(var).cfg
    B, l = idx_BL.shape
    if cfg == 0:
        logits_BlV, uncond_BlV = var(labels_B, idx_BL), None
    else:
        null_B = torch.full_like(labels_B, cfgm.num_classes)
        logits_BlV, uncond_BlV = var(torch.cat((labels_B, null_B)), idx_BL.repeat(2, 1)).chunk(2)
    si_l = scale_ids(cfgm.patch_nums)[:l].to(logits_BlV.device)
    cfg_t = (cfg * (si_l.double() / (cfgm.num_scales - 1))).float().view(1, l, 1)
    logits_BlV = process_logits(logits_BlV, uncond_BlV, cfg_t=cfg_t, temperature=temperature, top_k=top_k, top_p=top_p)
    return logits_BlV.gather(-1, idx_BL.unsqueeze(-1)).squeeze(-1) - logits_BlV.logsumexp(-1)
