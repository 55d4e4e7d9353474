"""vargrpo_tools: what a reader does not need to learn the method, beside vargrpo.py (which it
imports; vargrpo.py never imports this file).

  python vargrpo_tools.py eval --ckpt runs/aes
      Table 1: reward and class accuracy, pre-trained vs fine-tuned
  python vargrpo_tools.py ablate
      the VAR-RL ablation: GRPO, +PANW, +VMR, +MP, all three
  python vargrpo_tools.py bench
      speed and memory on this machine
  python vargrpo_tools.py gpu-check
      one JSON: a random d16's step on this GPU (`bash run.sh gpu-check`)
  python vargrpo_tools.py plot runs/demo
      reward_curve.png of a run
  python vargrpo_tools.py prepare
      the digits model (data, tokenizer, judge, VAR) -> weights/
  python vargrpo_tools.py demo [train flags]
      GRPO on the digits model (`bash run.sh demo`)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vargrpo as vg
import vargrpo_run as vr
from vargrpo import CheckpointError, TrainArgs, UsageError, arg


# ----------------------------------------------------------------------------------------------
# Model helpers that RL does not need: the official initialisation, encoding images to tokens


@torch.no_grad()
def official_init_(var: vg.VAR, init_adaln=0.5, init_adaln_gamma=1e-5,
                   init_head=0.02) -> vg.VAR:
    """The official VAR initialisation, in place: truncated normal std sqrt(1/(3C)) for linear,
    embedding and position weights; head x0.02; adaLN scale/shift x0.5 and gammas x1e-5 (blocks
    start near identity); attention/FFN output projections / sqrt(2 depth)."""
    C = var.config.embed_dim
    depth = var.config.depth
    layers = (torch.nn.Linear, torch.nn.Embedding)
    weights = [m.weight for m in var.modules() if isinstance(m, layers)]
    for p in [var.pos_start, var.pos_1LC] + weights:
        torch.nn.init.trunc_normal_(p, std=math.sqrt(1 / C / 3))

    for m in var.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    var.head.weight.mul_(init_head)
    var.head_nm.ada_lin[-1].weight.mul_(init_adaln)

    for block in var.blocks:
        block.attn.proj.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        ada = block.ada_lin[-1].weight.view(6, C, C)
        ada[2:].mul_(init_adaln)
        ada[:2].mul_(init_adaln_gamma)
    return var


def residual_scales(quant: vg.VectorQuantizer, f_BChw):
    """The official encoder path, one scale at a time: at scale si the nearest codebook
    vectors of the area-downsampled residual f - f_hat. Yields (codes (B, pn*pn), their
    contribution h (B, C, H, W)), h differentiable in the codebook and Phi; the residual
    itself carries no gradient."""
    B, C = f_BChw.shape[:2]
    E_VC = quant.embedding.weight
    f_rest = f_BChw.detach().clone()
    last = len(quant.patch_nums) - 1
    for si, pn in enumerate(quant.patch_nums):
        z = f_rest
        if si != last:
            z = F.interpolate(f_rest, size=(pn, pn), mode="area")
        z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)

        with torch.no_grad():
            norms_NV = z_NC.square().sum(dim=1, keepdim=True) + E_VC.square().sum(dim=1)
            dist_NV = torch.addmm(norms_NV, z_NC, E_VC.T, alpha=-2)
            idx_Bl = dist_NV.argmin(dim=1).view(B, pn * pn)

        h_BChw = quant.add_scale(torch.zeros_like(f_rest), quant.embed(idx_Bl), si)
        f_rest = f_rest - h_BChw.detach()
        yield idx_Bl, h_BChw


@torch.no_grad()
def f_to_idx(quant: vg.VectorQuantizer, f_BChw) -> list:
    """Quantize a latent (B, Cvae, H, H) into [(B, pn*pn)] per scale (residual_scales' codes)."""
    return [idx_Bl for idx_Bl, _ in residual_scales(quant, f_BChw)]


@torch.no_grad()
def img_to_idx(vae: vg.VQVAE, img_B3HW) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, 16*pn_K, 16*pn_K) -> tokens (B, L), all scales concatenated."""
    S = vae.config.image_size
    if img_B3HW.ndim != 4 or img_B3HW.shape[1:] != (3, S, S):
        raise ValueError(f"img_to_idx expects images of shape (B, 3, {S}, {S}) in [-1, 1],"
                         f" got {tuple(img_B3HW.shape)}")

    f_BChw = vae.quant_conv(vae.encoder(img_B3HW))
    return torch.cat(f_to_idx(vae.quantize, f_BChw), dim=1)


def captioned_grid(images_B3HW, captions, path: Path, ncol: int = 8):
    """A PNG grid with a caption under each image (nearest-upscaled to >= 128 px)."""
    from PIL import Image, ImageDraw
    pixels = (images_B3HW.float().clamp(0, 1) * 255).round().byte()
    imgs = pixels.permute(0, 2, 3, 1).cpu().numpy()
    B, H, W = imgs.shape[:3]
    s = max(1, 128 // W)
    cw = W * s
    ch = H * s
    pad = 14
    ncol = min(ncol, B)
    nrow = (B + ncol - 1) // ncol

    grid = Image.new("RGB", (ncol * cw, nrow * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        x = (i % ncol) * cw
        y = (i // ncol) * (ch + pad)
        grid.paste(Image.fromarray(imgs[i]).resize((cw, ch), Image.NEAREST), (x, y))
        draw.text((x + 2, y + ch + 1), captions[i], fill="black")

    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------------------------
# Reading a run's checkpoint: RUN (its last.pt), a step_N.pt, or an exported .safetensors


def checkpoint_path(ckpt: str) -> Path:
    """The file --ckpt names: RUN/checkpoints/last.pt of a run folder, or the file itself."""
    path = Path(ckpt)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise UsageError(f"--ckpt {ckpt}: no checkpoint there (expected RUN,"
                         " RUN/checkpoints/*.pt or *.safetensors)")
    return path


def export_settings(path: Path) -> tuple[dict, int, dict | None]:
    """(the run's settings, its step, the weights files it started from: None if not
    recorded) from the metadata of a .safetensors export."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file"
                              f" ({vr.first_line(e)})") from None

    try:
        settings = json.loads(meta["vargrpo_args"])
        step = int(meta["vargrpo_step"])
        weights = json.loads(meta.get("vargrpo_weights", "null"))
        if not isinstance(settings, dict):
            raise ValueError("the settings are not a JSON object")
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{path} has no readable vargrpo settings in its metadata"
            f" ({type(e).__name__}: {vr.first_line(e)}); pass a run's export"
            " (RUN/checkpoints/last.safetensors) or its .pt checkpoint") from None
    return settings, step, weights


@dataclass
class RunCheckpoint:
    """What eval reads from a run's checkpoint or export."""

    settings: dict  # the run's TrainArgs, as saved
    state: dict  # the policy's state_dict
    step: int  # steps done
    weights: dict | None  # the files it started from (vr.weights_record); None: unrecorded


def load_run_checkpoint(ckpt: str) -> RunCheckpoint:
    """A run folder's, a vargrpo .pt checkpoint's or a .safetensors export's settings (in its
    metadata), policy, step and weights record, its checksum checked. Unlike resuming
    (vr.RunFolder.read_checkpoint), any step_N.pt will do and no optimizer is needed."""
    path = checkpoint_path(ckpt)
    if path.suffix == ".safetensors":
        settings, step, weights = export_settings(path)
        state = vg.read_state_dict(path)
        vr.check_export(path, state)
        return RunCheckpoint(settings, state, step, weights)

    obj = vr.load_run_checkpoint(path, "pass another vargrpo checkpoint",
                                 ("model", "args", "step"),
                                 "; pass RUN/checkpoints/last.pt")
    return RunCheckpoint(obj["args"], obj["model"], int(obj["step"]), obj.get("weights"))


def load_finetuned(ckpt: str, device, weights_dir=None):
    """(vae, fine-tuned policy, pre-trained reference, run settings, step) of a checkpoint.
    device None: a GPU when torch can use one; the CPU only for the digits and tiny presets.
    The weights files must be those the run started from (its record)."""
    run = load_run_checkpoint(ckpt)
    known = {f.name for f in fields(TrainArgs)}
    a = TrainArgs(**{k: v for k, v in run.settings.items() if k in known})
    if weights_dir:
        import reward_models
        a.weights_dir = weights_dir
        names = [name for _, name, _ in reward_models.parse_spec(a.reward)]
        vr.check_weights_dir(a, names)  # not ignored

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch cannot use a CUDA GPU here"
                         f" ({vr.why_no_cuda()}); pass --device cpu, or fix CUDA")
    device = vr.default_device(device, a.preset)  # before the official weights load
    vae, finetuned, pretrained = vg.build_models(a, device)
    found = vr.weights_record(vae, pretrained) | judges_found(run.weights, a.weights_dir)
    advice = "evaluate with them: pass --weights-dir naming the folder that holds that file"
    vr.check_weights(run.weights, found, f"eval --ckpt {ckpt}", advice)
    vg.load_checked(finetuned, run.state, ckpt)
    return vae, finetuned, pretrained, a, run.step


def judges_found(recorded: dict | None, weights_dir) -> dict:
    """The files that the judges a run recorded (the reward's) load from here
    (reward_models.judge_path), as vr.weights_record names them."""
    import reward_models

    found = {}
    for name, then in (recorded or {}).items():
        if name in ("VQVAE", "VAR"):
            continue
        default = reward_models.DIGIT_JUDGE.with_name(Path(then["file"]).name)
        path = reward_models.judge_path(default, None, weights_dir)
        if path.is_file():
            found[name] = vr.file_identity(path)
    return found


# ----------------------------------------------------------------------------------------------
# Evaluation [GRPO-VAR Table 1]: aesthetic score, CLIP score and ResNet-50 top-5 accuracy of
# images sampled with the official inference settings, for the pre-trained and fine-tuned models.


# Inference settings: the official VAR's, and the digits model's (the same shape, scaled to
# its vocabulary of 512)
OFFICIAL_SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)
DIGITS_CFG = dict(cfg=3.0, top_k=128, top_p=0.96)


@dataclass
class EvalArgs:
    ckpt: str = arg(
        "", "a run directory, a vargrpo checkpoint (.pt) or its .safetensors export")
    samples_per_class: int = arg(
        10, "images per class [paper: 10 for each of the 1000 classes]")
    max_classes: int = arg(
        0, "evaluate only the first N classes of each subset (0 = all)")
    cfg: float = arg(
        None, "classifier-free guidance (default: the preset's: official VAR 1.5, digits 3)",
        type=float)
    top_k: int = arg(None, "top-k (default: official 900, digits 128)", type=int)
    top_p: float = arg(None, "top-p (default: 0.96)", type=float)
    temperature: float = arg(1.0, "sampling temperature")
    prompt: str = arg("a painting", "prompt of the CLIP score")
    batch: int = arg(50, "images per sampling call")
    seed: int = arg(
        0, "sampling seed (the same images are drawn for both models up to their differences)")
    out: str = arg(
        None, "folder for eval.md, eval.json and the grids (default: the run directory)",
        type=str)
    clip_model: str = arg(
        None, "open_clip model (default ViT-L-14-quickgelu; 'tiny-random' for smoke runs)",
        type=str)
    clip_pretrained: str = arg("openai", "open_clip weights tag ('none' = random)")
    clip_weights: str = arg(None, "local open_clip checkpoint file", type=str)
    aesthetic_head: str = arg(None, "local sac+logos+ava1-l14-linearMSE.pth", type=str)
    resnet_weights: str = arg(
        None, "local torchvision resnet50 IMAGENET1K_V2 state_dict"
        " (else torch hub cache, else download)", type=str)
    weights_dir: str = arg(None, "folder with the pre-trained VAR files", type=str)
    device: str = arg(
        None, "cpu or cuda (default: cuda; without one, d16-d30 stop, digits/tiny use the CPU)",
        type=str)


def load_resnet50(weights, device):
    """torchvision ResNet-50 with IMAGENET1K_V2 weights, and its own preprocessing (on tensors).
    The weights: --resnet-weights, else torch.hub's cache ($TORCH_HOME), else downloaded there by
    torch.hub (proxies honoured; not with HF_HUB_OFFLINE=1)."""
    from torchvision.models import ResNet50_Weights, resnet50
    spec = ResNet50_Weights.IMAGENET1K_V2
    model = resnet50()
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"--resnet-weights {weights}: no such file")
        state = vr.load_pth(weights, "pass torchvision's resnet50 IMAGENET1K_V2 .pth file")
    else:
        state = resnet50_download(spec)

    model.load_state_dict(state, strict=True)
    model = model.eval().requires_grad_(False).to(device)
    return model, spec.transforms()


def resnet50_download(spec):
    """The ResNet-50 state_dict from torch.hub's cache, else downloaded there."""
    import reward_models
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
    todo = f"download {spec.url} yourself and pass --resnet-weights PATH"
    if not cached.is_file() and reward_models.offline_mode():
        raise CheckpointError(f"ResNet-50 weights {cached.name} are not in {cached.parent} and "
                              f"HF_HUB_OFFLINE=1 forbids downloading them; {todo}")

    try:
        return spec.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # unreachable, proxy refused, wrong hash, unreadable cached file
        raise CheckpointError(f"ResNet-50 weights {cached.name}: neither {cached.parent} nor "
                              f"{spec.url} gave them ({vr.first_line(e)}); {todo}") from None


def eval_scorers(e: EvalArgs, a: TrainArgs, device) -> dict:
    """{key: (column title, fn(images, labels) -> one score per image)}: the paper's aesthetic
    score, CLIP score and ResNet-50 top-5 for the official models; the run's own reward and the
    digits judge's class accuracy (the ResNet-50 top-5's stand-in) for the digits model."""
    if a.preset in DIGITS_RECIPES:
        return digits_scorers(a, device)

    reward = vg.make_reward(f"aesthetic+clip:{e.prompt}", device, e)
    classifier, preprocess = load_resnet50(e.resnet_weights, device)

    def aesthetic(images, labels):
        return reward(images, return_components=True)[1]["aesthetic"]

    def clipscore(images, labels):
        components = reward(images, return_components=True)[1]
        return components[f"clip:{e.prompt}/clipscore"]

    def resnet50_top5(images, labels):
        top5 = classifier(preprocess(images)).topk(5, dim=-1).indices
        return (top5 == labels[:, None]).any(-1).float()

    return {"aesthetic": ("aesthetic score", aesthetic),
            "clipscore": (f"CLIPScore '{e.prompt}'", clipscore),
            "resnet50_top5": ("ResNet-50 top-5", resnet50_top5)}


def digits_scorers(a: TrainArgs, device) -> dict:
    """eval_scorers of the digits models: the run's reward, both judges' class accuracy (a
    number's: both halves read right), and the OCR's word accuracy where the reward reads
    text (ocr)."""
    reward = vg.make_reward(a.reward, device, a)
    judge, judge2 = (j.to(device) for j in load_judges(a.weights_dir, a.preset))
    classes = vg.VARConfig.preset(a.preset).num_classes
    digits = len(str(classes - 1))

    def run_reward(images, labels):
        return reward(images, labels)

    def judge_correct(images, labels):
        return number_correct(judge, images, labels, digits)

    def judge2_correct(images, labels):
        return number_correct(judge2, images, labels, digits)

    def word_accuracy(images, labels):
        logs = reward(images, labels, return_components=True)[1]
        return next(v for k, v in logs.items() if k.endswith("/word_accuracy"))

    scorers = {"reward": (f"reward `{a.reward}`", run_reward),
               "judge_accuracy": ("judge class accuracy", judge_correct),
               "judge2_accuracy": ("second judge class accuracy", judge2_correct)}
    if "ocr" in a.reward:
        scorers["word_accuracy"] = ("OCR word accuracy", word_accuracy)
    return scorers


def checkpoint_home(ckpt: str) -> Path:
    """The folder a checkpoint belongs to: a run folder given as such, the run of a file in
    its checkpoints/ folder, else the folder the file is in."""
    path = Path(ckpt)
    if path.is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path.parent


def eval_folder(e: EvalArgs) -> Path:
    """Where eval writes (--out, else beside the checkpoint: its run folder), checked before
    any work: a folder this process can write in, whose eval.md (if any) is this checkpoint's
    own earlier evaluation, never another run's or a file of the user's."""
    out = checkpoint_home(e.ckpt)
    if e.out:
        out = Path(e.out)
    output_folder(out, "eval.md, eval.json and the grids")

    table = out / "eval.md"
    if table.exists() and evaluated_home(out) != checkpoint_home(e.ckpt).resolve():
        raise UsageError(f"{table} is not an evaluation of {e.ckpt}; pass --out a folder of its"
                         " own (eval never replaces another run's tables or a file of yours)")
    return out


def evaluated_home(out: Path) -> Path | None:
    """The folder of the checkpoint that out/eval.json records (None if none is recorded)."""
    try:
        record = json.loads((out / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "run" not in record:
        return None
    return Path(record["run"]).resolve()


def output_folder(out: Path, what: str) -> Path:
    """`out`, made if absent, once it is known to be a folder this process can write `what` in (a
    UsageError naming the problem otherwise)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for {what}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot make {out} ({err.strerror}); pass --out a folder you can"
                         " write to") from None

    problem = vr.cannot_write(out)
    if problem:
        raise UsageError(f"cannot write in {out} ({problem}); pass --out a folder you can"
                         " write to")
    return out


def eval_sampling(e: EvalArgs, preset: str) -> dict:
    """cfg, top-k and top-p of eval: each one given, else the preset's."""
    preset_kw = OFFICIAL_SAMPLING
    if preset in DIGITS_RECIPES:
        preset_kw = DIGITS_CFG
    sampling = {}
    for k in ("cfg", "top_k", "top_p"):
        sampling[k] = getattr(e, k)
        if sampling[k] is None:
            sampling[k] = preset_kw[k]

    if sampling["cfg"] < 0 or sampling["top_k"] < 0 or not 0 <= sampling["top_p"] < 1:
        raise UsageError("need --cfg >= 0, --top-k >= 0 and 0 <= --top-p < 1")
    return sampling


def eval_subsets(a: TrainArgs, ncls: int) -> dict:
    """{subset name: its classes}: all of them, or the labels trained on and the others."""
    seen = vg.label_pool(a, ncls)
    if a.label_subset == "all":
        return {"all": seen}
    unseen = sorted(set(range(ncls)) - set(seen.tolist()))
    return {"seen": seen, "unseen": torch.tensor(unseen)}


def eval_one(e: EvalArgs, model, classes, scorers: dict, sampling: dict, device):
    """The mean score of each scorer over samples of `classes` (--samples-per-class each), and
    the grid's (image, label) pairs: up to 4 of each of the first 8 classes."""
    labels = classes.repeat_interleave(e.samples_per_class).to(device)
    shown = classes[:8].tolist()
    sums = dict.fromkeys(scorers, 0.0)
    grid = []
    for i in range(0, len(labels), e.batch):
        labels_B = labels[i:i + e.batch]
        gen = torch.Generator(device=device).manual_seed(vg.derive_seed(e.seed, 6, i))
        with torch.no_grad():
            images = vg.sample(model, labels_B, temperature=e.temperature, generator=gen,
                               **sampling).images.float()
            for name, (_, score) in scorers.items():
                sums[name] += score(images, labels_B).sum().item()

        counts = {lab: sum(1 for _, l in grid if l == lab) for lab in shown}
        for img, lab in zip(images, labels_B.tolist()):
            if lab in shown and counts[lab] < 4:  # counted before this batch
                grid.append((img, lab))

    means = {name: total / len(labels) for name, total in sums.items()}
    return means, len(labels), grid


def eval_table(results: list, scorers: dict, preset: str) -> list:
    """eval.md's lines: a row per model and subset, a column per scorer."""
    def fmt(name, v):
        if "top5" in name or "accuracy" in name:
            return f"{100 * v:.1f}%"
        return f"{v:.3f}"

    titles = " | ".join(title for title, _ in scorers.values())
    table = ["| model | labels | images | " + titles + " |",
             "|---|---|---|" + "---|" * len(scorers)]
    for r in results:
        scores = " | ".join(fmt(n, r[n]) for n in scorers)
        table.append(f"| {r['model']} ({preset}) | {r['subset']} | {r['images']} | "
                     + scores + " |")
    return table


def evaluate(e: EvalArgs) -> dict:
    positive = min(e.samples_per_class, e.batch) >= 1
    if not positive or e.max_classes < 0 or not 0 < e.temperature < math.inf:
        raise UsageError("need --samples-per-class >= 1, --batch >= 1, --max-classes >= 0 and"
                         " --temperature > 0")
    for name in ("cfg", "top_p"):
        if getattr(e, name) is not None and not math.isfinite(getattr(e, name)):
            raise UsageError(f"--{name.replace('_', '-')}: not a finite number")
    checkpoint_path(e.ckpt)
    out = eval_folder(e)  # before the work

    vae, finetuned, pretrained, a, step = load_finetuned(e.ckpt, e.device, e.weights_dir)
    device = str(finetuned.pos_1LC.device)
    sampling = eval_sampling(e, a.preset)
    scorers = eval_scorers(e, a, device)
    subsets = eval_subsets(a, finetuned.config.num_classes)

    results = []
    for model_name, model in (("pre-trained", pretrained), ("fine-tuned", finetuned)):
        for subset, classes in subsets.items():
            if e.max_classes:
                classes = classes[:e.max_classes]
            means, n, grid = eval_one(e, model, classes, scorers, sampling, device)
            results.append({"model": model_name, "subset": subset, "images": n, **means})
            images = torch.stack([g[0] for g in grid])
            captions = [str(g[1]) for g in grid]
            captioned_grid(images, captions, out / f"eval_{model_name}_{subset}.png")

    table = eval_table(results, scorers, a.preset)
    keys = ("samples_per_class", "temperature", "prompt", "seed")
    settings = {k: getattr(e, k) for k in keys} | sampling
    record = {"checkpoint": str(e.ckpt), "step": step, "settings": settings,
              "results": results, "run": str(checkpoint_home(e.ckpt).resolve())}
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    (out / "eval.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return {"results": results}


# ----------------------------------------------------------------------------------------------
# Ablation [VAR-RL]: vanilla GRPO, +PANW, +VMR, +MP, all three, at equal sample budgets (VMR's
# extra completions count: each image sampled, decoded and rewarded).

ABLATION_METHODS = {
    "grpo": {},
    "+panw": {"panw_alpha": 1.0},
    "+vmr": {"vmr": True},
    "+mp": {"mask_propagation": True},
    "nextflow (all three)": {"vmr": True, "mask_propagation": True, "panw_alpha": 1.0},
}
# the label-aware reward (the judge reads the asked digit: VAR-RL's OCR task in miniature) and
# a region reward (mask propagation's mask is its box); their seeds
ABLATION_REWARDS = ["digit:correct", "brightness:region=0.25,0.25,0.75,0.75"]
ABLATION_SEEDS = ["0,1,2,3,4", "0,1,2"]
# VAR-RL's own ablation on the numbers model (ablate --preset numbers): the OCR reward, paper
# B's PANW alpha sweep and fine vs coarse alternation; each method (train flags, seeds) at the
# same sample budget, nothing tuned per method
NUMBERS_REWARD = "ocr"
NUMBERS_METHODS = {
    "grpo": ({}, 5),
    "+panw a=0.6": ({"panw_alpha": 0.6}, 3),
    "+panw a=0.8": ({"panw_alpha": 0.8}, 3),
    "+panw a=1.0": ({"panw_alpha": 1.0}, 3),
    "+vmr": ({"vmr": True}, 5),
    "+vmr coarse 12:4": ({"vmr": True, "vmr_schedule": "12:4"}, 3),
    "+mp": ({"mask_propagation": True}, 5),
    "nextflow (all three)": ({"vmr": True, "mask_propagation": True, "panw_alpha": 1.0}, 5),
}
# Student's t 0.975 quantiles by degrees of freedom: the 95% interval of a mean over n seeds is
# mean +- T975[n - 1] * std / sqrt(n)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262}


def mean_ci95(values) -> tuple:
    """(mean, half-width of the 95% t-interval); the half-width is nan for a single value."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), math.nan
    half = T975[len(v) - 1] * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()), half


def ablation_runs(args) -> list:
    """[(reward, method name, train flags, seeds)]: every method for each reward with its
    seeds, and for the first reward VMR's split m at the scales of --vmr-m (the VAR-RL m sweep)
    with --sweep-seeds."""
    if args.preset == "numbers":
        return numbers_ablation_runs(args)

    rewards = args.reward or ABLATION_REWARDS
    seeds = args.seeds or ABLATION_SEEDS[:len(rewards)]
    if len(seeds) == 1:
        seeds = seeds * len(rewards)
    if len(seeds) != len(rewards):
        raise UsageError(f"--seeds given {len(seeds)} times for {len(rewards)} rewards: give it"
                         " once (every reward) or once per --reward")

    sweep = vmr_sweep(args)
    plan = []
    for i, reward in enumerate(rewards):
        ids = [int(s) for s in seeds[i].split(",")]
        plan += [(reward, name, flags, ids) for name, flags in ABLATION_METHODS.items()]
        if i == 0:
            ids = [int(s) for s in args.sweep_seeds.split(",")]
            plan += [(reward, f"+vmr m={m}", {"vmr": True, "vmr_m": m}, ids) for m in sweep]
    return plan


def vmr_sweep(args) -> list:
    """The splits m of --vmr-m, each checked against the preset's scales."""
    K = vg.VARConfig.preset(args.preset).num_scales
    sweep = []
    if args.vmr_m:
        sweep = [int(m) for m in args.vmr_m.split(",")]
    if any(not 1 <= m < K for m in sweep):
        raise UsageError(f"--vmr-m {args.vmr_m}: the split must be a scale in 1..{K - 1} of"
                         f" {args.preset}; pass --vmr-m with those (e.g. --vmr-m {K // 2}),"
                         " or --vmr-m '' for no sweep")
    return sweep


def numbers_ablation_runs(args) -> list:
    """The plan of ablate --preset numbers: NUMBERS_METHODS with their seeds (--seeds: the
    same seeds for every method), then the VMR m sweep with --sweep-seeds."""
    rewards = args.reward or [NUMBERS_REWARD]
    plan = []
    for reward in rewards:
        for name, (flags, n_seeds) in NUMBERS_METHODS.items():
            ids = list(range(n_seeds))
            if args.seeds:
                ids = [int(s) for s in args.seeds[0].split(",")]
            plan.append((reward, name, flags, ids))

    ids = [int(s) for s in args.sweep_seeds.split(",")]
    for m in vmr_sweep(args):
        plan.append((rewards[0], f"+vmr m={m}", {"vmr": True, "vmr_m": m}, ids))
    return plan


@torch.no_grad()
def final_scores(model: vg.VAR, reward, judges, n: int, seed: int = 4) -> dict:
    """The reward and both judges' accuracy on the asked digit of n samples at T = 1 (labels
    in turn, one fixed seed: every run and the pre-trained model draw the same noise); a
    number's digits are judged one half of the image each, and the OCR's word accuracy and
    NED are kept where the reward logs them."""
    classes = model.config.num_classes
    labels = torch.arange(n) % classes
    images = sample_images(model, labels, vg.derive_seed(seed, 4))
    total, logs = reward(images, labels, return_components=True)
    scores = {"reward": total.mean().item()}
    for key, values in logs.items():
        name = key.rsplit("/", 1)[-1]
        if name in ("word_accuracy", "ned"):
            scores[name] = values.float().mean().item()

    digits = 1
    if classes == 100:
        digits = 2
    for prefix, judge in zip(("judge", "judge2"), judges):
        scores.update(judge_accuracies(judge, images, labels, digits, prefix))
    return scores


def folder_name(text: str) -> str:
    """A reward spec as a folder name: each run of other characters becomes one _."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def ablate(args):
    """Runs every method for every seed to the same sample budget, for each reward; then scores
    each final policy (and the pre-trained model) with the reward and both judges. Writes
    ablation.md / .json / .png per reward (in a subfolder named after it) and ablation.md of
    all."""
    out = Path(args.out)
    tables = []
    plan = ablation_runs(args)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} holds an earlier ablation (or other files); pass"
                         " --overwrite to replace its runs and tables, or --out another folder")
    output_folder(out, "the ablation's runs and tables")
    common = dict(preset=args.preset, labels_per_step=4, group_size=8, minibatch=16,
                  lr=args.lr, beta=args.beta, temperature=1.0, image_every=0,
                  save_every=10**6, overwrite=args.overwrite, weights_dir=args.weights_dir)
    judges = load_judges(args.weights_dir, args.preset)

    for reward_spec in dict.fromkeys(r for r, *_ in plan):
        folder = out / folder_name(reward_spec)
        runs = {}
        reward = vg.make_reward(reward_spec, "cpu", TrainArgs(**common))
        _, _, pretrained = vg.build_models(TrainArgs(**common), "cpu")
        base = final_scores(pretrained, reward, judges, args.eval_samples)
        runs["pre-trained", None] = dict(final=base)

        for _, name, flags, seeds in [p for p in plan if p[0] == reward_spec]:
            per_step = common["labels_per_step"] * common["group_size"]
            if flags.get("vmr"):
                per_step *= TrainArgs.vmr_k
            steps = max(1, args.budget // per_step)
            for seed in seeds:
                run = folder / f"{re.sub(r'[^a-z0-9]+', '', name)}_s{seed}"
                a = TrainArgs(**common, **flags, reward=reward_spec, out=str(run),
                              steps=steps, seed=seed)
                runs[name, seed] = ablation_run(a, reward, judges, args.eval_samples)
                print(f"[ablate] {reward_spec} {name} seed {seed}:"
                      f" {runs[name, seed]['final']}", flush=True)

        table, summary = summarise_ablation(runs, plan, args, reward_spec)
        (folder / "ablation.md").write_text(table)
        (folder / "ablation.json").write_text(json.dumps(summary, indent=1))
        plot_ablation(runs, plan, folder / "ablation.png", reward_spec)
        tables.append(table)
        print(table, flush=True)
    (out / "ablation.md").write_text("\n".join(tables))


def ablation_run(a: TrainArgs, reward, judges, eval_samples: int) -> dict:
    """One training run of the ablation: its metrics rows, wall time and final scores."""
    t0 = time.perf_counter()
    vg.train(a)
    policy = vg.build_models(a, "cpu")[1]
    state = vg.read_state_dict(Path(a.out) / "checkpoints" / "last.pt")
    vg.load_checked(policy, state, Path(a.out))
    lines = (Path(a.out) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(l) for l in lines]
    wall = time.perf_counter() - t0
    final = final_scores(policy, reward, judges, eval_samples)
    return dict(rows=rows, wall=wall, final=final)


# The columns of an ablation table (key of final_scores, title), where final_scores has them:
# the OCR's figures for the ocr reward, the judges per half for two-digit numbers
SCORE_COLUMNS = [
    ("reward", "final reward"),
    ("word_accuracy", "OCR word accuracy"),
    ("ned", "OCR NED"),
    ("judge", "judge accuracy (asked digit)"),
    ("judge2", "second judge"),
    ("judge_tens", "judge: tens (left half)"),
    ("judge_units", "judge: units (right half)"),
    ("judge2_tens", "second judge: tens"),
    ("judge2_units", "second judge: units"),
]


def summarise_ablation(runs, plan, args, reward_spec):
    """The table of one reward: per method the final policy's reward, the OCR's figures and
    both judges' accuracy on the asked digit (mean and 95% interval over seeds), the training
    reward at the start and at the end, the KL."""
    base = runs["pre-trained", None]["final"]
    columns = [(key, title) for key, title in SCORE_COLUMNS if key in base]
    classes = vg.VARConfig.preset(args.preset).num_classes
    titles = " | ".join(title for _, title in columns)
    lines = [f"Reward `{reward_spec}`, {args.preset} preset, budget {args.budget} samples per"
             f" run; final policy: {args.eval_samples} samples at T = 1 (labels"
             f" 0-{classes - 1}, one seed); mean [95% t-interval] over seeds.",
             "",
             f"| method | seeds | steps | {titles}"
             " | training reward: first step -> last 10%"
             " | KL per token at the end | wall time per run |",
             "|---" * (len(columns) + 6) + "|"]
    values = " | ".join(f"{base[key]:.3f}" for key, _ in columns)
    lines.append(f"| pre-trained | - | 0 | {values} | - | 0 | - |")
    summary = {"pre-trained": base}

    for _, name, _, seeds in [p for p in plan if p[0] == reward_spec]:
        per_seed = [seed_summary(runs[name, seed], seed) for seed in seeds]
        keys = [key for key, _ in columns] + ["start", "end", "kl", "wall"]
        ci = {k: mean_ci95([r[k] for r in per_seed]) for k in keys}
        summary[name] = {"per_seed": per_seed, "mean_ci95": ci}

        def f(k, p=3):
            mean, half = ci[k]
            return f"{mean:.{p}f} [{mean - half:.{p}f}, {mean + half:.{p}f}]"

        values = " | ".join(f(key) for key, _ in columns)
        lines.append(f"| {name} | {len(seeds)} | {per_seed[0]['steps']} | {values}"
                     f" | {ci['start'][0]:.3f} -> {ci['end'][0]:.3f}"
                     f" | {ci['kl'][0]:.4f} | {ci['wall'][0]:.0f} s |")
    return "\n".join(lines) + "\n", summary


def seed_summary(run: dict, seed: int) -> dict:
    """One seed's row of summarise_ablation: the training reward at the first step and over
    the last 10% of the samples, the last KL, the wall time, the final scores."""
    rows = run["rows"]
    budget = [r["budget/samples"] for r in rows]
    last = [r["reward/mean"] for r in rows if r["budget/samples"] > 0.9 * budget[-1]]
    return dict(seed=seed, steps=len(rows), start=rows[0]["reward/mean"],
                end=float(np.mean(last)), kl=rows[-1]["policy/kl"], wall=run["wall"],
                **run["final"])


def plot_ablation(runs, plan, path: Path, reward_spec: str):
    """Left: the judge's accuracy on the asked digit of each step's samples (digit:correct) or
    the mean reward, against the samples used (mean over seeds, 5-step running mean); right:
    the final policy's accuracy on the asked digit by both judges (mean and 95% interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "reward/mean"
    if "digit:correct" in reward_spec:
        key = "reward/digit:correct/accuracy"
    if reward_spec.startswith("ocr"):
        key = f"reward/{reward_spec}/word_accuracy"
    finals = ("judge", "judge2")
    names = ("first judge", "second judge")
    if "word_accuracy" in runs["pre-trained", None]["final"]:
        finals = ("word_accuracy", "ned")
        names = ("OCR word accuracy", "OCR NED")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    methods = [(name, seeds) for r, name, _, seeds in plan if r == reward_spec]

    for i, (name, seeds) in enumerate(methods):
        x = np.array([r["budget/samples"] for r in runs[name, seeds[0]]["rows"]])
        per_seed = [[r[key] for r in runs[name, s]["rows"]][:len(x)] for s in seeds]
        ys = np.array(per_seed).mean(0)
        w = min(5, len(ys))
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(x[len(x) - len(smooth):], smooth, label=name, color=f"C{i}")
        for j, judge in enumerate(finals):
            m, h = mean_ci95([runs[name, s]["final"][judge] for s in seeds])
            if math.isnan(h):
                h = 0
            label = None
            if i == 0:
                label = names[j]
            ax2.errorbar(i + 0.15 * (2 * j - 1), m, yerr=h, fmt="os"[j], color=f"C{i}",
                         label=label, capsize=3)

    for j, judge in enumerate(finals):
        base = runs["pre-trained", None]["final"][judge]
        ax2.axhline(base, color="grey", ls=("-", "--")[j], lw=0.8)
    ax.set_xlabel("samples (sampled, decoded and rewarded images)")
    ax.set_ylabel("mean reward")
    if key.endswith("/accuracy"):
        ax.set_ylabel("judge accuracy on the asked digit")
    if key.endswith("/word_accuracy"):
        ax.set_ylabel("OCR word accuracy")
    ax.set_title(f"{reward_spec}: each step's samples, mean over seeds, 5-step running mean",
                 fontsize=9)
    ax.legend(fontsize=7)

    ax2.set_xticks(range(len(methods)), [n for n, _ in methods], fontsize=7, rotation=20)
    ax2.set_ylabel(f"{names[0]}, {names[1]} (final policy)")
    ax2.set_title(f"final policy, T = 1; grey: pre-trained (solid {names[0]}, dashed"
                  f" {names[1]})", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Plots of a run


def plot_reward_curve(run: Path, out_path: Path | None = None, title: str | None = None):
    """reward_curve.png: the mean reward (band: +- std over the step's samples) and the KL per
    token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not (run / "metrics.jsonl").is_file():
        raise UsageError(f"{run / 'metrics.jsonl'} does not exist: name a run folder (the --out"
                         " of a training run)")
    out_path = out_path or run / "reward_curve.png"
    problem = vr.cannot_write(out_path.parent)
    if problem:
        raise UsageError(f"cannot write {out_path} ({problem}); pass --out a PNG path in a"
                         " folder you can write")
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line
            pass

    steps = [r["step"] for r in rows]
    mean = [r["reward/mean"] for r in rows]
    low = [r["reward/mean"] - r["reward/std"] for r in rows]
    high = [r["reward/mean"] + r["reward/std"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, mean, label="reward (mean)", color="C0")
    ax.fill_between(steps, low, high, color="C0", alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")

    ax2 = ax.twinx()
    kl = [r["policy/kl"] for r in rows]
    ax2.plot(steps, kl, color="C3", label="KL to pre-trained (per token)")
    ax2.set_ylabel("KL", color="C3")
    if title is None:
        title = run_title(run)
    ax.set_title(title, fontsize=9)
    handles = ax.get_lines() + ax2.get_lines()
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def run_title(run: Path) -> str:
    """'preset, reward spec' from the run's args.json, else the folder's name."""
    try:
        a = json.loads((run / "args.json").read_text())
        return f"{a['preset']}, reward {a['reward']}"
    except (OSError, ValueError, KeyError, TypeError):
        return run.name


# ----------------------------------------------------------------------------------------------
# Benchmark: `python vargrpo_tools.py bench`. Every row runs in a fresh process so that its peak
# memory is its own; FLOPs are counted by torch's FlopCounterMode on one call of the timed function.

BENCH_SAMPLER_KW = {"tiny": dict(cfg=1.5, top_k=10, top_p=0.9), "digits": DIGITS_CFG,
                    "default": OFFICIAL_SAMPLING}


def time_call(fn, device, min_calls=3, min_seconds=2.0) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    vr.synced_time(device)
    times = []
    while len(times) < min_calls or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        vr.synced_time(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_memory(device) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_flops(device) -> float:
    """This machine's fp32 matmul throughput (FLOP/s): the fastest of 10 square matmuls."""
    n = 2048
    if str(device).startswith("cuda"):
        n = 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b

    best = math.inf
    for _ in range(10):
        vr.synced_time(device)
        t0 = time.perf_counter()
        a @ b
        vr.synced_time(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def bench_row(preset: str, what: str, batch: int, device: str, official_dir=None) -> dict:
    """One measurement, in this process: sampler (cfg 0 / cfg+top-k/top-p, ours or the official
    code's) or teacher forcing (fwd / fwd+bwd, optionally with gradient checkpointing) of a random
    model of this preset."""
    from torch.utils.flop_counter import FlopCounterMode
    if what.startswith("GRPO step"):
        return bench_grpo_step(preset, batch, device)
    if what.startswith("reward "):
        return bench_reward(what[len("reward "):], batch, device)

    config = vg.VARConfig.preset(preset)
    vae, var = vg.build_vae_var(config, seed=0)
    vae.to(device)
    var.to(device)
    labels = torch.arange(batch, device=device) % config.num_classes
    guided_kw = BENCH_SAMPLER_KW.get(preset, BENCH_SAMPLER_KW["default"])
    gen = torch.Generator(device=device).manual_seed(0)

    if what in ("sample cfg=0", "sample cfg+top-k/p"):
        kw = guided_kw
        if what == "sample cfg=0":
            kw = {}

        def fn():
            return vg.sample(var, labels, generator=gen, **kw)
        unit = "img/s"
        per_call = batch
    elif what == "official sample cfg+top-k/p":
        def ours():
            return vg.sample(var, labels, generator=gen, **guided_kw)
        official = official_sampler(vae, var, config, labels, guided_kw, device, official_dir)
        return bench_official(official, ours, batch, device)
    else:
        idx = vg.sample(var, labels, decode=False).idx
        var.grad_checkpointing = what.endswith("checkpointing")
        if what == "teacher-forced fwd":
            @torch.no_grad()
            def fn():
                return vg.token_logprobs(var, labels, idx).sum()
        else:
            def fn():
                var.zero_grad(set_to_none=True)
                vg.token_logprobs(var, labels, idx).sum().backward()
        unit = "tok/s"
        per_call = batch * config.seq_len

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = time_call(fn, device)
    return dict(preset=preset, what=what, batch=batch, seconds=seconds,
                throughput=per_call / seconds, unit=unit, flops=counter.get_total_flops(),
                peak_mem=peak_memory(device), device=device)


def official_sampler(vae, var, config, labels, guided_kw: dict, device, official_dir):
    """The official repository's sampler on a copy of our random weights."""
    sys.path.insert(0, str(official_dir))
    from models import build_vae_var as official_build  # the official repository's package
    o_vae, o_var = official_build(
        device=device,
        patch_nums=config.patch_nums,
        V=config.vocab_size,
        Cvae=config.z_channels,
        ch=config.vae_ch,
        share_quant_resi=4,
        num_classes=config.num_classes,
        depth=config.depth,
        shared_aln=False,
        attn_l2_norm=True,
        flash_if_available=False,
        fused_if_available=False)
    o_vae.load_state_dict(vae.state_dict())
    o_var.load_state_dict(var.state_dict())
    o_var.eval()

    def official():
        return o_var.autoregressive_infer_cfg(B=len(labels), label_B=labels, g_seed=0,
                                              more_smooth=False, **guided_kw)
    return official


def bench_official(official, ours, batch: int, device) -> dict:
    """The official sampler's row, timed interleaved with ours in one process (this machine's
    speed drifts)."""
    official()
    ours()
    t = {official: [], ours: []}
    pairs = 8
    for rep in range(pairs):
        order = (official, ours)
        if rep % 2 == 1:
            order = (ours, official)
        for f in order:
            t0 = time.perf_counter()
            f()
            vr.synced_time(device)
            t[f].append(time.perf_counter() - t0)

    ratio = np.median(np.array(t[ours]) / np.array(t[official]))  # pairs ran back to back
    what = (f"official sample cfg+top-k/p, interleaved with ours"
            f" ({np.median(t[ours]):.3f} s/call; "
            f"ours/official per pair, median of {pairs}: {ratio:.3f})")
    seconds = float(np.median(t[official]))
    return dict(what=what, seconds=seconds, throughput=batch / seconds,
                unit="img/s", flops=None, peak_mem=None)


def bench_grpo_step(preset: str, labels_per_step: int, device: str) -> dict:
    """One full GRPO step of the real trainer (random weights, brightness reward): the second of
    two steps, so that the first absorbs warm-up."""
    import tempfile
    G = 2
    if device.startswith("cuda"):
        G = 16
    elif preset == "tiny":
        G = 8
    with tempfile.TemporaryDirectory() as tmp:
        a = TrainArgs(preset=preset, random_init=True, out=tmp + "/run", steps=2,
                      labels_per_step=labels_per_step, group_size=G,
                      minibatch=min(32, labels_per_step * G), image_every=0, device=device)
        vg.train(a)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        m = [json.loads(line) for line in lines][-1]

    parts = ("sample", "decode", "reward", "update")
    split = " / ".join(f"{k} {100 * m['time/' + k] / m['time/step']:.0f}%" for k in parts)
    return dict(what=f"GRPO step, {labels_per_step}x{G} samples ({split})",
                seconds=m["time/step"], throughput=m["perf/samples_per_s"], unit="samples/s",
                flops=None, peak_mem=peak_memory(device))


def bench_reward(name: str, batch: int, device: str) -> dict:
    """A reward on `batch` random 256 px images; CLIP ViT-L/14 and the aesthetic head with random
    weights (the same work as the real ones)."""
    import reward_models as rm
    from torch.utils.flop_counter import FlopCounterMode
    if name.startswith("ocr"):
        return bench_ocr(name, batch)

    if name == "brightness":
        fn_reward = rm.Brightness()
    else:
        clip, tokenizer = rm.load_clip(rm.AESTHETIC_CLIP[0], "none", None, device)
        embedder = rm.ClipImageEmbedder(clip).to(device)
        if name == "aesthetic":
            fn_reward = rm.Aesthetic(embedder, rm.AestheticHead().to(device))
        else:
            fn_reward = rm.ClipScore(embedder, tokenizer, "a painting")
    images = torch.rand(batch, 3, 256, 256, device=device)

    @torch.no_grad()
    def fn():
        return fn_reward(images)

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    seconds = time_call(fn, device)
    return dict(seconds=seconds, throughput=batch / seconds, unit="img/s",
                flops=counter.get_total_flops(), peak_mem=peak_memory(device))


def bench_ocr(name: str, batch: int) -> dict:
    """The ocr reward on `batch` rendered numbers (64 px, as the numbers preset draws): the
    recogniser alone ('ocr', the reward), or the detector's text boxes too ('ocr boxes', mask
    propagation's mask). onnxruntime runs it on the CPU: no FLOP count."""
    import reward_models as rm
    images_u8, labels, _ = render_digits(batch, seed=0, digits=2)
    images = images_u8.float() / 255
    reward = rm.build_reward("ocr")

    def fn():
        reward.parts[0].last = None  # read again: no cached reading
        if name == "ocr boxes":
            return reward.region_masks(images, labels)
        return reward(images, labels)

    seconds = time_call(fn, "cpu")
    what = f"reward {name} ({1000 * seconds / batch:.0f} ms/img)"
    return dict(seconds=seconds, throughput=batch / seconds, unit="img/s",
                flops=None, peak_mem=peak_memory("cpu"), what=what)


def saved_bytes(fn, weights) -> int:
    """Bytes of the tensors autograd saves for the backward pass while fn() runs, the weights left
    out: the activation memory a training forward holds until its backward (storages counted
    once)."""
    seen = {}
    own = {w.untyped_storage().data_ptr() for w in weights}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn()
    return sum(seen.values())


def activation_memory(preset: str, dtype=None) -> dict:
    """Activation bytes per sample of a teacher-forced log-prob pass (the update's forward), with
    and without --grad-checkpointing, counted from the graph on the CPU (random weights, B = 1).
    With checkpointing a block keeps only its input, and its own activations exist again only
    while the backward pass recomputes it: saved - depth * block + depth * input + block."""
    config = vg.VARConfig.preset(preset)
    vae, var = vg.build_vae_var(config)
    weights = [*var.parameters(), *var.buffers(), *vae.parameters(), *vae.buffers()]
    amp = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

    per_sample = {}
    # B = 2 minus B = 1 leaves out what a forward holds once (bf16 copies of the weights)
    for B in (1, 2):
        labels = torch.zeros(B, dtype=torch.long)
        idx = torch.zeros(B, config.seq_len, dtype=torch.long)
        x = torch.zeros(B, config.seq_len, config.embed_dim, requires_grad=True)

        def logprobs():
            return vg.token_logprobs(var, labels, idx, 0.7)

        def first_block():
            mask = var.attn_bias_for_masking[0, 0] == 0
            return var.blocks[0](x, var.class_emb(labels), mask)

        with amp:
            per_sample[B] = (saved_bytes(logprobs, weights),
                             saved_bytes(first_block, weights))

    total = per_sample[2][0] - per_sample[1][0]
    block = per_sample[2][1] - per_sample[1][1]
    element = 4
    if dtype is not None:
        element = 2
    inputs = config.depth * config.seq_len * config.embed_dim * element
    params = sum(p.numel() for p in var.parameters())
    return dict(preset=preset, params=params, plain=total,
                checkpointed=total - config.depth * block + inputs + block)


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def bench_memory(presets: str):
    """bench --memory: the activation memory table."""
    print("| preset | parameters | activations per sample, fp32 | with --grad-checkpointing"
          " | bf16 autocast | bf16, checkpointing |")
    print("|---|---|---|---|---|---|")
    for preset in presets.split(","):
        f32 = activation_memory(preset)
        b16 = activation_memory(preset, torch.bfloat16)
        print(f"| {preset} | {f32['params'] / 1e6:.1f} M | {gib(f32['plain'])}"
              f" | {gib(f32['checkpointed'])} | "
              f"{gib(b16['plain'])} | {gib(b16['checkpointed'])} |", flush=True)


# The cards of docs/memory.md's tables, in decimal bytes as sold: a little less than the 39.6 /
# 79.6 GiB torch reports on A100 40GB / H100 80GB, so the tables err low
CARDS = {"40 GB": 40 * 10**9, "80 GB": 80 * 10**9}
PLAN_PRESETS = ("d16", "d20", "d24", "d30")


@functools.lru_cache(maxsize=None)
def param_counts(preset: str) -> tuple:
    """(VAR, VQVAE) parameters of a preset, counted on the meta device (nothing allocated)."""
    config = vg.VARConfig.preset(preset)
    with torch.device("meta"):
        vae, var = vg.build_vae_var(config)
    n_var = sum(p.numel() for p in var.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    return n_var, n_vae


def memory_plan(preset: str, card: str, **kw) -> vr.GpuMemory:
    """vargrpo_run.gpu_memory_plan of a preset at the paper's shape (a minibatch of 32 and 512
    samples per step, split across `world` processes), with a CLIP reward, bf16."""
    config = vg.VARConfig.preset(preset)
    vae_params = param_counts(preset)[1]
    world = kw.get("world", 1)
    return vr.gpu_memory_plan(config, vae_params, CARDS[card], 32 // world, rows=512 // world,
                              clip_params=vr.CLIP_L14_PARAMS, **kw)


def fit_cell(m: vr.GpuMemory) -> str:
    """Samples per pass that fit, and --micro-batch 0's choice when it differs."""
    if not m.samples_fit:
        return "does not fit"
    if m.micro_batch == m.samples_fit:
        return str(m.micro_batch)
    return f"{m.samples_fit} ({m.micro_batch})"


def memory_plan_tables() -> list:
    """bench --memory-plan: docs/memory.md's tables, worked out by vargrpo_run.gpu_memory_plan
    (no GPU, nothing measured)."""
    lines = ["| model | parameters | weights, AdamW, reference, VQVAE (GiB) | CLIP | gradients"
             " | bf16 weight casts | activations / sample (of which logits) | with checkpointing"
             " | 40 GB | 40 GB, checkpointing | 80 GB | 80 GB, checkpointing"
             " | sample() rows per call, 40 / 80 GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in PLAN_PRESETS:
        m = memory_plan(preset, "80 GB")
        ck = memory_plan(preset, "80 GB", checkpointing=True)
        config = vg.VARConfig.preset(preset)
        logits = 4 * config.seq_len * config.vocab_size * vr.LOGITS_TENSORS
        weights = sum(m.resident.values()) - m.resident["CLIP"]
        cells = [preset, f"{param_counts(preset)[0] / 1e6:.0f} M", f"{weights / 2**30:.1f}",
                 f"{m.resident['CLIP'] / 2**30:.2f}", f"{m.pass_fixed['gradients'] / 2**30:.2f}",
                 f"{m.pass_fixed['weight casts'] / 2**30:.2f}",
                 f"{m.per_sample / 2**30:.2f} ({logits / 2**30:.2f})", f"{ck.per_sample / 2**30:.2f}"]
        for card in CARDS:
            for checkpointing in (False, True):
                plan = memory_plan(preset, card, checkpointing=checkpointing)
                cells.append(fit_cell(plan))
        rows = [memory_plan(preset, card).sample_rows for card in CARDS]
        cells.append(" / ".join(str(n) if n else "does not fit" for n in rows))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "| model | on 80 GB (GiB): update, --micro-batch 0 | a sample() call,"
              " --sample-batch 0 | the reference's pass, 64 rows |", "|---|---|---|---|"]
    for preset in PLAN_PRESETS:
        m = memory_plan(preset, "80 GB")
        peaks = (m.update_peak, m.sample_peak, m.reference_peak)
        lines.append(f"| {preset} | " + " | ".join(f"{b / 2**30:.1f}" for b in peaks) + " |")

    lines += ["", "| model | static per GPU, 8 GPUs (GiB) | bf16 weight casts | gathered blocks"
              " | sampling copy | fp32 traffic per pass (GiB) | 40 GB | 40 GB, checkpointing"
              " | 80 GB | 80 GB, checkpointing |", "|---|---|---|---|---|---|---|---|---|---|"]
    for preset in PLAN_PRESETS:
        m = memory_plan(preset, "80 GB", world=8, fsdp=True)
        P = param_counts(preset)[0]
        static = sum(m.resident.values()) + m.pass_fixed["gradients"]
        traffic = 3 * 4 * P * 7 / 8  # all-gathers in forward and backward, reduce-scatter
        cells = [preset, f"{static / 2**30:.1f}", f"{m.pass_fixed['weight casts'] / 2**30:.2f}",
                 f"{m.pass_fixed['FSDP gathers'] / 2**30:.2f}", f"{4 * P / 2**30:.1f}",
                 f"{traffic / 2**30:.1f}"]
        for card in CARDS:
            for checkpointing in (False, True):
                plan = memory_plan(preset, card, world=8, fsdp=True, checkpointing=checkpointing)
                cells.append(fit_cell(plan))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bench_batches(preset: str, on_gpu: bool) -> dict:
    """The batch of each kind of row: (samples, teacher-forced rows, GRPO labels per step)."""
    if preset in ("tiny", "digits"):
        if on_gpu:
            return dict(sample=32, teacher=32, step=32)
        return dict(sample=16, teacher=16, step=4)
    if on_gpu:
        return dict(sample=32, teacher=16, step=32)
    return dict(sample=2, teacher=2, step=1)


def bench_child(row: str, device: str, extra=()) -> dict | str:
    """One row measured in a fresh process: its JSON, or the last line of its error."""
    import subprocess
    cmd = [sys.executable, __file__, "bench", "--row", row, "--device", device, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return res.stderr.strip().splitlines()[-1]
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_bench_row(preset: str, what: str, batch: int, r: dict | str, peak: float):
    """One line of the table: bench_child's measurement, or its error."""
    if isinstance(r, str):
        print(f"| {preset} | {what} | {batch} | failed: {r} |", flush=True)
        return

    flop_cols = "- | - | -"
    if r["flops"] is not None:
        per_s = r["flops"] / r["seconds"]
        flop_cols = (f"{r['flops'] / 1e9:.1f} | {per_s / 1e9:.1f}"
                     f" | {100 * per_s / peak:.0f}%")
    mem = "-"
    if r["peak_mem"] is not None:
        mem = gib(r["peak_mem"])
    print(f"| {preset} | {r.get('what', what)} | {batch} | {r['seconds']:.3f}"
          f" | {r['throughput']:.3g} {r['unit']} | "
          f"{flop_cols} | {mem} |", flush=True)


def preset_list(text: str) -> str:
    """argparse type of --presets: comma-separated names of vargrpo's presets."""
    unknown = [p for p in text.split(",") if p not in vg.PRESETS]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f"unknown preset {','.join(unknown) or text!r}; choose"
                                         f" from {', '.join(vg.PRESETS)}")
    return text


def int_list(text: str) -> str:
    """argparse type of a comma-separated list of whole numbers ('' for none)."""
    try:
        [int(v) for v in text.split(",") if text]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas,"
                                         " e.g. 0,1,2") from None
    return text


def seed_list(text: str) -> str:
    """argparse type of --seeds / --sweep-seeds: at least one whole number, comma-separated."""
    if not text:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return int_list(text)


def bench(args):
    device = args.device
    if not device:
        device = "cpu"
        if torch.cuda.is_available():
            device = "cuda"
    if args.memory:
        bench_memory(args.presets)
        return
    if args.memory_plan:
        print("\n".join(memory_plan_tables()))
        return
    if args.row:  # child process: one measurement, printed as JSON
        preset, what, batch = args.row.split(":")
        print(json.dumps(bench_row(preset, what, int(batch), device, args.official_var)))
        return

    peak = matmul_peak_flops(device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        name = torch.cuda.get_device_name()
    else:
        name = f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), torch {torch.__version__},"
          f" measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    whats = ["sample cfg=0", "sample cfg+top-k/p"]
    if args.official_var:
        whats.append("official sample cfg+top-k/p")
    whats += ["teacher-forced fwd", "teacher-forced fwd+bwd",
              "teacher-forced fwd+bwd, grad checkpointing", "GRPO step"]
    header = ("| preset | what | batch | s/call | throughput | GFLOP/call | GFLOP/s"
              " | % of matmul peak | peak memory |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    for preset in args.presets.split(","):
        batches = bench_batches(preset, on_gpu)
        for what in whats:
            batch = batches["sample"]
            if what.startswith("teacher"):
                batch = batches["teacher"]
            if what == "GRPO step":  # labels per step
                batch = batches["step"]
            extra = []
            if args.official_var:
                extra = ["--official-var", args.official_var]
            r = bench_child(f"{preset}:{what}:{batch}", device, extra)
            print_bench_row(preset, what, batch, r, peak)

    for name in ("brightness", "aesthetic", "clip", "ocr", "ocr boxes"):
        n = 32
        preset = "256 px"
        if name.startswith("ocr"):
            preset = "64 px"
        if name == "ocr boxes":  # the detector: ~0.5 s an image
            n = 8
        r = bench_child(f"-:reward {name}:{n}", device)
        if isinstance(r, str):
            preset = "-"
        print_bench_row(preset, f"reward {name}", n, r, peak)
    if on_gpu:
        memory = "max CUDA memory allocated"
    else:
        memory = "peak RSS of the row process, Python and torch included"
    print(f"(peak memory: {memory}; sampler rows include decoding the images;"
          " teacher-forced rows compute per-token log-probs)")


# ----------------------------------------------------------------------------------------------
# gpu-check: one command for the day a GPU is at hand (`bash run.sh gpu-check`). A random-weight
# model of the preset trains 3 steps at the paper's shape (32 labels x 16 samples, minibatch 32,
# bf16, the aesthetic reward: CLIP ViT-L/14 and LAION's head, random weights, the same work) once
# per variant (plain, --grad-checkpointing, --fsdp), each in its own process: step 1 is timed (step
# 0 absorbs warm-up), step 2 runs under torch.profiler, which counts its launches. One JSON.

GPU_CHECK_VARIANTS = {"plain": [], "grad_checkpointing": ["--grad-checkpointing"],
                      "fsdp": ["--fsdp"]}
GPU_CHECK_PARTS = ("sample", "decode", "reward", "update")
# the trainer's function that runs each part
GPU_CHECK_STEPS = ("rollout", "decode", "score", "policy_update")


def gpu_check_shape(preset: str) -> dict:
    """The step measured: the paper's for an official preset (TrainArgs' defaults, written out), a
    small one with a tiny random CLIP for the tiny / digits presets."""
    if preset in vr.OFFICIAL_PRESETS:
        return dict(labels_per_step=32, group_size=16, minibatch=32, clip_model=None)
    return dict(labels_per_step=4, group_size=4, minibatch=8, clip_model="tiny-random")


def gpu_check_args(preset: str, device: str, variant: str, tmp: Path,
                   reward: str = "aesthetic") -> TrainArgs:
    """The trainer's settings of one variant (for the aesthetic reward, a random LAION head
    written into tmp)."""
    import reward_models as rm
    head = tmp / "aesthetic_head.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(rm.AestheticHead().state_dict(), head)

    return TrainArgs(preset=preset, random_init=True, reward=reward,
                     clip_pretrained="none", aesthetic_head=str(head),
                     out=str(tmp / "run"), steps=3, image_every=0, device=device,
                     dtype="bf16", grad_checkpointing=variant == "grad_checkpointing",
                     fsdp=variant == "fsdp", **gpu_check_shape(preset))


# The packages the check's step needs beyond torch and numpy (module: pip package). Without
# one, the variants run the brightness reward, and one line says what is missing.
GPU_CHECK_PACKAGES = {"open_clip": "open_clip_torch"}


def gpu_check_missing() -> dict:
    """The GPU_CHECK_PACKAGES (module: pip package) that this Python cannot import."""
    import importlib.util
    return {module: pip for module, pip in GPU_CHECK_PACKAGES.items()
            if importlib.util.find_spec(module) is None}


def no_checkpoint(self, policy, opt, step):
    """RunFolder.save in gpu-check: nothing written (and no gathering of shards: one process)."""
    return None


@contextlib.contextmanager
def patched(owner, replacements: dict):
    """owner's attributes replaced while the block runs; the originals put back after it,
    however it ends."""
    originals = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield originals
    finally:
        for name, value in originals.items():
            setattr(owner, name, value)


def count_launches(prof, device: str) -> dict:
    """Kernel launches of the profiled step, in total and per part: on a GPU the CUDA runtime's
    launch calls (cudaLaunchKernel and kin), on the CPU the aten ops that call no other aten op
    (each runs its own kernel). An event belongs to the part whose time range (on the CPU: the
    ranges' device copies are left out) holds its start (the backward pass runs on another thread
    on GPUs)."""
    from torch.autograd import DeviceType
    events = prof.events()
    ranges = {}
    for e in events:  # the CPU side of each range (on GPUs kineto also shows it on the device)
        if e.name.startswith("gpu-check:") and e.device_type == DeviceType.CPU:
            ranges[e.name.split(":", 1)[1]] = e.time_range

    on_gpu = str(device).startswith("cuda")
    if on_gpu:
        launches = [e for e in events if "LaunchKernel" in e.name]
        counter = "CUDA runtime kernel launches"
    else:
        launches = [e for e in events if e.name.startswith("aten::")
                    and not any(c.name.startswith("aten::") for c in e.cpu_children)]
        counter = "leaf aten ops (CPU)"

    per_part = {}
    for part, r in ranges.items():
        per_part[part] = sum(r.start <= e.time_range.start <= r.end for e in launches)
    return dict(launches_per_step=sum(per_part.values()), launches=per_part,
                launch_counter=counter)


def gpu_check_variant(preset: str, device: str, variant: str,
                      reward: str = "aesthetic") -> dict:
    """One variant, in this process (under torchrun for --fsdp): the trainer's 3 steps, with the
    step's parts wrapped in profiler ranges, its sample() calls counted, no checkpoint written.
    vargrpo's functions and RunFolder.save are the originals again when it returns or raises."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile, record_function
    on_gpu = device.startswith("cuda")
    seen = dict(step=0, calls={}, prof=None, metrics=[], peak=None)
    real = {name: getattr(vg, name) for name in (*GPU_CHECK_STEPS, "sample")}
    real["step_metrics"] = vr.step_metrics

    def in_range(part, fn):
        def run(*args, **kw):
            with record_function(f"gpu-check:{part}"):
                return fn(*args, **kw)
        return run

    def counted_sample(var, labels_B, **kw):
        seen["calls"].setdefault(seen["step"], []).append(len(labels_B))
        return real["sample"](var, labels_B, **kw)

    def metrics_then_profile(step, *args, **kw):
        m = real["step_metrics"](step, *args, **kw)
        seen["metrics"].append(m)
        seen["step"] = step + 1
        if step == 1:  # the timed step is done: its memory, then the profiled step
            seen["peak"] = peak_memory(device)
            if on_gpu:
                seen["reserved"] = torch.cuda.max_memory_reserved(device)
            activities = [ProfilerActivity.CPU]
            if on_gpu:
                activities.append(ProfilerActivity.CUDA)
            seen["prof"] = profile(activities=activities)
            seen["prof"].__enter__()
        if step == 2:
            vr.synced_time(device)
            seen["prof"].__exit__(None, None, None)
        return m

    wrapped = {}
    for part, name in zip(GPU_CHECK_PARTS, GPU_CHECK_STEPS):
        wrapped[name] = in_range(part, real[name])
    wrapped["sample"] = counted_sample
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with contextlib.ExitStack() as restore:
        restore.enter_context(patched(vg, wrapped))
        restore.enter_context(patched(vr, {"step_metrics": metrics_then_profile}))
        restore.enter_context(patched(vr.RunFolder, {"save": no_checkpoint}))
        tmp = restore.enter_context(tempfile.TemporaryDirectory())
        vg.train(gpu_check_args(preset, device, variant, Path(tmp), reward))

    m = seen["metrics"][1]
    out = {f"{part}_s": m[f"time/{part}"] for part in GPU_CHECK_PARTS}
    peak_kind = "peak RSS of the process"
    out["device_name"] = "cpu"
    if on_gpu:
        peak_kind = "torch.cuda.max_memory_allocated"
        out["device_name"] = torch.cuda.get_device_name(device)
        # what decides an out-of-memory: the allocator's pools, fragmentation included
        out["peak_memory_reserved_bytes"] = seen["reserved"]
    ratio_dev = max(r["policy/ratio_dev_first_minibatch"] for r in seen["metrics"])
    out.update(step_s=m["time/step"], samples_per_s=m["perf/samples_per_s"],
               peak_memory_bytes=seen["peak"], peak_memory_kind=peak_kind,
               ratio_dev_first_minibatch=ratio_dev,
               rows_per_sample_call=max(seen["calls"][1]),
               sample_calls_per_step=len(seen["calls"][1]),
               **count_launches(seen["prof"], device))
    return out


def gpu_check(args) -> dict:
    """`bash run.sh gpu-check`: every variant in its own process (killed after
    --child-timeout seconds), one JSON (--out) written again after each. This process never
    creates a CUDA context (~0.5 GiB the variants would lose): torch.cuda.is_available only
    counts the devices; the variants report the GPU's name."""
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        raise UsageError(f"gpu-check: no usable CUDA GPU ({build}: {vr.why_no_cuda()}); "
                         "`bash run.sh gpu-check --device cpu --preset tiny` runs the check on"
                         " the CPU")
    if args.variant:  # child process: one variant, printed as JSON (rank 0)
        result = gpu_check_variant(args.preset, device, args.variant, args.reward)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return result

    out = Path(args.out)  # checked before the minutes of measuring
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the JSON file gpu-check writes")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it (or --out"
                         " another file)")
    output_folder(out.parent, "the gpu-check JSON")
    timeout_s = args.child_timeout
    vr.need(math.isfinite(timeout_s) and timeout_s > 0,
            f"--child-timeout must be a positive number of seconds, got {timeout_s}")

    reward = "aesthetic"
    reward_text = "aesthetic, random weights"
    missing = gpu_check_missing()
    if missing:
        modules = ", ".join(missing)
        reward = "brightness"
        reward_text = f"brightness ({modules} not installed)"
        print(f"[gpu-check] {modules} is not installed (pip install"
              f" {' '.join(missing.values())}): the variants run the brightness reward"
              " instead of the aesthetic one (CLIP ViT-L/14 and its memory not measured)",
              flush=True)

    t0 = time.perf_counter()
    report = dict(device=device, device_name=None, torch=torch.__version__,
                  cuda=torch.version.cuda, preset=args.preset, dtype="bf16", steps=3,
                  shape=gpu_check_shape(args.preset), reward=reward_text,
                  child_timeout_s=args.child_timeout, variants={},
                  unfinished=list(GPU_CHECK_VARIANTS))
    write_report(out, report)
    for name, flags in GPU_CHECK_VARIANTS.items():
        v = gpu_check_child(name, flags, device, args.preset, reward, timeout_s)
        report["variants"][name] = v
        report["unfinished"].remove(name)
        report["device_name"] = report["device_name"] or v.get("device_name")
        report["wall_s"] = time.perf_counter() - t0
        write_report(out, report)  # a later variant that fails keeps this one's numbers
        print(f"[gpu-check] {name}: {json.dumps(v)}", flush=True)

    print(f"[gpu-check] wrote {out} ({report['wall_s']:.0f} s)")
    failed = [name for name, v in report["variants"].items() if "error" in v]
    if failed:
        raise vg.RunFailed(f"gpu-check: {', '.join(failed)} failed; {out} holds the error and"
                           " the last lines of its stderr")
    return report


def write_report(out: Path, report: dict):
    """The JSON, replaced atomically (a reader never sees half of it)."""
    text = json.dumps(report, indent=1).encode()

    def write(f):
        f.write(text)

    vr.atomic_write(out, write)


def gpu_check_command(name: str, device: str, preset: str, reward: str) -> list:
    """The command of one variant's process (--fsdp under torchrun, one process)."""
    cmd = [__file__, "gpu-check", "--variant", name, "--device", device, "--preset", preset,
           "--reward", reward]
    if name == "fsdp":
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *cmd]
    return [sys.executable, *cmd]


STDERR_TAIL = 30  # lines of a failed variant's stderr kept in the JSON


def gpu_check_child(name: str, flags: list, device: str, preset: str, reward: str,
                    timeout_s: float) -> dict:
    """One variant in its own process group: its JSON, or its error and the last STDERR_TAIL
    lines of its stderr. Past timeout_s the whole group is killed (torchrun and its trainer
    too: a hung NCCL or FSDP call never ends by itself)."""
    import subprocess
    cmd = gpu_check_command(name, device, preset, reward)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    error = None
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        error = f"killed after --child-timeout {timeout_s:g} s (hung or too slow)"

    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if error is None and proc.returncode == 0 and lines:
        return dict(flags=flags, **json.loads(lines[-1]))
    tail = stderr.strip().splitlines()[-STDERR_TAIL:]
    if error is None:
        error = (tail or [f"exit code {proc.returncode}, no output"])[-1][:300]
    return dict(flags=flags, error=error, exit_code=proc.returncode, stderr_tail=tail)


# ----------------------------------------------------------------------------------------------
# The digits model: a class-conditional VAR that has learned something, made on the CPU from
# images the program renders (digits 0-9 in Pillow's default font), with its tokenizer and a
# judge (a digit classifier, also a learned reward). `python vargrpo_tools.py prepare` builds it
# into weights/ (shipped: it took 53 minutes on one CPU thread); the trainer loads it as
# `--preset digits`.


@dataclass
class DigitsRecipe:
    """Every number of the preparation (the defaults are what built the shipped weights)."""
    preset: str = "digits"           # the VARConfig preset built
    seed: int = 1                    # training images; the held-out set uses seed + 998
    train_images: int = 60000
    heldout_images: int = 1000
    tok_steps: int = 4600            # tokenizer: AdamW (0.9, 0.95), batch 16, bf16 autocast
    tok_batch: int = 16
    tok_lr: float = 5e-4
    # first 40% of the steps: a plain autoencoder (no quantizer)
    tok_ae_frac: float = 0.4
    # then 5% of the steps blending the latent into its quantization
    tok_blend_frac: float = 0.05
    tok_beta: float = 0.25           # commitment weight
    # codes unused for this many steps restart at a random latent
    tok_restart_every: int = 25
    judge_steps: int = 300
    judge_batch: int = 128
    judge_lr: float = 3e-3
    # VAR: next-scale cross-entropy, AdamW (0.9, 0.95), batch 64, bf16
    var_steps: int = 6000
    var_batch: int = 64
    var_lr: float = 1e-3
    var_weight_decay: float = 0.05
    label_dropout: float = 0.1       # to the null class, so that CFG works at inference
    # bf16 autocast for the tokenizer, tokenization and VAR (needs a CPU with bf16 units)
    bf16: bool = True
    # copy the shipped judge (weights/judge_digits.safetensors) instead of training one
    reuse_judge: bool = False
    judge2_steps: int = 0            # the second judge (reward_models.DigitJudge2); 0: none
    judge2_images: int = 20000       # rendered with seed + 2000 (its own images)
    judge2_lr: float = 2e-3
    reuse_judge2: bool = False       # copy the shipped second judge instead of training one
    # --quick: steps of the tokenizer, the judges, the VAR
    quick_steps: tuple = (200, 100, 300)
    # digits per image: 1 (class = the digit) or 2 (numbers: class = "00"-"99")
    digits: int = 1
    # steps between saves of the tokenizer's and the VAR's progress (resuming)
    save_every: int = 50


# The recipe of each digits preset. digits7 (64 px, 8x tokenizer, 155 tokens) is sized for ~90
# minutes on one thread of a CPU without bf16 units, where bf16 autocast was 3-5x slower than
# fp32 (measured there, fp32: tokenizer 1.5 s/step as an autoencoder, 1.9 quantizing; VAR 1.9
# s/step; tokenization 60 img/s). Its reconstructions were legible early (30 steps: 93% judge
# accuracy), so the VAR gets the larger share.
DIGITS_RECIPES = {
    "digits": DigitsRecipe(),
    "digits7": DigitsRecipe(preset="digits7", train_images=20000, tok_steps=1200,
                            var_steps=1400, bf16=False, reuse_judge=True,
                            judge2_steps=400, quick_steps=(30, 30, 20)),
    # two-digit numbers 00-99 (class = the number), judged one half at a time: the shipped
    # judge, and a second judge trained on halves of numbers
    "numbers": DigitsRecipe(preset="numbers", digits=2, train_images=30000,
                            tok_steps=1200, var_steps=3000, bf16=False,
                            reuse_judge=True, judge2_steps=400, judge2_images=10000,
                            quick_steps=(30, 30, 20)),
}


# The text each rendering draws: one digit (digits, digits7), or two (numbers: "00"-"99").
# Per digit count: font size as a fraction of the image, stroke width (x size/24; two digits
# thinner, so that they never merge) and the largest rotation (deg).
TEXT_LAYOUT = {1: dict(size=(0.65, 0.85), bold=(0.7, 2.0), angle=15.0),
               2: dict(size=(0.44, 0.58), bold=(0.6, 1.3), angle=8.0)}


@torch.no_grad()
def render_digits(n: int, seed: int, res: int = 64, digits: int = 1):
    """n images of the numbers 0 .. 10**digits - 1 written with `digits` digits
    (class-balanced: label i % 10**digits, shuffled; digits=2 draws "00" to "99"),
    deterministic from `seed`: Pillow's scalable default font at a random size (TEXT_LAYOUT:
    0.65-0.85 of the image for one digit), stroke width (one digit: 0.7-2 x size/24, the
    'boldness' the judge learns), position (the middle 30% of the free range) and rotation (one
    digit: +-15 deg); half of them dark digits on a light background, half the reverse, each
    colour slightly tinted. Drawn at 2x and box-downsampled. Returns (uint8 (n, 3, res, res),
    labels (n,), boldness (n,))."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    R = 2 * res
    layout = TEXT_LAYOUT[digits]
    labels = rng.permutation(np.arange(n) % 10 ** digits)
    size = rng.uniform(*layout["size"], n) * R
    bold = rng.uniform(*layout["bold"], n)
    angle = rng.uniform(-layout["angle"], layout["angle"], n)
    light_bg = rng.random(n) < 0.5
    # the draws in this order: light, dark, tint of the background, then of the digits
    light = rng.uniform(0.55, 1.0, n)
    dark = rng.uniform(0.0, 0.45, n)
    tint = rng.uniform(-0.06, 0.06, (n, 3))
    bg = np.clip(np.where(light_bg, light, dark)[:, None] + tint, 0, 1)
    dark = rng.uniform(0.0, 0.3, n)
    light = rng.uniform(0.7, 1.0, n)
    tint = rng.uniform(-0.06, 0.06, (n, 3))
    fg = np.clip(np.where(light_bg, dark, light)[:, None] + tint, 0, 1)
    # measured: a wider layout cost about 40% of the samples' class accuracy
    shift = rng.uniform(0.35, 0.65, (n, 2))
    images = np.empty((n, 3, res, res), np.uint8)
    boldness = np.empty(n, np.float32)

    for i in range(n):
        font = ImageFont.load_default(size=int(round(size[i])))
        s = int(round(size[i]))
        stroke = max(1, int(round(bold[i] * s / 24)))
        boldness[i] = stroke * 24 / s
        glyph = Image.new("L", (R, R), 0)
        draw = ImageDraw.Draw(glyph)
        text = f"{labels[i]:0{digits}d}"
        gap = s / 10  # between the digits of a number: apart, whatever the stroke
        boxes = [draw.textbbox((0, 0), ch, font=font, stroke_width=stroke) for ch in text]
        x = (R - sum(x1 - x0 for x0, _, x1, _ in boxes) - gap * (len(text) - 1)) / 2
        _, y0, _, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        for ch, (x0, _, x1, _) in zip(text, boxes):  # one digit: centred, as always
            draw.text((x - x0, (R - y1 - y0) / 2), ch, fill=255, font=font,
                      stroke_width=stroke, stroke_fill=255)
            x += x1 - x0 + gap
        glyph = glyph.rotate(angle[i], resample=Image.BICUBIC)
        bx0, by0, bx1, by1 = glyph.getbbox()
        margin = R // 32
        canvas = Image.new("L", (R, R), 0)
        free_x = max(0, R - 2 * margin - (bx1 - bx0))
        free_y = max(0, R - 2 * margin - (by1 - by0))
        corner = (int(round(margin - bx0 + shift[i, 0] * free_x)),
                  int(round(margin - by0 + shift[i, 1] * free_y)))
        canvas.paste(glyph, corner)
        alpha = np.asarray(canvas.resize((res, res), Image.BOX), np.float32)[None] / 255
        mixed = bg[i][:, None, None] * (1 - alpha) + fg[i][:, None, None] * alpha
        images[i] = np.round(mixed * 255)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(boldness)


def to_m11(images_u8):
    """uint8 images -> float in [-1, 1] (the tokenizer's input range)."""
    return images_u8.float() / 127.5 - 1


def st_quantize(vae: vg.VQVAE, f_BChw, beta: float):
    """The multi-scale residual quantizer of f_to_idx, differentiable: the same codes are
    chosen, the quantized latent passes the decoder's gradient straight through to f, and the
    loss trains the codebook and Phi (f_hat after each scale towards f) and commits f to the
    codes. Returns (straight-through latent, loss, [(B, pn*pn)] codes per scale)."""
    target = f_BChw.detach()
    f_hat = torch.zeros_like(f_BChw)
    loss = 0.0
    codes = []
    for idx_Bl, h_BChw in residual_scales(vae.quantize, f_BChw):
        f_hat = f_hat + h_BChw
        loss = loss + F.mse_loss(f_hat, target) + beta * F.mse_loss(f_hat.detach(), f_BChw)
        codes.append(idx_Bl)
    return f_BChw + (f_hat - f_BChw).detach(), loss / len(codes), codes


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 100,
              floor: float = 0.05) -> float:
    cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
    return lr * min(1, (step + 1) / warmup) * (floor + (1 - floor) * cosine)


def load_progress(path: Path | None):
    """A part's saved progress (save_progress), or None where there is none."""
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_progress(path: Path | None, state: dict):
    """Write a part's progress under a temporary name, then rename: a kill leaves the old
    file."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore_progress(progress: Path | None, model, opt, gen, what: str, log) -> dict | None:
    """A training part's saved progress put back into its model, optimizer and batch
    generator; the saved state (its step, and the part's own fields), or None."""
    state = load_progress(progress)
    if state is None:
        return None

    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["generator"])
    log(f"[prepare] {what}: going on from step {state['step']} ({progress})")
    return state


def train_tokenizer(images_u8, config: vg.VARConfig, r: DigitsRecipe, steps=None,
                    log=print, progress: Path | None = None) -> vg.VQVAE:
    """The official-architecture VQVAE of `config` trained on the images: L1 + MSE
    reconstruction, first as a plain autoencoder, then through the quantizer (codebook
    initialised from encoder outputs, dead codes restarted). Residual branches start at zero and
    Phi at the identity (the weights keep the official layout; measured: other inits train
    several times slower). progress: a file that holds the training's state every r.save_every
    steps, and that a later call goes on from (bit-exact: weights, optimizer, batch generator,
    code usage)."""
    steps = steps or r.tok_steps
    g = torch.Generator().manual_seed(r.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        vae = vg.VQVAE(config)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, (vg.ResnetBlock, vg.AttnBlock)):
                out = m.conv2 if isinstance(m, vg.ResnetBlock) else m.proj_out
                out.weight.zero_(), out.bias.zero_()
        for phi in vae.quantize.quant_resi.qresi_ls:
            phi.weight.zero_(), phi.bias.zero_()
            phi.weight[:, :, 1, 1] = torch.eye(config.z_channels)
    opt = torch.optim.AdamW(vae.parameters(), r.tok_lr, betas=(0.9, 0.95), weight_decay=0.0)
    usage = torch.zeros(config.vocab_size)
    quantizing = False
    t0 = time.perf_counter()
    start = 0

    state = restore_progress(progress, vae, opt, g, "tokenizer", log)
    if state is not None:
        usage = state["usage"]
        quantizing = state["quantizing"]
        start = state["step"]

    from tqdm import tqdm
    for step in tqdm(range(start, steps), desc="tokenizer", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, r.tok_lr)
        x = to_m11(images_u8[torch.randint(len(images_u8), (r.tok_batch,), generator=g)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            f = vae.quant_conv(vae.encoder(x)).float()
            # the codebook starts as encoder outputs of every scale
            if step >= r.tok_ae_frac * steps and not quantizing:
                quantizing = True
                with torch.no_grad():
                    f0 = vae.quant_conv(vae.encoder(to_m11(images_u8[:512]))).float()
                    z = torch.cat([
                        F.interpolate(f0, size=(pn, pn), mode="area")
                        .permute(0, 2, 3, 1).reshape(-1, config.z_channels)
                        for pn in config.patch_nums])
                    chosen = torch.randperm(len(z), generator=g)[:config.vocab_size]
                    vae.quantize.embedding.weight.copy_(0.5 * z[chosen])

            vq_loss = torch.zeros(())
            latent = f
            if quantizing:
                f_st, vq_loss, codes = st_quantize(vae, f, r.tok_beta)
                ramp = max(1, r.tok_blend_frac * steps)
                blend = min(1.0, (step - r.tok_ae_frac * steps) / ramp)
                latent = f + blend * (f_st - f)
                used = torch.cat(codes, 1).flatten()
                usage += torch.bincount(used, minlength=config.vocab_size)
            y = vae.decoder(vae.post_quant_conv(latent)).float()
        loss = F.mse_loss(y, x) + F.l1_loss(y, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()

        # unused codes restart at residuals of this batch
        if quantizing and (step + 1) % r.tok_restart_every == 0:
            dead = (usage == 0).nonzero().flatten()
            with torch.no_grad():
                rest = f.detach()
                candidates = []
                for si, (pn, idx_Bl) in enumerate(zip(config.patch_nums, codes)):
                    z = rest
                    if si != len(codes) - 1:
                        z = F.interpolate(rest, size=(pn, pn), mode="area")
                    candidates.append(z.permute(0, 2, 3, 1).reshape(-1, config.z_channels))
                    h = vae.quantize.embed(idx_Bl)
                    rest = rest - vae.quantize.add_scale(torch.zeros_like(rest), h, si)
                z = torch.cat(candidates)
                picks = torch.randint(len(z), (len(dead),), generator=g)
                vae.quantize.embedding.weight[dead] = z[picks]
            usage.zero_()

        if step % 500 == 0 or step == steps - 1:
            log(f"[prepare] tokenizer step {step}: loss {loss.item():.4f}"
                f" ({time.perf_counter() - t0:.0f} s)")
        if (step + 1) % r.save_every == 0 or step == steps - 1:
            state = dict(step=step + 1, model=vae.state_dict(), opt=opt.state_dict(),
                         generator=g.get_state(), usage=usage, quantizing=quantizing)
            save_progress(progress, state)
    return vae.eval().requires_grad_(False)


def soften(x_B3HW):
    """A 5-tap binomial-like blur (replicate padding): the judges' augmentation."""
    kernel = torch.tensor([0.06, 0.24, 0.4, 0.24, 0.06])
    x = F.pad(x_B3HW, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, kernel.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)


def train_judge(images_u8, labels, boldness, r: DigitsRecipe, steps=None):
    """The judge (reward_models.DigitJudge): digit class and boldness, trained with a blur on
    half of its inputs (generated images are softer than rendered ones)."""
    import reward_models as rm
    steps = steps or r.judge_steps
    g = torch.Generator().manual_seed(r.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        judge = rm.DigitJudge()
    judge.boldness_mean.fill_(boldness.mean())
    judge.boldness_std.fill_(boldness.std())
    opt = torch.optim.AdamW(judge.parameters(), r.judge_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r.judge_lr, total_steps=steps,
                                                pct_start=0.15)
    x32 = F.interpolate(images_u8.float() / 255, size=(32, 32), mode="area")

    judge.train()
    for _ in range(steps):
        i = torch.randint(len(x32), (r.judge_batch,), generator=g)
        x = x32[i]
        blur = torch.rand(r.judge_batch, generator=g) < 0.5
        logits, bold = judge.heads(torch.where(blur[:, None, None, None], soften(x), x))
        bold_target = (boldness[i] - judge.boldness_mean) / judge.boldness_std
        loss = F.cross_entropy(logits, labels[i]) + F.mse_loss(bold, bold_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return judge.eval().requires_grad_(False)


def train_judge2(images_u8, labels, r: DigitsRecipe, steps=None):
    """The second judge (reward_models.DigitJudge2, class only): its own init seed, the same
    blur on half of its inputs, on images the caller renders with another seed than the first
    judge's."""
    import reward_models as rm
    steps = steps or r.judge2_steps
    g = torch.Generator().manual_seed(r.seed + 2000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed + 2000)
        judge = rm.DigitJudge2()
    opt = torch.optim.AdamW(judge.parameters(), r.judge2_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r.judge2_lr, total_steps=steps,
                                                pct_start=0.15)
    x32 = F.interpolate(images_u8.float() / 255, size=(32, 32), mode="area")

    judge.train()
    for _ in range(steps):
        i = torch.randint(len(x32), (r.judge_batch,), generator=g)
        x = x32[i]
        blur = torch.rand(r.judge_batch, generator=g) < 0.5
        logits = judge(torch.where(blur[:, None, None, None], soften(x), x))
        loss = F.cross_entropy(logits, labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def tokenize(vae: vg.VQVAE, images_u8, batch: int = 200, bf16: bool = False):
    """The tokenizer's codes of the images, (N, L). bf16: under bf16 autocast, ~3x faster on
    this CPU (measured: 88% of the codes equal fp32's, the rest near-ties; used for the VAR's
    training data only)."""
    from tqdm import tqdm
    starts = tqdm(range(0, len(images_u8), batch), desc="tokenize", mininterval=10,
                  disable=len(images_u8) <= 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([img_to_idx(vae, to_m11(images_u8[i:i + batch])) for i in starts])


def train_var(vae: vg.VQVAE, idx_NL, labels, config: vg.VARConfig, r: DigitsRecipe,
              steps=None, log=print, progress: Path | None = None) -> vg.VAR:
    """Class-conditional pretraining by next-scale cross-entropy on the tokenizer's codes: the
    same teacher-forced forward the RL uses, with the labels dropped to the null class 10% of
    the time (pretraining only) so that classifier-free guidance works at inference. progress:
    as in train_tokenizer (weights, optimizer, batch generator)."""
    steps = steps or r.var_steps
    g = torch.Generator().manual_seed(r.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        var = official_init_(vg.VAR(config, vae))
    opt = torch.optim.AdamW(var.parameters(), r.var_lr, betas=(0.9, 0.95),
                            weight_decay=r.var_weight_decay)
    start = 0

    state = restore_progress(progress, var, opt, g, "VAR", log)
    if state is not None:
        start = state["step"]

    from tqdm import tqdm
    t0 = time.perf_counter()
    for step in tqdm(range(start, steps), desc="VAR", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, r.var_lr)
        i = torch.randint(len(idx_NL), (r.var_batch,), generator=g)
        drop = torch.rand(r.var_batch, generator=g) < r.label_dropout
        dropped = torch.where(drop, config.num_classes, labels[i])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            logits = var(dropped, idx_NL[i]).float()
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), idx_NL[i].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()

        if step % 1000 == 0 or step == steps - 1:
            log(f"[prepare] VAR step {step}: cross-entropy {loss.item():.3f} nats/token"
                f" ({time.perf_counter() - t0:.0f} s)")
        if (step + 1) % r.save_every == 0 or step == steps - 1:
            state = dict(step=step + 1, model=var.state_dict(), opt=opt.state_dict(),
                         generator=g.get_state())
            save_progress(progress, state)
    return var.eval()


@torch.no_grad()
def judge_accuracy(judge, images01, labels, batch: int = 500) -> float:
    """The share of images the judge (DigitJudge or DigitJudge2) reads as their label."""
    def classify(x):
        if hasattr(judge, "heads"):
            return judge.heads(x)[0]
        return judge(x)

    starts = range(0, len(images01), batch)
    read = torch.cat([classify(images01[i:i + batch]).argmax(1) for i in starts])
    return float(read.eq(labels).float().mean())


@torch.no_grad()
def sample_images(var: vg.VAR, labels, seed: int, batch: int = 100, **sampling):
    """Images of `labels` in calls of `batch` rows, drawn from one generator seeded with
    `seed`."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(labels), batch):
        out = vg.sample(var, labels[i:i + batch], generator=gen, **sampling)
        images.append(out.images.float())
    return torch.cat(images)


def sample_accuracy(var: vg.VAR, judge, n: int, seed: int, **sampling) -> float:
    """The judge's accuracy on n samples of the labels 0-9 in turn (fixed seed)."""
    labels = torch.arange(n) % var.config.num_classes
    return judge_accuracy(judge, sample_images(var, labels, seed, **sampling), labels)


DIGITS_FILES = {"vae": "vae_digits.safetensors", "var": "var_digits.safetensors",
                "judge": "judge_digits.safetensors"}


def digits_files(r: DigitsRecipe) -> dict:
    """The weight files prepare writes for the recipe's preset (digits: DIGITS_FILES)."""
    p = r.preset
    files = {"vae": f"vae_{p}.safetensors", "var": f"var_{p}.safetensors",
             "judge": f"judge_{p}.safetensors"}
    if r.reuse_judge:
        files["judge"] = DIGITS_FILES["judge"]
    # one second judge for the digits presets: it reads 28 px, whatever the size
    if r.judge2_steps or r.reuse_judge2:
        files["judge2"] = f"judge2_{p}.safetensors"
        if r.digits == 1:
            files["judge2"] = "judge2_digits.safetensors"
    return files


def reused_files(r: DigitsRecipe) -> dict:
    """{name: shipped file} of the judges the recipe copies instead of training."""
    import reward_models as rm
    shipped = {"judge": rm.DIGIT_JUDGE if r.reuse_judge else None,
               "judge2": rm.DIGIT_JUDGE2 if r.reuse_judge2 else None}
    return {name: path for name, path in shipped.items() if path is not None}


@torch.no_grad()
def halves(images_B3HW):
    """The left and right halves of the middle 5/8 of each image's rows, each padded (edge
    colour) to a square: what the digit judges read of a two-digit number, one digit each, at
    the size they were trained on (measured: the first judge reads 100% of rendered numbers
    so)."""
    h, w = images_B3HW.shape[-2:]
    side = round(h * 5 / 8)
    band = images_B3HW[..., (h - side) // 2:(h - side) // 2 + side, :]
    pad = side - w // 2
    pads = (pad // 2, pad - pad // 2, 0, 0)
    left = band[..., :w // 2]
    right = band[..., w // 2:]
    return [F.pad(half, pads, mode="replicate") for half in (left, right)]


def judge_accuracies(judge, images01, labels, digits: int, prefix: str) -> dict:
    """The judge's accuracy on the images: one figure for a digit, one per half (tens, units)
    for a two-digit number."""
    if digits == 1:
        return {prefix: judge_accuracy(judge, images01, labels)}
    tens, units = halves(images01)
    return {f"{prefix}_tens": judge_accuracy(judge, tens, labels // 10),
            f"{prefix}_units": judge_accuracy(judge, units, labels % 10)}


class PrepareWork:
    """prepare's progress, in OUT/.prepare-<preset>/ while it runs: each finished part's
    result and the tokenizer's and the VAR's training state, so that a prepare that was stopped
    (Ctrl-C, a kill, a reboot) goes on where it was when run again with the same flags. Made at
    the first save; removed when the model's files are written."""

    def __init__(self, out: Path, r: DigitsRecipe, quick: bool):
        self.folder = out / f".prepare-{r.preset}"
        self.plan = {"recipe": json.loads(json.dumps(asdict(r))), "quick": quick}

    def check(self):
        """Refuse progress made with other flags or another recipe (one line)."""
        plan = self.folder / "plan.json"
        if not plan.is_file():
            return
        if json.loads(plan.read_text()) != self.plan:
            raise UsageError(f"{self.folder} holds the progress of a prepare with other"
                             " settings (--quick, or another recipe); run that command again"
                             " to finish it, or delete that folder to start anew")

    def path(self, name: str) -> Path:
        """The file that holds part `name` (made with its folder on first use)."""
        if not self.folder.is_dir():
            self.folder.mkdir()
            (self.folder / "plan.json").write_text(json.dumps(self.plan, indent=1))
        return self.folder / f"{name}.pt"

    def done(self) -> list:
        """The parts saved so far."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.pt"))

    def result(self, name: str, make):
        """Part `name`'s saved tensors (a dict), else make() saved."""
        state = load_progress(self.folder / f"{name}.pt")
        if state is None:
            state = make()
            save_progress(self.path(name), state)
        return state

    def remove(self):
        """Delete the progress: exactly the files this class writes."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name == "plan.json" or path.suffix in (".pt", ".tmp"):
                path.unlink()
        self.folder.rmdir()


def prepare(out: Path, r: DigitsRecipe, quick: bool = False, overwrite: bool = False) -> dict:
    """Data -> tokenizer -> judge(s) -> VAR, each measured on held-out data; the weights (fp16)
    go to `out` as the files load_pretrained(r.preset) and reward_models.load_digit_judge read,
    with <preset>.json (the recipe, the measurements, the times, the files' sha256). With
    r.reuse_judge the shipped judge is copied instead of trained; with r.judge2_steps a second
    judge (another architecture, its own images) reports a second opinion on the class
    accuracies (r.reuse_judge2: the shipped one). Numbers (r.digits = 2) are judged one half of
    the image at a time. Resumable (PrepareWork): run again, it goes on where it stopped.
    quick: a few steps of each, on 256 images (smoke tests)."""
    files = digits_files(r)
    reused = {files[name]: shipped for name, shipped in reused_files(r).items()}
    check_prepare_out(out, r, files, reused, overwrite)
    work = PrepareWork(out, r, quick)
    work.check()
    if work.done():
        print(f"[prepare] {r.preset}: going on from {work.folder}"
              f" (saved: {', '.join(work.done())})", flush=True)

    config = vg.VARConfig.preset(r.preset)
    laps = vr.StepClock()  # the time of each part
    n_train, n_held = (r.train_images, r.heldout_images)
    tok_steps, judge_steps, var_steps = (None, None, None)
    if quick:
        n_train, n_held = (256, 100)
        tok_steps, judge_steps, var_steps = r.quick_steps
    print(f"[prepare] {r.preset}: rendering {n_train} + {n_held} images", flush=True)
    train_u8, train_y, train_bold = render_digits(n_train, r.seed, config.image_size, r.digits)
    held_u8, held_y, _ = render_digits(n_held, r.seed + 998, config.image_size, r.digits)
    laps.lap("render")

    vae = train_tokenizer(train_u8, config, r, steps=tok_steps, log=print_now,
                          progress=work.path("tokenizer"))
    laps.lap("tokenizer")
    judge = prepare_judge(work, r, train_u8, train_y, train_bold, judge_steps)
    laps.lap("judge")
    judge2 = prepare_judge2(work, r, config, quick, judge_steps)
    if judge2 is not None and not r.reuse_judge2:
        laps.lap("judge2")

    def make_tokens():
        return {"idx": tokenize(vae, train_u8, bf16=r.bf16)}

    idx = work.result("tokens", make_tokens)["idx"]
    laps.lap("tokenize")
    var = train_var(vae, idx, train_y, config, r, steps=var_steps, log=print_now,
                    progress=work.path("var"))
    laps.lap("var")

    held = (held_u8, held_y)
    results = prepare_results(vae, var, (judge, judge2), held, r, quick)
    laps.lap("evaluation")

    times = {name: round(seconds, 1) for name, seconds in laps.times.items()}
    modules = {"vae": vae, "var": var, "judge": judge, "judge2": judge2}
    summary = {"config": asdict(config), "recipe": asdict(r), "quick": quick,
               "results": results, "seconds": times,
               "torch_threads": torch.get_num_threads()}
    write_model_files(out, files, reused, modules, summary, f"{r.preset}.json")
    work.remove()
    print(f"[prepare] {r.preset}: {json.dumps(results)}; {sum(times.values()):.0f} s",
          flush=True)
    return summary


def print_now(message: str):
    print(message, flush=True)


def check_prepare_out(out: Path, r: DigitsRecipe, files: dict, reused: dict, overwrite: bool):
    """Refuse an --out that holds the model's files already (the shipped judges a recipe
    copies excepted, when they are the same bytes), or a recipe whose shipped judges are
    missing."""
    def same(file):
        if not (out / file).is_file():
            return False
        return (out / file).read_bytes() == reused[file].read_bytes()

    output_folder(out, "the weights")
    there = []
    for name in [*files.values(), f"{r.preset}.json"]:
        if (out / name).exists() and not (name in reused and same(name)):
            there.append(name)
    if there and not overwrite:
        raise UsageError(f"{out} already holds {', '.join(there)}; pass --overwrite to replace"
                         " them (or --out another folder)")
    for record in sorted(out.glob("*.json")):
        if record.name == f"{r.preset}.json":
            continue
        listed = recorded_files(record)
        shared = [name for name in there if name in listed]
        if shared:
            raise UsageError(f"{out / shared[0]} is part of the model {record} records; prepare"
                             f" --preset {r.preset} would change it under that model: pass --out"
                             " another folder")
    for shipped in reused.values():
        if not shipped.is_file():
            raise UsageError(f"{shipped} is missing: the {r.preset} recipe reuses the shipped"
                             " digits judges")


def recorded_files(record: Path) -> dict:
    """{file: sha256} that a <preset>.json lists ({} for another JSON file)."""
    try:
        listed = json.loads(record.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(listed, dict):
        return {}
    return listed


def prepare_judge(work: PrepareWork, r: DigitsRecipe, train_u8, train_y, train_bold,
                  steps):
    """The first judge: the shipped one (r.reuse_judge), else trained (PrepareWork's part
    "judge")."""
    import reward_models as rm
    if r.reuse_judge:
        return rm.load_digit_judge(path=rm.DIGIT_JUDGE)

    def make():
        return train_judge(train_u8, train_y, train_bold, r, steps=steps).state_dict()

    judge = rm.DigitJudge()
    judge.load_state_dict(work.result("judge", make))
    judge.eval().requires_grad_(False)
    return judge


def prepare_judge2(work: PrepareWork, r: DigitsRecipe, config, quick: bool, steps):
    """The second judge: the shipped one (r.reuse_judge2), else trained on its own images when
    r.judge2_steps (PrepareWork's part "judge2"), else None."""
    import reward_models as rm
    if r.reuse_judge2:
        return rm.load_digit_judge2(path=rm.DIGIT_JUDGE2)
    if not r.judge2_steps:
        return None

    def make():  # numbers: a second judge of their halves (the digits' one reads them poorly)
        n = r.judge2_images
        if quick:
            n = 256
        judge2_u8, judge2_y, _ = render_digits(n, r.seed + 2000, config.image_size, r.digits)
        if r.digits == 2:
            judge2_u8 = torch.cat(halves(judge2_u8.float())).round().to(torch.uint8)
            judge2_y = torch.cat([judge2_y // 10, judge2_y % 10])
        return train_judge2(judge2_u8, judge2_y, r, steps=steps).state_dict()

    judge2 = rm.DigitJudge2()
    judge2.load_state_dict(work.result("judge2", make))
    judge2.eval().requires_grad_(False)
    return judge2


def prepare_results(vae, var, judges, held, r: DigitsRecipe, quick: bool) -> dict:
    """prepare's measurements: the tokenizer's PSNR on held-out images, and each judge's
    accuracy on them, on their reconstructions and on the VAR's samples (T = 1 and with
    DIGITS_CFG)."""
    held_u8, held_y = held
    held01 = held_u8.float() / 255
    n_held = len(held_u8)
    reconstructions = torch.cat([vae.idx_to_img(tokenize(vae, held_u8[i:i + 200]))
                                 for i in range(0, n_held, 200)])
    n = 1000
    if quick:
        n = 100
    labels = torch.arange(n) % var.config.num_classes
    samples_t1 = sample_images(var, labels, seed=7)
    samples_cfg = sample_images(var, labels, seed=7, **DIGITS_CFG)

    mse = (reconstructions - held01).square().mean((1, 2, 3))
    results = {"reconstruction_psnr_db": float((-10 * torch.log10(mse)).mean())}
    # the first judge's figures keep their shorter names
    for prefix, j in zip(("", "judge2_"), judges):
        if j is None:
            continue
        heldout = f"{prefix or 'judge_'}accuracy_heldout"
        results.update(judge_accuracies(j, held01, held_y, r.digits, heldout))
        results.update(judge_accuracies(j, reconstructions, held_y, r.digits,
                                        f"{prefix}reconstruction_accuracy"))
        results.update(judge_accuracies(j, samples_t1, labels, r.digits,
                                        f"{prefix}sample_accuracy_t1"))
        results.update(judge_accuracies(j, samples_cfg, labels, r.digits,
                                        f"{prefix}sample_accuracy_cfg"))
    if r.digits == 2:  # the numbers: what the OCR reads (the ablation's baseline: T = 1)
        results.update(ocr_figures(samples_t1, labels, "ocr_t1"))
        results.update(ocr_figures(samples_cfg, labels, "ocr_cfg"))
    return results


def ocr_figures(images01, labels, prefix: str) -> dict:
    """PP-OCR's word accuracy (exact match) and NED (reward_models.ned_similarity) on
    images of two-digit numbers."""
    import reward_models as rm
    logs = rm.OCR(digits=2).extra_logs(None, images01, labels)  # the reward's own figures
    return {f"{prefix}_{name}": values.mean().item() for name, values in logs.items()}


def fp16_state(module) -> dict:
    """A module's state_dict as saved: floating tensors in fp16, all contiguous."""
    state = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            v = v.detach().half()
        state[k] = v.contiguous()
    return state


def write_model_files(out: Path, files: dict, reused: dict, modules: dict, summary: dict,
                      record: str):
    """The model's files and `record` (summary, with the files' sha256 added), replaced
    together: all written under temporary names first, then renamed, `record` last."""
    import shutil
    from safetensors.torch import save_file
    tmp = {file: out / (file + ".tmp") for file in [*files.values(), record]}
    try:
        for name, file in files.items():
            if file in reused:
                shutil.copyfile(reused[file], tmp[file])
            else:
                save_file(fp16_state(modules[name]), str(tmp[file]))
        summary["sha256"] = {f: hashlib.sha256(tmp[f].read_bytes()).hexdigest()
                             for f in files.values()}
        tmp[record].write_text(json.dumps(summary, indent=1))
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise

    # then renamed, <preset>.json last: a kill between two renames leaves files whose sha256
    # differ from those <preset>.json records, which loading refuses
    # (reward_models.check_recorded_sha256)
    for file, path in tmp.items():
        os.replace(path, out / file)
        print(f"[prepare] wrote {out / file}", flush=True)


# ----------------------------------------------------------------------------------------------
# The CPU demo: GRPO on a small model, with before / after pictures, a reward curve and a summary

DEMO_FLAGS = dict(preset="digits", reward="brightness", out="runs/demo", steps=40,
                  labels_per_step=4, group_size=8, minibatch=16, lr=1e-4, beta=0.1,
                  temperature=1.0, image_every=10, save_every=20)


@torch.no_grad()
def preview(model: vg.VAR, reward, judges, labels, seed: int, temperature: float,
            path: Path | None = None) -> dict:
    """Samples of fixed labels and seed (so that before and after compare): their mean reward
    and the class accuracy of the two judges (the second one never a reward: a check for reward
    hacking; a number counts when both its halves are read right), the OCR's word accuracy
    where the reward logs it; a grid of the first 16 at `path`, each under the asked label."""
    digits = len(str(model.config.num_classes - 1))
    images = sample_images(model, labels, seed, temperature=temperature)
    r, logs = reward(images, labels, return_components=True)
    if path is not None:
        pairs = zip(labels[:16].tolist(), r[:16].tolist())
        captions = [f"{l:0{digits}d} r={v:.2f}" for l, v in pairs]
        captioned_grid(images[:16], captions, path)

    scores = {"reward": r.mean().item(),
              "class_acc": number_accuracy(judges[0], images, labels, digits),
              "class_acc2": number_accuracy(judges[1], images, labels, digits)}
    for key, values in logs.items():
        if key.endswith("/word_accuracy"):
            scores["word_accuracy"] = values.float().mean().item()
    return scores


def number_accuracy(judge, images01, labels, digits: int) -> float:
    """The judge's class accuracy: a digit read right, or a number (digits = 2) whose halves
    are both read right."""
    if digits == 1:
        return judge_accuracy(judge, images01, labels)
    return number_correct(judge, images01, labels, digits).mean().item()


@torch.no_grad()
def number_correct(judge, images01, labels, digits: int):
    """(B,) 1.0 where the judge reads the image's label: its digit, or each half of a
    two-digit number."""
    def read(x):
        if hasattr(judge, "heads"):  # DigitJudge: (class logits, boldness)
            return judge.heads(x)[0].argmax(1)
        return judge(x).argmax(1)

    if digits == 1:
        return read(images01).eq(labels).float()
    tens, units = halves(images01)
    right = read(tens).eq(labels // 10) & read(units).eq(labels % 10)
    return right.float()


def load_judges(weights_dir=None, preset: str = "digits"):
    """The digits judge and the second judge (reward_models.load_digit_judge,
    load_digit_judge2; the numbers preset: load_numbers_judge2, the second judge of its
    halves); a missing or changed file is one CheckpointError."""
    import reward_models
    second = reward_models.load_digit_judge2
    if preset == "numbers":
        second = reward_models.load_numbers_judge2
    try:
        return (reward_models.load_digit_judge(weights_dir=weights_dir),
                second(weights_dir=weights_dir))
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def demo(argv) -> dict:
    """`bash run.sh demo [train flags]`: GRPO on the digits model with DEMO_FLAGS (flags given
    win), then before.png / after.png (the pre-trained and the fine-tuned model on the same
    labels and seed), reward_curve.png and summary.json in the run folder."""
    defaults = [f"{vr.flag(k)} {v}" for k, v in DEMO_FLAGS.items()]
    parser = argparse.ArgumentParser(
        prog="vargrpo_tools.py demo", argument_default=argparse.SUPPRESS,
        description="GRPO on the digits model, with train's flags; the demo's"
        f" defaults where not given: {' '.join(defaults)}")
    vr.add_dataclass_args(parser, TrainArgs)
    given = vars(parser.parse_args(argv))
    a = TrainArgs(**{**DEMO_FLAGS, **given})
    load_judges(a.weights_dir, a.preset)  # their files are there before the training, not after
    t0 = time.perf_counter()
    vg.train(a, given=set(given))  # the flags the user gave (a resumed run keeps its own settings)
    seconds = time.perf_counter() - t0

    run = Path(a.resume or a.out)
    try:
        return demo_pictures(run, seconds)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM (Interrupted): the run is saved
        signum = getattr(e, "signum", signal.SIGINT)
        raise vg.Stopped(signum, f"demo interrupted while drawing its pictures; the run and"
                         f" its checkpoint are saved in {run} (evaluate it with:"
                         f" python vargrpo_tools.py eval --ckpt {run})") from None


def demo_pictures(run: Path, seconds: float) -> dict:
    """The demo's pictures of a trained run: before.png / after.png, reward_curve.png and
    summary.json."""
    ckpt = vr.load_pth(run / "checkpoints" / "last.pt", "run the demo again")
    a = TrainArgs(**ckpt["args"])  # the run's settings
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    vae, policy, pretrained = vg.build_models(a, "cpu")
    vg.load_checked(policy, ckpt["model"], run)
    reward = vg.make_reward(a.reward, "cpu", a)
    judges = load_judges(a.weights_dir, a.preset)

    labels = torch.arange(200) % policy.config.num_classes
    seed = vg.derive_seed(a.seed, 4)
    before = preview(pretrained, reward, judges, labels, seed, a.temperature,
                     run / "before.png")
    after = preview(policy, reward, judges, labels, seed, a.temperature, run / "after.png")
    plot_reward_curve(run)
    summary = demo_summary(rows, before, after, seconds)
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] mean reward: first step {summary['reward_first']:.4f} -> last 3 steps"
          f" {summary['reward_last']:.4f}"
          f" ({summary['reward_last'] - summary['reward_first']:+.4f}); judge's class accuracy"
          f" {before['class_acc']:.3f} -> {after['class_acc']:.3f}, second judge's"
          f" {before['class_acc2']:.3f} -> {after['class_acc2']:.3f} (200 samples, "
          f"fixed labels and seed); {seconds:.0f} s; {run}/before.png, after.png, "
          "reward_curve.png, summary.json")
    if "word_accuracy_before" in summary:
        print(f"[demo] OCR word accuracy: {summary['word_accuracy_before']:.3f} ->"
              f" {summary['word_accuracy_after']:.3f} (the same 200 samples)")
    return summary


def demo_summary(rows: list, before: dict, after: dict, seconds: float) -> dict:
    """summary.json of the demo: the training reward at the first and the last 3 steps, both
    judges' class accuracy and the reward before and after, the last KL."""
    last3 = float(np.mean([r["reward/mean"] for r in rows[-3:]]))
    summary = {"reward_first": rows[0]["reward/mean"], "reward_last": last3,
               "class_acc_before": before["class_acc"], "class_acc_after": after["class_acc"],
               "class_acc2_before": before["class_acc2"],
               "class_acc2_after": after["class_acc2"],
               "reward_before": before["reward"], "reward_after": after["reward"],
               "kl_last": rows[-1]["policy/kl"], "steps": len(rows),
               "seconds": round(seconds, 1)}
    # digit:correct's: the judge's top-1 on the asked digit of the step's samples
    for key in [k for k in rows[0] if k.startswith("reward/") and k.endswith("/accuracy")]:
        summary["accuracy_first"] = rows[0][key]
        summary["accuracy_last"] = float(np.mean([r[key] for r in rows[-3:]]))
    # ocr's: the word accuracy of the step's samples, and of the 200 fixed samples
    for key in [k for k in rows[0] if k.endswith("/word_accuracy")]:
        summary["word_accuracy_first"] = rows[0][key]
        summary["word_accuracy_last"] = float(np.mean([r[key] for r in rows[-3:]]))
        summary["word_accuracy_before"] = before["word_accuracy"]
        summary["word_accuracy_after"] = after["word_accuracy"]
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def add_ablate_parser(sub):
    p = sub.add_parser("ablate", help="VAR-RL ablation: GRPO, +PANW, +VMR, +MP, all three")
    p.add_argument("--out", default="runs/ablate",
                   help="folder for the runs and ablation.md / .json / .png")
    p.add_argument("--preset", default="digits7", choices=("tiny", "digits", "digits7", "numbers"),
                   help="model of every run: digits7 (digit:correct and a region reward), or"
                   " numbers (VAR-RL's own: the ocr reward, its PANW and VMR sweeps)")
    p.add_argument("--weights-dir", default=None,
                   help="folder holding the preset's weights (default: weights/)")
    p.add_argument("--seeds", action="append", default=None, type=seed_list,
                   help="comma-separated seeds, once for every reward or once per --reward"
                   f" (default: {' and '.join(ABLATION_SEEDS)}; numbers: 5 or 3 per method)")
    p.add_argument("--vmr-m", default="2,5", type=int_list,
                   help="VMR splits m for the first reward's m sweep ('' for none)")
    p.add_argument("--sweep-seeds", default="0,1,2", type=seed_list,
                   help="comma-separated seeds of the m sweep")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs and tables of an earlier ablation in --out")
    p.add_argument("--eval-samples", type=int, default=500,
                   help="samples of each final policy that the reward and both judges score")
    p.add_argument("--budget", type=int, default=1280,
                   help="samples per run (VMR's extra completions count)")
    p.add_argument("--lr", type=float, default=DEMO_FLAGS["lr"],
                   help="learning rate of every run (the demo's)")
    p.add_argument("--beta", type=float, default=DEMO_FLAGS["beta"],
                   help="KL weight of every run (the demo's)")
    p.add_argument("--reward", action="append", default=None,
                   help="reward of every run; repeat for several"
                   f" (default: {' and '.join(ABLATION_REWARDS)})")


def add_bench_parser(sub):
    p = sub.add_parser("bench", help="speed and memory table of the model layer on this machine")
    p.add_argument("--presets", default="tiny,d16", type=preset_list,
                   help="comma-separated presets to measure")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--official-var", default=None, metavar="DIR",
                   help="a checkout of FoundationVision/VAR: also time its sampler on the same"
                   " weights")
    p.add_argument("--memory", action="store_true",
                   help="activation memory per sample of each preset (from the graph)")
    p.add_argument("--memory-plan", action="store_true",
                   help="docs/memory.md's tables: what fits on 40 and 80 GB cards, worked out"
                   " by vargrpo_run.gpu_memory_plan (nothing measured)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one measurement


def add_gpu_check_parser(sub):
    p = sub.add_parser("gpu-check",
                       help="step time and its parts, peak memory, ratio check and launches of a"
                       " random d16 at the paper's shape, plain / --grad-checkpointing / --fsdp:"
                       " one JSON (bash run.sh gpu-check)")
    p.add_argument("--device", default=None, help="cuda (default; exit 2 without a GPU) or cpu")
    p.add_argument("--preset", default="d16",
                   help="model (random weights): the paper's step for d16-d30, a small one for"
                   " tiny")
    p.add_argument("--out", default="runs/gpu_check.json",
                   help="the JSON, written again after each variant")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file")
    p.add_argument("--child-timeout", default=600.0, type=float, metavar="SECONDS",
                   help="each variant's process (and its torchrun) is killed after this long,"
                   " its error recorded, and the next one runs (default 600)")
    p.add_argument("--variant", default=None, choices=list(GPU_CHECK_VARIANTS),
                   help=argparse.SUPPRESS)  # internal: one variant
    p.add_argument("--reward", default="aesthetic", choices=("aesthetic", "brightness"),
                   help=argparse.SUPPRESS)  # internal: the variant's reward


def add_prepare_parser(sub):
    p = sub.add_parser("prepare",
                       help="build the digits model (data, tokenizer, judge, VAR) into --out;"
                       " run again after a stop, it goes on where it was")
    p.add_argument("--preset", default="digits", choices=list(DIGITS_RECIPES),
                   help="the preset to build (its recipe): digits, digits7, or numbers (00-99)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights"),
                   help="folder for the weights and <preset>.json")
    p.add_argument("--quick", action="store_true",
                   help="a few hundred steps of each part (smoke tests)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the digits model files already in --out")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vargrpo_tools.py",
        description="evaluation, ablation, benchmark and plots for vargrpo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", argument_default=argparse.SUPPRESS,
                       help="aesthetic / CLIP score / ResNet-50 top-5 of a checkpoint and its"
                       " pre-trained model (Table 1)")
    vr.add_dataclass_args(p, EvalArgs)
    add_ablate_parser(sub)
    add_bench_parser(sub)
    add_gpu_check_parser(sub)
    p = sub.add_parser("plot", help="reward_curve.png of a run")
    p.add_argument("run", help="the run directory")
    p.add_argument("--out", default=None,
                   help="the PNG to write (default: RUN/reward_curve.png)")
    sub.add_parser("demo", add_help=False,
                   help="the CPU demo: GRPO on the digits model, then before/after pictures and"
                   " summary.json")
    add_prepare_parser(sub)
    return parser


def run_command(args):
    if args.command == "eval":
        settings = {k: v for k, v in vars(args).items() if k != "command"}
        return evaluate(EvalArgs(**settings))
    if args.command == "bench":
        return bench(args)
    if args.command == "gpu-check":
        return gpu_check(args)
    if args.command == "ablate":
        return ablate(args)
    if args.command == "plot":
        out = None
        if args.out:
            out = Path(args.out)
        return plot_reward_curve(Path(args.run), out)
    if args.command == "prepare":
        return prepare(Path(args.out), DIGITS_RECIPES[args.preset], quick=args.quick,
                       overwrite=args.overwrite)


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP during a tool, raised where it runs as Ctrl-C raises
    KeyboardInterrupt (a trainer inside it handles them itself: it saves, then Stopped)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interrupt(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP end a tool as Ctrl-C does: one line, 128 + the signal."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(argv, e: KeyboardInterrupt) -> vg.Stopped:
    """The one line of a tool stopped by Ctrl-C / SIGTERM / SIGHUP: what it saved."""
    signum = getattr(e, "signum", signal.SIGINT)
    what = "nothing was saved"
    if argv[:1] == ["prepare"]:
        what = ("the model files in --out are as they were; run the same command again to"
                " go on from the saved progress")
    if argv[:1] == ["eval"]:
        what = "eval.md and eval.json were not written; run the same command again"
    how = "Ctrl-C"
    if signum != signal.SIGINT:
        how = signal.Signals(signum).name
    return vg.Stopped(signum, f"{argv[0]} interrupted by {how}; {what}")


def main(argv=None):
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        with signals_interrupt():
            if argv[:1] == ["demo"]:
                return demo(argv[1:])
            return run_command(parser.parse_args(argv))
    except FileNotFoundError as e:
        vr.exit_with(UsageError(str(e)), "vargrpo_tools")
    except (UsageError, CheckpointError, vg.RunFailed, vg.Stopped, vg.PeerFailed) as e:
        vr.exit_with(e, "vargrpo_tools")
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (the trainer saves and raises Stopped)
        vr.exit_with(interrupted(argv, e), "vargrpo_tools")


if __name__ == "__main__":
    main()
