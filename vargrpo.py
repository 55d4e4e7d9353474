"""vargrpo: reinforcement-learning fine-tuning of next-scale VAR image models, in one file.

Reference implementation of
  [GRPO-VAR] Gallici & Saez de Ocariz Borde, "Fine-Tuning Next-Scale Visual Autoregressive Models
             with Group Relative Policy Optimization" (2025), and
  [VAR-RL]   "VAR RL Done Right" (arXiv 2601.02256): VMR, PANW and mask propagation,
on a re-implementation of VAR (Tian et al. 2024) that loads the official checkpoints
(FoundationVision/VAR: vae_ch160v4096z32.pth, var_d16.pth .. var_d30.pth) with strict key matching.

Launch lines:
  python vargrpo.py train --preset digits --reward brightness --out runs/b --lr 1e-4   # 1 process, CPU ok
  torchrun --nproc_per_node=8 vargrpo.py train --preset d16 --reward aesthetic --out runs/aes   # 1 node
  torchrun --nnodes=2 --node-rank=R --nproc-per-node=8 --rdzv-backend=c10d \\
      --rdzv-endpoint=HOST:29500 vargrpo.py train ...                                  # 2 nodes, R = 0, 1
Evaluation, the ablation, benchmarks, plots and the digits model live in vargrpo_tools.py.

Read top to bottom: config -> scale bookkeeping -> VQVAE -> VAR -> pre-trained weights ->
logits processing -> sample -> token_logprobs -> GRPO maths -> VAR-RL maths (PANW, VMR, MP) ->
distributed helpers -> TrainArgs -> train (one step, numbered 1-6) -> run folder -> CLI.

Choices and deviations from the official VAR code, referenced below as [C1] ...:
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
 9. Every group of G samples draws from its own generator seeded by (seed, step, group), and every
    minibatch holds the same samples whatever the number of processes: a run's result does not
    depend on it (up to float summation order). Labels per step and minibatch sizes are global.
10. VMR reuses each group sample as the first of its prefix's K completions; prefix and suffix steps
    alternate by the schedule; the KV cache of the prefix is recomputed, not reused (the prefix is
    ~8% of the tokens). Each stage's loss, its per-token KL included, covers that stage's tokens only.
11. Mask propagation starts from the reward's region when every term of the reward scores a region,
    else from gradient saliency; a reward with a flat or no gradient keeps every token.
12. AdamW with the official VAR parameter groups: no weight decay on embeddings, position/level
    embeddings, scale_mul, biases and other 1-D tensors (decay 0.01, torch's default, elsewhere).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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
    # CPU tests and smoke runs, random weights: 64 px images, 30 tokens, 4 scales (the shape of the
    # official code's reference outputs in ../shared/fixtures, with vae_ch 64 for the colour tokenizer).
    "tiny": VARConfig(depth=2, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=64, num_classes=10),
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
    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.vae_ch, config.z_channels)
        self.decoder = Decoder(config.vae_ch, config.z_channels)
        self.quantize = VectorQuantizer(config.vocab_size, config.z_channels, config.patch_nums)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, 1, 1)

    @torch.no_grad()
    def img_to_idx(self, img_B3HW):
        """Images in [-1, 1], (B, 3, 16*pn_K, 16*pn_K) -> tokens (B, L), all scales concatenated."""
        S = self.config.image_size
        if img_B3HW.ndim != 4 or img_B3HW.shape[1:] != (3, S, S):
            raise ValueError(f"img_to_idx expects images of shape (B, 3, {S}, {S}) in [-1, 1], got {tuple(img_B3HW.shape)}")
        f = self.quant_conv(self.encoder(img_B3HW))
        return torch.cat(self.quantize.f_to_idx(f), dim=1)

    def fhat_to_img(self, f_hat_BChw):
        """Decoded image in [0, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1).add(1).mul(0.5)

    def idx_to_img(self, idx_BL):
        """Tokens (B, L) -> images (B, 3, H, W) in [0, 1]."""
        if idx_BL.shape[1] != self.config.seq_len:
            raise ValueError(f"idx_to_img expects all {self.config.seq_len} tokens, got {idx_BL.shape[1]}")
        return self.fhat_to_img(self.quantize.idx_to_fhat(split_scales(idx_BL, self.config.patch_nums)))


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
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if config.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(C, config.num_heads, config.shared_aln, config.attn_l2_norm)
                                     for _ in range(config.depth)])
        self.register_buffer("lvl_1L", scale_ids(config.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(config.patch_nums).view(1, 1, L, L))
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, config.vocab_size)
        self.grad_checkpointing = False  # --grad-checkpointing: trade a second forward for activation memory

    @property
    def vae(self) -> VQVAE:
        return self._vae[0]

    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02):
        """The official initialisation: truncated normal std sqrt(1/(3C)) for linear, embedding and
        position weights; head x0.02; adaLN scale/shift x0.5 and gammas x1e-5 (blocks start ~identity);
        attention/FFN output projections / sqrt(2 depth)."""
        std = math.sqrt(1 / self.config.embed_dim / 3)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        C, depth = self.config.embed_dim, self.config.depth
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                if self.config.shared_aln:
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
        idx_per_scale = split_scales(idx_BL, self.config.patch_nums)
        B, l = idx_BL.shape
        cond_BD, ada_cond = self.cond(labels_B)
        x_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        var_input = self.vae.quantize.idx_to_var_input(idx_per_scale)  # (B, l - first_l, Cvae)
        if var_input is not None:
            x_BlC = torch.cat((x_BlC, self.word_embed(var_input.float())), dim=1)
        x_BlC = x_BlC + (self.lvl_embed(self.lvl_1L[:, :l]) + self.pos_1LC[:, :l])
        visible_ll = self.attn_bias_for_masking[0, 0, :l, :l] == 0  # block-causal, as a boolean mask
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute the block in backward
                x_BlC = torch.utils.checkpoint.checkpoint(block, x_BlC, ada_cond, visible_ll, use_reentrant=False)
            else:
                x_BlC = block(x_BlC, ada_cond, visible_ll)
        return self.head_logits(x_BlC, cond_BD)


def build_vae_var(config: VARConfig, seed: int = 0) -> tuple[VQVAE, VAR]:
    """A random VQVAE (PyTorch default init) and VAR (official init), both on CPU, seeded locally
    (the global RNG state is left as it was). The VQVAE is frozen (eval, no grad)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(config)
        var = VAR(config, vae)
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
    cfg = vae.config
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
# Pre-trained weights: --weights-dir, then the cache, then the official repository on the Hugging
# Face hub. Files (.pth or .safetensors) load with strict key matching into the classes above.

OFFICIAL_REPO, OFFICIAL_ENDPOINT = "FoundationVision/var", "https://huggingface.co"
VAE_FILE = "vae_ch160v4096z32.pth"


class CheckpointError(RuntimeError):
    """A weights file that cannot be used; the message ends with what to do."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def cache_dir() -> Path:
    return Path(os.environ.get("VARGRPO_CACHE") or Path.home() / ".cache" / "vargrpo")


def find_or_download(filename: str, weights_dir=None) -> Path:
    """`filename` (or the .safetensors of the same name) in weights_dir, else in the cache, else
    downloaded from the official repository into the cache. Offline or unreachable: one line naming
    the file, the URL and the flag that points at a local copy."""
    folders = [Path(d) for d in (weights_dir, cache_dir()) if d]
    for folder in folders:
        for name in (filename, Path(filename).stem + ".safetensors"):
            if (folder / name).is_file():
                return folder / name
    url = f"{OFFICIAL_ENDPOINT}/{OFFICIAL_REPO}/resolve/main/{filename}"
    todo = f"download {url} yourself and pass --weights-dir naming its folder (or put it in {cache_dir()})"
    where = " or ".join(str(f) for f in folders)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("VARGRPO_OFFLINE") == "1":
        raise CheckpointError(f"{filename} is not in {where} and offline mode is on; {todo}")
    from huggingface_hub import hf_hub_download
    try:  # a .part file while downloading, renamed when complete: never a truncated file under the real name
        return Path(hf_hub_download(OFFICIAL_REPO, filename, local_dir=cache_dir(), endpoint=OFFICIAL_ENDPOINT))
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


def check_var_file(state_dict: dict, config: VARConfig, path):
    """The load errors a user can cause with a real file, each with what to do."""
    depth = max((int(k.split(".")[1]) + 1 for k in state_dict if k.startswith("blocks.")), default=0)
    if depth != config.depth:
        raise CheckpointError(f"{path} holds a depth-{depth} VAR (by its shapes), not depth {config.depth}; "
                              f"use --preset d{depth} or the var_d{config.depth}.pth file")
    if config.attn_l2_norm and "blocks.0.attn.scale_mul_1H11" not in state_dict:
        raise CheckpointError(f"{path} has no blocks.*.attn.scale_mul_1H11: it was saved by an old VAR version "
                              f"(before attn_l2_norm); download the current file from the {OFFICIAL_REPO} repository")


def load_pretrained(preset: str = "d16", weights_dir=None, device="cpu") -> tuple[VQVAE, VAR]:
    """The official VQVAE and VAR-d16 .. d36 ('d16' .. 'd36'), loaded strictly, on `device`."""
    if preset not in PRESETS or preset == "tiny":
        raise ValueError(f"no official weights for preset {preset!r}; choose d16, d20, d24, d30 or d36")
    config = VARConfig.preset(preset)
    var_path, vae_path = find_or_download(f"var_{preset}.pth", weights_dir), find_or_download(VAE_FILE, weights_dir)
    var_sd, vae_sd = read_state_dict(var_path), read_state_dict(vae_path)
    check_var_file(var_sd, config, var_path)
    with torch.device("meta"):  # no random init of billions of weights that are overwritten anyway
        vae = VQVAE(config)
        var = VAR(config, vae)
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
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (0 <= cfg < math.inf) or top_k < 0 or not 0 <= top_p < 1:
        raise ValueError(f"need cfg >= 0, top_k >= 0 and 0 <= top_p < 1; got cfg={cfg}, top_k={top_k}, top_p={top_p}")


# ----------------------------------------------------------------------------------------------
# Sampling (KV cache, one scale per step) and teacher-forced log-probs (one pass).


@dataclass
class Rollout:
    labels: torch.Tensor          # (B,) class labels
    idx: torch.Tensor             # (B, L) tokens, all scales concatenated
    logprobs: torch.Tensor        # (B, L) log-prob of each token under the distribution sampled from
    images: torch.Tensor | None   # (B, 3, H, W) in [0, 1], or None with decode=False
    nonfinite: torch.Tensor       # () number of tokens whose distribution was not finite (drawn uniformly)


@torch.no_grad()
def sample(var, labels_B, *, temperature=1.0, cfg=0.0, top_k=0, top_p=0.0, generator=None,
           prefix_idx=None, decode=True) -> Rollout:
    """Draw one image per label, scale by scale: one multinomial per scale over the (B*l, V)
    probabilities (the official sampler's RNG call order). `generator` may be a list of n
    generators for n equal groups of consecutive rows: each group then draws from its own, exactly
    as a call with its rows alone would. With prefix_idx (B, l), the first scales are taken from it
    (no RNG used) and sampling continues from there. A distribution that is not finite (a diverged
    policy) is replaced by the uniform one and counted, so that multinomial never fails on it."""
    check_sampling_args(temperature, cfg, top_k, top_p)
    model = unwrap(var)
    config, quant = model.config, model.vae.quantize
    device, B, K, V = model.pos_1LC.device, labels_B.shape[0], config.num_scales, config.vocab_size
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if B % len(gens):
        raise ValueError(f"{B} rows cannot be split into {len(gens)} equal groups, one per generator")
    if quant.embedding.weight.device != device:
        raise ValueError(f"the VAR is on {device} but its VQVAE on {quant.embedding.weight.device}; move both (vae.to(device))")
    n_prefix = 0 if prefix_idx is None else prefix_idx.shape[1]
    if prefix_idx is not None:
        split_scales(prefix_idx, config.patch_nums)  # validates the scale boundary
        if prefix_idx.shape[0] != B:
            raise ValueError(f"prefix_idx has {prefix_idx.shape[0]} rows for {B} labels")
    guided = cfg != 0  # [C3]: no unconditional half without CFG
    labels_in = torch.cat((labels_B, torch.full_like(labels_B, config.num_classes))) if guided else labels_B
    cond_BD, ada_cond = model.cond(labels_in)
    lvl_pos_1LC = model.lvl_embed(model.lvl_1L) + model.pos_1LC
    x_BlC = (cond_BD.unsqueeze(1).expand(-1, model.first_l, -1) + model.pos_start.expand(len(labels_in), -1, -1)
             + lvl_pos_1LC[:, :model.first_l])
    kv_caches = [[None, None] for _ in model.blocks]
    H = config.patch_nums[-1]
    f_hat = torch.zeros(B, config.z_channels, H, H, device=device)
    idx_BL = torch.empty(B, config.seq_len, dtype=torch.long, device=device)
    logp_BL = torch.empty(B, config.seq_len, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    for si, (bg, ed) in enumerate(model.begin_ends):
        for block, kv in zip(model.blocks, kv_caches):
            x_BlC = block(x_BlC, ada_cond, None, kv)
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
            if guided:
                x_BlC = x_BlC.repeat(2, 1, 1)
    del kv_caches, x_BlC, logits_BlV  # free the KV cache before the decoder allocates its feature maps
    images = model.vae.fhat_to_img(f_hat) if decode else None
    return Rollout(labels=labels_B, idx=idx_BL, logprobs=logp_BL, images=images, nonfinite=nonfinite)


def token_logprobs(var, labels_B, idx_BL, temperature=1.0, *, cfg=0.0, top_k=0, top_p=0.0, return_logits=False):
    """log pi(idx_t | label, coarser scales) for every token, (B, L), under the same distribution
    `sample` draws from with these settings, in one teacher-forced pass (differentiable). With
    cfg != 0 the conditional and null-class passes run as one batch. return_logits: also the
    processed logits (B, L, V), as (logp_BL, logits_BLV) - the trainer's entropy and exact KL."""
    check_sampling_args(temperature, cfg, top_k, top_p)
    config = unwrap(var).config
    B, l = idx_BL.shape
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



# ----------------------------------------------------------------------------------------------
# The RL maths [GRPO-VAR eq. 1-2], as pure functions: tensors in, tensors out. Each one runs when
# pasted alone into a file that imports math, torch and torch.nn.functional as F.
# Sign convention: we maximise the objective J; the loss is -J.


def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the G samples of one group (a row)  [GRPO-VAR eq. 2].

    Population std (ddof 0), in float64. A group whose rewards are all equal carries no signal and
    gets A = 0 exactly (not rounding noise blown up by the division). Non-finite rewards are left
    out of their group's statistics and get A = 0. The same A is then used for every token of the
    sample [GRPO-VAR 4.2]. Returns A (N, G) float32 (a group with no spread is a row of zeros).
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
    return torch.where(flat, 0.0, centred / (std + eps)).float()


def clipped_surrogate(logp_BL, old_logp_BL, adv_B, clip_eps=0.2, clip_eps_high=None):
    """PPO's clipped objective per token  [GRPO-VAR eq. 1]:
        min(rho A, clip(rho, 1 - eps, 1 + eps_high) A),  rho = pi / pi_old = exp(logp - old_logp),
    A broadcast from the sample to its tokens; eps_high defaults to eps. A token whose clipped
    term is the smaller one gives no gradient. Returns (B, L)."""
    ratio = torch.exp(logp_BL - old_logp_BL)
    A = adv_B.unsqueeze(1)
    upper = 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    return torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, upper) * A)


def kl_k3(logp_BL, ref_logp_BL):
    """Per-token KL estimate k3 = pi_ref/pi - log(pi_ref/pi) - 1  [GRPO-VAR eq. 1], written
    expm1(d) - d with d = ref_logp - logp: >= 0 always and exactly 0 where pi = pi_ref. Its value,
    averaged over tokens drawn from pi, estimates KL(pi || pi_ref). Its gradient as a loss term is
    d k3 / d logp = 1 - pi_ref/pi, whose expectation over tokens drawn from pi is
    -sum_v pi_ref_v grad log pi_v: the gradient of KL(pi_ref || pi), not of KL(pi || pi_ref).
    kl_exact has the gradient of KL(pi || pi_ref)."""
    d = ref_logp_BL - logp_BL
    return torch.expm1(d) - d


def kl_exact(logits_BLV, ref_logits_BLV):
    """Per-token KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v), over the whole vocabulary,
    with its true gradient. Computed as sum_v pi_v k3_v (equal, since sum_v pi_v (pi_ref_v / pi_v - 1)
    = 0): every term is >= 0 in floating point, so it never dips below 0 for nearly equal policies."""
    logp, ref_logp = logits_BLV.log_softmax(-1), ref_logits_BLV.log_softmax(-1)
    p, d = logp.exp(), ref_logp - logp
    return torch.where(p > 0, p * (torch.expm1(d) - d), 0.0).sum(-1)


def entropy(logits_BLV):
    """Per-token entropy of the policy, -sum_v pi_v log pi_v."""
    logp = logits_BLV.log_softmax(-1)
    return -torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1)


def grpo_loss(surrogate_BL, kl_BL, token_weights_BL=None, beta=0.2, kl_weights_BL=None):
    """loss = -J,  J = (1/B) sum_b sum_t [ w_bt surrogate_bt - beta u_bt kl_bt ]   [GRPO-VAR eq. 1].

    w: policy-gradient token weights, each sample's summing to 1 (default 1/L: the token mean;
    PANW and mask propagation change it); a sample with w = 0 gets no policy gradient.
    u: KL token weights, default w (mask propagation keeps the KL outside its mask).
    """
    w = torch.full_like(surrogate_BL, 1.0 / surrogate_BL.shape[1]) if token_weights_BL is None else token_weights_BL
    u = w if kl_weights_BL is None else kl_weights_BL
    return -((w * surrogate_BL).sum(1) - beta * (u * kl_BL).sum(1)).mean()


# ----------------------------------------------------------------------------------------------
# Beyond vanilla GRPO [VAR-RL]: per-action normalisation weighting (PANW), value as middle return
# (VMR) and mask propagation (MP). Pure functions; the trainer combines them through the loss's
# token weights (PANW, MP) and the advantages (VMR).


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
    """The reward-relevant finest-grid mask (B, pn, pn) that mask propagation starts from.

    The reward's region if it scores one (a box: the pixels it looks at; `reward.region_mask` is
    None unless every term of the reward is a region term [C11]); otherwise gradient saliency
    |d reward / d image| summed over channels, area-pooled to the token grid, keeping the top `keep`
    fraction of cells (ties kept). An image whose saliency is flat (a reward with no gradient, or
    a uniform one) keeps every cell: there is nothing to choose by. The mask is where the reward
    is most sensitive, not a proof that other tokens cannot change it (the decoder mixes areas).
    """
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
    mask = (flat >= kth).float()
    mask[(flat.amax(1) - flat.amin(1)) <= 1e-12 * flat.amax(1).clamp_min(1e-30)] = 1.0
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return Dist(device=device)
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, device)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if distributed():
        torch.distributed.all_reduce(t, {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                                         "min": torch.distributed.ReduceOp.MIN}[op])
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order)."""
    if not distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def on_main(d: Dist, fn):
    """fn() on rank 0 only; its result, or the usage / checkpoint / I/O error it raised, reaches
    every rank (raised there too), so that no rank waits forever for a peer that gave up."""
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except (UsageError, CheckpointError, RunFailed) as e:
            error = e
    if distributed():
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def derive_seed(*keys: int) -> int:
    """A seed for one explicit random stream, mixed from integers (seed, step, stream, index, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


STREAM_LABELS, STREAM_SAMPLE, STREAM_ORDER, STREAM_PREVIEW, STREAM_SUBSET = 1, 2, 3, 4, 5


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Settings. `python vargrpo.py train --help` lists them; the defaults are the GRPO-VAR paper's.


def arg(default, help, **extra):
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class TrainArgs:
    reward: str = arg("brightness", "reward spec: brightness, bright, dark, aesthetic, clip:PROMPT, brightness:region=x0,y0,x1,y1, or weighted sums such as 0.5*aesthetic+clip:a painting")
    preset: str = arg("d16", "model: d16 d20 d24 d30 d36 (official weights, --weights-dir) or tiny (random, CPU tests)")
    out: str = arg("", "run directory (metrics, checkpoints, images): new, empty, or a run to replace with --overwrite")
    steps: int = arg(1000, "training steps (one step = one rollout batch and its updates)")
    seed: int = arg(0, "seed of every random stream: labels, sampling, minibatch order")
    labels_per_step: int = arg(32, "class labels drawn per step, GLOBAL: split across processes, a group never spans two [paper: 32]")
    group_size: int = arg(16, "G: samples per label; advantages are normalised within these groups [paper: 16]")
    minibatch: int = arg(32, "samples per optimizer step, global [paper: 32]; labels*G/minibatch updates per step")
    micro_batch: int = arg(0, "samples per forward/backward on each process (gradient accumulation); 0 = minibatch/processes")
    sample_batch: int = arg(0, "rows per sample() call on each process, in whole groups (0 = all of the process's rows)")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    lr: float = arg(1e-4, "AdamW learning rate [paper: 1e-4]")
    weight_decay: float = arg(0.01, "AdamW weight decay of matrices (torch default; the paper does not say) [C12]")
    beta: float = arg(0.2, "KL coefficient [paper: 0.2]")
    kl: str = arg("k3", "per-token KL to the pre-trained model: k3 (estimator, as the paper; its gradient is KL(ref||pi)'s) or exact (whole vocabulary, KL(pi||ref))", choices=("k3", "exact"))
    clip_eps: float = arg(0.2, "PPO clip range epsilon [paper: 0.2]")
    clip_eps_high: float = arg(None, "separate upper clip bound (1 + eps_high); default = clip_eps", type=float)
    temperature: float = arg(0.7, "sampling temperature while training (no CFG / top-k / top-p) [paper: 0.7]")
    adv_eps: float = arg(1e-4, "epsilon added to the group std")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this (0 = off; the paper does not clip)")
    reward_batch: int = arg(64, "images per reward-model (and decoder) call")
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
    label_subset: str = arg("all", "train on all classes, or 'half': a fixed 50%% of them (seeded by --seed, saved in DIR/labels.json)", choices=("all", "half"))
    save_every: int = arg(100, "checkpoint every this many steps (and at the end, and on Ctrl-C / SIGTERM)")
    keep_last: int = arg(3, "checkpoints to keep")
    image_every: int = arg(50, "write a PNG grid of samples every this many steps (0 = off)")
    tracker: str = arg("none", "live curves: tensorboard mirrors metrics.jsonl and the grids to DIR/tb (rank 0)", choices=("none", "tensorboard"))
    resume: str = arg(None, "continue the run in this directory from its last checkpoint", type=str)
    overwrite: bool = arg(False, "allow --out to name a directory that holds a run: exactly that run's files are replaced")
    weights_dir: str = arg(None, "folder with the pre-trained .pth / .safetensors files (else cache, else download)", type=str)
    init_seed: int = arg(0, "seed of the random 'pre-trained' model of the tiny preset (and of --random-init)")
    random_init: bool = arg(False, "start from random weights instead of the pre-trained ones (benchmarks, smoke tests)")
    grad_checkpointing: bool = arg(False, "recompute each transformer block in the backward pass (less activation memory)")
    preview_images: int = arg(16, "images in before.png / after.png (fixed labels and seed; 0 = off)")
    device: str = arg(None, "cpu or cuda (default: cuda if available)", type=str)
    dtype: str = arg("auto", "autocast dtype for the model: auto (bf16 on GPU, fp32 on CPU), bf16, fp32", choices=("auto", "bf16", "fp32"))


# settings a resumed run may change: they change neither the samples nor the updates
RESUME_OVERRIDABLE = ("steps", "save_every", "keep_last", "image_every", "tracker", "device", "micro_batch",
                      "sample_batch", "reward_batch", "grad_checkpointing", "weights_dir")


class UsageError(ValueError):
    """A bad flag, file or folder; the message says what to change (exit code 2)."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_train_args(a: TrainArgs, world: int):
    """Every setting a user can get wrong: one UsageError naming it and what to do."""
    import reward_models
    for f in fields(a):  # NaN / inf are never meant (they would silently turn checks and clipping off)
        v = getattr(a, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{flag(f.name)} {v}: must be a finite number")
    try:
        reward_models.parse_spec(a.reward)
    except ValueError as e:
        raise UsageError(f"--reward: {e}") from None
    if a.preset not in PRESETS:
        raise UsageError(f"--preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
    positive = dict(steps=a.steps, labels_per_step=a.labels_per_step, minibatch=a.minibatch, ppo_epochs=a.ppo_epochs,
                    lr=a.lr, temperature=a.temperature, save_every=a.save_every, keep_last=a.keep_last,
                    reward_batch=a.reward_batch, adv_eps=a.adv_eps)
    for name, v in positive.items():
        if not v > 0:
            raise UsageError(f"{flag(name)} must be > 0, got {v}")
    if a.lr >= 1:
        raise UsageError(f"--lr {a.lr}: AdamW at a learning rate >= 1 diverges at once; the paper uses 1e-4")
    if a.group_size < 2:
        raise UsageError(f"--group-size must be >= 2 (advantages compare samples of one label), got {a.group_size}")
    if a.labels_per_step % world:
        raise UsageError(f"--labels-per-step {a.labels_per_step} must be divisible by the {world} processes (groups never span two)")
    n = a.labels_per_step * a.group_size
    if n % a.minibatch or a.minibatch % world:
        raise UsageError(f"--minibatch {a.minibatch} must divide labels*group = {n} and be divisible by the {world} processes")
    if a.micro_batch < 0 or a.micro_batch and (a.minibatch // world) % a.micro_batch:
        raise UsageError(f"--micro-batch {a.micro_batch} must divide the per-process minibatch {a.minibatch // world}")
    if a.sample_batch < 0 or min(a.beta, a.max_grad_norm, a.weight_decay, a.image_every, a.preview_images, a.panw_alpha) < 0:
        raise UsageError("--sample-batch, --beta, --max-grad-norm, --weight-decay, --image-every, --preview-images and "
                         "--panw-alpha must be >= 0")
    if not 0 < a.clip_eps < 1 or (a.clip_eps_high is not None and not a.clip_eps_high > 0):
        raise UsageError(f"need 0 < --clip-eps < 1 and --clip-eps-high > 0, got {a.clip_eps}, {a.clip_eps_high}")
    if a.vmr:
        K = VARConfig.preset(a.preset).num_scales
        if not 0 <= a.vmr_m < K:
            raise UsageError(f"--vmr-m {a.vmr_m}: the split must leave scales on both sides (1 .. {K - 1}, or 0 = auto)")
        if a.vmr_k < 2 or a.vmr_eta <= 0 or not re.fullmatch(r"\d+:\d+", a.vmr_schedule) or \
                sum(map(int, a.vmr_schedule.split(":"))) == 0:
            raise UsageError(f"need --vmr-k >= 2, --vmr-eta > 0 and --vmr-schedule P:S (e.g. 3:1 or 30:10); "
                             f"got {a.vmr_k}, {a.vmr_eta}, {a.vmr_schedule!r}")
    if not 0 < a.mp_keep <= 1:
        raise UsageError(f"need 0 < --mp-keep <= 1, got {a.mp_keep}")
    try:
        dev = torch.device(a.device) if a.device else None
    except RuntimeError:
        raise UsageError(f"--device {a.device!r}: use cpu, cuda or cuda:N") from None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {a.device}: this machine has no CUDA GPU that torch can use")


def resolve_args(a: TrainArgs, given, saved: dict | None) -> TrainArgs:
    """The run's settings: a resumed run's saved ones, with only RESUME_OVERRIDABLE flags changed;
    --method nextflow switches VMR, MP and PANW (alpha 1) on; flags that would do nothing are refused."""
    if saved is not None:
        unknown = sorted(set(saved) - {f.name for f in fields(TrainArgs)})
        if unknown:
            raise UsageError(f"the checkpoint's settings hold {', '.join(unknown)}, unknown to this vargrpo version")
        changed = [k for k in given if k not in RESUME_OVERRIDABLE + ("resume", "out") and getattr(a, k) != saved.get(k)]
        if changed:
            raise UsageError(f"--resume keeps the run's settings; {', '.join(map(flag, changed))} cannot change "
                             f"(only {', '.join(map(flag, RESUME_OVERRIDABLE))} can)")
        return TrainArgs(**{**saved, **{k: getattr(a, k) for k in RESUME_OVERRIDABLE if k in given},
                            "resume": a.resume, "out": a.resume})
    if a.method == "nextflow":  # VAR-RL's full recipe; explicit flags still win for the numbers
        a = TrainArgs(**{**asdict(a), "vmr": True, "mask_propagation": True,
                         "panw_alpha": a.panw_alpha if "panw_alpha" in given else 1.0})
    idle = [k for k in given if (k.startswith("vmr_") and not a.vmr) or (k == "mp_keep" and not a.mask_propagation)]
    if idle:
        raise UsageError(f"{', '.join(map(flag, sorted(idle)))} only act with --vmr / --mask-propagation "
                         "(or --method nextflow); add the switch or drop the flag")
    return a


# ----------------------------------------------------------------------------------------------
# The trainer [GRPO-VAR 4]: one step = 1 sample, 2 reward, 3 advantages, 4 token weights,
# 5 clipped updates with the per-token KL, 6 log and save. `train` holds the loop.


def build_models(a: TrainArgs, device):
    """(vae, policy, ref): the frozen tokenizer, the policy to train, the frozen pre-trained VAR."""
    if a.preset == "tiny" or a.random_init:
        vae, ref = build_vae_var(VARConfig.preset(a.preset), seed=a.init_seed)
        if a.preset == "tiny":
            colour_tokenizer_(vae, seed=a.init_seed)
    else:
        vae, ref = load_pretrained(a.preset, a.weights_dir)
    policy = VAR(ref.config, vae)
    policy.load_state_dict(ref.state_dict())
    policy.grad_checkpointing = a.grad_checkpointing
    ref.requires_grad_(False)  # never holds gradients or optimizer state
    return vae.to(device), policy.to(device), ref.to(device)


def make_optimizer(policy: VAR, a: TrainArgs, device: str):
    """AdamW with the official VAR parameter groups [C12]: no weight decay on the class, position
    and level embeddings, scale_mul, the d36 adaLN table, biases and 1-D tensors, so that rows that
    never get a gradient (the null class; unseen classes with --label-subset half) never change."""
    no_decay_names = ("class_emb", "lvl_embed", "pos_start", "pos_1LC", "scale_mul", "ada_gss")
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        (no_decay if p.ndim < 2 or any(k in name for k in no_decay_names) else decay).append(p)
    return torch.optim.AdamW([dict(params=decay, weight_decay=a.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                             lr=a.lr, fused=True if device.startswith("cuda") else None)


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


def step_labels(a: TrainArgs, step: int, pool: torch.Tensor) -> torch.Tensor:
    """The step's global labels (the same on every rank): uniform over the label pool."""
    g = torch.Generator().manual_seed(derive_seed(a.seed, step, STREAM_LABELS))
    return pool[torch.randint(len(pool), (a.labels_per_step,), generator=g)]


def autocast_ctx(a: TrainArgs, device: str):
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else None, "bf16": torch.bfloat16, "fp32": None}[a.dtype]
    return (lambda: torch.autocast(device_type=device.split(":")[0], dtype=dtype)) if dtype else nullcontext


def vmr_stage(a: TrainArgs, step: int):
    """None without VMR; else 'prefix' or 'suffix' by the P:S schedule (3:1 = P P P S P P P S ...)."""
    if not a.vmr:
        return None
    p, s = map(int, a.vmr_schedule.split(":"))
    return "prefix" if step % (p + s) < p else "suffix"


@dataclass
class Setup:
    """What a run trains with (built once, before the first step)."""
    vae: VQVAE
    policy: VAR                 # the policy, pi_theta (never wrapped: saving and sampling use it)
    model: nn.Module            # the policy, DDP-wrapped when several processes train it
    ref: VAR                    # the frozen pre-trained model, pi_ref
    opt: torch.optim.Optimizer
    reward: nn.Module
    pool: torch.Tensor          # the classes labels are drawn from
    split_m: int                # VMR's middle scale (0 without VMR)
    start: int                  # the first step to run


def setup_training(a: TrainArgs, ckpt, run, d: Dist) -> Setup:
    reward = make_reward(a.reward, d.device, a, differentiable=a.mask_propagation)
    vae, policy, ref = build_models(a, d.device)
    opt = make_optimizer(policy, a, d.device)
    start = run.restore(ckpt, policy, opt, d) if ckpt else 0
    model = policy
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(policy, device_ids=[d.local_rank] if d.device.startswith("cuda") else None,
                    gradient_as_bucket_view=True)
    pool = label_pool(a, policy.config.num_classes)
    split_m = (a.vmr_m or default_vmr_split(policy.config.patch_nums)) if a.vmr else 0
    if ckpt is None:
        run.begin(a, policy, vae, reward, pool)  # args.json, labels.json, before.png
    return Setup(vae, policy, model, ref, opt, reward, pool, split_m, start)


def train(args: TrainArgs, given=frozenset()) -> dict:
    """GRPO fine-tuning of a VAR [GRPO-VAR 4]; VMR / PANW / MP [VAR-RL] when switched on. `given`:
    the flags set on the command line. Returns the last step's metrics."""
    d, stop = setup_distributed(args.device), StopRequest()
    run = RunFolder(Path(args.resume or args.out), d)
    try:
        args, ckpt = run.open(args, given)  # new / overwritten / resumed; DIR locked while we run
        s = setup_training(args, ckpt, run, d)
        amp, config = autocast_ctx(args, d.device), s.policy.config
        n_local = args.labels_per_step // d.world
        groups = list(range(d.rank * n_local, (d.rank + 1) * n_local))  # this rank's global group indices
        prefix_len = s.policy.begin_ends[s.split_m - 1][1] if args.vmr else None
        m = {}
        for step in range(s.start, args.steps):
            timer, stage = Timer(d.device), vmr_stage(args, step)
            # 1 sample: G images per label from the current policy (pi_old), log-probs recorded;
            #   VMR: K - 1 more completions of each sample's first scales (its prefix)
            with amp():
                roll = rollout(s.policy, step_labels(args, step, s.pool)[groups].to(d.device), groups, args, step, prefix_len)
            timer.lap("sample")
            images = decode(s.vae, roll.idx, args.reward_batch, d.device)
            timer.lap("decode")
            # 2 reward (retried once if it raises); MP: the reward-relevant tokens
            rewards, comps, mp_mask = run.score(s, images, args, step)
            timer.lap("reward")
            # 3 advantages (eq. 2, or VMR's middle value): one per sample, for all of its tokens
            values_Ng = advantage_groups(rewards, stage, args, n_local)
            keep = slice(None, None, args.vmr_k) if stage == "prefix" else slice(None)  # prefix: one row per prefix
            adv, valid = group_advantages(values_Ng, args.adv_eps).flatten(), torch.isfinite(values_Ng).flatten()
            # 4 token weights (PANW x stage x MP), each sample's summing to 1 (0: a non-finite reward)
            w_L = stage_weights(config.patch_nums, args.panw_alpha, stage, s.split_m).to(d.device)
            kl_w = normalise_rows(w_L.expand(len(adv), -1)) * valid[:, None]
            token_w = kl_w if mp_mask is None else normalise_rows(w_L * mp_mask[keep]) * valid[:, None]
            batch = gather_batch(UpdateBatch(labels=roll.labels[keep], idx=roll.idx[keep], old_logp=roll.logprobs[keep],
                                             adv=adv, token_w=token_w, kl_w=kl_w))
            # 5 clipped update with the per-token KL (eq. 1), one optimizer step per minibatch
            stats = policy_update(s.model, s.ref, s.opt, batch, args, step, d, amp)
            timer.lap("update")
            # 6 log and save (a non-finite policy stops the run; Ctrl-C / SIGTERM after saving)
            m = step_metrics(step, rewards, comps, values_Ng, batch, stats, timer.times, args, d)
            m.update(budget_metrics(args, step, s.reward, stage, batch, mp_mask is not None))
            run.log(m, step, images, roll.labels, rewards)
            run.halt_if_nonfinite(roll.nonfinite, stats, step, s, args)
            stop_all = all_reduce(torch.tensor([float(stop.signum)], device=d.device), "max").item()
            if stop_all or (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                run.save(s, args, step + 1)
            if stop_all and step + 1 < args.steps:
                raise Stopped(int(stop_all), f"stopped after step {step + 1}; continue with --resume {run.out}")
        run.finish(s, args)
        return m
    finally:
        stop.restore()
        run.close()
        leave_distributed(d)


# ---- the parts of a step, in order


class Timer:
    """Wall time of a step's phases, the device synchronised at each lap (GPU work is asynchronous)."""
    def __init__(self, device):
        self.device, self.times, self.t0 = device, {}, time.perf_counter()

    def lap(self, name: str):
        sync(self.device)
        now = time.perf_counter()
        self.times[name], self.t0 = now - self.t0, now


def rollout(policy: VAR, labels_n, group_ids, a: TrainArgs, step: int, prefix_len=None) -> Rollout:
    """Step 1: G samples of each label (labels_n: one per group, on the policy's device) with their
    log-probs. Group g (a global index) draws from its own generator seeded by (seed, step, g), so
    its samples do not depend on which process draws them, nor with which other groups [C9]; up to
    --sample-batch rows share one sample() call. VMR (prefix_len = the prefix's tokens): K - 1 more
    completions of each sample's prefix are drawn, the sample being the first: G*K rows per label,
    prefix j's completion k at row j*K + k."""
    G, n_comp = a.group_size, (a.vmr_k if prefix_len else 1)
    gens = [torch.Generator(labels_n.device).manual_seed(derive_seed(a.seed, step, STREAM_SAMPLE, g)) for g in group_ids]
    per_call = max(1, a.sample_batch // G) if a.sample_batch else len(group_ids)
    parts = []
    for c in range(0, len(group_ids), per_call):
        labels_B = labels_n[c:c + per_call].repeat_interleave(G)
        kw = dict(temperature=a.temperature, generator=gens[c:c + per_call], decode=False)
        outs = [sample(policy, labels_B, **kw)]
        outs += [sample(policy, labels_B, prefix_idx=outs[0].idx[:, :prefix_len], **kw) for _ in range(n_comp - 1)]
        parts.append(Rollout(labels=labels_B.repeat_interleave(n_comp), idx=torch.stack([o.idx for o in outs], 1).flatten(0, 1),
                             logprobs=torch.stack([o.logprobs for o in outs], 1).flatten(0, 1).float(), images=None,
                             nonfinite=sum(o.nonfinite for o in outs)))
    return Rollout(labels=torch.cat([p.labels for p in parts]), idx=torch.cat([p.idx for p in parts]),
                   logprobs=torch.cat([p.logprobs for p in parts]), images=None, nonfinite=sum(p.nonfinite for p in parts))


@torch.no_grad()
def decode(vae: VQVAE, idx_NL, batch: int, device: str):
    """Tokens -> images in [0, 1] (fp32), `batch` at a time; the decoder under bf16 autocast on GPUs."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
        return torch.cat([vae.idx_to_img(idx_NL[i:i + batch]).float() for i in range(0, len(idx_NL), batch)])


def advantage_groups(rewards_N, stage, a: TrainArgs, n_labels: int):
    """Step 3's groups (rows), normalised by group_advantages [GRPO-VAR eq. 2; VAR-RL VMR]:
    plain GRPO: R over each label's G samples; VMR prefix step: the middle value V_m of each prefix
    (its K completions' rewards) over the label's G prefixes; suffix step: R over the label's G*K
    completions (--vmr-suffix-group label) or over each prefix's K (prefix)."""
    if stage == "prefix":
        return middle_value(rewards_N.view(-1, a.vmr_k), a.vmr_eta).view(n_labels, a.group_size)
    if stage == "suffix" and a.vmr_suffix_group == "prefix":
        return rewards_N.view(-1, a.vmr_k)
    return rewards_N.view(n_labels, -1)


@dataclass
class UpdateBatch:
    """What step 5 trains on, one row per sample of the whole step (all processes')."""
    labels: torch.Tensor    # (N,)
    idx: torch.Tensor       # (N, L) tokens
    old_logp: torch.Tensor  # (N, L) log-probs at sampling, pi_old
    adv: torch.Tensor       # (N,) the sample's advantage, for each of its tokens
    token_w: torch.Tensor   # (N, L) policy-gradient token weights, rows summing to 1 (or 0)
    kl_w: torch.Tensor      # (N, L) KL token weights


def gather_batch(b: UpdateBatch) -> UpdateBatch:
    """Every process's rows, in global group order: the minibatches are then the same whatever the
    number of processes [C9] (a few MB even at the paper's 512 samples of 680 tokens)."""
    return UpdateBatch(**{k: all_gather_cat(v) for k, v in vars(b).items()})


@dataclass
class LossTerms:
    logp: torch.Tensor       # (n, L) log pi_theta of the tokens (tempered, as sampled)
    logits: torch.Tensor     # (n, L, V) pi_theta's processed logits (entropy, exact KL)
    kl: torch.Tensor         # (n, L) per-token KL to pi_ref
    surrogate: torch.Tensor  # (n, L) the clipped objective


def loss_terms(model, ref, b: UpdateBatch, ids, a: TrainArgs, amp) -> LossTerms:
    """The per-token pieces of eq. 1 for the samples `ids`, both policies tempered as sampled [C8]."""
    labels, idx = b.labels[ids], b.idx[ids]
    with amp():
        logp, logits = token_logprobs(model, labels, idx, a.temperature, return_logits=True)
        with torch.no_grad():
            ref_logp, ref_logits = token_logprobs(ref, labels, idx, a.temperature, return_logits=True)
    kl = kl_k3(logp, ref_logp) if a.kl == "k3" else kl_exact(logits, ref_logits)
    surrogate = clipped_surrogate(logp, b.old_logp[ids], b.adv[ids], a.clip_eps, a.clip_eps_high)
    return LossTerms(logp=logp, logits=logits, kl=kl, surrogate=surrogate)


class UpdateStats:
    """Sums over a step's updates, kept on the device (read once per step, in step_metrics)."""
    def __init__(self, num_scales: int, device):
        zeros = lambda *shape: torch.zeros(shape, device=device)
        self.per_scale = zeros(4, num_scales)  # kl, clipped, entropy, tokens (the tokens with KL weight)
        self.ratio_sum, self.loss_sum, self.first_dev = zeros(), zeros(), zeros()
        self.ratio_min, self.ratio_max = zeros().fill_(math.inf), zeros().fill_(-math.inf)
        self.grad_norms, self.scale_norms, self.nonfinite = [], None, None

    @torch.no_grad()
    def add(self, t: LossTerms, b: UpdateBatch, ids, sid_L, loss, first: bool):
        on_nL = (b.kl_w[ids] > 0).float()
        ratio = (t.logp - b.old_logp[ids]).exp()
        clipped = t.surrogate < ratio * b.adv[ids, None]  # the clipped term is the smaller: no gradient
        for i, v in enumerate((t.kl, clipped, entropy(t.logits), torch.ones_like(t.kl))):
            self.per_scale[i].index_add_(0, sid_L, (v.float() * on_nL).sum(0))
        self.ratio_sum += (ratio * on_nL).sum()
        self.ratio_min = torch.minimum(self.ratio_min, ratio.masked_fill(on_nL == 0, math.inf).amin())
        self.ratio_max = torch.maximum(self.ratio_max, ratio.masked_fill(on_nL == 0, -math.inf).amax())
        if first:  # before any update the policy is the sampling policy: ratio 1 up to float error
            self.first_dev = torch.maximum(self.first_dev, ((ratio - 1).abs() * on_nL).amax())
        self.loss_sum += loss.detach().float()


def policy_update(model, ref, opt, b: UpdateBatch, a: TrainArgs, step: int, d: Dist, amp) -> UpdateStats:
    """Step 5: --ppo-epochs passes over the step's samples, one optimizer step per minibatch of
    --minibatch samples  [GRPO-VAR eq. 1]. One seeded global order makes the minibatches the same
    whatever the number of processes; each process takes its share of each, in micro-batches whose
    gradients add up, and DDP averages the shares. An optimizer step whose gradient is not finite
    is not taken, and ends the updates (the run then stops, see halt_if_nonfinite)."""
    config = unwrap(model).config
    share = a.minibatch // d.world
    micro = a.micro_batch or share
    sid_L = scale_ids(config.patch_nums).to(b.idx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    stats = UpdateStats(config.num_scales, b.idx.device)
    for epoch in range(a.ppo_epochs):
        g = torch.Generator().manual_seed(derive_seed(a.seed, step, STREAM_ORDER, epoch))
        order = torch.randperm(len(b.idx), generator=g).to(b.idx.device)
        for m in range(len(b.idx) // a.minibatch):
            mine = order[m * a.minibatch + d.rank * share:][:share]
            if a.scale_grad_norms and epoch == m == 0:
                stats.scale_norms = per_scale_grad_norms(unwrap(model), ref, b, mine[:micro], a, amp)
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


def per_scale_grad_norms(policy, ref, b: UpdateBatch, ids, a: TrainArgs, amp) -> list:
    """||grad_theta loss_k|| for every scale k, loss_k = the loss restricted to scale k's tokens
    (weights not renormalised: the K parts sum to the loss). Shows which scales drive the update."""
    params = [p for p in policy.parameters() if p.requires_grad]
    t = loss_terms(policy, ref, b, ids, a, amp)
    norms = []
    for bg, ed in policy.begin_ends:
        sel = torch.zeros_like(b.token_w[ids])
        sel[:, bg:ed] = 1
        loss_k = grpo_loss(t.surrogate, t.kl, b.token_w[ids] * sel, a.beta, b.kl_w[ids] * sel)
        grads = torch.autograd.grad(loss_k, params, retain_graph=True, allow_unused=True)
        norms.append(torch.stack([g.float().square().sum() for g in grads if g is not None]).sum().sqrt())
    return norms


def step_metrics(step, rewards, comps, values_Ng, b: UpdateBatch, u: UpdateStats, times, a: TrainArgs, d: Dist) -> dict:
    """One metrics.jsonl line. Call on every rank (it gathers and reduces); its host reads are the
    step's only ones besides one per optimizer step."""
    r = all_gather_cat(rewards)
    fin = r[torch.isfinite(r)]
    none = torch.tensor(math.nan, device=r.device)
    per_scale = all_reduce(u.per_scale.clone())
    kl, clipped, ent, tokens = per_scale
    total = tokens.sum().clamp_min(1)
    flat = all_reduce(torch.stack([(group_advantages(values_Ng, a.adv_eps) == 0).all(1).sum().float(),
                                   torch.tensor(float(len(values_Ng)), device=r.device)]))
    dev = {"reward/mean": fin.mean() if len(fin) else none, "reward/std": fin.std(unbiased=False) if len(fin) else none,
           "reward/min": fin.min() if len(fin) else none, "reward/max": fin.max() if len(fin) else none,
           "reward/nonfinite": (~torch.isfinite(r)).sum(),
           "adv/mean": b.adv.mean(), "adv/std": b.adv.std(unbiased=False), "adv/abs_max": b.adv.abs().max(),
           "adv/zero_std_group_frac": flat[0] / flat[1],
           "policy/kl": kl.sum() / total, "policy/clip_frac": clipped.sum() / total, "policy/entropy": ent.sum() / total,
           "policy/ratio_mean": all_reduce(u.ratio_sum.clone()) / total,
           "policy/ratio_min": all_reduce(u.ratio_min.clone(), "min"), "policy/ratio_max": all_reduce(u.ratio_max.clone(), "max"),
           "policy/ratio_dev_first_minibatch": all_reduce(u.first_dev.clone(), "max"),
           "loss/loss": all_reduce(u.loss_sum.clone()) / max(1, len(u.grad_norms)),
           "loss/grad_norm": torch.stack(u.grad_norms).mean() if u.grad_norms else none}
    for name, v in comps.items():
        v = all_gather_cat(v)
        dev[f"reward/{name}"] = v[torch.isfinite(v)].mean()
    for si in range(per_scale.shape[1]):
        n = tokens[si].clamp_min(1)
        dev.update({f"scale/kl_s{si}": kl[si] / n, f"scale/clip_frac_s{si}": clipped[si] / n, f"scale/entropy_s{si}": ent[si] / n})
    for si, v in enumerate(u.scale_norms or []):
        dev[f"scale/grad_norm_s{si}"] = v
    m = {"step": step, **dict(zip(dev, torch.stack([v.float() for v in dev.values()]).tolist())), "lr": a.lr}
    m["reward/nonfinite"] = int(m["reward/nonfinite"])
    m.update({f"time/{k}": v for k, v in times.items()})
    m["time/step"] = sum(times.values())
    m["perf/samples_per_s"] = len(r) / m["time/step"]
    return m


def budget_metrics(a: TrainArgs, step: int, reward, stage, b: UpdateBatch, mp: bool) -> dict:
    """Images sampled (= decoded, rewarded) so far, the images the reward saw (MP's saliency pass
    rewards them again), the VMR stage and the share of tokens MP kept."""
    samples = (step + 1) * a.labels_per_step * a.group_size * (a.vmr_k if a.vmr else 1)
    saliency = a.mask_propagation and getattr(reward, "region_mask", lambda *_: None)(8, 8) is None
    m = {"budget/samples": samples, "budget/reward_images": samples * (1 + int(saliency))}
    if stage:
        m["vmr/stage"] = stage
    if mp:
        m["mp/kept_fraction"] = b.token_w.gt(0).float().mean().item()
    return m


@torch.no_grad()
def preview(policy: VAR, reward, a: TrainArgs, device, path: Path) -> float:
    """Samples of fixed labels and seed (before.png / after.png are comparable); their mean reward."""
    labels = (torch.arange(a.preview_images, device=device) // 2) % policy.config.num_classes
    gen = torch.Generator(device=device).manual_seed(derive_seed(a.seed, STREAM_PREVIEW))
    with autocast_ctx(a, device)():
        images = sample(policy, labels, temperature=a.temperature, generator=gen).images.float()
    try:
        r = reward(images)
    except Exception as e:  # the training steps retry a failing reward; a preview just goes without
        print(f"[vargrpo] preview: the reward raised {type(e).__name__}: {first_line(e)}", file=sys.stderr, flush=True)
        r = torch.full((len(images),), math.nan)
    save_grid(images, [f"{l} r={v:.2f}" for l, v in zip(labels.tolist(), r.tolist())], path)
    return r.mean().item()


def save_grid(images_B3HW, captions, path: Path, ncol: int = 8) -> np.ndarray:
    """A PNG grid with a caption under each image (nearest-upscaled to >= 128 px); returns its pixels."""
    from PIL import Image, ImageDraw
    imgs = (images_B3HW.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    B, H, W = imgs.shape[:3]
    s = max(1, 128 // W)
    cw, ch, pad, ncol = W * s, H * s, 14, min(ncol, B)
    grid = Image.new("RGB", (ncol * cw, ((B + ncol - 1) // ncol) * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        x, y = (i % ncol) * cw, (i // ncol) * (ch + pad)
        grid.paste(Image.fromarray(imgs[i]).resize((cw, ch), Image.NEAREST), (x, y))
        draw.text((x + 2, y + ch + 1), captions[i], fill="black")
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
    return np.asarray(grid)


# ----------------------------------------------------------------------------------------------
# The run folder. Nothing in DIR but a run's own files is ever touched; a lock keeps a second
# trainer out; checkpoints are written atomically and resume exactly; Ctrl-C / SIGTERM stop after
# a save; a reward that raises is retried once; a non-finite policy stops the run.


class RunFailed(RuntimeError):
    """The run cannot go on (a reward that keeps raising, a non-finite policy, a disk error); the
    message says what was saved and what to do (exit code 1)."""


class Stopped(RuntimeError):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stopped (exit code 128 + signal, as shells)."""
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


LOCK_NAME = ".vargrpo.lock"
RUN_FILES = ("args.json", "labels.json", "metrics.jsonl", "before.png", "after.png", "reward_curve.png", "summary.json",
             "checkpoints/step_*.pt", "checkpoints/step_*.safetensors", "checkpoints/last.pt", "checkpoints/last.safetensors",
             "checkpoints/*.tmp", "images/step_*.png", "images/*.tmp", "tb/events.out.tfevents.*")  # what a run writes


def io_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def atomic_write(path: Path, write):
    """write(file) into path.tmp, then rename it to path: a crash never leaves a torn file under the
    real name. An I/O error (disk full, read-only, ...) is one RunFailed naming the path and the cause."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise RunFailed(f"cannot write {path}: {io_reason(e)}; nothing earlier was changed: fix that (free space, "
                        "permissions) and continue with --resume, or choose another --out") from None


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
        self.out, self.d, self.lock_fd, self.tracker, self.bar, self.warned_flat = out, d, None, None, None, False

    def open(self, a: TrainArgs, given):
        """The run's settings, and its checkpoint when resuming. Rank 0 applies the folder rules and
        takes the lock; a refusal reaches every rank."""
        if a.resume and "out" in given and a.out and Path(a.out).resolve() != Path(a.resume).resolve():
            raise UsageError(f"--resume {a.resume} continues in that directory; drop --out {a.out}")
        if not (a.resume or a.out):
            raise UsageError("--out DIR is required (or --resume DIR)")
        ckpt, last = None, self.out / "checkpoints" / "last.pt"
        if a.resume:
            if not last.is_file():
                raise UsageError(f"--resume {a.resume}: no checkpoints/last.pt there; start a new run with --out instead")
            ckpt = load_pth(last, f"resume from another step: copy one of {last.parent}/step_*.pt to last.pt")
            if not (isinstance(ckpt, dict) and {"model", "optimizer", "step", "args"} <= ckpt.keys()):
                raise CheckpointError(f"{last} is not a vargrpo run checkpoint (it lacks model/optimizer/step/args)")
        a = self.args = resolve_args(a, given, ckpt["args"] if ckpt else None)
        check_train_args(a, self.d.world)
        on_main(self.d, lambda: self.claim(a))
        if self.d.main:
            self.tracker = Tracker(a.tracker, self.out / "tb")
        return a, ckpt

    def claim(self, a: TrainArgs):
        """Rank 0: refuse anything that could lose a file, then lock DIR (re-checking: a trainer that
        started at the same moment may have claimed it first); --overwrite removes the old run's files."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} is a file, not a folder; choose a folder for the run")
        refuse = lambda state: (
            state == "run" and not a.resume and not a.overwrite and f"{out} already holds a run; continue it with "
            f"--resume {out}, choose another --out, or pass --overwrite to replace it") or (
            state == "other" and f"{out} holds files that are not a vargrpo run "
            f"({', '.join(sorted(p.name for p in out.iterdir())[:3])}); choose a new or empty folder (nothing was changed)")
        for state in (run_state(out), None):
            if state is None:  # second pass, under the lock
                self.lock()
                state = run_state(out)
            if refuse(state):
                raise UsageError(refuse(state))
        if not a.resume and state == "run":
            print(f"[vargrpo] --overwrite: removing the previous run's files from {out}", file=sys.stderr)
            for pattern in RUN_FILES:
                for p in out.glob(pattern):
                    p.unlink()
            for sub in ("checkpoints", "images", "tb"):
                if (out / sub).is_dir() and not any((out / sub).iterdir()):
                    (out / sub).rmdir()

    def lock(self):
        import fcntl
        import socket
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot write in {self.out}: {io_reason(e)}; choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.out} is in use by another trainer ({holder}); wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.lock_fd = fd

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock (so does any exit, kill -9 included)
            self.lock_fd = None

    def begin(self, a: TrainArgs, policy: VAR, vae: VQVAE, reward, pool):
        """A new run (rank 0): its settings, the classes it trains on, before.png."""
        def write():
            atomic_write(self.out / "args.json", lambda f: f.write(json.dumps(asdict(a), indent=1).encode()))
            atomic_write(self.out / "labels.json", lambda f: f.write(json.dumps(
                {"label_subset": a.label_subset, "seen": pool.tolist()}).encode()))
            if a.preview_images:
                r = preview(policy, reward, a, self.d.device, self.out / "before.png")
                print(f"[vargrpo] preview before training ({self.out / 'before.png'}): mean reward {r:.4f}")
        on_main(self.d, write)

    def restore(self, ckpt: dict, policy: VAR, opt, d: Dist) -> int:
        """Policy and optimizer from the checkpoint; the metrics log cut back to the steps it covers."""
        last = self.out / "checkpoints" / "last.pt"
        load_checked(policy, ckpt["model"], last)
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{last}: its optimizer state does not fit this model ({first_line(e)}); "
                                  "it was saved by another vargrpo version or for another model") from None
        start = int(ckpt["step"])

        def cut():  # a line of a step after the checkpoint (redone now) or a torn last line (a crash) goes
            path = self.out / "metrics.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            keep = []
            for line in lines:
                try:
                    if json.loads(line)["step"] < start:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    print(f"[vargrpo] {path}: dropping an unreadable line (a write cut short)", file=sys.stderr)
            atomic_write(path, lambda f: f.write("".join(l + "\n" for l in keep).encode()))
        on_main(d, cut)
        return start

    def score(self, s: Setup, images, a: TrainArgs, step: int):
        """Step 2: rewards (N,), their components {name: (N,)}, and MP's token mask (N, L) or None.
        A reward that raises is retried once; if it raises again (on any process) the run saves a
        checkpoint of the steps done and stops."""
        error, chunks = None, range(0, len(images), a.reward_batch)
        for attempt in (1, 2):
            try:
                with torch.no_grad():
                    out = [s.reward(images[i:i + a.reward_batch], return_components=True) for i in chunks]
                rewards = torch.cat([r.float() for r, _ in out]).to(self.d.device)
                comps = {k: torch.cat([c[k].float() for _, c in out]) for k in out[0][1]}
                mask, pn = None, s.policy.config.patch_nums
                if a.mask_propagation:  # [VAR-RL MP]: the reward-relevant finest tokens, propagated to all scales
                    mask = propagate_mask(torch.cat([initial_mask(s.reward, images[i:i + a.reward_batch], pn[-1], a.mp_keep)
                                                     for i in chunks]), pn)
                error = None
                break
            except Exception as e:  # a user's reward can fail in any way
                error = f"{type(e).__name__}: {first_line(e)}"
                if attempt == 1:
                    print(f"[vargrpo] the reward raised {error}; retrying once", file=sys.stderr, flush=True)
        if all_reduce(torch.tensor([float(error is not None)], device=self.d.device), "max").item():
            path = self.save(s, a, step)
            raise RunFailed(f"the reward raised twice at step {step} ({error or 'on another process'}); saved {path} "
                            f"(the {step} steps done); fix the reward and continue with --resume {self.out}")
        return rewards, comps, mask

    def log(self, m: dict, step: int, images, labels, rewards):
        """Step 6 (rank 0): a metrics.jsonl line, the tracker, a sample grid every --image-every steps."""
        a = self.args

        def write():
            path = self.out / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(m) + "\n")
            except OSError as e:
                raise RunFailed(f"cannot write {path}: {io_reason(e)}; the last checkpoint is intact: fix that and "
                                f"continue with --resume {self.out}") from None
            if m["reward/nonfinite"]:
                print(f"\n[vargrpo] step {step}: {m['reward/nonfinite']} non-finite rewards; those samples get no gradient",
                      file=sys.stderr, flush=True)
            if m["adv/abs_max"] == 0 and not self.warned_flat:
                self.warned_flat = True
                print(f"\n[vargrpo] step {step}: every sample of every group got the same reward, so every advantage is 0 "
                      "and the policy only follows the KL; check that the reward can tell samples apart", file=sys.stderr)
            if a.image_every and step % a.image_every == 0:
                pick = torch.arange(len(images)).view(a.labels_per_step // self.d.world, -1).T.reshape(-1)[:16]  # a group each first
                grid = save_grid(images[pick], [f"{l} r={v:.2f}" for l, v in zip(labels[pick].tolist(), rewards[pick].tolist())],
                                 self.out / "images" / f"step_{step:06d}.png")
                self.tracker.image("samples", grid, step)
            self.tracker.log(m, step)
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=a.steps, initial=step, dynamic_ncols=True, desc="grpo")
            self.bar.set_postfix(reward=f"{m['reward/mean']:.3f}", kl=f"{m['policy/kl']:.4f}")
            self.bar.update(1)
        on_main(self.d, write)

    def halt_if_nonfinite(self, sampling_nonfinite, stats: UpdateStats, step: int, s: Setup, a: TrainArgs):
        """A policy that diverged (a non-finite sampling distribution or gradient, on any process)
        stops the run. No update was taken with a non-finite gradient, so the weights are saved."""
        bad = all_reduce(torch.tensor([float(sampling_nonfinite > 0), float(stats.nonfinite is not None)],
                                      device=self.d.device), "max").tolist()
        if not any(bad):
            return
        what = " and ".join(w for w, b in zip(("the sampling distribution", stats.nonfinite or "the loss gradient"), bad) if b)
        finite = all(bool(torch.isfinite(p).all()) for p in s.policy.parameters())
        saved = f"saved {self.save(s, a, step)} (the weights after the last finite update)" if finite else "saved nothing"
        raise RunFailed(f"step {step}: {what} went non-finite (the policy diverged); {saved}; start again with a lower "
                        f"--lr (now {a.lr:g}) or a --max-grad-norm")

    def save(self, s: Setup, a: TrainArgs, step: int):
        """A checkpoint after `step` completed steps (rank 0; returns its path): checkpoints/step_N.pt
        (policy, optimizer, step, settings: an exact resume) and step_N.safetensors (the policy alone,
        official key layout, settings in its metadata), each written atomically; last.pt and
        last.safetensors are the newest; --keep-last of each are kept."""
        def write():
            from safetensors.torch import save as safetensors_bytes
            folder = self.out / "checkpoints"
            path = folder / f"step_{step:06d}.pt"
            state = {"model": s.policy.state_dict(), "optimizer": s.opt.state_dict(), "step": step,
                     "config": asdict(s.policy.config), "args": asdict(a)}
            weights = {k: v.detach().cpu().contiguous() for k, v in s.policy.state_dict().items()}
            meta = {"vargrpo_config": json.dumps(asdict(s.policy.config)), "vargrpo_args": json.dumps(asdict(a)),
                    "vargrpo_step": str(step)}
            atomic_write(path, lambda f: torch.save(state, f))
            atomic_write(path.with_suffix(".safetensors"), lambda f: f.write(safetensors_bytes(weights, metadata=meta)))
            for suffix in (".pt", ".safetensors"):
                last, tmp = folder / f"last{suffix}", folder / f"last{suffix}.tmp"
                tmp.unlink(missing_ok=True)
                try:
                    os.link(path.with_suffix(suffix), tmp)  # a hard link: no second copy on disk
                    os.replace(tmp, last)
                except OSError:  # a filesystem without hard links
                    atomic_write(last, lambda f, src=path.with_suffix(suffix): f.write(src.read_bytes()))
                for old in sorted(folder.glob(f"step_*{suffix}"))[:-a.keep_last]:
                    old.unlink()
            return folder / "last.pt"
        return on_main(self.d, write)

    def finish(self, s: Setup, a: TrainArgs):
        """After the last step (rank 0): the reward's first and last values, after.png."""
        def write():
            rows = [json.loads(l) for l in (self.out / "metrics.jsonl").read_text().splitlines() if l.strip()]
            if rows:
                first, last3 = rows[0]["reward/mean"], float(np.mean([r["reward/mean"] for r in rows[-3:]]))
                print(f"[vargrpo] mean reward: first step {first:.4f} -> last 3 steps {last3:.4f} ({last3 - first:+.4f}); "
                      f"run in {self.out}")
            if a.preview_images:
                r = preview(s.policy, s.reward, a, self.d.device, self.out / "after.png")
                print(f"[vargrpo] preview after training ({self.out / 'after.png'}): mean reward {r:.4f}")
        on_main(self.d, write)


class Tracker:
    """Live curves: with --tracker tensorboard, every metrics.jsonl value and the sample grids go to
    DIR/tb as well (watch with `tensorboard --logdir runs/`); metrics.jsonl stays the record."""
    def __init__(self, kind: str, folder: Path):
        self.writer = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tracker tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(folder))

    def log(self, m: dict, step: int):
        for k, v in (m.items() if self.writer else ()):
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k, v, step)
            elif isinstance(v, str):
                self.writer.add_text(k, v, step)

    def image(self, tag: str, grid_HW3: np.ndarray, step: int):
        if self.writer:
            self.writer.add_image(tag, grid_HW3, step, dataformats="HWC")

    def close(self):
        if self.writer:
            self.writer.close()


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C aborts at once."""
    def __init__(self):
        import signal
        self.signum, self.previous = 0, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass

    def handle(self, signum, frame):
        import signal
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[vargrpo] signal {signum}: finishing this step, saving a checkpoint, then exiting "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def restore(self):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def leave_distributed(d: Dist):
    """Ranks leave together (a gloo rank that exits while its peer still talks can abort at exit)."""
    if distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Command line: `python vargrpo.py train ...` (or under torchrun). Evaluation, ablation, benchmark
# and the digits model: `python vargrpo_tools.py --help`.


def add_dataclass_args(parser, cls):
    """One --flag per dataclass field, its help from the field's metadata. Defaults are suppressed
    so that the namespace holds only the flags actually given."""
    for f in fields(cls):
        meta = dict(f.metadata)
        help = f"{meta.pop('help')} (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag(f.name), action="store_true", help=help)
        else:
            parser.add_argument(flag(f.name), type=meta.pop("type", type(f.default)), help=help, **meta)


def read_config(path: str) -> dict:
    """--config FILE: a run's saved args.json; its keys must be TrainArgs fields."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path}: cannot read it as JSON ({io_reason(e)}); pass a run's args.json") from None
    known = {f.name for f in fields(TrainArgs)}
    if not isinstance(saved, dict) or set(saved) - known:
        bad = sorted(set(saved) - known) if isinstance(saved, dict) else ["(not a JSON object)"]
        raise UsageError(f"--config {path}: unknown settings {', '.join(bad)}; it must hold `train` flags, as a run's args.json does")
    return {k: v for k, v in saved.items() if k not in ("resume", "overwrite")}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vargrpo.py", description="GRPO fine-tuning of VAR image models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="GRPO fine-tuning (also under torchrun --nproc-per-node=N)",
                       description="GRPO fine-tuning of a VAR model. Labels per step and minibatch sizes are global: "
                                   "torchrun splits them across processes. Exit codes: 0 done, 1 the run failed (saved), "
                                   "2 a bad flag / file / folder, 130 / 143 stopped by Ctrl-C / SIGTERM (saved).")
    p.add_argument("--config", metavar="FILE", help="start from a run's args.json; flags given here win")
    add_dataclass_args(p, TrainArgs)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    try:
        config = read_config(args.pop("config")) if "config" in args else {}
        return train(TrainArgs(**{**config, **args}), given=set(args))
    except (UsageError, CheckpointError, RunFailed) as e:
        print(f"vargrpo: error: {e}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, RunFailed) else 2)
    except Stopped as e:
        print(f"\n[vargrpo] {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum)


if __name__ == "__main__":
    main()
