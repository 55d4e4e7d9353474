"""vargrpo: reinforcement-learning fine-tuning of next-scale VAR image models, in one file.

Reference implementation of
  [GRPO-VAR] Gallici & Saez de Ocariz Borde, "Fine-Tuning Next-Scale Visual Autoregressive Models
             with Group Relative Policy Optimization" (2025), and
  [VAR-RL]   "VAR RL Done Right" (arXiv 2601.02256): VMR, PANW and mask propagation,
on top of a re-implementation of VAR (Tian et al. 2024) that loads the official checkpoints
(FoundationVision/VAR: vae_ch160v4096z32.pth, var_d16.pth .. var_d30.pth) with strict key matching.

Launch lines:
  python vargrpo.py train --preset tiny --reward brightness --out runs/demo --lr 1e-3   # 1 process, CPU ok
  torchrun --nproc_per_node=8 vargrpo.py train --preset d16 --reward aesthetic --out runs/aes   # 1 node
  torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 vargrpo.py train ...  # 2 nodes
  python vargrpo.py eval --ckpt runs/aes                     # Table 1: aesthetic, CLIPScore, ResNet-50 top-5
  python vargrpo.py ablate                                   # VAR-RL ablation on the CPU tiny preset
  python vargrpo.py bench                                    # speed and memory on this machine

Read top to bottom: config -> scale bookkeeping -> VQVAE -> VAR -> checkpoint loading ->
logits processing -> sampler -> per-token log-probs -> the RL maths (GRPO, then PANW / VMR / MP)
-> distributed helpers -> trainer -> evaluation -> ablation -> benchmark -> CLI.

Choices and deviations from the official VAR code (numbered, referenced below as [C1] ...):
 1. No label dropout and no drop-path: they are pre-training regularisers; RL needs a
    deterministic teacher-forced pass that equals the sampling distribution.
 2. One attention path: torch SDPA with the official block-causal mask for teacher forcing,
    an explicit KV cache for sampling. No flash-attn / xformers / fused kernels.
 3. With cfg == 0 the sampler runs the conditional batch only (the official code always runs the
    unconditional half too and throws it away).
 4. Temperature (absent from the official sampler) divides the logits after CFG and before top-k /
    top-p, so top-p acts on the distribution actually sampled from.
 5. The head (adaLN + linear) always runs in fp32, also under autocast: log-probabilities feed ratios.
 6. The VQVAE is frozen and held by the VAR as a plain reference (`var.vae`), outside its
    state_dict and parameters, so the VAR state_dict is exactly the official one.

Choices within the papers (where they are silent):
 7. Group std is the population std (ddof 0) plus eps = 1e-4; a group of equal rewards gets A = 0.
 8. The loss averages each sample's tokens with weights summing to 1 (uniform: the token mean), then
    the samples; the k3 KL and the ratio use the tempered policy (the one sampled from) for both
    the policy and the reference.
 9. Each group of G samples has its own sampler seed (seed, step, group): runs do not depend on the
    number of processes. Labels per step and minibatch sizes are global.
10. VMR reuses each group sample as the first of its prefix's K completions; prefix and suffix steps
    alternate by the schedule; the KV cache of the prefix is recomputed, not reused (the prefix is
    ~8% of the tokens). Each stage's loss, its per-token KL included, covers that stage's tokens only.
11. Mask propagation without a region mask uses gradient saliency; a reward with a flat or no
    gradient keeps every token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
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
    # CPU demos and tests: 64 px images, 30 tokens, 4 scales. The official code's reference outputs
    # (../shared/fixtures/official_var_tiny.pt) use the same shape with vae_ch=32; 64 lets the demo
    # tokenizer carry colours through the decoder's GroupNorms (colour_tokenizer_).
    "tiny": VARConfig(depth=2, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=64,
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
        inplace = not torch.is_grad_enabled()  # the frozen tokenizer runs without autograd: save the copies
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
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


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
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


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
        x_BlC = x_BlC + self.attn(self.ln_wo_grad(x_BlC).mul(scale1 + 1).add_(shift1), attn_bias, kv_cache).mul_(gamma1)
        x_BlC = x_BlC + self.ffn(self.ln_wo_grad(x_BlC).mul(scale2 + 1).add_(shift2)).mul(gamma2)
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


def colour_tokenizer_(vae: VQVAE, seed: int = 0, gain: float = 1.0) -> VQVAE:
    """Make a random VQVAE of the `tiny` preset a tokenizer whose tokens are colours (CPU demos).

    A random decoder maps every token choice to nearly the same brightness (its GroupNorms remove
    per-image means), leaving RL no signal (../shared/notes/tiny-demo-feasibility.md). Here, in the
    official layout and code path:
      - token v's vector holds an RGB colour in dims 0-2 (each spread evenly over [-1, 1] across the
        vocabulary, shuffled per dim), the other dims stay random (they only feed the VAR's input);
      - Phi, quant_conv, post_quant_conv are identities, so f_hat = sum of the upsampled scales;
      - the decoder's residual branches are zero and its other maps carry 6 channels
        (R, -R, G, -G, B, -B) unchanged; the last GroupNorm sees each (+c, -c) pair as one group,
        so it divides c by its root-mean-square over the image without removing its mean, and
        conv_out recovers c from SiLU(c) - SiLU(-c) = c.
    Pixel = clamp(gain * c / rms(c)): a mosaic of colours whose brightness the tokens decide.
    """
    cfg = vae.cfg
    if cfg.vae_ch != 64 or cfg.z_channels < 3:
        raise ValueError(f"colour_tokenizer_ needs vae_ch=64 and z_channels>=3 (the tiny preset), got {cfg}")
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, cfg.vocab_size)
    carry = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # source, sign

    def identity_(conv: nn.Conv2d, n: int = 6):
        nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)
        k = conv.weight.shape[-1] // 2
        conv.weight[torch.arange(n), torch.arange(n), k, k] = 1.0

    with torch.no_grad():
        E = vae.quantize.embedding.weight
        for d in range(3):
            E[:, d] = ramp[torch.randperm(cfg.vocab_size, generator=g)]
        for phi in vae.quantize.quant_resi.qresi_ls:
            identity_(phi, cfg.z_channels)
        identity_(vae.quant_conv, cfg.z_channels), identity_(vae.post_quant_conv, cfg.z_channels)
        dec = vae.decoder
        nn.init.zeros_(dec.conv_in.weight), nn.init.zeros_(dec.conv_in.bias)
        dec.conv_in.weight[torch.arange(6), carry[0], 1, 1] = carry[1]
        for m in dec.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight), nn.init.zeros_(m.conv2.bias)
                if isinstance(m.nin_shortcut, nn.Conv2d):
                    identity_(m.nin_shortcut)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight), nn.init.zeros_(m.proj_out.bias)
            elif isinstance(m, Upsample2x):
                identity_(m.conv)
        nn.init.ones_(dec.norm_out.weight), nn.init.zeros_(dec.norm_out.bias)
        nn.init.zeros_(dec.conv_out.weight), nn.init.zeros_(dec.conv_out.bias)
        for rgb in range(3):
            dec.conv_out.weight[rgb, 2 * rgb, 1, 1], dec.conv_out.weight[rgb, 2 * rgb + 1, 1, 1] = gain, -gain
    return vae


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


def find_or_download(filename: str, weights_dir=None, url=None, flag="--weights-dir") -> Path:
    """Path of `filename` in weights_dir or the cache; otherwise download it (from `url`, default the
    official VAR files) into the cache. Offline or unreachable: one line naming the file, the URL and
    the flag that points at a local copy."""
    folders = [Path(d) for d in (weights_dir, cache_dir()) if d]
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    url = url or OFFICIAL_URL.format(filename)
    todo = f"download {url} yourself and pass {flag} naming it (or put it in {cache_dir()})"
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


def load_pth(path, hint: str):
    """torch.load(path, weights_only=True) onto the CPU; a file it cannot read (truncated zip, pickle
    garbage, text, ...) is one CheckpointError naming the file, the reason and `hint`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}); {hint}") from None


def read_state_dict(path) -> dict:
    """The state_dict in a .pth file: a plain state_dict, the official training-script wrapper
    (ckpt['trainer']['var_wo_ddp']) or a vargrpo checkpoint (ckpt['model'])."""
    obj = load_pth(path, "if it is a partial download, delete it and fetch it again")
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
    del kv_caches, x_BlC, logits_BlV  # free the KV cache before the decoder allocates its feature maps
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


# ----------------------------------------------------------------------------------------------
# The RL maths [GRPO-VAR eq. 1-2], as pure functions: tensors in, tensors out.
# Sign convention: we maximise the objective J; the loss is -J.


def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-4):
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the G samples of one group (a row)  [GRPO-VAR eq. 2].

    Population std (ddof 0), in float64. A group whose rewards are all equal carries no signal and
    gets A = 0 exactly (not rounding noise blown up by the division). Non-finite rewards are left
    out of their group's statistics and get A = 0. The same A is then used for every token of the
    sample [GRPO-VAR 4.2]. Returns (A (N, G) float32, number of groups with zero spread).
    """
    r = rewards_NG.double()
    valid = torch.isfinite(r)
    n = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n
    centred = torch.where(valid, r - mean, 0.0)
    std = (centred.square().sum(dim=1, keepdim=True) / n).sqrt()
    hi = torch.where(valid, r, -torch.inf).amax(dim=1, keepdim=True)
    lo = torch.where(valid, r, torch.inf).amin(dim=1, keepdim=True)
    flat = ~(hi > lo)  # all equal, or fewer than two finite rewards
    adv = torch.where(flat, 0.0, centred / (std + eps))
    return adv.float(), int(flat.sum())


def clipped_surrogate(logp_BL, old_logp_BL, adv_B, clip_eps=0.2, clip_eps_high=None):
    """PPO's clipped objective per token  [GRPO-VAR eq. 1]:
        min(rho A, clip(rho, 1 - eps, 1 + eps_high) A),  rho = pi / pi_old = exp(logp - old_logp).
    eps_high defaults to eps. Returns (objective (B, L), rho (B, L), clipped (B, L) bool: the clipped
    term is the smaller one, so this token gives no gradient)."""
    ratio = torch.exp(logp_BL - old_logp_BL)
    A = adv_B.unsqueeze(1)
    upper = 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    unclipped, clipped = ratio * A, ratio.clamp(1 - clip_eps, upper) * A
    return torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def kl_k3(logp_BL, ref_logp_BL):
    """Per-token KL(pi || pi_ref) estimate k3 = pi_ref/pi - log(pi_ref/pi) - 1  [GRPO-VAR eq. 1],
    written expm1(d) - d with d = ref_logp - logp: >= 0 always, exactly 0 where pi = pi_ref, and its
    expectation over tokens drawn from pi is the exact KL."""
    d = ref_logp_BL - logp_BL
    return torch.expm1(d) - d


def kl_exact(logits_BLV, ref_logits_BLV):
    """Per-token KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v), over the whole vocabulary.

    Computed as sum_v pi_v k3_v (equal, since sum_v pi_v (pi_ref_v / pi_v - 1) = 0): every term is
    >= 0 in floating point, so the result never dips below 0 for nearly equal policies."""
    logp, ref_logp = logits_BLV.log_softmax(-1), ref_logits_BLV.log_softmax(-1)
    p = logp.exp()
    return torch.where(p > 0, p * kl_k3(logp, ref_logp), 0.0).sum(-1)


def entropy(logits_BLV):
    """Per-token entropy of the policy, -sum_v pi_v log pi_v."""
    logp = logits_BLV.log_softmax(-1)
    return -torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1)


def uniform_token_weights(B: int, L: int, device=None):
    """w_bt = 1/L: the plain mean over a sample's tokens."""
    return torch.full((B, L), 1.0 / L, device=device)


def grpo_loss(surrogate_BL, kl_BL, token_weights_BL=None, beta=0.2, kl_weights_BL=None):
    """loss = -J,  J = (1/B) sum_b sum_t [ w_bt surrogate_bt - beta u_bt kl_bt ]   [GRPO-VAR eq. 1].

    w: policy-gradient token weights, each sample's summing to 1 (uniform 1/L = the token mean;
    PANW and mask propagation change it); a sample with w = 0 gets no policy gradient.
    u: KL token weights, default w (mask propagation keeps the KL outside its mask).
    """
    if token_weights_BL is None:
        token_weights_BL = uniform_token_weights(*surrogate_BL.shape, device=surrogate_BL.device)
    u = token_weights_BL if kl_weights_BL is None else kl_weights_BL
    return -((token_weights_BL * surrogate_BL).sum(1) - beta * (u * kl_BL).sum(1)).mean()


# ----------------------------------------------------------------------------------------------
# Beyond vanilla GRPO [VAR-RL]: per-action normalisation weighting (PANW), value as middle return
# (VMR) and mask propagation (MP). Pure functions; the trainer combines them through the loss's
# token weights and the advantages.


def normalise_rows(w_BL: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum; an all-zero row stays zero (that sample gets no gradient)."""
    s = w_BL.sum(dim=1, keepdim=True)
    return torch.where(s > 0, w_BL / torch.where(s > 0, s, 1.0), 0.0)


def panw_weights(patch_nums, alpha: float) -> torch.Tensor:
    """PANW token weights (L,)  [VAR-RL, PANW]: a token of scale t (an h_t x w_t grid) weighs
    k_t = (h_t w_t)^(-alpha), normalised so that one sample's L weights sum to 1.
    alpha = 0: the plain token mean (1/L); alpha = 1: every scale gets an equal share 1/K."""
    n_L = torch.cat([torch.full((pn * pn,), float(pn * pn), dtype=torch.float64) for pn in patch_nums])
    k_L = n_L.pow(-alpha)
    return (k_L / k_L.sum()).float()


def scale_token_mask(patch_nums, first_scale: int, end_scale: int) -> torch.Tensor:
    """(L,) 1.0 on the tokens of scales first_scale .. end_scale - 1, else 0."""
    s_L = scale_ids(patch_nums)
    return ((s_L >= first_scale) & (s_L < end_scale)).float()


def middle_value(rewards_NK: torch.Tensor, eta: float) -> torch.Tensor:
    """Value as middle return  [VAR-RL, Eq. 10]: V_m(s_m) = eta log( (1/K) sum_k exp(R_k / eta) ),
    a soft maximum of the K on-policy completions' rewards of one prefix (a row). It lies between
    their mean (eta -> inf) and their max (eta -> 0). Computed in float64 with logsumexp."""
    r = rewards_NK.double()
    K = r.shape[1]
    return (eta * (torch.logsumexp(r / eta, dim=1) - math.log(K))).to(rewards_NK.dtype)


def default_vmr_split(patch_nums) -> int:
    """The middle scale m (prefix = scales 0..m-1): the scale boundary nearest 8% of the tokens
    (VAR-RL's m256 fraction). For the 256 px models that is after the 5x5 scale: 55 of 680 tokens."""
    ends = [e for _, e in scale_begin_ends(patch_nums)][:-1]  # the prefix must leave a suffix
    L = sum(p * p for p in patch_nums)
    return 1 + min(range(len(ends)), key=lambda i: abs(ends[i] - 0.08 * L))


def propagate_mask(mask_fine_BHW: torch.Tensor, patch_nums) -> torch.Tensor:
    """Mask propagation  [VAR-RL, MP]: a binary mask on the finest token grid (B, pn_K, pn_K) ->
    a mask on every token of every scale (B, L). A coarser token is relevant if any finest-scale
    token its area covers is relevant: area-downsample the binary mask and threshold > 0."""
    m = (mask_fine_BHW > 0).float().unsqueeze(1)  # (B, 1, H, W)
    B = m.shape[0]
    return torch.cat([(F.interpolate(m, size=(pn, pn), mode="area") > 0).float().view(B, pn * pn)
                      for pn in patch_nums], dim=1)


def reward_region(reward, H: int, W: int, device=None):
    """The (H, W) mask of the pixels the reward scores, if it scores a region (a box); else None."""
    return reward.region_mask(H, W, device) if hasattr(reward, "region_mask") else None


def initial_mask(reward, images_B3HW: torch.Tensor, pn: int, keep: float) -> torch.Tensor:
    """The reward-relevant finest-grid mask (B, pn, pn) that mask propagation starts from.

    The reward's own region mask if it has one (a box: the pixels it scores); otherwise gradient
    saliency |d reward / d image| summed over channels, area-pooled to the token grid, keeping the
    top `keep` fraction of cells per image. An image whose saliency is flat (a reward with no
    gradient, or a uniform one) keeps every cell: there is nothing to choose by.
    """
    B, _, H, W = images_B3HW.shape
    region = reward_region(reward, H, W, images_B3HW.device)
    if region is not None:
        pooled = F.interpolate(region[None, None].float(), size=(pn, pn), mode="area")[:, 0]
        return (pooled > 0).float().expand(B, pn, pn)
    x = images_B3HW.detach().float().requires_grad_(True)
    with torch.enable_grad():
        r = reward(x)
        grad = torch.autograd.grad(r.sum(), x, allow_unused=True)[0] if r.requires_grad else None
    if grad is None:  # a reward without a gradient (a threshold, or not built differentiable)
        return torch.ones(B, pn, pn, device=images_B3HW.device)
    sal_Bpp = F.interpolate(grad.abs().sum(1, keepdim=True), size=(pn, pn), mode="area")[:, 0]
    flat = sal_Bpp.view(B, -1)
    n_keep = max(1, round(keep * pn * pn))
    kth = flat.topk(n_keep, dim=1).values[:, -1:]
    mask = (flat >= kth).float()
    uniform = (flat.amax(1) - flat.amin(1)) <= 1e-12 * flat.amax(1).clamp_min(1e-30)
    mask[uniform] = 1.0
    return mask.view(B, pn, pn)


# ----------------------------------------------------------------------------------------------
# Distributed helpers. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is
# rank 0 of 1 and never touches torch.distributed.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device=None) -> Dist:
    device = device or default_device()
    if "RANK" not in os.environ:
        return Dist(device=device)
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, device)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if distributed():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(t, ops[op])
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order)."""
    if not distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def derive_seed(*keys: int) -> int:
    """A seed for one explicit random stream, mixed from integers (seed, step, stream, index, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


STREAM_LABELS, STREAM_SAMPLE, STREAM_ORDER, STREAM_PREVIEW, STREAM_SUBSET, STREAM_EVAL = 1, 2, 3, 4, 5, 6


# ----------------------------------------------------------------------------------------------
# Trainer. `python vargrpo.py train --help` lists every setting; defaults are the GRPO-VAR paper's.


def arg(default, help, **extra):
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class TrainArgs:
    reward: str = arg("brightness", "reward spec: brightness, bright, dark, aesthetic, clip:PROMPT, brightness:region=x0,y0,x1,y1, or weighted sums such as 0.5*aesthetic+clip:a painting")
    preset: str = arg("d16", "model: d16 d20 d24 d30 d36 (official weights, --weights-dir) or tiny (random, CPU demo)")
    out: str = arg("", "run directory (metrics, checkpoints, images); required unless --resume")
    steps: int = arg(1000, "training steps (one step = one rollout batch and its updates)")
    seed: int = arg(0, "seed of every random stream: labels, sampling, minibatch order")
    labels_per_step: int = arg(32, "class labels drawn per step, GLOBAL: split across ranks, a group never spans ranks [paper: 32]")
    group_size: int = arg(16, "G: samples per label; advantages are normalised within these groups [paper: 16]")
    minibatch: int = arg(32, "samples per optimizer step, global [paper: 32]; labels*G/minibatch updates per step")
    micro_batch: int = arg(0, "samples per forward/backward on each rank (gradient accumulation); 0 = minibatch/ranks")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    lr: float = arg(1e-4, "AdamW learning rate [paper: 1e-4]")
    weight_decay: float = arg(0.01, "AdamW weight decay (torch default; the paper does not say)")
    beta: float = arg(0.2, "KL coefficient [paper: 0.2]")
    kl: str = arg("k3", "per-token KL to the pre-trained model: k3 (estimator, as the paper) or exact (whole vocabulary)", choices=("k3", "exact"))
    clip_eps: float = arg(0.2, "PPO clip range epsilon [paper: 0.2]")
    clip_eps_high: float = arg(None, "separate upper clip bound (1 + eps_high); default = clip_eps", type=float)
    temperature: float = arg(0.7, "sampling temperature while training (no CFG / top-k / top-p) [paper: 0.7]")
    adv_eps: float = arg(1e-4, "epsilon added to the group std")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this (0 = off; the paper does not clip)")
    reward_batch: int = arg(64, "images per reward-model call")
    clip_model: str = arg(None, "open_clip model of the CLIP rewards (default ViT-L-14-quickgelu; 'tiny-random' or a JSON config for CPU smoke runs)", type=str)
    clip_pretrained: str = arg("openai", "open_clip weights tag of --clip-model ('none' = random)")
    clip_weights: str = arg(None, "local open_clip checkpoint file for --clip-model (no download)", type=str)
    aesthetic_head: str = arg(None, "local sac+logos+ava1-l14-linearMSE.pth (else cache, else download)", type=str)
    method: str = arg("grpo", "grpo (the GRPO-VAR paper) or nextflow (VAR-RL: VMR + PANW alpha 1 + mask propagation)", choices=("grpo", "nextflow"))
    panw_alpha: float = arg(0.0, "PANW: a scale-t token weighs (h_t w_t)^-alpha, normalised per sample; 0 = off (token mean), 1 = equal share per scale")
    vmr: bool = arg(False, "VMR: value as middle return, alternating prefix and suffix updates")
    vmr_m: int = arg(0, "VMR split: the prefix is scales 0..m-1 (0 = the boundary nearest 8%% of the tokens)")
    vmr_k: int = arg(2, "VMR: on-policy completions per prefix for the middle value [VAR-RL: 2]")
    vmr_eta: float = arg(1.0, "VMR: temperature eta of the soft middle value [VAR-RL: 1]")
    vmr_schedule: str = arg("3:1", "VMR: prefix updates : suffix updates, repeating [VAR-RL 'fine-grained': 3:1]")
    vmr_suffix_group: str = arg("label", "VMR suffix advantages: normalised over a label's G*K completions, or a prefix's K", choices=("label", "prefix"))
    mask_propagation: bool = arg(False, "MP: policy-gradient weight only on reward-relevant tokens, propagated fine to coarse")
    mp_keep: float = arg(0.5, "MP: fraction of finest-grid cells kept by gradient saliency (rewards without a region)")
    scale_grad_norms: bool = arg(False, "log the parameter-gradient norm of each scale's tokens (first minibatch; K extra backward passes)")
    label_subset: str = arg("all", "train on all classes, or 'half': a fixed 50%% of them (seeded by --seed, saved in DIR/labels.json); eval reports seen and unseen", choices=("all", "half"))
    save_every: int = arg(100, "checkpoint every this many steps (and at the end, and on Ctrl-C / SIGTERM)")
    keep_last: int = arg(3, "checkpoints to keep")
    image_every: int = arg(50, "write a PNG grid of samples every this many steps (0 = off)")
    resume: str = arg(None, "continue the run in this directory from its last checkpoint", type=str)
    overwrite: bool = arg(False, "allow --out to name a directory that already holds a run (its run files are replaced)")
    weights_dir: str = arg(None, "folder with the official .pth files (else cache, else download)", type=str)
    init_seed: int = arg(0, "seed of the random 'pre-trained' model of the tiny preset (and of --random-init)")
    random_init: bool = arg(False, "start from random weights instead of the official ones (benchmarks, smoke tests)")
    preview_images: int = arg(16, "images in before.png / after.png (fixed labels and seed; 0 = off)")
    device: str = arg(None, "cpu or cuda (default: cuda if available)", type=str)
    dtype: str = arg("auto", "autocast dtype for the model: auto (bf16 on GPU, fp32 on CPU), bf16, fp32", choices=("auto", "bf16", "fp32"))


RESUME_OVERRIDABLE = ("steps", "save_every", "keep_last", "image_every", "device")
RUN_FILES = ("metrics.jsonl", "checkpoints", "images", "reward_curve.png", "before.png", "after.png", "args.json", "labels.json")


class UsageError(ValueError):
    """A bad flag or argument combination; the message says what to change."""


def check_train_args(a: TrainArgs, world: int):
    import reward_models
    try:
        reward_models.parse_spec(a.reward)
    except ValueError as e:
        raise UsageError(f"--reward: {e}") from None
    if a.preset not in PRESETS:
        raise UsageError(f"--preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
    if not a.out:
        raise UsageError("--out DIR is required (or --resume DIR)")
    positive = dict(steps=a.steps, labels_per_step=a.labels_per_step, minibatch=a.minibatch, ppo_epochs=a.ppo_epochs,
                    lr=a.lr, temperature=a.temperature, save_every=a.save_every, keep_last=a.keep_last,
                    reward_batch=a.reward_batch)
    for name, v in positive.items():
        if not v > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if a.group_size < 2:
        raise UsageError(f"--group-size must be >= 2 (advantages compare samples of one label), got {a.group_size}")
    if a.labels_per_step % world:
        raise UsageError(f"--labels-per-step {a.labels_per_step} must be divisible by the {world} processes (groups never span ranks)")
    n = a.labels_per_step * a.group_size
    if n % a.minibatch or a.minibatch % world:
        raise UsageError(f"--minibatch {a.minibatch} must divide labels*group = {n} and be divisible by the {world} processes")
    if a.micro_batch < 0 or a.micro_batch and (a.minibatch // world) % a.micro_batch:
        raise UsageError(f"--micro-batch {a.micro_batch} must divide the per-process minibatch {a.minibatch // world}")
    if not 0 < a.clip_eps < 1 or (a.clip_eps_high is not None and not a.clip_eps_high > 0):
        raise UsageError(f"need 0 < --clip-eps < 1 and --clip-eps-high > 0, got {a.clip_eps}, {a.clip_eps_high}")
    if a.vmr:
        K = len(VARConfig.preset(a.preset).patch_nums)
        if not 0 <= a.vmr_m < K:
            raise UsageError(f"--vmr-m {a.vmr_m}: the split must leave scales on both sides (1 .. {K - 1}, or 0 = auto)")
        if a.vmr_k < 2 or a.vmr_eta <= 0 or not re.fullmatch(r"\d+:\d+", a.vmr_schedule) or \
                sum(map(int, a.vmr_schedule.split(":"))) == 0:
            raise UsageError(f"need --vmr-k >= 2, --vmr-eta > 0 and --vmr-schedule P:S (e.g. 3:1 or 30:10); "
                             f"got {a.vmr_k}, {a.vmr_eta}, {a.vmr_schedule!r}")
    try:
        dev = torch.device(a.device) if a.device else None
    except RuntimeError:
        raise UsageError(f"--device {a.device!r}: use cpu, cuda or cuda:N") from None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {a.device}: this machine has no CUDA GPU that torch can use")
    if a.panw_alpha < 0 or not 0 < a.mp_keep <= 1:
        raise UsageError(f"need --panw-alpha >= 0 and 0 < --mp-keep <= 1, got {a.panw_alpha}, {a.mp_keep}")
    if min(a.beta, a.max_grad_norm, a.weight_decay, a.image_every, a.preview_images) < 0 or a.adv_eps <= 0:
        raise UsageError("--beta, --max-grad-norm, --weight-decay, --image-every, --preview-images must be >= 0 and --adv-eps > 0")


def build_models(a: TrainArgs, device):
    """(vae, policy, ref): the frozen tokenizer, the policy to train, the frozen pre-trained VAR."""
    cfg = VARConfig.preset(a.preset)
    if a.preset == "tiny":
        vae, ref = build_vae_var(cfg, seed=a.init_seed)
        colour_tokenizer_(vae, seed=a.init_seed)
    elif a.random_init:
        vae, ref = build_vae_var(cfg, seed=a.init_seed)
    else:
        vae, ref = load_pretrained(cfg.depth, a.weights_dir)
    policy = VAR(cfg, vae)
    policy.load_state_dict(ref.state_dict())
    ref.requires_grad_(False)  # never holds gradients or optimizer state
    return vae.to(device), policy.to(device), ref.to(device)


def make_reward(spec: str, device, a, differentiable: bool = False):
    """reward_models.build_reward with the CLIP / aesthetic options of `a`; its errors become one line."""
    import reward_models
    try:
        return reward_models.build_reward(spec, device, differentiable, clip_model=a.clip_model,
                                          clip_pretrained=a.clip_pretrained, clip_weights=a.clip_weights,
                                          aesthetic_head=a.aesthetic_head)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"reward {spec!r}: {e}") from None


def label_pool(a: TrainArgs, num_classes: int) -> torch.Tensor:
    """The classes a run trains on: all, or a fixed seeded half [GRPO-VAR Table 1, 'seen 50% labels']."""
    if a.label_subset == "all":
        return torch.arange(num_classes)
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(derive_seed(a.seed, STREAM_SUBSET)))
    return perm[:num_classes // 2].sort().values


def autocast_ctx(a: TrainArgs, device: str):
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else None, "bf16": torch.bfloat16, "fp32": None}[a.dtype]
    return (lambda: torch.autocast(device_type=device.split(":")[0], dtype=dtype)) if dtype else nullcontext


# ---- run directory: checkpoints, metrics, images


def save_checkpoint(out: Path, state: dict, step: int, keep_last: int) -> Path:
    """Atomic: written to a temp file and renamed; last.pt is a hard link to the newest."""
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    torch.save(state, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    tmp_last = folder / "last.pt.tmp"
    tmp_last.unlink(missing_ok=True)
    try:
        os.link(path, tmp_last)
    except OSError:  # a filesystem without hard links
        import shutil
        shutil.copyfile(path, tmp_last)
    os.replace(tmp_last, folder / "last.pt")
    for old in sorted(folder.glob("step_*.pt"))[:-keep_last]:
        old.unlink()
    return folder / "last.pt"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def all_rng_states() -> list:
    states = [rng_state()]
    if distributed():
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, rng_state())
    return states


def save_grid(images_B3HW, captions, path: Path, ncol: int = 8):
    """A PNG grid with a caption under each image (nearest-upscaled to >= 128 px)."""
    from PIL import Image, ImageDraw
    imgs = (images_B3HW.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    B, H, W = imgs.shape[:3]
    s = max(1, 128 // W)
    cw, ch, pad = W * s, H * s, 14
    ncol = min(ncol, B)
    grid = Image.new("RGB", (ncol * cw, ((B + ncol - 1) // ncol) * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        x, y = (i % ncol) * cw, (i // ncol) * (ch + pad)
        grid.paste(Image.fromarray(imgs[i]).resize((cw, ch), Image.NEAREST), (x, y))
        draw.text((x + 2, y + ch + 1), captions[i], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def plot_reward_curve(metrics_path: Path, out_path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward/mean"] for r in rows], label="reward (mean)", color="C0")
    ax.fill_between(steps, [r["reward/mean"] - r["reward/std"] for r in rows],
                    [r["reward/mean"] + r["reward/std"] for r in rows], color="C0", alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["policy/kl"] for r in rows], color="C3", label="KL to pre-trained (per token)")
    ax2.set_ylabel("KL", color="C3")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=ax.get_lines() + ax2.get_lines(), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C aborts at once."""
    def __init__(self):
        import signal
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass

    def handle(self, signum, frame):
        import signal
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[vargrpo] signal {signum}: finishing this step, saving a checkpoint, then exiting "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def restore(self):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RewardFailed(RuntimeError):
    pass


def compute_rewards(reward, images_N3HW, batch: int):
    """Rewards (N,) and component means, in chunks; a failure is retried once, then raised."""
    for attempt in (1, 2):
        try:
            totals, comps = [], {}
            with torch.no_grad():
                for i in range(0, len(images_N3HW), batch):
                    t, c = reward(images_N3HW[i:i + batch], return_components=True)
                    totals.append(t.float())
                    for k, v in c.items():
                        comps.setdefault(k, []).append(v.float())
            return torch.cat(totals), {k: torch.cat(v) for k, v in comps.items()}
        except Exception as e:  # a user's reward can fail in any way
            if attempt == 2:
                raise RewardFailed(f"{type(e).__name__}: {e}") from e
            print(f"[vargrpo] the reward raised {type(e).__name__}: {e}; retrying once", file=sys.stderr, flush=True)


# ---- one training step


def vmr_stage(a: TrainArgs, step: int):
    """None without VMR; else 'prefix' or 'suffix' by the P:S schedule (3:1 = P P P S P P P S ...)."""
    if not a.vmr:
        return None
    p, s = map(int, a.vmr_schedule.split(":"))
    return "prefix" if step % (p + s) < p else "suffix"


def rollout(policy, vae, labels_n, group_ids, a: TrainArgs, step: int, amp, device, prefix_len=None):
    """G samples per label from the current policy (old = pi at sampling time). Each group has
    its own generator seeded by (seed, step, global group index): the samples do not depend on how
    many processes share the batch.

    With VMR (prefix_len = the prefix's tokens) the first scales of each of the G samples are a
    prefix and K - 1 more completions of it are drawn (the sample itself is the first): G*K samples
    per label, prefix-major (prefix j's completion k is row j*K + k)."""
    G, K, t0 = a.group_size, (a.vmr_k if prefix_len else 1), time.perf_counter()
    idx, old_logp = [], []
    with torch.no_grad(), amp():
        for label, gid in zip(labels_n.tolist(), group_ids):
            gen = torch.Generator(device=device).manual_seed(derive_seed(a.seed, step, STREAM_SAMPLE, gid))
            labels_G = torch.full((G,), label, device=device)
            outs = [sample(policy, labels_G, temperature=a.temperature, generator=gen, decode=False)]
            for _ in range(K - 1):
                outs.append(sample(policy, labels_G, temperature=a.temperature, generator=gen,
                                   prefix_idx=outs[0].idx[:, :prefix_len], decode=False))
            idx.append(torch.stack([o.idx for o in outs], dim=1).flatten(0, 1))                # (G*K, L)
            old_logp.append(torch.stack([o.logprobs for o in outs], dim=1).flatten(0, 1).float())
        sync(device)
        t1 = time.perf_counter()
        idx = torch.cat(idx)
        images = torch.cat([vae.idx_to_img(idx[i:i + a.reward_batch]).float() for i in range(0, len(idx), a.reward_batch)])
        sync(device)
    labels = labels_n.repeat_interleave(G * K)
    return labels, idx, torch.cat(old_logp), images, t1 - t0, time.perf_counter() - t1


def update_batch(a: TrainArgs, stage, patch_nums, labels, idx, old_logp, rewards, mp_mask_NL, n_labels: int, split_m: int):
    """What a step trains on: rows, advantages, policy-gradient and KL token weights.

    grpo:   every sample; A = group-normalised R over a label's G samples.
    prefix: one row per prefix; A = group-normalised middle value V_m over a label's G prefixes;
            only prefix tokens (scales < m) in the loss.                        [VAR-RL, VMR]
    suffix: every completion; A = group-normalised R over a label's G*K completions (or a
            prefix's K); only suffix tokens (scales >= m) in the loss.
    Token weights: PANW (uniform when alpha = 0) x the stage's tokens, times the mask-propagation
    mask for the policy gradient only, renormalised per sample; the KL keeps the unmasked weights.
    A sample with a non-finite reward (or middle value) gets no gradient at all.
    Returns (labels, idx, old_logp, adv, token_w, kl_w, n_flat_groups, n_groups)."""
    G, K = a.group_size, (a.vmr_k if stage else 1)
    device = idx.device
    rows = torch.arange(0, len(idx), K, device=device) if stage == "prefix" else torch.arange(len(idx), device=device)
    if stage == "prefix":
        value = middle_value(rewards.view(-1, K), a.vmr_eta)
        groups, valid, stage_L = value.view(n_labels, G), torch.isfinite(value), scale_token_mask(patch_nums, 0, split_m)
    else:
        shape = (n_labels * G, K) if stage == "suffix" and a.vmr_suffix_group == "prefix" else (n_labels, -1)
        groups, valid = rewards.view(*shape), torch.isfinite(rewards)
        stage_L = scale_token_mask(patch_nums, split_m, len(patch_nums)) if stage == "suffix" else torch.ones(len(idx[0]))
    adv, n_flat = group_advantages(groups, a.adv_eps)
    w_L = (panw_weights(patch_nums, a.panw_alpha) * stage_L).to(device).expand(len(rows), -1)
    kl_w = normalise_rows(w_L) * valid[:, None]
    token_w = normalise_rows(w_L * mp_mask_NL[rows]) * valid[:, None] if mp_mask_NL is not None else kl_w
    return labels[rows], idx[rows], old_logp[rows], adv.reshape(-1), token_w, kl_w, n_flat, groups.shape[0]


def loss_terms(model, ref, labels, idx, old_logp, adv, a: TrainArgs, amp):
    """The per-token pieces of the loss for one micro-batch: (policy logits, kl, surrogate, ratio, clipped)."""
    with amp():
        logits = process_logits(model(labels, idx), temperature=a.temperature)
        with torch.no_grad():
            ref_logits = process_logits(ref(labels, idx), temperature=a.temperature)
    tok = idx.unsqueeze(-1)
    logp = logits.gather(-1, tok).squeeze(-1) - logits.logsumexp(-1)
    ref_logp = ref_logits.gather(-1, tok).squeeze(-1) - ref_logits.logsumexp(-1)
    kl = kl_k3(logp, ref_logp) if a.kl == "k3" else kl_exact(logits, ref_logits)
    surr, ratio, clipped = clipped_surrogate(logp, old_logp, adv, a.clip_eps, a.clip_eps_high)
    return logits, kl, surr, ratio, clipped


def per_scale_grad_norms(policy, ref, labels, idx, old_logp, adv, token_w, kl_w, a: TrainArgs, amp) -> list:
    """||grad_theta loss_k|| for every scale k, loss_k = the loss restricted to scale k's tokens
    (weights not renormalised: the K parts sum to the loss). Shows which scales drive the update."""
    params = [p for p in policy.parameters() if p.requires_grad]
    _, kl, surr, _, _ = loss_terms(policy, ref, labels, idx, old_logp, adv, a, amp)
    norms = []
    for bg, ed in policy.begin_ends:
        sel = torch.zeros_like(token_w)
        sel[:, bg:ed] = 1
        grads = torch.autograd.grad(grpo_loss(surr, kl, token_w * sel, a.beta, kl_w * sel), params,
                                    retain_graph=True, allow_unused=True)
        norms.append(math.sqrt(sum(g.float().square().sum().item() for g in grads if g is not None)))
    return norms


def policy_update(model, ref, opt, labels, idx, old_logp, adv, token_w, kl_w, a: TrainArgs, step: int, d: Dist, amp):
    """PPO-style passes over the update batch in minibatches; returns summed statistics."""
    cfgm = unwrap(model).cfg
    N, K = len(idx), cfgm.num_scales
    mb = a.minibatch // d.world  # divides N (check_train_args)
    micro = a.micro_batch or mb
    sid_L = scale_ids(cfgm.patch_nums).to(idx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = {k: torch.zeros(K, device=idx.device) for k in ("kl", "clip", "ent", "tokens")}
    ratio_min, ratio_max, ratio_sum, first_dev, losses, norms = math.inf, -math.inf, 0.0, None, [], []
    scale_norms = None
    for epoch in range(a.ppo_epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(derive_seed(a.seed, step, STREAM_ORDER, d.rank, epoch)))
        for m in range(N // mb):
            ids_mb = order[m * mb:(m + 1) * mb].to(idx.device)
            if a.scale_grad_norms and scale_norms is None:
                ids = ids_mb[:micro]
                scale_norms = per_scale_grad_norms(unwrap(model), ref, labels[ids], idx[ids], old_logp[ids], adv[ids],
                                                   token_w[ids], kl_w[ids], a, amp)
            opt.zero_grad(set_to_none=True)
            loss_mb = 0.0
            for c0 in range(0, mb, micro):
                ids = ids_mb[c0:c0 + micro]
                last = c0 + micro >= mb
                with model.no_sync() if (d.world > 1 and not last) else nullcontext():
                    logits, kl, surr, ratio, clipped = loss_terms(model, ref, labels[ids], idx[ids], old_logp[ids], adv[ids], a, amp)
                    loss = grpo_loss(surr, kl, token_w[ids], a.beta, kl_w[ids]) * (len(ids) / mb)
                    loss.backward()
                with torch.no_grad():
                    on = (kl_w[ids] > 0).float()
                    for key, v in (("kl", kl), ("clip", clipped.float()), ("ent", entropy(logits)), ("tokens", torch.ones_like(kl))):
                        acc[key].index_add_(0, sid_L, (v.detach().float() * on).sum(0))
                    r = ratio.detach()[on > 0]
                    if r.numel():
                        ratio_min, ratio_max = min(ratio_min, r.min().item()), max(ratio_max, r.max().item())
                        ratio_sum += r.sum().item()
                        if epoch == 0 and m == 0:  # before any update: the sampler's policy == the trained one
                            first_dev = max(first_dev or 0.0, (r - 1).abs().max().item())
                    loss_mb += loss.item()
            norm = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm if a.max_grad_norm > 0 else math.inf)
            opt.step()
            losses.append(loss_mb)
            norms.append(norm.item())
    return dict(acc=acc, ratio_min=ratio_min, ratio_max=ratio_max, ratio_sum=ratio_sum,
                first_dev=first_dev if first_dev is not None else 0.0,
                loss=float(np.mean(losses)), grad_norm=float(np.mean(norms)), scale_norms=scale_norms)


def step_labels(a: TrainArgs, step: int, pool: torch.Tensor) -> torch.Tensor:
    """The step's global labels (the same on every rank): uniform over the label pool."""
    g = torch.Generator().manual_seed(derive_seed(a.seed, step, STREAM_LABELS))
    return pool[torch.randint(len(pool), (a.labels_per_step,), generator=g)]


def step_metrics(step, rewards, comps, adv, n_flat_groups, n_groups, upd, times, n_samples, lr) -> dict:
    """One metrics.jsonl line from this rank's numbers; call on every rank (it all-reduces)."""
    all_r = all_gather_cat(rewards)
    finite = all_r[torch.isfinite(all_r)]
    all_adv = all_gather_cat(adv)
    acc = {k: all_reduce(v.clone()) for k, v in upd["acc"].items()}
    counts = all_reduce(torch.tensor([float(n_flat_groups), float(n_groups), upd["ratio_sum"]], device=rewards.device))
    rmin = all_reduce(torch.tensor([upd["ratio_min"]], device=rewards.device), "min").item()
    rmax = all_reduce(torch.tensor([upd["ratio_max"]], device=rewards.device), "max").item()
    tokens = acc["tokens"].sum().clamp_min(1)
    m = {"step": step,
         "reward/mean": finite.mean().item() if finite.numel() else float("nan"),
         "reward/std": finite.std(unbiased=False).item() if finite.numel() else float("nan"),
         "reward/min": finite.min().item() if finite.numel() else float("nan"),
         "reward/max": finite.max().item() if finite.numel() else float("nan"),
         "reward/nonfinite": int((~torch.isfinite(all_r)).sum()),
         "adv/mean": all_adv.mean().item(), "adv/std": all_adv.std(unbiased=False).item(),
         "adv/abs_max": all_adv.abs().max().item(),
         "adv/zero_std_group_frac": (counts[0] / counts[1]).item(),
         "policy/kl": (acc["kl"].sum() / tokens).item(),
         "policy/clip_frac": (acc["clip"].sum() / tokens).item(),
         "policy/entropy": (acc["ent"].sum() / tokens).item(),
         "policy/ratio_mean": (counts[2] / tokens).item(), "policy/ratio_min": rmin, "policy/ratio_max": rmax,
         "policy/ratio_dev_first_minibatch": all_reduce(torch.tensor([upd["first_dev"]], device=rewards.device), "max").item(),
         "loss/loss": upd["loss"], "loss/grad_norm": upd["grad_norm"], "lr": lr}
    for name, v in comps.items():
        v = all_gather_cat(v)
        m[f"reward/{name}"] = v[torch.isfinite(v)].mean().item()
    for si in range(len(acc["kl"])):
        n = acc["tokens"][si].clamp_min(1)
        m[f"scale/kl_s{si}"] = (acc["kl"][si] / n).item()
        m[f"scale/clip_frac_s{si}"] = (acc["clip"][si] / n).item()
        m[f"scale/entropy_s{si}"] = (acc["ent"][si] / n).item()
    for si, v in enumerate(upd["scale_norms"] or []):
        m[f"scale/grad_norm_s{si}"] = v
    total = sum(times.values())
    m.update({f"time/{k}": v for k, v in times.items()})
    m["time/step"] = total
    m["perf/samples_per_s"] = n_samples / total
    return m


def preview(policy, vae, reward, a: TrainArgs, device, amp, path: Path):
    """Fixed labels and seed: before.png / after.png are comparable. Returns the mean reward."""
    ncls = policy.cfg.num_classes
    labels = torch.arange((a.preview_images + 1) // 2, device=device).repeat_interleave(2)[:a.preview_images] % ncls
    gen = torch.Generator(device=device).manual_seed(derive_seed(a.seed, STREAM_PREVIEW))
    with torch.no_grad(), amp():
        images = sample(policy, labels, temperature=a.temperature, generator=gen).images.float()
    try:
        with torch.no_grad():
            r = reward(images)
    except Exception as e:  # the training steps retry a failing reward; a preview just goes without
        print(f"[vargrpo] preview: the reward raised {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        r = torch.full((len(images),), float("nan"))
    save_grid(images, [f"{l} r={v:.2f}" for l, v in zip(labels.tolist(), r.tolist())], path)
    return r.mean().item()


def train(a: TrainArgs, given=frozenset()) -> dict:
    """The GRPO loop [GRPO-VAR 4]: sample G images per label, reward, group-normalise, clipped
    updates with a per-token KL to the pre-trained model. `given`: the flags set on the command
    line (a resumed run keeps its saved settings but these). Returns the last step's metrics."""
    from tqdm import tqdm
    d = setup_distributed(a.device)
    resume_ckpt = None
    if a.resume:
        last = Path(a.resume) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UsageError(f"--resume {a.resume}: no checkpoints/last.pt there; start a new run with --out instead")
        if "out" in given and a.out and Path(a.out).resolve() != Path(a.resume).resolve():
            raise UsageError(f"--resume {a.resume} continues in that directory; drop --out {a.out}")
        resume_ckpt = load_pth(last, f"resume from another file in {last.parent} by copying it to last.pt")
        saved = dict(resume_ckpt["args"])
        changed = [k for k in given if k not in RESUME_OVERRIDABLE + ("resume", "out") and getattr(a, k) != saved.get(k)]
        if changed:
            raise UsageError(f"--resume keeps the run's settings; {', '.join('--' + k.replace('_', '-') for k in changed)} "
                             f"cannot change (only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE)} can)")
        saved.update({k: getattr(a, k) for k in RESUME_OVERRIDABLE if k in given})
        a = TrainArgs(**{**saved, "resume": a.resume, "out": a.resume})
    elif a.method == "nextflow":  # VAR-RL's full recipe; explicit flags still win for the numbers
        a = TrainArgs(**{**asdict(a), "vmr": True, "mask_propagation": True,
                         "panw_alpha": a.panw_alpha if "panw_alpha" in given else 1.0})
    idle = [k for k in given if (k.startswith("vmr_") and not a.vmr) or (k == "mp_keep" and not a.mask_propagation)]
    if idle:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(idle))} only act with --vmr / "
                         "--mask-propagation (or --method nextflow); add the switch or drop the flag")
    check_train_args(a, d.world)
    out = Path(a.out)
    holds_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if not a.resume and holds_run and not a.overwrite:
        raise UsageError(f"{out} already holds a run; continue it with --resume {out}, choose another --out, or pass --overwrite")
    if not a.resume and holds_run and d.main:
        print(f"[vargrpo] --overwrite: replacing the run in {out}", file=sys.stderr)
    reward = make_reward(a.reward, d.device, a, differentiable=a.mask_propagation)
    amp = autocast_ctx(a, d.device)
    vae, policy, ref = build_models(a, d.device)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=a.lr, weight_decay=a.weight_decay)
    start = 0
    if resume_ckpt is not None:
        policy.load_state_dict(resume_ckpt["model"])
        opt.load_state_dict(resume_ckpt["optimizer"])
        start = resume_ckpt["step"]
        if len(resume_ckpt["rng"]) == d.world:
            set_rng_state(resume_ckpt["rng"][d.rank])
    model = policy
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(policy, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)
    metrics_path = out / "metrics.jsonl"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if a.resume:  # drop log lines of steps after the checkpoint (they will be redone)
            keep = [l for l in metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < start] if metrics_path.exists() else []
            metrics_path.write_text("".join(l + "\n" for l in keep))
        else:  # --overwrite: the previous run's files go, so that nothing of it mixes with this one
            import shutil
            for stale in RUN_FILES:
                shutil.rmtree(out / stale) if (out / stale).is_dir() else (out / stale).unlink(missing_ok=True)
            (out / "args.json").write_text(json.dumps(asdict(a), indent=1))
            if a.preview_images:
                r = preview(policy, vae, reward, a, d.device, amp, out / "before.png")
                print(f"[vargrpo] preview before training ({out / 'before.png'}): mean reward {r:.4f}")
    pool = label_pool(a, policy.cfg.num_classes)
    if d.main and not a.resume:
        (out / "labels.json").write_text(json.dumps({"label_subset": a.label_subset, "seen": pool.tolist()}))
    n_local = a.labels_per_step // d.world
    split_m = (a.vmr_m or default_vmr_split(policy.cfg.patch_nums)) if a.vmr else 0
    samples_per_step = a.labels_per_step * a.group_size * (a.vmr_k if a.vmr else 1)
    saliency_pass = int(a.mask_propagation and reward_region(reward, 8, 8) is None)  # initial_mask's second reward pass
    stop = StopRequest()

    def checkpoint(step):
        states = all_rng_states()
        if d.main:
            state = {"model": policy.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "config": asdict(policy.cfg), "args": asdict(a), "rng": states}
            return save_checkpoint(out, state, step, a.keep_last)

    bar = tqdm(total=a.steps, initial=start, disable=not d.main, dynamic_ncols=True, desc="grpo")
    m, step = {}, start
    try:
        for step in range(start, a.steps):
            labels_all = step_labels(a, step, pool)
            group_ids = list(range(d.rank * n_local, (d.rank + 1) * n_local))
            stage = vmr_stage(a, step)
            labels, idx, old_logp, images, t_sample, t_decode = rollout(
                policy, vae, labels_all[group_ids].to(d.device), group_ids, a, step, amp, d.device,
                prefix_len=policy.begin_ends[split_m - 1][1] if a.vmr else None)
            t0 = time.perf_counter()
            failed, mp_mask = None, None
            try:
                rewards, comps = compute_rewards(reward, images, a.reward_batch)
                if a.mask_propagation:
                    fine = torch.cat([initial_mask(reward, images[i:i + a.reward_batch], policy.cfg.patch_nums[-1], a.mp_keep)
                                      for i in range(0, len(images), a.reward_batch)])
                    mp_mask = propagate_mask(fine, policy.cfg.patch_nums)
            except RewardFailed as e:
                failed, rewards, comps = e, torch.zeros(len(images), device=d.device), {}
            t_reward = time.perf_counter() - t0
            if all_reduce(torch.tensor([float(failed is not None)], device=d.device), "max").item():
                path = checkpoint(step)
                raise RewardFailed(f"the reward raised twice at step {step} ({failed or 'on another rank'}); saved "
                                   f"{path or 'a checkpoint'} of the {step} completed steps; fix the reward and continue with --resume {out}")
            rewards = rewards.to(d.device)
            batch = update_batch(a, stage, policy.cfg.patch_nums, labels, idx, old_logp, rewards, mp_mask, n_local, split_m)
            t0 = time.perf_counter()
            upd = policy_update(model, ref, opt, *batch[:6], a, step, d, amp)
            t_update = time.perf_counter() - t0
            times = dict(sample=t_sample, decode=t_decode, reward=t_reward, update=t_update)
            m = step_metrics(step, rewards, comps, batch[3], batch[6], batch[7], upd, times,
                             len(images) * d.world, opt.param_groups[0]["lr"])
            m["budget/samples"] = (step + 1) * samples_per_step  # images sampled, decoded and rewarded so far
            m["budget/reward_images"] = m["budget/samples"] * (1 + saliency_pass)  # MP saliency rewards them again
            if stage:
                m["vmr/stage"] = stage
            if mp_mask is not None:
                m["mp/kept_fraction"] = all_reduce(batch[4].gt(0).float().mean().reshape(1)).item() / d.world
            if d.main:
                if m["reward/nonfinite"]:
                    print(f"\n[vargrpo] step {step}: {m['reward/nonfinite']} non-finite rewards; those samples get no gradient",
                          file=sys.stderr, flush=True)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                if a.image_every and step % a.image_every == 0:
                    pick = torch.arange(len(idx)).view(n_local, -1).T.reshape(-1)[:16]  # one per group first
                    save_grid(images[pick], [f"{l} r={v:.2f}" for l, v in zip(labels[pick].tolist(), rewards[pick].tolist())],
                              out / "images" / f"step_{step:06d}.png")
                bar.set_postfix(reward=f"{m['reward/mean']:.3f}", kl=f"{m['policy/kl']:.4f}")
                bar.update(1)
            done = step + 1
            stop_all = all_reduce(torch.tensor([float(stop.requested)], device=d.device), "max").item()
            if stop_all or done % a.save_every == 0 or done == a.steps:
                checkpoint(done)
                if stop_all and done < a.steps:
                    if d.main:
                        print(f"\n[vargrpo] stopped after step {done}; continue with --resume {out}", file=sys.stderr)
                    break
    finally:
        bar.close()
        stop.restore()
    if distributed():  # ranks leave together, the DDP wrapper (it holds the group) first: a gloo rank
        torch.distributed.barrier()  # that exits while its peer still talks can abort at exit
        del model
        torch.distributed.destroy_process_group()
    if d.main and metrics_path.exists() and metrics_path.read_text().strip():
        plot_reward_curve(metrics_path, out / "reward_curve.png", f"{a.preset}, reward {a.reward}")
        rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        first, last3 = rows[0]["reward/mean"], float(np.mean([r["reward/mean"] for r in rows[-3:]]))
        print(f"[vargrpo] mean reward: first step {first:.4f} -> last 3 steps {last3:.4f} ({last3 - first:+.4f}); run in {out}")
        if a.preview_images:
            r = preview(policy, vae, reward, a, d.device, amp, out / "after.png")
            print(f"[vargrpo] preview after training ({out / 'after.png'}): mean reward {r:.4f}")
    return m


# ----------------------------------------------------------------------------------------------
# Evaluation [GRPO-VAR Table 1]: aesthetic score, CLIP score and ResNet-50 top-5 accuracy of
# images sampled with the official inference settings, for the pre-trained and fine-tuned models.


@dataclass
class EvalArgs:
    ckpt: str = arg("", "a vargrpo checkpoint (RUN/checkpoints/last.pt) or its run directory")
    samples_per_class: int = arg(10, "images per class [paper: 10 for each of the 1000 classes]")
    max_classes: int = arg(0, "evaluate only the first N classes of each subset (0 = all)")
    cfg: float = arg(1.5, "classifier-free guidance [official VAR inference: 1.5]")
    top_k: int = arg(900, "top-k [official: 900]")
    top_p: float = arg(0.96, "top-p [official: 0.96]")
    temperature: float = arg(1.0, "sampling temperature")
    prompt: str = arg("a painting", "prompt of the CLIP score")
    batch: int = arg(50, "images per sampling call")
    seed: int = arg(0, "sampling seed (the same images are drawn for both models up to their differences)")
    out: str = arg(None, "folder for eval.md, eval.json and the grids (default: the run directory)", type=str)
    clip_model: str = arg(None, "open_clip model (default ViT-L-14-quickgelu; 'tiny-random' for smoke runs)", type=str)
    clip_pretrained: str = arg("openai", "open_clip weights tag ('none' = random)")
    clip_weights: str = arg(None, "local open_clip checkpoint file", type=str)
    aesthetic_head: str = arg(None, "local sac+logos+ava1-l14-linearMSE.pth", type=str)
    resnet_weights: str = arg(None, "local torchvision resnet50 IMAGENET1K_V2 state_dict (else torch hub cache, else download)", type=str)
    weights_dir: str = arg(None, "folder with the official VAR .pth files", type=str)
    device: str = arg(None, "cpu or cuda (default: cuda if available)", type=str)


def load_resnet50(weights, device):
    """torchvision ResNet-50 with IMAGENET1K_V2 weights, and its own preprocessing (on tensors)."""
    from torchvision.models import ResNet50_Weights, resnet50
    spec = ResNet50_Weights.IMAGENET1K_V2
    model = resnet50()
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"--resnet-weights {weights}: no such file")
        state = load_pth(weights, "pass torchvision's resnet50 IMAGENET1K_V2 .pth file")
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
        import reward_models
        if not cached.is_file() and not reward_models.hub_reachable("download.pytorch.org"):
            raise CheckpointError(f"ResNet-50 IMAGENET1K_V2 weights are not in {cached.parent} and download.pytorch.org "
                                  f"cannot be reached; download {spec.url} and pass --resnet-weights PATH")
        state = spec.get_state_dict(progress=True, check_hash=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device), spec.transforms()


def evaluate(e: EvalArgs) -> dict:
    path = Path(e.ckpt)
    path = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--ckpt {e.ckpt}: no checkpoint there (expected RUN/checkpoints/last.pt)")
    if min(e.samples_per_class, e.batch) < 1 or e.max_classes < 0 or e.temperature <= 0 or e.cfg < 0 \
            or e.top_k < 0 or not 0 <= e.top_p < 1:
        raise UsageError("need --samples-per-class >= 1, --batch >= 1, --max-classes >= 0, --temperature > 0, "
                         "--cfg >= 0, --top-k >= 0 and 0 <= --top-p < 1")
    ckpt = load_pth(path, "pass another vargrpo checkpoint")
    device = e.device or default_device()
    a = TrainArgs(**{**ckpt["args"], "weights_dir": e.weights_dir or ckpt["args"]["weights_dir"]})
    vae, finetuned, pretrained = build_models(a, device)
    finetuned.load_state_dict(ckpt["model"])
    reward = make_reward(f"aesthetic+clip:{e.prompt}", device, e)
    classifier, classifier_preprocess = load_resnet50(e.resnet_weights, device)
    ncls = finetuned.cfg.num_classes
    seen = label_pool(a, ncls)
    subsets = {"all": seen} if a.label_subset == "all" else \
        {"seen": seen, "unseen": torch.tensor(sorted(set(range(ncls)) - set(seen.tolist())))}
    out = Path(e.out) if e.out else path.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model_name, model in (("pre-trained", pretrained), ("fine-tuned", finetuned)):
        for subset, classes in subsets.items():
            classes = classes[:e.max_classes] if e.max_classes else classes
            labels = classes.repeat_interleave(e.samples_per_class).to(device)
            sums, grid = {"aesthetic": 0.0, "clipscore": 0.0, "top5": 0.0}, []
            for i in range(0, len(labels), e.batch):
                gen = torch.Generator(device=device).manual_seed(derive_seed(e.seed, STREAM_EVAL, i))
                with torch.no_grad():
                    images = sample(model, labels[i:i + e.batch], temperature=e.temperature, cfg=e.cfg, top_k=e.top_k,
                                    top_p=e.top_p, generator=gen).images.float()
                    _, parts = reward(images, return_components=True)
                    top5 = classifier(classifier_preprocess(images)).topk(5, dim=-1).indices
                sums["aesthetic"] += parts["aesthetic"].sum().item()
                sums["clipscore"] += parts[f"clip:{e.prompt}/clipscore"].sum().item()
                sums["top5"] += (top5 == labels[i:i + e.batch, None]).any(-1).float().sum().item()
                grid += [(img, lab) for img, lab in zip(images, labels[i:i + e.batch].tolist())
                         if lab in classes[:8].tolist() and sum(1 for _, l in grid if l == lab) < 4]
            n = len(labels)
            results.append({"model": model_name, "subset": subset, "images": n, "aesthetic": sums["aesthetic"] / n,
                            "clipscore": sums["clipscore"] / n, "resnet50_top5": sums["top5"] / n})
            save_grid(torch.stack([g[0] for g in grid]), [str(g[1]) for g in grid],
                      out / f"eval_{model_name}_{subset}.png")
    table = [f"| model | labels | images | aesthetic score | CLIPScore '{e.prompt}' | ResNet-50 top-5 |", "|---|---|---|---|---|---|"]
    table += [f"| {r['model']} ({a.preset}) | {r['subset']} | {r['images']} | {r['aesthetic']:.3f} | {r['clipscore']:.2f} | "
              f"{100 * r['resnet50_top5']:.1f}% |" for r in results]
    settings = {k: getattr(e, k) for k in ("samples_per_class", "cfg", "top_k", "top_p", "temperature", "prompt", "seed")}
    (out / "eval.json").write_text(json.dumps({"checkpoint": str(path), "step": ckpt["step"], "settings": settings,
                                               "results": results}, indent=1))
    (out / "eval.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return {"results": results}


# ----------------------------------------------------------------------------------------------
# Ablation [VAR-RL]: vanilla GRPO, +PANW, +VMR, +MP, all three, on the CPU tiny preset, at equal
# sample budgets (VMR's extra completions count: each image sampled, decoded and rewarded).

ABLATION_METHODS = {
    "grpo": {},
    "+panw": {"panw_alpha": 1.0},
    "+vmr": {"vmr": True},
    "+mp": {"mask_propagation": True},
    "nextflow (all three)": {"vmr": True, "mask_propagation": True, "panw_alpha": 1.0},
}


def ablate(args):
    """Runs every method for every seed to the same sample budget; writes ablation.md / .json / .png."""
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = dict(preset="tiny", reward=args.reward, labels_per_step=4, group_size=8, minibatch=16, lr=1e-3,
                  beta=0.1, temperature=1.0, preview_images=0, image_every=0, save_every=10**6, scale_grad_norms=True,
                  overwrite=True)
    runs = {}
    for name, flags in ABLATION_METHODS.items():
        per_step = common["labels_per_step"] * common["group_size"] * (TrainArgs.vmr_k if flags.get("vmr") else 1)
        steps = max(1, args.budget // per_step)
        for seed in seeds:
            run = out / f"{name.split()[0].lstrip('+')}_s{seed}"
            t0 = time.perf_counter()
            train(TrainArgs(**common, **flags, out=str(run), steps=steps, seed=seed))
            rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            runs[name, seed] = dict(rows=rows, wall=time.perf_counter() - t0)
    table, summary = summarise_ablation(runs, seeds, args)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps(summary, indent=1))
    plot_ablation(runs, seeds, out / "ablation.png", args.reward)
    print(table)


def summarise_ablation(runs, seeds, args):
    lines = [f"Reward `{args.reward}`, tiny preset, {len(seeds)} seed(s) ({args.seeds}), budget {args.budget} samples per run.",
             "",
             "| method | steps | reward at start | at 50% budget | final (last 10% of budget) | gain | wall time per run | grad-norm share of the finest scale |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in ABLATION_METHODS:
        stats = []
        for seed in seeds:
            rows, wall = runs[name, seed]["rows"], runs[name, seed]["wall"]
            budget = [r["budget/samples"] for r in rows]
            reward = [r["reward/mean"] for r in rows]
            last = [r for b, r in zip(budget, reward) if b > 0.9 * budget[-1]]
            half = min(range(len(budget)), key=lambda i: abs(budget[i] - 0.5 * budget[-1]))
            norms = np.array([[r[f"scale/grad_norm_s{k}"] for k in range(4)] for r in rows])
            stats.append(dict(start=reward[0], half=reward[half], final=float(np.mean(last)), wall=wall, steps=len(rows),
                              finest_share=float(np.mean(norms[:, -1] / norms.sum(1)))))
        agg = {k: (float(np.mean([s[k] for s in stats])), float(np.std([s[k] for s in stats]))) for k in stats[0]}
        summary[name] = {"per_seed": stats, "mean_std": agg}
        f = lambda k, p=3: f"{agg[k][0]:.{p}f} ± {agg[k][1]:.{p}f}" if len(seeds) > 1 else f"{agg[k][0]:.{p}f}"
        gain = [s["final"] - s["start"] for s in stats]
        lines.append(f"| {name} | {stats[0]['steps']} | {f('start')} | {f('half')} | {f('final')} | "
                     f"{np.mean(gain):+.3f} | {agg['wall'][0]:.0f} s | {agg['finest_share'][0]:.2f} |")
    lines += ["", "Rewards are the mean over the step's samples; ± is the std over seeds. The grad-norm share is "
              "||grad of the finest scale's part of the loss|| / sum over scales (first minibatch of each step)."]
    return "\n".join(lines) + "\n", summary


def plot_ablation(runs, seeds, path: Path, reward: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(ABLATION_METHODS):
        curves = [([r["budget/samples"] for r in runs[name, s]["rows"]], [r["reward/mean"] for r in runs[name, s]["rows"]])
                  for s in seeds]
        x = curves[0][0]
        ys = np.array([c[1][:len(x)] for c in curves])
        ax.plot(x, ys.mean(0), label=name, color=f"C{i}")
        ax.fill_between(x, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.15)
        norms = np.array([[r[f"scale/grad_norm_s{k}"] for k in range(4)] for s in seeds for r in runs[name, s]["rows"]])
        share = (norms / norms.sum(1, keepdims=True)).mean(0)
        ax2.bar(np.arange(4) + 0.16 * (i - 2), share, width=0.16, label=name, color=f"C{i}")
    ax.set_xlabel("samples (sampled, decoded and rewarded images)")
    ax.set_ylabel("mean reward")
    ax.set_title(f"{reward}: mean over seeds, band = min..max", fontsize=9)
    ax.legend(fontsize=8)
    ax2.set_xticks(range(4), [f"scale {k} ({p}x{p})" for k, p in enumerate(VARConfig.preset('tiny').patch_nums)])
    ax2.set_ylabel("share of the gradient norm")
    ax2.set_title("which scales drive the update (mean over steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Benchmark: `python vargrpo.py bench`. Every row runs in a fresh process so that its peak memory
# is its own; FLOPs are counted by torch's FlopCounterMode on one call of the timed function.

BENCH_SAMPLER_KW = {"tiny": dict(cfg=1.5, top_k=10, top_p=0.9), "default": dict(cfg=1.5, top_k=900, top_p=0.96)}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device, min_calls=3, min_seconds=2.0) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    sync(device)
    times = []
    while len(times) < min_calls or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak_flops(device) -> float:
    """This machine's fp32 matmul throughput (FLOP/s): the fastest of 10 square matmuls."""
    n = 8192 if str(device).startswith("cuda") else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def bench_row(preset: str, what: str, batch: int, device: str, official_dir=None) -> dict:
    """One measurement, in this process: sampler (cfg 0 / cfg+top-k/top-p, ours or the official
    code's) or teacher forcing (fwd / fwd+bwd) of a random model of this preset."""
    from torch.utils.flop_counter import FlopCounterMode
    if what.startswith("GRPO step"):
        return bench_grpo_step(preset, batch, device)
    if what.startswith("reward "):
        return bench_reward(what[len("reward "):], batch, device)
    cfg = VARConfig.preset(preset)
    vae, var = build_vae_var(cfg, seed=0)
    vae.to(device), var.to(device)
    labels = torch.arange(batch, device=device) % cfg.num_classes
    guided_kw = BENCH_SAMPLER_KW.get(preset, BENCH_SAMPLER_KW["default"])
    gen = torch.Generator(device=device).manual_seed(0)
    if what in ("sample cfg=0", "sample cfg+top-k/p"):
        kw = {} if what == "sample cfg=0" else guided_kw
        fn = lambda: sample(var, labels, generator=gen, **kw)
        unit, per_call = "img/s", batch
    elif what == "official sample cfg+top-k/p":
        sys.path.insert(0, str(official_dir))
        from models import build_vae_var as official_build  # the official repository's package
        o_vae, o_var = official_build(device=device, patch_nums=cfg.patch_nums, V=cfg.vocab_size, Cvae=cfg.z_channels,
                                      ch=cfg.vae_ch, share_quant_resi=4, num_classes=cfg.num_classes, depth=cfg.depth,
                                      shared_aln=cfg.shared_aln, attn_l2_norm=cfg.attn_l2_norm,
                                      flash_if_available=False, fused_if_available=False)
        o_vae.load_state_dict(vae.state_dict()), o_var.load_state_dict(var.state_dict())
        o_var.eval()
        fn = lambda: o_var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, more_smooth=False, **guided_kw)
        ours = lambda: sample(var, labels, generator=gen, **guided_kw)
        # this machine's speed drifts: time the two samplers interleaved, in one process
        fn(), ours()
        t, pairs = {fn: [], ours: []}, 8
        for rep in range(pairs):
            for f in ((fn, ours) if rep % 2 == 0 else (ours, fn)):
                t0 = time.perf_counter()
                f()
                sync(device)
                t[f].append(time.perf_counter() - t0)
        ratio = np.median(np.array(t[ours]) / np.array(t[fn]))  # pairs ran back to back
        what = (f"official sample cfg+top-k/p, interleaved with ours ({np.median(t[ours]):.3f} s/call; "
                f"ours/official per pair, median of {pairs}: {ratio:.3f})")
        return dict(what=what, seconds=float(np.median(t[fn])), throughput=batch / float(np.median(t[fn])),
                    unit="img/s", flops=None, peak_mem=None)
    else:
        idx = sample(var, labels, decode=False).idx
        if what == "teacher-forced fwd":
            fn = lambda: token_logprobs(var, labels, idx).sum()
            fn = torch.no_grad()(fn)
        else:
            def fn():
                var.zero_grad(set_to_none=True)
                token_logprobs(var, labels, idx).sum().backward()
        unit, per_call = "tok/s", batch * cfg.seq_len
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = time_call(fn, device)
    if str(device).startswith("cuda"):
        peak_mem = torch.cuda.max_memory_allocated()
    else:
        import resource
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(preset=preset, what=what, batch=batch, seconds=seconds, throughput=per_call / seconds, unit=unit,
                flops=counter.get_total_flops(), peak_mem=peak_mem, device=device)


def bench_grpo_step(preset: str, labels_per_step: int, device: str) -> dict:
    """One full GRPO step of the real trainer (random weights, brightness reward): the second of
    two steps, so that the first absorbs warm-up."""
    import tempfile
    G = 8 if preset == "tiny" or device.startswith("cuda") else 2
    with tempfile.TemporaryDirectory() as tmp:
        a = TrainArgs(preset=preset, random_init=True, out=tmp, steps=2, labels_per_step=labels_per_step, group_size=G,
                      minibatch=min(16, labels_per_step * G), preview_images=0, image_every=0, device=device)
        train(a)
        m = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()][-1]
    split = " / ".join(f"{k} {100 * m['time/' + k] / m['time/step']:.0f}%" for k in ("sample", "decode", "reward", "update"))
    peak_mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    return dict(what=f"GRPO step, {labels_per_step}x{G} samples ({split})", seconds=m["time/step"],
                throughput=m["perf/samples_per_s"], unit="samples/s", flops=None, peak_mem=peak_mem)


def bench_reward(name: str, batch: int, device: str) -> dict:
    """A reward on `batch` random 256 px images; CLIP ViT-L/14 and the aesthetic head with random
    weights (the same work as the real ones)."""
    import reward_models as rm
    from torch.utils.flop_counter import FlopCounterMode
    if name == "brightness":
        fn_reward = rm.Brightness()
    else:
        clip, tokenizer = rm.load_clip(rm.AESTHETIC_CLIP[0], "none", None, device)
        embedder = rm.ClipImageEmbedder(clip).to(device)
        fn_reward = rm.Aesthetic(embedder, rm.AestheticHead().to(device)) if name == "aesthetic" else \
            rm.ClipScore(embedder, tokenizer, "a painting")
    images = torch.rand(batch, 3, 256, 256, device=device)
    fn = torch.no_grad()(lambda: fn_reward(images))
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    seconds = time_call(fn, device)
    peak_mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    return dict(seconds=seconds, throughput=batch / seconds, unit="img/s", flops=counter.get_total_flops(), peak_mem=peak_mem)


def bench(args):
    import subprocess
    device = args.device or default_device()
    if args.row:  # child process: one measurement, printed as JSON
        preset, what, batch = args.row.split(":")
        print(json.dumps(bench_row(preset, what, int(batch), device, args.official_var)))
        return
    peak = matmul_peak_flops(device)
    on_gpu = device.startswith("cuda")
    print(f"device: {device} ({torch.cuda.get_device_name() if on_gpu else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    whats = ["sample cfg=0", "sample cfg+top-k/p"] + (["official sample cfg+top-k/p"] if args.official_var else []) \
        + ["teacher-forced fwd", "teacher-forced fwd+bwd", "GRPO step"]
    header = "| preset | what | batch | s/call | throughput | GFLOP/call | GFLOP/s | % of matmul peak | peak memory |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for preset in args.presets.split(","):
        sample_batch = (32 if on_gpu else 16) if preset == "tiny" else (32 if on_gpu else 2)
        tf_batch = (32 if on_gpu else 16) if preset == "tiny" else (16 if on_gpu else 2)
        for what in whats:
            batch = tf_batch if what.startswith("teacher") else sample_batch
            if what == "GRPO step":  # labels per step
                batch = (8 if on_gpu else 4) if preset == "tiny" else (4 if on_gpu else 1)
            cmd = [sys.executable, __file__, "bench", "--row", f"{preset}:{what}:{batch}", "--device", device]
            if args.official_var:
                cmd += ["--official-var", args.official_var]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"| {preset} | {what} | {batch} | failed: {res.stderr.strip().splitlines()[-1]} |", flush=True)
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            flop_cols = "- | - | -" if r["flops"] is None else \
                f"{r['flops'] / 1e9:.1f} | {r['flops'] / r['seconds'] / 1e9:.1f} | {100 * r['flops'] / r['seconds'] / peak:.0f}%"
            mem = "-" if r["peak_mem"] is None else f"{r['peak_mem'] / 2**30:.2f} GiB"
            print(f"| {preset} | {r.get('what', what)} | {batch} | {r['seconds']:.3f} | {r['throughput']:.3g} {r['unit']} | "
                  f"{flop_cols} | {mem} |", flush=True)
    for name in ("brightness", "aesthetic", "clip"):
        cmd = [sys.executable, __file__, "bench", "--row", f"-:reward {name}:32", "--device", device]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| - | reward {name} | 32 | failed: {res.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| 256 px | reward {name} | 32 | {r['seconds']:.3f} | {r['throughput']:.3g} img/s | {r['flops'] / 1e9:.1f} | "
              f"{r['flops'] / r['seconds'] / 1e9:.1f} | {100 * r['flops'] / r['seconds'] / peak:.0f}% | {r['peak_mem'] / 2**30:.2f} GiB |", flush=True)
    print(f"(peak memory: {'max CUDA memory allocated' if on_gpu else 'peak RSS of the row process, Python and torch included'};"
          " sampler rows include decoding the images; teacher-forced rows compute per-token log-probs)")


# ----------------------------------------------------------------------------------------------
# Command line


def add_dataclass_args(parser, cls):
    """One --flag per dataclass field, its help from the field's metadata. Defaults are suppressed
    so that the namespace holds only the flags actually given."""
    for f in fields(cls):
        meta = dict(f.metadata)
        help = f"{meta.pop('help')} (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=help)
        else:
            parser.add_argument(flag, type=meta.pop("type", type(f.default)), help=help, **meta)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vargrpo.py", description="GRPO fine-tuning of VAR image models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="GRPO fine-tuning (also under torchrun --nproc_per_node=N)",
                       description="GRPO fine-tuning of a VAR model. Labels per step and minibatch sizes are global: "
                                   "torchrun splits them across processes.")
    add_dataclass_args(p, TrainArgs)
    p = sub.add_parser("eval", argument_default=argparse.SUPPRESS,
                       help="aesthetic / CLIP score / ResNet-50 top-5 of a checkpoint and its pre-trained model (Table 1)")
    add_dataclass_args(p, EvalArgs)
    p = sub.add_parser("ablate", help="VAR-RL ablation on the CPU tiny preset: GRPO, +PANW, +VMR, +MP, all three")
    p.add_argument("--out", default="runs/ablate", help="folder for the runs and ablation.md / .json / .png")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--budget", type=int, default=2560, help="samples per run (VMR's extra completions count)")
    p.add_argument("--reward", default="brightness:region=0.25,0.25,0.75,0.75",
                   help="reward of every run (a region reward gives mask propagation its mask)")
    p = sub.add_parser("bench", help="speed and memory table of the model layer on this machine")
    p.add_argument("--presets", default="tiny,d16", help="comma-separated presets to measure")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--official-var", default=None, metavar="DIR",
                   help="a checkout of FoundationVision/VAR: also time its sampler on the same weights")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            given = {k for k in vars(args) if k != "command"}
            return train(TrainArgs(**{k: getattr(args, k) for k in given}), given)
        if args.command == "eval":
            return evaluate(EvalArgs(**{k: v for k, v in vars(args).items() if k != "command"}))
        if args.command == "bench":
            return bench(args)
        if args.command == "ablate":
            return ablate(args)
    except (UsageError, CheckpointError, RewardFailed, FileNotFoundError) as e:
        print(f"vargrpo: error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, UsageError) else 1)


if __name__ == "__main__":
    main()
