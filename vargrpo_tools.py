"""vargrpo_tools: what a reader does not need to learn the method, beside vargrpo.py (which it
imports; vargrpo.py never imports this file).

  python vargrpo_tools.py eval --ckpt runs/aes        Table 1: reward and class accuracy, pre-trained vs fine-tuned
  python vargrpo_tools.py ablate                      the VAR-RL ablation: GRPO, +PANW, +VMR, +MP, all three
  python vargrpo_tools.py bench                       speed and memory on this machine
  python vargrpo_tools.py gpu-check                   one JSON: a random d16's step on this GPU (`bash run.sh gpu-check`)
  python vargrpo_tools.py plot runs/demo              reward_curve.png of a run
  python vargrpo_tools.py prepare                     the digits model (data, tokenizer, judge, VAR) -> weights/
  python vargrpo_tools.py demo [train flags]          GRPO on the digits model (`bash run.sh demo`)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import sys
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
def official_init_(var: vg.VAR, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02) -> vg.VAR:
    """The official VAR initialisation, in place: truncated normal std sqrt(1/(3C)) for linear,
    embedding and position weights; head x0.02; adaLN scale/shift x0.5 and gammas x1e-5 (blocks
    start near identity); attention/FFN output projections / sqrt(2 depth)."""
    C, depth = var.config.embed_dim, var.config.depth
    for p in [var.pos_start, var.pos_1LC] + [m.weight for m in var.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]:
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
    """The official encoder path, one scale at a time: at scale si the nearest codebook vectors of the
    area-downsampled residual f - f_hat. Yields (codes (B, pn*pn), their contribution h (B, C, H, W)),
    h differentiable in the codebook and Phi; the residual itself carries no gradient."""
    B, C = f_BChw.shape[:2]
    E_VC, f_rest = quant.embedding.weight, f_BChw.detach().clone()
    for si, pn in enumerate(quant.patch_nums):
        z = torch.nn.functional.interpolate(f_rest, size=(pn, pn), mode="area") if si != len(quant.patch_nums) - 1 else f_rest
        z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
        with torch.no_grad():
            dist_NV = torch.addmm(z_NC.square().sum(dim=1, keepdim=True) + E_VC.square().sum(dim=1), z_NC, E_VC.T, alpha=-2)
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
        raise ValueError(f"img_to_idx expects images of shape (B, 3, {S}, {S}) in [-1, 1], got {tuple(img_B3HW.shape)}")
    return torch.cat(f_to_idx(vae.quantize, vae.quant_conv(vae.encoder(img_B3HW))), dim=1)


def captioned_grid(images_B3HW, captions, path: Path, ncol: int = 8):
    """A PNG grid with a caption under each image (nearest-upscaled to >= 128 px)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------------------------
# Reading a run's checkpoint: RUN (its last.pt), a step_N.pt, or an exported .safetensors


def checkpoint_path(ckpt: str) -> Path:
    """The file --ckpt names: RUN/checkpoints/last.pt of a run folder, or the file itself."""
    path = Path(ckpt)
    path = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--ckpt {ckpt}: no checkpoint there (expected RUN, RUN/checkpoints/*.pt or *.safetensors)")
    return path


def load_run_checkpoint(ckpt: str) -> tuple[dict, dict, int]:
    """(the run's settings, the policy's state_dict, its step) from a run folder, a vargrpo .pt
    checkpoint or a .safetensors export (settings in its metadata)."""
    path = checkpoint_path(ckpt)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({vr.first_line(e)})") from None
        try:
            settings, step = json.loads(meta["vargrpo_args"]), int(meta["vargrpo_step"])
            if not isinstance(settings, dict):
                raise ValueError("the settings are not a JSON object")
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path} has no readable vargrpo settings in its metadata ({type(e).__name__}: "
                                  f"{vr.first_line(e)}); pass a run's export (RUN/checkpoints/last.safetensors) or "
                                  "its .pt checkpoint") from None
        return settings, vg.read_state_dict(path), step
    obj = vr.load_pth(path, "pass another vargrpo checkpoint")
    if not (isinstance(obj, dict) and {"model", "args", "step"} <= obj.keys()):
        raise CheckpointError(f"{path} is not a vargrpo run checkpoint (it lacks model/args/step); pass RUN/checkpoints/last.pt")
    return obj["args"], obj["model"], int(obj["step"])


def load_finetuned(ckpt: str, device, weights_dir=None):
    """(vae, fine-tuned policy, pre-trained reference, run settings, step) of a checkpoint.
    device None: a GPU when torch can use one; the CPU only for the digits and tiny presets."""
    saved, state, step = load_run_checkpoint(ckpt)
    known = {f.name for f in fields(TrainArgs)}
    a = TrainArgs(**{k: v for k, v in saved.items() if k in known})
    if weights_dir:
        import reward_models
        a.weights_dir = weights_dir
        vr.check_weights_dir(a, [name for _, name, _ in reward_models.parse_spec(a.reward)])  # not ignored
    device = vr.default_device(device, a.preset)  # before the official weights load
    vae, finetuned, pretrained = vg.build_models(a, device)
    vg.load_checked(finetuned, state, ckpt)
    return vae, finetuned, pretrained, a, step


# ----------------------------------------------------------------------------------------------
# Evaluation [GRPO-VAR Table 1]: aesthetic score, CLIP score and ResNet-50 top-5 accuracy of
# images sampled with the official inference settings, for the pre-trained and fine-tuned models.


# Inference settings: the official VAR's, and the digits model's (the same shape, scaled to its vocabulary of 512)
OFFICIAL_SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)
DIGITS_CFG = dict(cfg=3.0, top_k=128, top_p=0.96)


@dataclass
class EvalArgs:
    ckpt: str = arg("", "a run directory, a vargrpo checkpoint (.pt) or its .safetensors export")
    samples_per_class: int = arg(10, "images per class [paper: 10 for each of the 1000 classes]")
    max_classes: int = arg(0, "evaluate only the first N classes of each subset (0 = all)")
    cfg: float = arg(None, "classifier-free guidance (default: the preset's: official VAR 1.5, digits 3)", type=float)
    top_k: int = arg(None, "top-k (default: official 900, digits 128)", type=int)
    top_p: float = arg(None, "top-p (default: 0.96)", type=float)
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
    weights_dir: str = arg(None, "folder with the pre-trained VAR files", type=str)
    device: str = arg(None, "cpu or cuda (default: cuda; without one, d16-d30 stop, digits/tiny use the CPU)", type=str)


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
        import reward_models
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
        todo = f"download {spec.url} yourself and pass --resnet-weights PATH"
        if not cached.is_file() and reward_models.offline_mode():
            raise CheckpointError(f"ResNet-50 weights {cached.name} are not in {cached.parent} and "
                                  f"HF_HUB_OFFLINE=1 forbids downloading them; {todo}")
        try:
            state = spec.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except Exception as e:  # unreachable, proxy refused, wrong hash, unreadable cached file
            raise CheckpointError(f"ResNet-50 weights {cached.name}: neither {cached.parent} nor "
                                  f"{spec.url} gave them ({vr.first_line(e)}); {todo}") from None
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device), spec.transforms()


def eval_scorers(e: EvalArgs, a: TrainArgs, device) -> dict:
    """{key: (column title, fn(images, labels) -> one score per image)}: the paper's aesthetic score, CLIP score and
    ResNet-50 top-5 for the official models; the run's own reward and the digits judge's class
    accuracy (the ResNet-50 top-5's stand-in) for the digits model."""
    if a.preset in DIGITS_RECIPES:
        reward = vg.make_reward(a.reward, device, a)
        judge, judge2 = (j.to(device) for j in load_judges(a.weights_dir))
        return {"reward": (f"reward `{a.reward}`", lambda images, labels: reward(images, labels)),
                "judge_accuracy": ("judge class accuracy", lambda images, labels: judge.heads(images)[0].argmax(1).eq(labels).float()),
                "judge2_accuracy": ("second judge class accuracy", lambda images, labels: judge2(images).argmax(1).eq(labels).float())}
    reward = vg.make_reward(f"aesthetic+clip:{e.prompt}", device, e)
    classifier, preprocess = load_resnet50(e.resnet_weights, device)
    return {"aesthetic": ("aesthetic score", lambda images, labels: reward(images, return_components=True)[1]["aesthetic"]),
            "clipscore": (f"CLIPScore '{e.prompt}'", lambda images, labels: reward(images, return_components=True)[1][f"clip:{e.prompt}/clipscore"]),
            "resnet50_top5": ("ResNet-50 top-5", lambda images, labels: (classifier(preprocess(images)).topk(5, dim=-1).indices
                                                                         == labels[:, None]).any(-1).float())}


def eval_folder(e: EvalArgs) -> Path:
    """Where eval writes (--out, else the run directory), checked before any work: a folder this
    process can write in."""
    ckpt = Path(e.ckpt)
    out = Path(e.out) if e.out else (ckpt if ckpt.is_dir() else ckpt.parent.parent)
    return output_folder(out, "eval.md, eval.json and the grids")


def output_folder(out: Path, what: str) -> Path:
    """`out`, made if absent, once it is known to be a folder this process can write `what` in (a
    UsageError naming the problem otherwise)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for {what}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot make {out} ({err.strerror}); pass --out a folder you can write to") from None
    problem = vr.cannot_write(out)
    if problem:
        raise UsageError(f"cannot write in {out} ({problem}); pass --out a folder you can write to")
    return out


def evaluate(e: EvalArgs) -> dict:
    if min(e.samples_per_class, e.batch) < 1 or e.max_classes < 0 or not 0 < e.temperature < math.inf:
        raise UsageError("need --samples-per-class >= 1, --batch >= 1, --max-classes >= 0 and --temperature > 0")
    for name in ("cfg", "top_p"):
        if getattr(e, name) is not None and not math.isfinite(getattr(e, name)):
            raise UsageError(f"--{name.replace('_', '-')}: not a finite number")
    checkpoint_path(e.ckpt)
    out = eval_folder(e)  # before the work
    vae, finetuned, pretrained, a, step = load_finetuned(e.ckpt, e.device, e.weights_dir)
    device = str(finetuned.pos_1LC.device)
    preset_kw = DIGITS_CFG if a.preset in DIGITS_RECIPES else OFFICIAL_SAMPLING  # each setting not given: the preset's
    sampling = {k: preset_kw[k] if getattr(e, k) is None else getattr(e, k) for k in ("cfg", "top_k", "top_p")}
    if sampling["cfg"] < 0 or sampling["top_k"] < 0 or not 0 <= sampling["top_p"] < 1:
        raise UsageError("need --cfg >= 0, --top-k >= 0 and 0 <= --top-p < 1")
    scorers = eval_scorers(e, a, device)
    ncls = finetuned.config.num_classes
    seen = vg.label_pool(a, ncls)
    subsets = {"all": seen} if a.label_subset == "all" else \
        {"seen": seen, "unseen": torch.tensor(sorted(set(range(ncls)) - set(seen.tolist())))}
    results = []
    for model_name, model in (("pre-trained", pretrained), ("fine-tuned", finetuned)):
        for subset, classes in subsets.items():
            classes = classes[:e.max_classes] if e.max_classes else classes
            labels = classes.repeat_interleave(e.samples_per_class).to(device)
            sums, grid = dict.fromkeys(scorers, 0.0), []
            for i in range(0, len(labels), e.batch):
                gen = torch.Generator(device=device).manual_seed(vg.derive_seed(e.seed, 6, i))
                with torch.no_grad():
                    images = vg.sample(model, labels[i:i + e.batch], temperature=e.temperature, generator=gen, **sampling).images.float()
                    for name, (_, score) in scorers.items():
                        sums[name] += score(images, labels[i:i + e.batch]).sum().item()
                grid += [(img, lab) for img, lab in zip(images, labels[i:i + e.batch].tolist())
                         if lab in classes[:8].tolist() and sum(1 for _, l in grid if l == lab) < 4]
            results.append({"model": model_name, "subset": subset, "images": len(labels),
                            **{name: total / len(labels) for name, total in sums.items()}})
            captioned_grid(torch.stack([g[0] for g in grid]), [str(g[1]) for g in grid], out / f"eval_{model_name}_{subset}.png")
    fmt = lambda name, v: f"{100 * v:.1f}%" if "top5" in name or "accuracy" in name else f"{v:.3f}"
    table = ["| model | labels | images | " + " | ".join(title for title, _ in scorers.values()) + " |", "|---|---|---|" + "---|" * len(scorers)]
    table += [f"| {r['model']} ({a.preset}) | {r['subset']} | {r['images']} | " + " | ".join(fmt(n, r[n]) for n in scorers) + " |"
              for r in results]
    settings = {k: getattr(e, k) for k in ("samples_per_class", "temperature", "prompt", "seed")} | sampling
    (out / "eval.json").write_text(json.dumps({"checkpoint": str(e.ckpt), "step": step, "settings": settings,
                                               "results": results}, indent=1))
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
# the label-aware reward (the judge reads the asked digit: VAR-RL's OCR task in miniature) and a region
# reward (mask propagation's mask is its box); their seeds
ABLATION_REWARDS = ["digit:correct", "brightness:region=0.25,0.25,0.75,0.75"]
ABLATION_SEEDS = ["0,1,2,3,4", "0,1,2"]
# Student's t 0.975 quantiles by degrees of freedom: the 95% interval of a mean over n seeds is
# mean +- T975[n - 1] * std / sqrt(n)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci95(values) -> tuple:
    """(mean, half-width of the 95% t-interval); the half-width is nan for a single value."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), T975[len(v) - 1] * float(v.std(ddof=1)) / math.sqrt(len(v))


def ablation_runs(args) -> list:
    """[(reward, method name, train flags, seeds)]: every method for each reward with its seeds, and for
    the first reward VMR's split m at the scales of --vmr-m (the VAR-RL m sweep) with --sweep-seeds."""
    rewards = args.reward or ABLATION_REWARDS
    seeds = args.seeds or ABLATION_SEEDS[:len(rewards)]
    if len(seeds) == 1:
        seeds = seeds * len(rewards)
    if len(seeds) != len(rewards):
        raise UsageError(f"--seeds given {len(seeds)} times for {len(rewards)} rewards: give it once (every reward) or once per --reward")
    K = vg.VARConfig.preset(args.preset).num_scales
    sweep = [int(m) for m in args.vmr_m.split(",")] if args.vmr_m else []
    if any(not 1 <= m < K for m in sweep):
        raise UsageError(f"--vmr-m {args.vmr_m}: the split must be a scale in 1..{K - 1} of {args.preset}")
    plan = []
    for i, reward in enumerate(rewards):
        ids = [int(s) for s in seeds[i].split(",")]
        plan += [(reward, name, flags, ids) for name, flags in ABLATION_METHODS.items()]
        if i == 0:
            ids = [int(s) for s in args.sweep_seeds.split(",")]
            plan += [(reward, f"+vmr m={m}", {"vmr": True, "vmr_m": m}, ids) for m in sweep]
    return plan


@torch.no_grad()
def final_scores(model: vg.VAR, reward, judges, n: int, seed: int = 4) -> dict:
    """The reward and both judges' accuracy on the asked digit of n samples at T = 1 (labels 0-9 in turn,
    one fixed seed: every run and the pre-trained model draw the same noise)."""
    labels = torch.arange(n) % model.config.num_classes
    images = sample_images(model, labels, vg.derive_seed(seed, 4))
    return {"reward": reward(images, labels).mean().item(), "judge": judge_accuracy(judges[0], images, labels),
            "judge2": judge_accuracy(judges[1], images, labels)}


def ablate(args):
    """Runs every method for every seed to the same sample budget, for each reward; then scores each final
    policy (and the pre-trained model) with the reward and both judges. Writes ablation.md / .json / .png per
    reward (in a subfolder named after it) and ablation.md of all."""
    import reward_models
    out, tables, plan = Path(args.out), [], ablation_runs(args)
    common = dict(preset=args.preset, labels_per_step=4, group_size=8, minibatch=16, lr=args.lr, beta=args.beta,
                  temperature=1.0, image_every=0, save_every=10**6, overwrite=True, weights_dir=args.weights_dir)
    judges = (reward_models.load_digit_judge(weights_dir=args.weights_dir),
              reward_models.load_digit_judge2(weights_dir=args.weights_dir))
    for reward_spec in dict.fromkeys(r for r, *_ in plan):
        folder, runs = out / re.sub(r"[^A-Za-z0-9.]+", "_", reward_spec).strip("_"), {}
        reward = vg.make_reward(reward_spec, "cpu", TrainArgs(**common))
        _, _, pretrained = vg.build_models(TrainArgs(**common), "cpu")
        runs["pre-trained", None] = dict(final=final_scores(pretrained, reward, judges, args.eval_samples))
        for _, name, flags, seeds in [p for p in plan if p[0] == reward_spec]:
            per_step = common["labels_per_step"] * common["group_size"] * (TrainArgs.vmr_k if flags.get("vmr") else 1)
            steps = max(1, args.budget // per_step)
            for seed in seeds:
                a = TrainArgs(**common, **flags, reward=reward_spec, out=str(folder / f"{re.sub(r'[^a-z0-9]+', '', name)}_s{seed}"),
                              steps=steps, seed=seed)
                t0 = time.perf_counter()
                vg.train(a)
                policy = vg.build_models(a, "cpu")[1]
                vg.load_checked(policy, vg.read_state_dict(Path(a.out) / "checkpoints" / "last.pt"), Path(a.out))
                rows = [json.loads(l) for l in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
                runs[name, seed] = dict(rows=rows, wall=time.perf_counter() - t0, final=final_scores(policy, reward, judges, args.eval_samples))
                print(f"[ablate] {reward_spec} {name} seed {seed}: {runs[name, seed]['final']}", flush=True)
        table, summary = summarise_ablation(runs, plan, args, reward_spec)
        (folder / "ablation.md").write_text(table)
        (folder / "ablation.json").write_text(json.dumps(summary, indent=1))
        plot_ablation(runs, plan, folder / "ablation.png", reward_spec)
        tables.append(table)
        print(table, flush=True)
    (out / "ablation.md").write_text("\n".join(tables))


def summarise_ablation(runs, plan, args, reward_spec):
    """The table of one reward: per method the final policy's reward and both judges' accuracy on the asked
    digit (mean and 95% interval over seeds), the training reward at the start and at the end, the KL."""
    lines = [f"Reward `{reward_spec}`, {args.preset} preset, budget {args.budget} samples per run; final policy: "
             f"{args.eval_samples} samples at T = 1 (labels 0-9, one seed); mean [95% t-interval] over seeds.",
             "",
             "| method | seeds | steps | final reward | judge accuracy (asked digit) | second judge | training reward: first step -> last 10% | KL per token at the end | wall time per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = runs["pre-trained", None]["final"]
    lines.append(f"| pre-trained | - | 0 | {base['reward']:.3f} | {base['judge']:.3f} | {base['judge2']:.3f} | - | 0 | - |")
    summary = {"pre-trained": base}
    for _, name, _, seeds in [p for p in plan if p[0] == reward_spec]:
        per_seed = []
        for seed in seeds:
            rows = runs[name, seed]["rows"]
            budget = [r["budget/samples"] for r in rows]
            last = [r["reward/mean"] for r in rows if r["budget/samples"] > 0.9 * budget[-1]]
            per_seed.append(dict(seed=seed, steps=len(rows), start=rows[0]["reward/mean"], end=float(np.mean(last)),
                                 kl=rows[-1]["policy/kl"], wall=runs[name, seed]["wall"], **runs[name, seed]["final"]))
        ci = {k: mean_ci95([r[k] for r in per_seed]) for k in ("reward", "judge", "judge2", "start", "end", "kl", "wall")}
        summary[name] = {"per_seed": per_seed, "mean_ci95": ci}
        f = lambda k, p=3: f"{ci[k][0]:.{p}f} [{ci[k][0] - ci[k][1]:.{p}f}, {ci[k][0] + ci[k][1]:.{p}f}]"
        lines.append(f"| {name} | {len(seeds)} | {per_seed[0]['steps']} | {f('reward')} | {f('judge')} | {f('judge2')} | "
                     f"{ci['start'][0]:.3f} -> {ci['end'][0]:.3f} | {ci['kl'][0]:.4f} | {ci['wall'][0]:.0f} s |")
    return "\n".join(lines) + "\n", summary


def plot_ablation(runs, plan, path: Path, reward_spec: str):
    """Left: the judge's accuracy on the asked digit of each step's samples (digit:correct) or the mean
    reward, against the samples used (mean over seeds, 5-step running mean); right: the final policy's
    accuracy on the asked digit by both judges (mean and 95% interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "reward/digit:correct/accuracy" if "digit:correct" in reward_spec else "reward/mean"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    methods = [(name, seeds) for r, name, _, seeds in plan if r == reward_spec]
    for i, (name, seeds) in enumerate(methods):
        x = np.array([r["budget/samples"] for r in runs[name, seeds[0]]["rows"]])
        ys = np.array([[r[key] for r in runs[name, s]["rows"]][:len(x)] for s in seeds]).mean(0)
        w = min(5, len(ys))
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(x[len(x) - len(smooth):], smooth, label=name, color=f"C{i}")
        for j, judge in enumerate(("judge", "judge2")):
            m, h = mean_ci95([runs[name, s]["final"][judge] for s in seeds])
            ax2.errorbar(i + 0.15 * (2 * j - 1), m, yerr=0 if math.isnan(h) else h, fmt="os"[j], color=f"C{i}",
                         label=("first judge", "second judge")[j] if i == 0 else None, capsize=3)
    for j, judge in enumerate(("judge", "judge2")):
        ax2.axhline(runs["pre-trained", None]["final"][judge], color="grey", ls=("-", "--")[j], lw=0.8)
    ax.set_xlabel("samples (sampled, decoded and rewarded images)")
    ax.set_ylabel("judge accuracy on the asked digit" if key != "reward/mean" else "mean reward")
    ax.set_title(f"{reward_spec}: each step's samples, mean over seeds, 5-step running mean", fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_xticks(range(len(methods)), [n for n, _ in methods], fontsize=7, rotation=20)
    ax2.set_ylabel("accuracy on the asked digit (final policy)")
    ax2.set_title("final policy, T = 1; grey: pre-trained (solid first judge, dashed second)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Plots of a run


def plot_reward_curve(run: Path, out_path: Path | None = None, title: str | None = None):
    """reward_curve.png: the mean reward (band: +- std over the step's samples) and the KL per token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not (run / "metrics.jsonl").is_file():
        raise UsageError(f"{run / 'metrics.jsonl'} does not exist: name a run folder (the --out of a training run)")
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line
            pass
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
    if title is None:
        a = json.loads((run / "args.json").read_text())
        title = f"{a['preset']}, reward {a['reward']}"
    ax.set_title(title, fontsize=9)
    ax.legend(handles=ax.get_lines() + ax2.get_lines(), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path or run / "reward_curve.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Benchmark: `python vargrpo_tools.py bench`. Every row runs in a fresh process so that its peak
# memory is its own; FLOPs are counted by torch's FlopCounterMode on one call of the timed function.

BENCH_SAMPLER_KW = {"tiny": dict(cfg=1.5, top_k=10, top_p=0.9), "digits": DIGITS_CFG, "default": OFFICIAL_SAMPLING}


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
    n = 8192 if str(device).startswith("cuda") else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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
    vae.to(device), var.to(device)
    labels = torch.arange(batch, device=device) % config.num_classes
    guided_kw = BENCH_SAMPLER_KW.get(preset, BENCH_SAMPLER_KW["default"])
    gen = torch.Generator(device=device).manual_seed(0)
    if what in ("sample cfg=0", "sample cfg+top-k/p"):
        kw = {} if what == "sample cfg=0" else guided_kw
        fn = lambda: vg.sample(var, labels, generator=gen, **kw)
        unit, per_call = "img/s", batch
    elif what == "official sample cfg+top-k/p":
        sys.path.insert(0, str(official_dir))
        from models import build_vae_var as official_build  # the official repository's package
        o_vae, o_var = official_build(device=device, patch_nums=config.patch_nums, V=config.vocab_size, Cvae=config.z_channels,
                                      ch=config.vae_ch, share_quant_resi=4, num_classes=config.num_classes, depth=config.depth,
                                      shared_aln=False, attn_l2_norm=True,
                                      flash_if_available=False, fused_if_available=False)
        o_vae.load_state_dict(vae.state_dict()), o_var.load_state_dict(var.state_dict())
        o_var.eval()
        fn = lambda: o_var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, more_smooth=False, **guided_kw)
        ours = lambda: vg.sample(var, labels, generator=gen, **guided_kw)
        # this machine's speed drifts: time the two samplers interleaved, in one process
        fn(), ours()
        t, pairs = {fn: [], ours: []}, 8
        for rep in range(pairs):
            for f in ((fn, ours) if rep % 2 == 0 else (ours, fn)):
                t0 = time.perf_counter()
                f()
                vr.synced_time(device)
                t[f].append(time.perf_counter() - t0)
        ratio = np.median(np.array(t[ours]) / np.array(t[fn]))  # pairs ran back to back
        what = (f"official sample cfg+top-k/p, interleaved with ours ({np.median(t[ours]):.3f} s/call; "
                f"ours/official per pair, median of {pairs}: {ratio:.3f})")
        return dict(what=what, seconds=float(np.median(t[fn])), throughput=batch / float(np.median(t[fn])),
                    unit="img/s", flops=None, peak_mem=None)
    else:
        idx = vg.sample(var, labels, decode=False).idx
        var.grad_checkpointing = what.endswith("checkpointing")
        if what == "teacher-forced fwd":
            fn = torch.no_grad()(lambda: vg.token_logprobs(var, labels, idx).sum())
        else:
            def fn():
                var.zero_grad(set_to_none=True)
                vg.token_logprobs(var, labels, idx).sum().backward()
        unit, per_call = "tok/s", batch * config.seq_len
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = time_call(fn, device)
    return dict(preset=preset, what=what, batch=batch, seconds=seconds, throughput=per_call / seconds, unit=unit,
                flops=counter.get_total_flops(), peak_mem=peak_memory(device), device=device)


def bench_grpo_step(preset: str, labels_per_step: int, device: str) -> dict:
    """One full GRPO step of the real trainer (random weights, brightness reward): the second of
    two steps, so that the first absorbs warm-up."""
    import tempfile
    G = 16 if device.startswith("cuda") else (8 if preset == "tiny" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        a = TrainArgs(preset=preset, random_init=True, out=tmp + "/run", steps=2, labels_per_step=labels_per_step,
                      group_size=G, minibatch=min(32, labels_per_step * G), image_every=0, device=device)
        vg.train(a)
        m = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    split = " / ".join(f"{k} {100 * m['time/' + k] / m['time/step']:.0f}%" for k in ("sample", "decode", "reward", "update"))
    return dict(what=f"GRPO step, {labels_per_step}x{G} samples ({split})", seconds=m["time/step"],
                throughput=m["perf/samples_per_s"], unit="samples/s", flops=None, peak_mem=peak_memory(device))


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
    return dict(seconds=seconds, throughput=batch / seconds, unit="img/s", flops=counter.get_total_flops(),
                peak_mem=peak_memory(device))


def saved_bytes(fn, weights) -> int:
    """Bytes of the tensors autograd saves for the backward pass while fn() runs, the weights left
    out: the activation memory a training forward holds until its backward (storages counted once)."""
    seen, own = {}, {w.untyped_storage().data_ptr() for w in weights}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_memory(preset: str, dtype=None) -> dict:
    """Activation bytes per sample of a teacher-forced log-prob pass (the update's forward), with and
    without --grad-checkpointing, counted from the graph on the CPU (random weights, B = 1).
    With checkpointing a block keeps only its input, and its own activations exist again only while
    the backward pass recomputes it: saved - depth * block + depth * input + block."""
    config = vg.VARConfig.preset(preset)
    vae, var = vg.build_vae_var(config)
    weights, amp = [*var.parameters(), *var.buffers(), *vae.parameters(), *vae.buffers()], torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    per_sample = {}
    for B in (1, 2):  # the difference leaves out what a forward holds once (bf16 copies of the weights)
        labels, idx = torch.zeros(B, dtype=torch.long), torch.zeros(B, config.seq_len, dtype=torch.long)
        x = torch.zeros(B, config.seq_len, config.embed_dim, requires_grad=True)
        with amp:
            per_sample[B] = (saved_bytes(lambda: vg.token_logprobs(var, labels, idx, 0.7), weights),
                             saved_bytes(lambda: var.blocks[0](x, var.class_emb(labels), var.attn_bias_for_masking[0, 0] == 0), weights))
    total, block = (per_sample[2][i] - per_sample[1][i] for i in (0, 1))
    inputs = config.depth * config.seq_len * config.embed_dim * (2 if dtype is not None else 4)
    return dict(preset=preset, params=sum(p.numel() for p in var.parameters()), plain=total,
                checkpointed=total - config.depth * block + inputs + block)


def bench(args):
    import subprocess
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory:
        print("| preset | parameters | activations per sample, fp32 | with --grad-checkpointing | bf16 autocast | bf16, checkpointing |")
        print("|---|---|---|---|---|---|")
        for preset in args.presets.split(","):
            f32, b16 = activation_memory(preset), activation_memory(preset, torch.bfloat16)
            print(f"| {preset} | {f32['params'] / 1e6:.1f} M | {f32['plain'] / 2**30:.2f} GiB | {f32['checkpointed'] / 2**30:.2f} GiB | "
                  f"{b16['plain'] / 2**30:.2f} GiB | {b16['checkpointed'] / 2**30:.2f} GiB |", flush=True)
        return
    if args.row:  # child process: one measurement, printed as JSON
        preset, what, batch = args.row.split(":")
        print(json.dumps(bench_row(preset, what, int(batch), device, args.official_var)))
        return
    peak = matmul_peak_flops(device)
    on_gpu = device.startswith("cuda")
    print(f"device: {device} ({torch.cuda.get_device_name() if on_gpu else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    whats = ["sample cfg=0", "sample cfg+top-k/p"] + (["official sample cfg+top-k/p"] if args.official_var else []) \
        + ["teacher-forced fwd", "teacher-forced fwd+bwd", "teacher-forced fwd+bwd, grad checkpointing", "GRPO step"]
    header = "| preset | what | batch | s/call | throughput | GFLOP/call | GFLOP/s | % of matmul peak | peak memory |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for preset in args.presets.split(","):
        small = preset in ("tiny", "digits")
        sample_batch = (32 if on_gpu else 16) if small else (32 if on_gpu else 2)
        tf_batch = (32 if on_gpu else 16) if small else (16 if on_gpu else 2)
        for what in whats:
            batch = tf_batch if what.startswith("teacher") else sample_batch
            if what == "GRPO step":  # labels per step
                batch = (32 if on_gpu else 4) if small else (32 if on_gpu else 1)
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
# gpu-check: one command for the day a GPU is at hand (`bash run.sh gpu-check`). A random-weight
# model of the preset trains 3 steps at the paper's shape (32 labels x 16 samples, minibatch 32,
# bf16, the aesthetic reward: CLIP ViT-L/14 and LAION's head, random weights, the same work) once
# per variant (plain, --grad-checkpointing, --fsdp), each in its own process: step 1 is timed (step
# 0 absorbs warm-up), step 2 runs under torch.profiler, which counts its launches. One JSON.

GPU_CHECK_VARIANTS = {"plain": [], "grad_checkpointing": ["--grad-checkpointing"], "fsdp": ["--fsdp"]}
GPU_CHECK_PARTS = ("sample", "decode", "reward", "update")


def cuda_unavailable_reason() -> str:
    """Why torch cannot use a CUDA GPU here, in a few words."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as e:  # a driver older than the wheel, no device, ...
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot start CUDA: {str(e).strip().splitlines()[0][:160]}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def gpu_check_shape(preset: str) -> dict:
    """The step measured: the paper's for an official preset (TrainArgs' defaults, written out), a
    small one with a tiny random CLIP for the tiny / digits presets."""
    if preset in vr.OFFICIAL_PRESETS:
        return dict(labels_per_step=32, group_size=16, minibatch=32, clip_model=None)
    return dict(labels_per_step=4, group_size=4, minibatch=8, clip_model="tiny-random")


def gpu_check_args(preset: str, device: str, variant: str, tmp: Path) -> TrainArgs:
    """The trainer's settings of one variant (a random LAION head written into tmp)."""
    import reward_models as rm
    head = tmp / "aesthetic_head.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(rm.AestheticHead().state_dict(), head)
    return TrainArgs(preset=preset, random_init=True, reward="aesthetic", clip_pretrained="none", aesthetic_head=str(head),
                     out=str(tmp / "run"), steps=3, image_every=0, device=device, dtype="bf16",
                     grad_checkpointing=variant == "grad_checkpointing", fsdp=variant == "fsdp", **gpu_check_shape(preset))


def no_checkpoint(self, policy, opt, step):
    """RunFolder.save in gpu-check: nothing written (and no gathering of shards: one process)."""
    return None


def count_launches(prof, device: str) -> dict:
    """Kernel launches of the profiled step, in total and per part: on a GPU the CUDA runtime's
    launch calls (cudaLaunchKernel and kin), on the CPU the aten ops that call no other aten op
    (each runs its own kernel). An event belongs to the part whose time range holds its start (the
    backward pass runs on another thread on GPUs)."""
    events = prof.events()
    ranges = {e.name.split(":", 1)[1]: e.time_range for e in events if e.name.startswith("gpu-check:")}
    if str(device).startswith("cuda"):
        launches = [e for e in events if "LaunchKernel" in e.name]
    else:
        launches = [e for e in events if e.name.startswith("aten::")
                    and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    per_part = {}
    for part, r in ranges.items():
        per_part[part] = sum(r.start <= e.time_range.start <= r.end for e in launches)
    return dict(launches_per_step=sum(per_part.values()), launches=per_part,
                launch_counter="CUDA runtime kernel launches" if str(device).startswith("cuda") else "leaf aten ops (CPU)")


def gpu_check_variant(preset: str, device: str, variant: str) -> dict:
    """One variant, in this process (under torchrun for --fsdp): the trainer's 3 steps, with the
    step's parts wrapped in profiler ranges, its sample() calls counted, no checkpoint written."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile, record_function
    on_gpu = device.startswith("cuda")
    seen = dict(step=0, calls={}, prof=None, metrics=[], peak=None)
    real = {name: getattr(vg, name) for name in ("rollout", "decode", "score", "policy_update", "sample")} | {"step_metrics": vr.step_metrics}

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
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
            seen["prof"] = profile(activities=activities)
            seen["prof"].__enter__()
        if step == 2:
            vr.synced_time(device)
            seen["prof"].__exit__(None, None, None)
        return m

    for part, name in zip(GPU_CHECK_PARTS, ("rollout", "decode", "score", "policy_update")):
        setattr(vg, name, in_range(part, real[name]))
    vg.sample = counted_sample
    vr.step_metrics = metrics_then_profile
    vr.RunFolder.save = no_checkpoint
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        vg.train(gpu_check_args(preset, device, variant, Path(tmp)))
    m = seen["metrics"][1]
    out = {f"{part}_s": m[f"time/{part}"] for part in GPU_CHECK_PARTS}
    out.update(step_s=m["time/step"], samples_per_s=m["perf/samples_per_s"], peak_memory_bytes=seen["peak"],
               peak_memory_kind="torch.cuda.max_memory_allocated" if on_gpu else "peak RSS of the process",
               ratio_dev_first_minibatch=max(r["policy/ratio_dev_first_minibatch"] for r in seen["metrics"]),
               rows_per_sample_call=max(seen["calls"][1]), sample_calls_per_step=len(seen["calls"][1]),
               **count_launches(seen["prof"], device))
    return out


def gpu_check(args) -> dict:
    """`bash run.sh gpu-check`: every variant in its own process, one JSON (--out)."""
    import os
    import subprocess
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"gpu-check: no usable CUDA GPU ({cuda_unavailable_reason()}); "
                         "`bash run.sh gpu-check --device cpu --preset tiny` runs the check on the CPU")
    if args.variant:  # child process: one variant, printed as JSON (rank 0)
        result = gpu_check_variant(args.preset, device, args.variant)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return result
    t0 = time.perf_counter()
    on_gpu = device.startswith("cuda")
    report = dict(device=device, device_name=torch.cuda.get_device_name(device) if on_gpu else "cpu",
                  torch=torch.__version__, cuda=torch.version.cuda, preset=args.preset, dtype="bf16", steps=3,
                  shape=gpu_check_shape(args.preset), reward="aesthetic, random weights", variants={})
    failed = False
    for name, flags in GPU_CHECK_VARIANTS.items():
        cmd = [__file__, "gpu-check", "--variant", name, "--device", device, "--preset", args.preset]
        if name == "fsdp":
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *cmd]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}
        res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode != 0 or not lines:
            failed = True
            error = (res.stderr.strip().splitlines() or ["no output"])[-1]
            report["variants"][name] = dict(flags=flags, error=error[:300])
        else:
            report["variants"][name] = dict(flags=flags, **json.loads(lines[-1]))
        print(f"[gpu-check] {name}: {json.dumps(report['variants'][name])}", flush=True)
    report["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    text = json.dumps(report, indent=1).encode()
    vr.atomic_write(out, lambda f: f.write(text))
    print(f"[gpu-check] wrote {out} ({report['wall_s']:.0f} s)")
    if failed:
        raise vg.RunFailed(f"a gpu-check variant failed; {out} holds its error")
    return report


# ----------------------------------------------------------------------------------------------
# The digits model: a class-conditional VAR that has learned something, made on the CPU from images
# the program renders (digits 0-9 in Pillow's default font), with its tokenizer and a judge (a
# digit classifier, also a learned reward). `python vargrpo_tools.py prepare` builds it into
# weights/ (shipped: it took 53 minutes on one CPU thread); the trainer loads it as `--preset digits`.


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
    tok_ae_frac: float = 0.4         # first 40% of the steps: a plain autoencoder (no quantizer)
    tok_blend_frac: float = 0.05     # then 5% of the steps blending the latent into its quantization
    tok_beta: float = 0.25           # commitment weight
    tok_restart_every: int = 25      # codes unused for this many steps restart at a random latent
    judge_steps: int = 300
    judge_batch: int = 128
    judge_lr: float = 3e-3
    var_steps: int = 6000            # VAR: next-scale cross-entropy, AdamW (0.9, 0.95), batch 64, bf16
    var_batch: int = 64
    var_lr: float = 1e-3
    var_weight_decay: float = 0.05
    label_dropout: float = 0.1       # to the null class, so that CFG works at inference
    bf16: bool = True                # bf16 autocast for the tokenizer, tokenization and VAR (needs a CPU with bf16 units)
    reuse_judge: bool = False        # copy the shipped judge (weights/judge_digits.safetensors) instead of training one
    judge2_steps: int = 0            # the second judge (reward_models.DigitJudge2); 0: none
    judge2_images: int = 20000       # rendered with seed + 2000 (its own images)
    judge2_lr: float = 2e-3
    reuse_judge2: bool = False       # copy the shipped second judge instead of training one
    quick_steps: tuple = (200, 100, 300)  # --quick: steps of the tokenizer, the judges, the VAR
    digits: int = 1                  # digits per image: 1 (class = the digit) or 2 (numbers: class = "00"-"99")
    save_every: int = 50             # steps between saves of the tokenizer's and the VAR's progress (resuming)


# The recipe of each digits preset. digits7 (64 px, 8x tokenizer, 155 tokens) is sized for ~90 minutes on one
# thread of a CPU without bf16 units, where bf16 autocast was 3-5x slower than fp32 (measured there, fp32:
# tokenizer 1.5 s/step as an autoencoder, 1.9 quantizing; VAR 1.9 s/step; tokenization 60 img/s). Its
# reconstructions were legible early (30 steps: 93% judge accuracy), so the VAR gets the larger share.
DIGITS_RECIPES = {
    "digits": DigitsRecipe(),
    "digits7": DigitsRecipe(preset="digits7", train_images=20000, tok_steps=1200, var_steps=1400, bf16=False,
                            reuse_judge=True, judge2_steps=400, quick_steps=(30, 30, 20)),
    # two-digit numbers 00-99 (class = the number), judged one half at a time: the shipped judge, and
    # a second judge trained on halves of numbers
    "numbers": DigitsRecipe(preset="numbers", digits=2, train_images=30000, tok_steps=1200, var_steps=3000,
                            bf16=False, reuse_judge=True, judge2_steps=400, judge2_images=10000,
                            quick_steps=(30, 30, 20)),
}


# The text each rendering draws: one digit (digits, digits7), or two (numbers: "00"-"99").
# Per digit count: font size as a fraction of the image, stroke width (x size/24; two digits
# thinner, so that they never merge) and the largest rotation (deg).
TEXT_LAYOUT = {1: dict(size=(0.65, 0.85), bold=(0.7, 2.0), angle=15.0),
               2: dict(size=(0.44, 0.58), bold=(0.6, 1.3), angle=8.0)}


@torch.no_grad()
def render_digits(n: int, seed: int, res: int = 64, digits: int = 1):
    """n images of the numbers 0 .. 10**digits - 1 written with `digits` digits (class-balanced:
    label i % 10**digits, shuffled; digits=2 draws "00" to "99"), deterministic from `seed`:
    Pillow's scalable default font at a random size (TEXT_LAYOUT: 0.65-0.85 of the image for one
    digit), stroke width (one digit: 0.7-2 x size/24, the 'boldness' the judge learns), position (the middle
    30% of the free range) and rotation (one digit: +-15 deg); half of
    them dark digits on a light background, half the reverse, each colour slightly tinted. Drawn at
    2x and box-downsampled. Returns (uint8 (n, 3, res, res), labels (n,), boldness (n,))."""
    from PIL import Image, ImageDraw, ImageFont
    rng, R = np.random.default_rng(seed), 2 * res
    layout = TEXT_LAYOUT[digits]
    labels = rng.permutation(np.arange(n) % 10 ** digits)
    size = rng.uniform(*layout["size"], n) * R
    bold = rng.uniform(*layout["bold"], n)
    angle = rng.uniform(-layout["angle"], layout["angle"], n)
    light_bg = rng.random(n) < 0.5
    bg = np.clip(np.where(light_bg, rng.uniform(0.55, 1.0, n), rng.uniform(0.0, 0.45, n))[:, None] + rng.uniform(-0.06, 0.06, (n, 3)), 0, 1)
    fg = np.clip(np.where(light_bg, rng.uniform(0.0, 0.3, n), rng.uniform(0.7, 1.0, n))[:, None] + rng.uniform(-0.06, 0.06, (n, 3)), 0, 1)
    shift = rng.uniform(0.35, 0.65, (n, 2))  # measured: a wider layout cost about 40% of the samples' class accuracy
    images, boldness = np.empty((n, 3, res, res), np.uint8), np.empty(n, np.float32)
    for i in range(n):
        font, s = ImageFont.load_default(size=int(round(size[i]))), int(round(size[i]))
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
            draw.text((x - x0, (R - y1 - y0) / 2), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
            x += x1 - x0 + gap
        glyph = glyph.rotate(angle[i], resample=Image.BICUBIC)
        bx0, by0, bx1, by1 = glyph.getbbox()
        margin = R // 32
        canvas = Image.new("L", (R, R), 0)
        canvas.paste(glyph, (int(round(margin - bx0 + shift[i, 0] * max(0, R - 2 * margin - (bx1 - bx0)))),
                             int(round(margin - by0 + shift[i, 1] * max(0, R - 2 * margin - (by1 - by0))))))
        alpha = np.asarray(canvas.resize((res, res), Image.BOX), np.float32)[None] / 255
        images[i] = np.round((bg[i][:, None, None] * (1 - alpha) + fg[i][:, None, None] * alpha) * 255)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(boldness)


def to_m11(images_u8):
    """uint8 images -> float in [-1, 1] (the tokenizer's input range)."""
    return images_u8.float() / 127.5 - 1


def st_quantize(vae: vg.VQVAE, f_BChw, beta: float):
    """The multi-scale residual quantizer of f_to_idx, differentiable: the same codes are chosen, the
    quantized latent passes the decoder's gradient straight through to f, and the loss trains the
    codebook and Phi (f_hat after each scale towards f) and commits f to the codes. Returns
    (straight-through latent, loss, [(B, pn*pn)] codes per scale)."""
    target, f_hat, loss, codes = f_BChw.detach(), torch.zeros_like(f_BChw), 0.0, []
    for idx_Bl, h_BChw in residual_scales(vae.quantize, f_BChw):
        f_hat = f_hat + h_BChw
        loss = loss + F.mse_loss(f_hat, target) + beta * F.mse_loss(f_hat.detach(), f_BChw)
        codes.append(idx_Bl)
    return f_BChw + (f_hat - f_BChw).detach(), loss / len(codes), codes


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 100, floor: float = 0.05) -> float:
    return lr * min(1, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def load_progress(path: Path | None):
    """A part's saved progress (save_progress), or None where there is none."""
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_progress(path: Path | None, state: dict):
    """Write a part's progress under a temporary name, then rename: a kill leaves the old file."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_tokenizer(images_u8, config: vg.VARConfig, r: DigitsRecipe, steps=None, log=print,
                    progress: Path | None = None) -> vg.VQVAE:
    """The official-architecture VQVAE of `config` trained on the images: L1 + MSE reconstruction,
    first as a plain autoencoder, then through the quantizer (codebook initialised from encoder
    outputs, dead codes restarted). Residual branches start at zero and Phi at the identity (the
    weights keep the official layout; measured: other inits train several times slower).
    progress: a file that holds the training's state every r.save_every steps, and that a later
    call goes on from (bit-exact: weights, optimizer, batch generator, code usage)."""
    steps, g = steps or r.tok_steps, torch.Generator().manual_seed(r.seed)
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
    usage, quantizing, t0 = torch.zeros(config.vocab_size), False, time.perf_counter()
    start = 0
    state = load_progress(progress)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        usage = state["usage"]
        quantizing = state["quantizing"]
        start = state["step"]
        log(f"[prepare] tokenizer: going on from step {start} ({progress})")
    from tqdm import tqdm
    for step in tqdm(range(start, steps), desc="tokenizer", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, r.tok_lr)
        x = to_m11(images_u8[torch.randint(len(images_u8), (r.tok_batch,), generator=g)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            f = vae.quant_conv(vae.encoder(x)).float()
            if step >= r.tok_ae_frac * steps and not quantizing:  # the codebook starts as encoder outputs of every scale
                quantizing = True
                with torch.no_grad():
                    f0 = vae.quant_conv(vae.encoder(to_m11(images_u8[:512]))).float()
                    z = torch.cat([F.interpolate(f0, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, config.z_channels)
                                   for pn in config.patch_nums])
                    vae.quantize.embedding.weight.copy_(0.5 * z[torch.randperm(len(z), generator=g)[:config.vocab_size]])
            vq_loss, latent = torch.zeros(()), f
            if quantizing:
                f_st, vq_loss, codes = st_quantize(vae, f, r.tok_beta)
                blend = min(1.0, (step - r.tok_ae_frac * steps) / max(1, r.tok_blend_frac * steps))
                latent = f + blend * (f_st - f)
                usage += torch.bincount(torch.cat(codes, 1).flatten(), minlength=config.vocab_size)
            y = vae.decoder(vae.post_quant_conv(latent)).float()
        loss = F.mse_loss(y, x) + F.l1_loss(y, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if quantizing and (step + 1) % r.tok_restart_every == 0:  # unused codes restart at residuals of this batch
            dead = (usage == 0).nonzero().flatten()
            with torch.no_grad():
                rest, candidates = f.detach(), []
                for si, (pn, idx_Bl) in enumerate(zip(config.patch_nums, codes)):
                    z = F.interpolate(rest, size=(pn, pn), mode="area") if si != len(codes) - 1 else rest
                    candidates.append(z.permute(0, 2, 3, 1).reshape(-1, config.z_channels))
                    rest = rest - vae.quantize.add_scale(torch.zeros_like(rest), vae.quantize.embed(idx_Bl), si)
                z = torch.cat(candidates)
                vae.quantize.embedding.weight[dead] = z[torch.randint(len(z), (len(dead),), generator=g)]
            usage.zero_()
        if step % 500 == 0 or step == steps - 1:
            log(f"[prepare] tokenizer step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
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
    """The judge (reward_models.DigitJudge): digit class and boldness, trained with a blur on half of
    its inputs (generated images are softer than rendered ones)."""
    import reward_models as rm
    steps, g = steps or r.judge_steps, torch.Generator().manual_seed(r.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        judge = rm.DigitJudge()
    judge.boldness_mean.fill_(boldness.mean()), judge.boldness_std.fill_(boldness.std())
    opt = torch.optim.AdamW(judge.parameters(), r.judge_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r.judge_lr, total_steps=steps, pct_start=0.15)
    x32 = F.interpolate(images_u8.float() / 255, size=(32, 32), mode="area")
    judge.train()
    for _ in range(steps):
        i = torch.randint(len(x32), (r.judge_batch,), generator=g)
        x, blur = x32[i], torch.rand(r.judge_batch, generator=g) < 0.5
        logits, bold = judge.heads(torch.where(blur[:, None, None, None], soften(x), x))
        loss = F.cross_entropy(logits, labels[i]) + F.mse_loss(bold, (boldness[i] - judge.boldness_mean) / judge.boldness_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
    return judge.eval().requires_grad_(False)


def train_judge2(images_u8, labels, r: DigitsRecipe, steps=None):
    """The second judge (reward_models.DigitJudge2, class only): its own init seed, the same blur on
    half of its inputs, on images the caller renders with another seed than the first judge's."""
    import reward_models as rm
    steps, g = steps or r.judge2_steps, torch.Generator().manual_seed(r.seed + 2000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed + 2000)
        judge = rm.DigitJudge2()
    opt = torch.optim.AdamW(judge.parameters(), r.judge2_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r.judge2_lr, total_steps=steps, pct_start=0.15)
    x32 = F.interpolate(images_u8.float() / 255, size=(32, 32), mode="area")
    judge.train()
    for _ in range(steps):
        i = torch.randint(len(x32), (r.judge_batch,), generator=g)
        x = x32[i]
        blur = torch.rand(r.judge_batch, generator=g) < 0.5
        loss = F.cross_entropy(judge(torch.where(blur[:, None, None, None], soften(x), x)), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def tokenize(vae: vg.VQVAE, images_u8, batch: int = 200, bf16: bool = False):
    """The tokenizer's codes of the images, (N, L). bf16: under bf16 autocast, ~3x faster on this CPU
    (measured: 88% of the codes equal fp32's, the rest near-ties; used for the VAR's training data only)."""
    from tqdm import tqdm
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([img_to_idx(vae, to_m11(images_u8[i:i + batch]))
                          for i in tqdm(range(0, len(images_u8), batch), desc="tokenize", mininterval=10, disable=len(images_u8) <= 1000)])


def train_var(vae: vg.VQVAE, idx_NL, labels, config: vg.VARConfig, r: DigitsRecipe, steps=None, log=print,
              progress: Path | None = None) -> vg.VAR:
    """Class-conditional pretraining by next-scale cross-entropy on the tokenizer's codes: the same
    teacher-forced forward the RL uses, with the labels dropped to the null class 10% of the time
    (pretraining only) so that classifier-free guidance works at inference. progress: as in
    train_tokenizer (weights, optimizer, batch generator)."""
    steps, g = steps or r.var_steps, torch.Generator().manual_seed(r.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        var = official_init_(vg.VAR(config, vae))
    opt = torch.optim.AdamW(var.parameters(), r.var_lr, betas=(0.9, 0.95), weight_decay=r.var_weight_decay)
    start = 0
    state = load_progress(progress)
    if state is not None:
        var.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        start = state["step"]
        log(f"[prepare] VAR: going on from step {start} ({progress})")
    from tqdm import tqdm
    t0 = time.perf_counter()
    for step in tqdm(range(start, steps), desc="VAR", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, r.var_lr)
        i = torch.randint(len(idx_NL), (r.var_batch,), generator=g)
        dropped = torch.where(torch.rand(r.var_batch, generator=g) < r.label_dropout, config.num_classes, labels[i])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            logits = var(dropped, idx_NL[i]).float()
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), idx_NL[i].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % 1000 == 0 or step == steps - 1:
            log(f"[prepare] VAR step {step}: cross-entropy {loss.item():.3f} nats/token ({time.perf_counter() - t0:.0f} s)")
        if (step + 1) % r.save_every == 0 or step == steps - 1:
            state = dict(step=step + 1, model=var.state_dict(), opt=opt.state_dict(), generator=g.get_state())
            save_progress(progress, state)
    return var.eval()


@torch.no_grad()
def judge_accuracy(judge, images01, labels, batch: int = 500) -> float:
    """The share of images the judge (DigitJudge or DigitJudge2) reads as their label."""
    classify = (lambda x: judge.heads(x)[0]) if hasattr(judge, "heads") else judge
    return float(torch.cat([classify(images01[i:i + batch]).argmax(1) for i in range(0, len(images01), batch)])
                 .eq(labels).float().mean())


@torch.no_grad()
def sample_images(var: vg.VAR, labels, seed: int, batch: int = 100, **sampling):
    """Images of `labels` in calls of `batch` rows, drawn from one generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([vg.sample(var, labels[i:i + batch], generator=gen, **sampling).images.float() for i in range(0, len(labels), batch)])


def sample_accuracy(var: vg.VAR, judge, n: int, seed: int, **sampling) -> float:
    """The judge's accuracy on n samples of the labels 0-9 in turn (fixed seed)."""
    labels = torch.arange(n) % var.config.num_classes
    return judge_accuracy(judge, sample_images(var, labels, seed, **sampling), labels)


DIGITS_FILES = {"vae": "vae_digits.safetensors", "var": "var_digits.safetensors", "judge": "judge_digits.safetensors"}


def digits_files(r: DigitsRecipe) -> dict:
    """The weight files prepare writes for the recipe's preset (digits: DIGITS_FILES)."""
    p = r.preset
    files = {"vae": f"vae_{p}.safetensors", "var": f"var_{p}.safetensors", "judge": f"judge_{p}.safetensors"}
    if r.reuse_judge:
        files["judge"] = DIGITS_FILES["judge"]
    if r.judge2_steps or r.reuse_judge2:  # one second judge for the digits presets: it reads 28 px, whatever the size
        files["judge2"] = "judge2_digits.safetensors" if r.digits == 1 else f"judge2_{p}.safetensors"
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
    the size they were trained on (measured: the first judge reads 100% of rendered numbers so)."""
    h, w = images_B3HW.shape[-2:]
    side = round(h * 5 / 8)
    band = images_B3HW[..., (h - side) // 2:(h - side) // 2 + side, :]
    pad = side - w // 2
    pads = (pad // 2, pad - pad // 2, 0, 0)
    return [F.pad(half, pads, mode="replicate") for half in (band[..., :w // 2], band[..., w // 2:])]


def judge_accuracies(judge, images01, labels, r: DigitsRecipe, prefix: str) -> dict:
    """The judge's accuracy on the images: one figure for a digit, one per half (tens, units)
    for a two-digit number."""
    if r.digits == 1:
        return {prefix: judge_accuracy(judge, images01, labels)}
    tens, units = halves(images01)
    return {f"{prefix}_tens": judge_accuracy(judge, tens, labels // 10),
            f"{prefix}_units": judge_accuracy(judge, units, labels % 10)}


class PrepareWork:
    """prepare's progress, in OUT/.prepare-<preset>/ while it runs: each finished part's result
    and the tokenizer's and the VAR's training state, so that a prepare that was stopped (Ctrl-C,
    a kill, a reboot) goes on where it was when run again with the same flags. Made at the first
    save; removed when the model's files are written."""

    def __init__(self, out: Path, r: DigitsRecipe, quick: bool):
        self.folder = out / f".prepare-{r.preset}"
        self.plan = {"recipe": json.loads(json.dumps(asdict(r))), "quick": quick}

    def check(self):
        """Refuse progress made with other flags or another recipe (one line)."""
        plan = self.folder / "plan.json"
        if not plan.is_file():
            return
        if json.loads(plan.read_text()) != self.plan:
            raise UsageError(f"{self.folder} holds the progress of a prepare with other settings (--quick, or another"
                             " recipe); run that command again to finish it, or delete that folder to start anew")

    def path(self, name: str) -> Path:
        """The file that holds part `name` (made with its folder on first use)."""
        if not self.folder.is_dir():
            self.folder.mkdir()
            (self.folder / "plan.json").write_text(json.dumps(self.plan, indent=1))
        return self.folder / f"{name}.pt"

    def done(self) -> list:
        """The parts saved so far."""
        return sorted(p.stem for p in self.folder.glob("*.pt")) if self.folder.is_dir() else []

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
    """Data -> tokenizer -> judge(s) -> VAR, each measured on held-out data; the weights (fp16) go to
    `out` as the files load_pretrained(r.preset) and reward_models.load_digit_judge read, with
    <preset>.json (the recipe, the measurements, the times, the files' sha256). With r.reuse_judge the
    shipped judge is copied instead of trained; with r.judge2_steps a second judge (another architecture,
    its own images) reports a second opinion on the class accuracies (r.reuse_judge2: the shipped one).
    Numbers (r.digits = 2) are judged one half of the image at a time. Resumable (PrepareWork): run
    again, it goes on where it stopped. quick: a few steps of each (smoke tests)."""
    import shutil
    import reward_models as rm
    from safetensors.torch import save_file
    files, record = digits_files(r), f"{r.preset}.json"
    reused = {files[name]: shipped for name, shipped in reused_files(r).items()}
    same = lambda file: (out / file).is_file() and (out / file).read_bytes() == reused[file].read_bytes()
    output_folder(out, "the weights")
    there = [name for name in [*files.values(), record] if (out / name).exists() and not (name in reused and same(name))]
    if there and not overwrite:
        raise UsageError(f"{out} already holds {', '.join(there)}; pass --overwrite to replace them (or --out another folder)")
    for shipped in reused.values():
        if not shipped.is_file():
            raise UsageError(f"{shipped} is missing: the {r.preset} recipe reuses the shipped digits judges")
    work = PrepareWork(out, r, quick)
    work.check()
    if work.done():
        print(f"[prepare] {r.preset}: going on from {work.folder} (saved: {', '.join(work.done())})", flush=True)
    config, t0, times = vg.VARConfig.preset(r.preset), time.perf_counter(), {}
    lap = lambda name: times.update({name: round(time.perf_counter() - t0 - sum(times.values()), 1)})
    log = lambda message: print(message, flush=True)
    n_train, n_held = (1024, 200) if quick else (r.train_images, r.heldout_images)
    tok_steps, judge_steps, var_steps = r.quick_steps if quick else (None, None, None)
    print(f"[prepare] {r.preset}: rendering {n_train} + {n_held} images", flush=True)
    train_u8, train_y, train_bold = render_digits(n_train, r.seed, config.image_size, r.digits)
    held_u8, held_y, _ = render_digits(n_held, r.seed + 998, config.image_size, r.digits)
    lap("render")
    vae = train_tokenizer(train_u8, config, r, steps=tok_steps, log=log, progress=work.path("tokenizer"))
    lap("tokenizer")
    if r.reuse_judge:
        judge = rm.load_digit_judge(path=rm.DIGIT_JUDGE)
    else:
        judge = rm.DigitJudge()
        make = lambda: train_judge(train_u8, train_y, train_bold, r, steps=judge_steps).state_dict()
        judge.load_state_dict(work.result("judge", make))
        judge.eval().requires_grad_(False)
    lap("judge")
    judge2 = None
    if r.reuse_judge2:
        judge2 = rm.load_digit_judge2(path=rm.DIGIT_JUDGE2)
    elif r.judge2_steps:
        def make():  # numbers: a second judge of their halves (the digits' one reads them poorly)
            n = 1024 if quick else r.judge2_images
            judge2_u8, judge2_y, _ = render_digits(n, r.seed + 2000, config.image_size, r.digits)
            if r.digits == 2:
                judge2_u8 = torch.cat(halves(judge2_u8.float())).round().to(torch.uint8)
                judge2_y = torch.cat([judge2_y // 10, judge2_y % 10])
            return train_judge2(judge2_u8, judge2_y, r, steps=judge_steps).state_dict()
        judge2 = rm.DigitJudge2()
        judge2.load_state_dict(work.result("judge2", make))
        judge2.eval().requires_grad_(False)
        lap("judge2")
    idx = work.result("tokens", lambda: {"idx": tokenize(vae, train_u8, bf16=r.bf16)})["idx"]
    lap("tokenize")
    var = train_var(vae, idx, train_y, config, r, steps=var_steps, log=log, progress=work.path("var"))
    lap("var")
    held01 = held_u8.float() / 255
    reconstructions = torch.cat([vae.idx_to_img(tokenize(vae, held_u8[i:i + 200])) for i in range(0, n_held, 200)])
    labels = torch.arange(200 if quick else 1000) % config.num_classes
    samples_t1 = sample_images(var, labels, seed=7)
    samples_cfg = sample_images(var, labels, seed=7, **DIGITS_CFG)
    results = {"reconstruction_psnr_db": float((-10 * torch.log10((reconstructions - held01).square().mean((1, 2, 3)))).mean())}
    for prefix, j in (("", judge), ("judge2_", judge2)):  # the first judge's figures keep their shorter names
        if j is None:
            continue
        results.update(judge_accuracies(j, held01, held_y, r, f"{prefix or 'judge_'}accuracy_heldout"))
        results.update(judge_accuracies(j, reconstructions, held_y, r, f"{prefix}reconstruction_accuracy"))
        results.update(judge_accuracies(j, samples_t1, labels, r, f"{prefix}sample_accuracy_t1"))
        results.update(judge_accuracies(j, samples_cfg, labels, r, f"{prefix}sample_accuracy_cfg"))
    lap("evaluation")
    modules = {"vae": vae, "var": var, "judge": judge, "judge2": judge2}
    tmp = {file: out / (file + ".tmp") for file in [*files.values(), record]}
    try:  # the model's files are replaced together: all written under temporary names first
        for name, file in files.items():
            if file in reused:
                shutil.copyfile(reused[file], tmp[file])
            else:
                save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
                           for k, v in modules[name].state_dict().items()}, str(tmp[file]))
        summary = {"config": asdict(config), "recipe": asdict(r), "quick": quick, "results": results, "seconds": times,
                   "torch_threads": torch.get_num_threads(),
                   "sha256": {f: hashlib.sha256(tmp[f].read_bytes()).hexdigest() for f in files.values()}}
        tmp[record].write_text(json.dumps(summary, indent=1))
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    # then renamed, <preset>.json last: a kill between two renames leaves files whose sha256 differ from
    # those <preset>.json records, which loading refuses (reward_models.check_recorded_sha256)
    for file, path in tmp.items():
        os.replace(path, out / file)
        print(f"[prepare] wrote {out / file}", flush=True)
    work.remove()
    print(f"[prepare] {r.preset}: {json.dumps(results)}; {sum(times.values()):.0f} s", flush=True)
    return summary




# ----------------------------------------------------------------------------------------------
# The CPU demo: GRPO on a small model, with before / after pictures, a reward curve and a summary

DEMO_FLAGS = dict(preset="digits", reward="brightness", out="runs/demo", steps=40, labels_per_step=4, group_size=8,
                  minibatch=16, lr=1e-4, beta=0.1, temperature=1.0, image_every=10, save_every=20)


@torch.no_grad()
def preview(model: vg.VAR, reward, judges, labels, seed: int, temperature: float, path: Path | None = None) -> dict:
    """Samples of fixed labels and seed (so that before and after compare): their mean reward and the
    class accuracy of the two judges (the second one never a reward: a check for reward hacking); a
    captioned grid of the first 16 at `path`."""
    images = sample_images(model, labels, seed, temperature=temperature)
    r = reward(images, labels)
    if path is not None:
        captioned_grid(images[:16], [f"{l} r={v:.2f}" for l, v in zip(labels[:16].tolist(), r[:16].tolist())], path)
    return {"reward": r.mean().item(), "class_acc": judge_accuracy(judges[0], images, labels),
            "class_acc2": judge_accuracy(judges[1], images, labels)}


def load_judges(weights_dir=None):
    """The digits judge and the second judge (reward_models.load_digit_judge, load_digit_judge2); a
    missing or changed file is one CheckpointError."""
    import reward_models
    try:
        return reward_models.load_digit_judge(weights_dir=weights_dir), reward_models.load_digit_judge2(weights_dir=weights_dir)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def demo(argv) -> dict:
    """`bash run.sh demo [train flags]`: GRPO on the digits model with DEMO_FLAGS (flags given win), then
    before.png / after.png (the pre-trained and the fine-tuned model on the same labels and seed),
    reward_curve.png and summary.json in the run folder."""
    parser = argparse.ArgumentParser(prog="vargrpo_tools.py demo", add_help=False, argument_default=argparse.SUPPRESS)
    vr.add_dataclass_args(parser, TrainArgs)
    given = vars(parser.parse_args(argv))
    a = TrainArgs(**{**DEMO_FLAGS, **given})
    load_judges(a.weights_dir)  # their files are there before the training, not after
    t0 = time.perf_counter()
    vg.train(a, given=set(given))  # the flags the user gave (a resumed run keeps its own settings)
    seconds = time.perf_counter() - t0
    run = Path(a.resume or a.out)
    ckpt = vr.load_pth(run / "checkpoints" / "last.pt", "run the demo again")
    a = TrainArgs(**ckpt["args"])  # the run's settings
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    vae, policy, pretrained = vg.build_models(a, "cpu")
    vg.load_checked(policy, ckpt["model"], run)
    reward = vg.make_reward(a.reward, "cpu", a)
    judges = load_judges(a.weights_dir)
    labels, seed = torch.arange(200) % policy.config.num_classes, vg.derive_seed(a.seed, 4)
    before = preview(pretrained, reward, judges, labels, seed, a.temperature, run / "before.png")
    after = preview(policy, reward, judges, labels, seed, a.temperature, run / "after.png")
    plot_reward_curve(run)
    summary = {"reward_first": rows[0]["reward/mean"], "reward_last": float(np.mean([r["reward/mean"] for r in rows[-3:]])),
               "class_acc_before": before["class_acc"], "class_acc_after": after["class_acc"],
               "class_acc2_before": before["class_acc2"], "class_acc2_after": after["class_acc2"],
               "reward_before": before["reward"], "reward_after": after["reward"], "kl_last": rows[-1]["policy/kl"],
               "steps": len(rows), "seconds": round(seconds, 1)}
    for key in [k for k in rows[0] if k.startswith("reward/") and k.endswith("/accuracy")]:  # digit:correct's
        summary["accuracy_first"] = rows[0][key]  # the judge's top-1 on the asked digit of the step's samples
        summary["accuracy_last"] = float(np.mean([r[key] for r in rows[-3:]]))
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] mean reward: first step {summary['reward_first']:.4f} -> last 3 steps {summary['reward_last']:.4f} "
          f"({summary['reward_last'] - summary['reward_first']:+.4f}); judge's class accuracy {before['class_acc']:.3f} -> "
          f"{after['class_acc']:.3f}, second judge's {before['class_acc2']:.3f} -> {after['class_acc2']:.3f} (200 samples, "
          f"fixed labels and seed); {seconds:.0f} s; {run}/before.png, after.png, "
          "reward_curve.png, summary.json")
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vargrpo_tools.py", description="evaluation, ablation, benchmark and plots for vargrpo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", argument_default=argparse.SUPPRESS,
                       help="aesthetic / CLIP score / ResNet-50 top-5 of a checkpoint and its pre-trained model (Table 1)")
    vr.add_dataclass_args(p, EvalArgs)
    p = sub.add_parser("ablate", help="VAR-RL ablation: GRPO, +PANW, +VMR, +MP, all three")
    p.add_argument("--out", default="runs/ablate", help="folder for the runs and ablation.md / .json / .png")
    p.add_argument("--preset", default="digits7", help="model of every run")
    p.add_argument("--weights-dir", default=None, help="folder holding the preset's weights (default: weights/)")
    p.add_argument("--seeds", action="append", default=None,
                   help=f"comma-separated seeds, once for every reward or once per --reward (default: {' and '.join(ABLATION_SEEDS)})")
    p.add_argument("--vmr-m", default="2,5", help="VMR splits m for the first reward's m sweep ('' for none)")
    p.add_argument("--sweep-seeds", default="0,1,2", help="comma-separated seeds of the m sweep")
    p.add_argument("--eval-samples", type=int, default=500, help="samples of each final policy that the reward and both judges score")
    p.add_argument("--budget", type=int, default=1280, help="samples per run (VMR's extra completions count)")
    p.add_argument("--lr", type=float, default=DEMO_FLAGS["lr"], help="learning rate of every run (the demo's)")
    p.add_argument("--beta", type=float, default=DEMO_FLAGS["beta"], help="KL weight of every run (the demo's)")
    p.add_argument("--reward", action="append", default=None,
                   help=f"reward of every run; repeat for several (default: {' and '.join(ABLATION_REWARDS)})")
    p = sub.add_parser("bench", help="speed and memory table of the model layer on this machine")
    p.add_argument("--presets", default="tiny,d16", help="comma-separated presets to measure")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--official-var", default=None, metavar="DIR",
                   help="a checkout of FoundationVision/VAR: also time its sampler on the same weights")
    p.add_argument("--memory", action="store_true", help="activation memory per sample of each preset (from the graph)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    p = sub.add_parser("gpu-check", help="step time and its parts, peak memory, ratio check and launches of a random d16"
                       " at the paper's shape, plain / --grad-checkpointing / --fsdp: one JSON (bash run.sh gpu-check)")
    p.add_argument("--device", default=None, help="cuda (default; exit 2 without a GPU) or cpu")
    p.add_argument("--preset", default="d16", help="model (random weights): the paper's step for d16-d30, a small one for tiny")
    p.add_argument("--out", default="runs/gpu_check.json", help="the JSON written")
    p.add_argument("--variant", default=None, choices=list(GPU_CHECK_VARIANTS), help=argparse.SUPPRESS)  # internal: one variant
    p = sub.add_parser("plot", help="reward_curve.png of a run")
    p.add_argument("run", help="the run directory")
    sub.add_parser("demo", help="the CPU demo: GRPO on the digits model, then before/after pictures and summary.json", add_help=False)
    p = sub.add_parser("prepare", help="build the digits model (data, tokenizer, judge, VAR) into --out; run again"
                       " after a stop, it goes on where it was")
    p.add_argument("--preset", default="digits", choices=list(DIGITS_RECIPES), help="the preset to build (its recipe):"
                   " digits, digits7, or numbers (00-99)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights"), help="folder for the weights and <preset>.json")
    p.add_argument("--quick", action="store_true", help="a few hundred steps of each part (smoke tests)")
    p.add_argument("--overwrite", action="store_true", help="replace the digits model files already in --out")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["demo"]:
            return demo(argv[1:])
        args = parser.parse_args(argv)
        if args.command == "eval":
            return evaluate(EvalArgs(**{k: v for k, v in vars(args).items() if k != "command"}))
        if args.command == "bench":
            return bench(args)
        if args.command == "gpu-check":
            return gpu_check(args)
        if args.command == "ablate":
            return ablate(args)
        if args.command == "plot":
            return plot_reward_curve(Path(args.run))
        if args.command == "prepare":
            return prepare(Path(args.out), DIGITS_RECIPES[args.preset], quick=args.quick, overwrite=args.overwrite)
    except FileNotFoundError as e:
        vr.exit_with(UsageError(str(e)), "vargrpo_tools")
    except (UsageError, CheckpointError, vg.RunFailed, vg.Stopped, vg.PeerFailed) as e:
        vr.exit_with(e, "vargrpo_tools")
    except KeyboardInterrupt:  # prepare, eval, ...: Ctrl-C (the trainer saves and raises Stopped)
        what = "nothing was saved"
        if argv[:1] == ["prepare"]:
            what = "the model files in --out are as they were; run the same command again to go on from the saved progress"
        vr.exit_with(vg.Stopped(signal.SIGINT, f"{argv[0]} interrupted by Ctrl-C; {what}"), "vargrpo_tools")


if __name__ == "__main__":
    main()
