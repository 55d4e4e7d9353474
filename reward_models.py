"""Reward models for vargrpo.

A reward is a callable: images (B, 3, H, W) float in [0, 1] on its device -> rewards (B,) float.
`build_reward(spec, device)` parses a spec such as `brightness`, `dark` or `0.5*bright+1*dark`
into one `Reward` that also reports each component's value for logging.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# Brightness [GRPO-VAR, section 5.1]


def luma(images_B3HW: torch.Tensor) -> torch.Tensor:
    """Mean brightness (1/HW) sum_ij 0.2989 R + 0.5870 G + 0.1140 B, in [0, 1]."""
    w = images_B3HW.new_tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    return (images_B3HW * w).sum(dim=1).mean(dim=(1, 2))


class Brightness(nn.Module):
    """'brightness': continuous mean luma; 'bright': 1 if luma >= 0.8 else 0; 'dark': 1 if luma < 0.2 else 0."""
    def __init__(self, kind: str = "brightness"):
        super().__init__()
        self.kind = kind

    def forward(self, images_B3HW):
        y = luma(images_B3HW)
        if self.kind == "bright":
            return (y >= 0.8).float()
        if self.kind == "dark":
            return (y < 0.2).float()
        return y


# ----------------------------------------------------------------------------------------------
# Registry and weighted sums


def _make_brightness(kind):
    return lambda arg, device, **opts: Brightness(kind)


REGISTRY = {
    "brightness": _make_brightness("brightness"),
    "bright": _make_brightness("bright"),
    "dark": _make_brightness("dark"),
}


class Reward(nn.Module):
    """sum_i w_i * component_i(images). Call: reward(images) -> (B,), or with
    return_components=True -> ((B,), {component name: (B,)}). No autograd graph unless built
    with differentiable=True."""
    def __init__(self, terms, differentiable: bool = False):
        super().__init__()
        self.names = [name for _, name, _ in terms]
        self.weights = [w for w, _, _ in terms]
        self.parts = nn.ModuleList([m for _, _, m in terms])
        self.differentiable = differentiable

    def forward(self, images_B3HW, return_components: bool = False):
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            values = {name: part(images_B3HW).float() for name, part in zip(self.names, self.parts)}
            total = sum(w * values[name] for w, name in zip(self.weights, self.names))
        return (total, values) if return_components else total


TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([a-z_]+)(?::(.*))?$")


def parse_spec(spec: str):
    """'0.5*aesthetic+clip:a painting' -> [(0.5, 'aesthetic', None), (1.0, 'clip', 'a painting')]."""
    terms = []
    for raw in spec.split("+"):
        m = TERM.match(raw)
        if not m or m.group(2) not in REGISTRY:
            raise ValueError(f"cannot parse reward term {raw.strip()!r} of {spec!r}; "
                             f"use [weight*]name[:argument] joined by '+', names: {', '.join(REGISTRY)}")
        try:
            weight = float(m.group(1)) if m.group(1) else 1.0
        except ValueError:
            raise ValueError(f"bad weight {m.group(1)!r} in reward spec {spec!r}") from None
        terms.append((weight, m.group(2), m.group(3).strip() if m.group(3) else None))
    return terms


def build_reward(spec: str, device="cpu", differentiable: bool = False, **opts) -> Reward:
    """One Reward for a spec; opts are passed to the components that take them (weights paths)."""
    terms = []
    for weight, name, arg in parse_spec(spec):
        label = name if arg is None else f"{name}:{arg}"
        terms.append((weight, label, REGISTRY[name](arg, device, **opts)))
    return Reward(terms, differentiable).to(device)
