"""Reward models for vargrpo: callables images (B, 3, H, W) in [0, 1] -> rewards (B,).

Placeholder until the rewards issue: only the brightness of the GRPO-VAR paper (section 5.1).
"""
import torch


def luma(images_B3HW: torch.Tensor) -> torch.Tensor:
    """Mean brightness: (1/HW) sum_ij 0.2989 R + 0.5870 G + 0.1140 B  [GRPO-VAR, 5.1]."""
    w = images_B3HW.new_tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    return (images_B3HW * w).sum(dim=1).mean(dim=(1, 2))
