"""Reward models for vargrpo.

A reward is a callable: images (B, 3, H, W) float in [0, 1] on its device -> rewards (B,) float.
`build_reward(spec, device)` parses a spec such as `aesthetic`, `clip:a painting`, `brightness`,
`aesthetic+clip:a painting` or `0.5*aesthetic+1*clip:an old picture` into one `Reward` that also
reports each component's value (and CLIPScore) for logging.

Components  [GRPO-VAR 5.1-5.3]:
  brightness / bright / dark   mean luma; 1 if luma >= 0.8; 1 if luma < 0.2
  aesthetic                    LAION improved-aesthetic-predictor v2 on OpenAI CLIP ViT-L/14 embeddings
  clip:PROMPT                  cosine similarity of the CLIP image and prompt embeddings
  brightness:region=x0,y0,x1,y1  mean luma inside a box (fractions of the image), with a region mask
  digit:bold                   stroke boldness read by the digits judge, a small CNN trained on the rendered
                               digits (vargrpo_tools.py prepare): a learned, label-independent style reward
  digit:correct                the judge's probability of the asked digit: label-aware (reward(images, labels)),
                               the analogue of VAR-RL's OCR word accuracy
  ocr[:N]                      PP-OCR (rapidocr-onnxruntime) reads the image; 1 - edit distance / length
                               to the label written with N digits (default 2, the numbers preset):
                               label-aware, VAR-RL's text rendering reward; logs word accuracy and NED

Importing this module loads nothing and touches no network. Downloads are left to the libraries
(open_clip through huggingface_hub, torch.hub), with their settings: HF_HUB_OFFLINE, HF_ENDPOINT,
HF_HOME, TORCH_HOME, HTTPS_PROXY / HTTP_PROXY. HF_HUB_OFFLINE=1 also stops the torch.hub downloads.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


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
# CLIP (open_clip) and the LAION aesthetic predictor v2

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The aesthetic head was trained on OpenAI's ViT-L/14, whose weights need QuickGELU: open_clip's
# plain 'ViT-L-14' config with the 'openai' weights runs GELU and only warns (wrong embeddings).
AESTHETIC_CLIP = ("ViT-L-14-quickgelu", "openai")
AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac%2Blogos%2Bava1-l14-linearMSE.pth")
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
# A random CLIP small enough for CPU tests and smoke runs (--clip-model tiny-random); its 768-d
# embedding fits the real aesthetic head, so every code path runs, with meaningless scores.
TINY_CLIP_CONFIG = {"embed_dim": 768,
                    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def clip_preprocess(images_B3HW, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD):
    """CLIP's preprocessing on tensors, on their device, differentiable: bicubic resize (antialiased)
    of the shorter side to `size` (torchvision's size rule), centre crop, clamp to [0, 1] (as the
    uint8 images of the PIL pipeline are), normalise with OpenAI's mean / std."""
    B, C, H, W = images_B3HW.shape
    short, long = min(H, W), max(H, W)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if H <= W else (new_long, size)
    x = F.interpolate(images_B3HW.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size].clamp(0, 1)
    m, s = x.new_tensor(mean).view(1, 3, 1, 1), x.new_tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it (at its import): one switch for every download,
    the torch.hub files (aesthetic head, ResNet-50) included."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def register_clip_model(name: str) -> str:
    """'tiny-random' or a path to an open_clip JSON config -> a registered open_clip model name."""
    import open_clip
    if name == "tiny-random" or name.endswith(".json"):
        path = Path(name)
        if name == "tiny-random":
            path = Path(tempfile.mkdtemp()) / "tiny-random.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
        elif not path.is_file():
            raise ValueError(f"--clip-model {name}: no such open_clip config file")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"--clip-model {name!r} is not an open_clip model; see open_clip.list_models()")
    return name


def check_clip_pair(model_name: str, pretrained: str):
    """Refuse weights trained with another activation than the config's (open_clip only warns)."""
    import open_clip
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg and tag_cfg.get("quick_gelu", False) != open_clip.get_model_config(model_name).get("quick_gelu", False):
        raise ValueError(f"CLIP weights '{pretrained}' were trained with quick_gelu={tag_cfg.get('quick_gelu', False)} "
                         f"but model '{model_name}' does not match; use '{model_name}-quickgelu' (OpenAI weights) or drop the suffix")


def load_clip(model_name: str, pretrained: str | None, weights: str | None, device):
    """(frozen open_clip model, tokenizer). `weights`: a local checkpoint file (no network used);
    else `pretrained` is an open_clip tag ('openai') that open_clip fetches through huggingface_hub
    (its cache first); pretrained None / 'none': random weights. A failure is one line naming
    --clip-weights."""
    import open_clip
    source = weights or (None if pretrained in (None, "", "none") else pretrained)
    name = register_clip_model(model_name)
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"--clip-weights {weights}: no such file")
    if source and not weights:
        check_clip_pair(name, source)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-weight models (tests, smoke runs) are reproducible
            model = open_clip.create_model(name, pretrained=source, device=device)
    except Exception as e:  # offline, unreachable, proxy refused, not found: many types
        if weights or not source:  # not a download
            raise
        from huggingface_hub import constants
        if offline_mode():
            why = f"HF_HUB_OFFLINE=1 and they are not in the Hugging Face cache {constants.HF_HUB_CACHE}"
        else:
            why = first_line(e)
        repo = (open_clip.get_pretrained_cfg(name, source) or {}).get("hf_hub", "").rstrip("/")
        what = f"the open_clip checkpoint of the hub repository {repo}" if repo else "the open_clip checkpoint"
        raise RuntimeError(f"cannot load CLIP {name} weights '{source}' ({why}); download {what} "
                           "elsewhere and pass --clip-weights PATH (or --clip-pretrained none for random weights)") from None
    model.eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor v2: an MLP 768-1024-128-64-16-1 with dropouts 0.2/0.2/0.1
    and no activations (an affine map), fed the L2-normalised CLIP ViT-L/14 image embedding."""
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb_BD):
        with torch.autocast(device_type=emb_BD.device.type, enabled=False):  # fp32 even under autocast
            return self.layers(emb_BD.float()).squeeze(-1)


def cache_dir() -> Path:
    """The old vargrpo cache ($VARGRPO_CACHE, default ~/.cache/vargrpo): still read, never written."""
    return Path(os.environ.get("VARGRPO_CACHE") or Path.home() / ".cache" / "vargrpo")


def load_aesthetic_head(path: str | None) -> AestheticHead:
    """From `path` (--aesthetic-head), else torch.hub's cache ($TORCH_HOME/hub/checkpoints; the old
    vargrpo cache is read too), else downloaded there from LAION's repository by torch.hub (proxies
    honoured, sha256 checked before the file takes its name; not with HF_HUB_OFFLINE=1). A failure is
    one line naming the file and --aesthetic-head."""
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"--aesthetic-head {path}: no such file")
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / AESTHETIC_HEAD
    cached = [f for f in (hub_file, cache_dir() / AESTHETIC_HEAD) if f.is_file()]
    file = Path(path) if path else (cached or [hub_file])[0]
    todo = f"download {AESTHETIC_HEAD_URL} yourself and pass --aesthetic-head PATH"
    if not file.is_file():
        if offline_mode():
            raise FileNotFoundError(f"{AESTHETIC_HEAD} is not in {file.parent} and HF_HUB_OFFLINE=1 "
                                    f"forbids downloading it; {todo}")
        file.parent.mkdir(parents=True, exist_ok=True)
        try:  # a temporary file, renamed once its sha256 is right
            torch.hub.download_url_to_file(AESTHETIC_HEAD_URL, str(file), hash_prefix=AESTHETIC_HEAD_SHA256)
        except Exception as e:
            raise FileNotFoundError(f"{AESTHETIC_HEAD} is not in {file.parent} and downloading it failed "
                                    f"({first_line(e)}); {todo}") from None
    elif not path and hashlib.sha256(file.read_bytes()).hexdigest() != AESTHETIC_HEAD_SHA256:
        raise RuntimeError(f"{file} does not have the sha256 of LAION's {AESTHETIC_HEAD}; delete it and retry")
    head = AestheticHead()
    try:
        head.load_state_dict(torch.load(file, map_location="cpu", weights_only=True), strict=True)  # saved on CUDA
    except Exception as e:  # not a checkpoint, or another network's
        raise ValueError(f"{file} is not LAION's aesthetic head {AESTHETIC_HEAD} (sha256 {AESTHETIC_HEAD_SHA256[:16]}...): "
                         f"{first_line(e)}") from None
    return head.eval().requires_grad_(False)


class ClipImageEmbedder(nn.Module):
    """L2-normalised CLIP image embeddings of images in [0, 1] (differentiable); on a GPU the CLIP
    runs under bf16 autocast, the normalisation (and what reads the embedding) in fp32."""
    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        size = clip.visual.image_size
        self.size = size if isinstance(size, int) else size[0]

    def forward(self, images_B3HW):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images_B3HW.is_cuda):
            emb = self.clip.encode_image(clip_preprocess(images_B3HW, self.size))
        return F.normalize(emb.float(), dim=-1)


class Aesthetic(nn.Module):
    def __init__(self, embedder: ClipImageEmbedder, head: AestheticHead):
        super().__init__()
        self.embedder, self.head = embedder, head

    def forward(self, images_B3HW):
        return self.head(self.embedder(images_B3HW))


class ClipScore(nn.Module):
    """cos(CLIP image embedding, CLIP prompt embedding); the prompt is embedded once."""
    def __init__(self, embedder: ClipImageEmbedder, tokenizer, prompt: str):
        super().__init__()
        self.embedder = embedder
        device = next(embedder.clip.parameters()).device
        with torch.no_grad():
            text = embedder.clip.encode_text(tokenizer([prompt]).to(device)).float()
        self.register_buffer("text_D", F.normalize(text, dim=-1)[0])

    def forward(self, images_B3HW):
        return self.embedder(images_B3HW) @ self.text_D

    @staticmethod
    def extra_logs(cos_B, images_B3HW=None, labels_B=None):
        """CLIPScore as usually reported: 100 * max(cos, 0)."""
        return {"clipscore": 100 * cos_B.clamp_min(0)}


# ----------------------------------------------------------------------------------------------
# The digits judge: a small CNN trained on the images vargrpo_tools.render_digits draws (the CPU
# demo's data). It reads a digit's class (the demo's class-fidelity check) and its stroke boldness
# (a learned reward that does not fight the label, as "CLIP score to 'a painting'" in GRPO-VAR 5.3).

DIGIT_JUDGE = Path(__file__).resolve().parent / "weights" / "judge_digits.safetensors"
DIGIT_JUDGE2 = DIGIT_JUDGE.with_name("judge2_digits.safetensors")


class DigitJudge(nn.Module):
    """Images in [0, 1] -> 10 class logits and the stroke boldness (in units of font size / 24),
    read at 32 px after per-image standardisation (so background colour does not matter)."""
    reward_classes = 10  # as a reward (digit:bold): it reads drawings of the digits 0-9

    def __init__(self, width: int = 32):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        w = width
        self.features = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w),
                                      nn.MaxPool2d(2), *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classes, self.bold = nn.Linear(4 * w, 10), nn.Linear(4 * w, 1)
        self.register_buffer("boldness_mean", torch.zeros(()))
        self.register_buffer("boldness_std", torch.ones(()))

    def heads(self, images_B3HW):
        """(class logits (B, 10), standardised boldness (B,))."""
        x = F.interpolate(images_B3HW.float(), size=(32, 32), mode="area") if images_B3HW.shape[-1] != 32 else images_B3HW.float()
        x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 0.05)
        h = self.features(x)
        return self.classes(h), self.bold(h).squeeze(-1)

    def forward(self, images_B3HW):
        return self.heads(images_B3HW)[1] * self.boldness_std + self.boldness_mean


SHA256_CACHE = {}  # (path, size, mtime_ns) -> sha256: each file is read once per process
UNCHECKED_FOLDERS = set()  # folders whose missing or unreadable record was said


def file_sha256(path) -> str:
    """The sha256 of a file. A Hugging Face cache blob is named by its own (the hub's record of
    it); any other file is read once per process (cached by path, size and modification time)."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and re.fullmatch("[0-9a-f]{64}", real.name):
        return real.name

    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in SHA256_CACHE:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        SHA256_CACHE[key] = digest.hexdigest()
    return SHA256_CACHE[key]


def weight_records(folder) -> tuple[dict, list]:
    """The <preset>.json records in `folder` (written by `vargrpo_tools.py prepare`; weights/ ships
    them): ({file name: [(record, sha256), ...]}, [why each unreadable record cannot be read])."""
    recorded = {}
    unreadable = []
    for record in sorted(Path(folder).glob("*.json")):
        try:
            digests = json.loads(record.read_text()).get("sha256")
        except (OSError, ValueError, AttributeError) as e:
            unreadable.append(f"{record.name} is not readable JSON ({first_line(e)})")
            continue
        if isinstance(digests, dict):
            for name, digest in digests.items():
                recorded.setdefault(name, []).append((record, str(digest)))
    return recorded, unreadable


def check_recorded_sha256(path) -> bool:
    """A weight file whose sha256 a record beside it holds (weight_records) must have that hash:
    one ValueError naming the file otherwise (a changed byte, or a file from another preparation
    than its neighbours). Returns whether a record lists it."""
    path = Path(path)
    recorded, _ = weight_records(path.parent)
    for record, expected in recorded.get(path.name, []):
        actual = file_sha256(path)
        if actual == expected:
            continue
        raise ValueError(f"{path} is not the file {record} records (sha256 {actual[:12]}..., recorded "
                         f"{expected[:12]}...): it was changed, or comes from another "
                         f"preparation than the files beside it; restore it (git checkout weights/ for the "
                         f"shipped files) or build them all again with `python vargrpo_tools.py prepare`")
    return path.name in recorded


def check_prepared_file(path):
    """check_recorded_sha256 of a prepared file (the digits models, the judges); where no readable
    record lists it, one line on stderr, once per folder: it loads unchecked."""
    path = Path(path)
    if check_recorded_sha256(path):
        return
    folder = path.parent.resolve()
    if folder in UNCHECKED_FOLDERS:
        return
    UNCHECKED_FOLDERS.add(folder)
    _, unreadable = weight_records(folder)
    why = "; ".join(unreadable) or "no <preset>.json there records it"
    print(f"[vargrpo] {folder}: {why}, so {path.name} and the files beside it load without a check "
          f"of their sha256; restore the record (git checkout weights/ for the shipped files)",
          file=sys.stderr)


def judge_path(default: Path, path=None, weights_dir=None) -> Path:
    """The file a judge loads: `path`, else the file named like `default` in `weights_dir` if it is
    there (as for the model: --weights-dir first), else `default`."""
    local = Path(weights_dir or "") / default.name
    if path:
        return Path(path)
    if weights_dir and local.is_file():
        return local
    return default


def load_judge_weights(judge: nn.Module, default: Path, path, weights_dir, what: str, build: str = ""):
    """`judge` with the weights of judge_path(default, path, weights_dir), checked (its record,
    every name, shape and dtype kind, finite values); strictly, in eval mode, frozen."""
    from safetensors.torch import load_file
    file = judge_path(default, path, weights_dir)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {what} there; build it with `python vargrpo_tools.py prepare{build}`")
    check_prepared_file(file)
    state = load_file(str(file))
    own = judge.state_dict()
    redo = f"build it again with `python vargrpo_tools.py prepare{build}`"
    for k, v in state.items():
        if k in own and v.is_floating_point() != own[k].is_floating_point():
            raise ValueError(f"{file}: {k} is {v.dtype}, where the {what} holds"
                             f" {own[k].dtype}; {redo}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{file}: {k} holds inf or NaN values, so the file is"
                             f" damaged; {redo}")
    judge.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    judge.loaded_from = file  # vargrpo_run.weights_record: a run records what it started from
    return judge.eval().requires_grad_(False)


def load_digit_judge(path=None, weights_dir=None) -> DigitJudge:
    """The judge (judge_digits.safetensors): `path`, else `weights_dir`, else weights/ beside this file."""
    return load_judge_weights(DigitJudge(), DIGIT_JUDGE, path, weights_dir, "digits judge")


class DigitJudge2(nn.Module):
    """A second opinion on the digit class (a reward-hacking check, never a reward): another architecture
    than DigitJudge (no BatchNorm, strided 5x5 convolutions, a fully connected head on the 7x7 map) on
    another input (28 px grey ink: the distance of each pixel from the image's border colour)."""
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(nn.Conv2d(1, w, 5, stride=2, padding=2), nn.ReLU(inplace=True),
                                      nn.Conv2d(w, 2 * w, 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(2 * w * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, 10))

    @staticmethod
    def ink(images_B3HW):
        """(B, 1, 28, 28): each pixel's grey distance from the mean of the 2-pixel border, scaled to max 1."""
        g = F.interpolate(images_B3HW.float(), size=(28, 28), mode="area").mean(1, keepdim=True)
        ring = torch.ones(28, 28, dtype=torch.bool, device=g.device)
        ring[2:-2, 2:-2] = False
        ink = (g - g[:, :, ring].mean(-1)[:, :, None, None]).abs()
        return ink / (ink.amax((1, 2, 3), keepdim=True) + 0.05)

    def forward(self, images_B3HW):
        """Class logits (B, 10) of images in [0, 1]."""
        return self.mlp(self.features(self.ink(images_B3HW)))


def load_digit_judge2(path=None, weights_dir=None) -> DigitJudge2:
    """The second judge (judge2_digits.safetensors, written by prepare --preset digits7; it serves every
    digits preset): `path`, else `weights_dir`, else weights/ beside this file."""
    return load_judge_weights(DigitJudge2(), DIGIT_JUDGE2, path, weights_dir, "second digits judge",
                              build=" --preset digits7")


def load_numbers_judge2(path=None, weights_dir=None) -> DigitJudge2:
    """The numbers preset's second judge (judge2_numbers.safetensors, written by prepare
    --preset numbers): a DigitJudge2 trained on the halves of rendered numbers."""
    default = DIGIT_JUDGE.with_name("judge2_numbers.safetensors")
    return load_judge_weights(DigitJudge2(), default, path, weights_dir,
                              "second judge of the numbers", build=" --preset numbers")


class DigitCorrect(nn.Module):
    """digit:correct: the judge's probability that the image shows the asked digit, p(label | image) -- a
    reward that reads what was drawn and compares it with what was asked (the analogue of VAR-RL's OCR
    word accuracy). Label-aware: called as part(images, labels). Logs the judge's top-1 accuracy on the
    asked digit as digit:correct/accuracy."""
    needs_labels = True
    reward_classes = 10  # the digits 0-9

    def __init__(self, judge: DigitJudge):
        super().__init__()
        self.judge = judge

    def forward(self, images_B3HW, labels_B):
        if len(labels_B) and not 0 <= int(labels_B.min()) <= int(labels_B.max()) <= 9:
            raise ValueError(f"digit:correct reads the digits 0-9; got labels {int(labels_B.min())}..{int(labels_B.max())} "
                             f"(use it with a digits preset)")
        logits_BC = self.judge.heads(images_B3HW)[0].float()
        return logits_BC.softmax(-1).gather(1, labels_B.long()[:, None]).squeeze(1)

    def extra_logs(self, p_B, images_B3HW, labels_B):
        with torch.no_grad():
            read_B = self.judge.heads(images_B3HW)[0].argmax(-1)
        return {"accuracy": (read_B == labels_B).float()}


def _digit(arg, ctx):
    if arg not in ("bold", "correct"):
        raise ValueError(f"digit:{arg}: the digits judge's rewards are digit:bold and digit:correct")
    judge = load_digit_judge(weights_dir=ctx.get("weights_dir")).to(ctx["device"])
    return judge if arg == "bold" else DigitCorrect(judge)


# ----------------------------------------------------------------------------------------------
# OCR [VAR-RL's text rendering task]: PaddleOCR's PP-OCRv4 (the models ship inside the
# rapidocr-onnxruntime wheel, run by onnxruntime on the CPU) reads the number an image shows.


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal = row[0]
        row[0] = i
        for j, cb in enumerate(b, 1):
            above = row[j]
            row[j] = min(above + 1, row[j - 1] + 1, diagonal + (ca != cb))
            diagonal = above
    return row[-1]


def ocr_score(read: str, target: str) -> float:
    """The ocr reward of one image: 1 - min(d, |t|) / |t|, d the edit distance from the
    text read to the target t (flow_grpo's form): 1 exactly right, 0 when nothing is read."""
    d = min(edit_distance(read, target), len(target))
    return 1 - d / len(target)


def ned_similarity(read: str, target: str) -> float:
    """1 - normalised edit distance, d / max(|read|, |t|): the NED column of text rendering
    tables (higher is better)."""
    longest = max(len(read), len(target), 1)
    return 1 - edit_distance(read, target) / longest


class OCR(nn.Module):
    """ocr[:N]: PP-OCR reads each image; the reward is ocr_score(read, target), the target
    the image's class label written with N digits (default 2: the numbers preset draws its
    class 0-99 as "00"-"99"; ocr:1 for the digits presets). Label-aware. Logs word accuracy
    (exact match) and NED, as VAR-RL's tables. The paper's own reward is not given in its
    summary; this is flow_grpo's (1 - edit distance / target length).

    The recogniser alone reads the whole image (fast); `region_masks` runs the detector
    too, for mask propagation: the union of the detected text boxes."""
    needs_labels = True

    def __init__(self, digits: int = 2, size: int = 96):
        super().__init__()
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise ValueError("ocr needs the rapidocr-onnxruntime package: "
                             "pip install -r requirements.txt") from None
        threads = torch.get_num_threads()
        self.engine = RapidOCR(intra_op_num_threads=threads,
                               inter_op_num_threads=1)
        self.digits = digits
        self.reward_classes = 10 ** digits  # the numbers it reads: 0 .. 10**digits - 1
        self.size = size
        self.last = None

    def targets(self, labels_B) -> list:
        """The text each image should show: its label with `digits` digits."""
        top = 10 ** self.digits - 1
        if len(labels_B) and not 0 <= int(labels_B.min()) <= int(labels_B.max()) <= top:
            raise ValueError(
                f"ocr:{self.digits} reads the numbers 0-{top}; got labels "
                f"{int(labels_B.min())}..{int(labels_B.max())} (use ocr with the numbers "
                f"preset, ocr:1 with the digits presets)")
        return [f"{int(v):0{self.digits}d}" for v in labels_B]

    def pictures(self, images_B3HW) -> list:
        """uint8 (H, W, 3) arrays at `size` px, as the OCR reads them."""
        x = images_B3HW.detach().float().clamp(0, 1) * 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return [np.ascontiguousarray(a) for a in x.cpu().numpy()]

    @torch.no_grad()
    def read(self, images_B3HW) -> list:
        """The text the recogniser reads in each image ('' for none), in one batched call."""
        x = images_B3HW.detach()
        if self.last is not None:  # the reward, then its logs: one reading
            seen, texts = self.last
            if seen.shape == x.shape and torch.equal(seen, x):
                return texts
        results, _ = self.engine.text_rec(self.pictures(x))
        texts = [text.strip() for text, _ in results]
        self.last = (x.clone(), texts)
        return texts

    def forward(self, images_B3HW, labels_B):
        targets = self.targets(labels_B)
        read = self.read(images_B3HW)
        scores = [ocr_score(r, t) for r, t in zip(read, targets)]
        return torch.tensor(scores, device=images_B3HW.device)

    def extra_logs(self, values_B, images_B3HW, labels_B):
        targets = self.targets(labels_B)
        read = self.read(images_B3HW)
        exact = [float(r == t) for r, t in zip(read, targets)]
        ned = [ned_similarity(r, t) for r, t in zip(read, targets)]
        device = images_B3HW.device
        return {"word_accuracy": torch.tensor(exact, device=device),
                "ned": torch.tensor(ned, device=device)}

    @torch.no_grad()
    def region_masks(self, images_B3HW, labels_B=None):
        """(B, H, W): 1 inside the text boxes PP-OCR's detector finds in each image (the
        image padded by a quarter of its side, as the detector wants a margin); all ones
        where it finds none."""
        import cv2
        B, _, H, W = images_B3HW.shape
        pad = self.size // 4
        masks = []
        for picture in self.pictures(images_B3HW):
            framed = np.pad(picture, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            boxes, _ = self.engine.text_det(framed)
            mask = np.zeros((self.size, self.size), np.uint8)
            for box in [] if boxes is None else boxes:
                corners = np.round(np.asarray(box) - pad).astype(np.int32)
                cv2.fillPoly(mask, [corners], 1)
            if not mask.any():
                mask[:] = 1
            masks.append(torch.from_numpy(mask).float())
        masks = torch.stack(masks)[:, None]
        masks = F.interpolate(masks, size=(H, W), mode="area")[:, 0]
        return (masks > 0).float().to(images_B3HW.device)


def _ocr(arg, ctx):
    digits = 2
    if arg is not None:
        if not arg.isdigit() or not 1 <= int(arg) <= 6:
            raise ValueError(f"ocr:{arg}: give the number of digits, e.g. ocr:2 (or plain ocr)")
        digits = int(arg)
    return OCR(digits)


# ----------------------------------------------------------------------------------------------
# Registry and weighted sums


class Region(nn.Module):
    """brightness:region=x0,y0,x1,y1: mean luma inside a box given as fractions of the image. It
    also provides the box as a mask (`region_mask`), the clean case for mask propagation."""
    def __init__(self, box):
        super().__init__()
        self.box = box

    def region_mask(self, H: int, W: int, device=None):
        x0, y0, x1, y1 = self.box
        m = torch.zeros(H, W, device=device)
        m[round(y0 * H):round(y1 * H), round(x0 * W):round(x1 * W)] = 1
        return m

    def forward(self, images_B3HW):
        m = self.region_mask(*images_B3HW.shape[-2:], device=images_B3HW.device)
        if not m.any():
            raise ValueError(f"brightness:region={','.join(map(str, self.box))} holds no pixel of a "
                             f"{images_B3HW.shape[-2]}x{images_B3HW.shape[-1]} image; make the box larger")
        w = images_B3HW.new_tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
        return ((images_B3HW * w).sum(1) * m).sum((1, 2)) / m.sum()


def _brightness(kind):
    def make(arg, ctx):
        if arg is None:
            return Brightness(kind)
        m = re.fullmatch(r"region=([0-9.]+),([0-9.]+),([0-9.]+),([0-9.]+)", arg.replace(" ", ""))
        box = tuple(float(v) for v in m.groups()) if m and kind == "brightness" else None
        if box is None or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"{kind}:{arg}: expected brightness:region=x0,y0,x1,y1 with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
        return Region(box)
    return make


def _embedder(ctx):
    """One CLIP per build, shared by the components that use it."""
    if "embedder" not in ctx:
        name, tag = ctx.get("clip_model") or AESTHETIC_CLIP[0], ctx.get("clip_pretrained", AESTHETIC_CLIP[1])
        clip, tokenizer = load_clip(name, tag, ctx.get("clip_weights"), ctx["device"])
        ctx["embedder"], ctx["tokenizer"] = ClipImageEmbedder(clip).to(ctx["device"]), tokenizer
    return ctx["embedder"]


def _aesthetic(arg, ctx):
    if arg:
        raise ValueError(f"aesthetic takes no argument, got {arg!r}")
    name = ctx.get("clip_model") or AESTHETIC_CLIP[0]
    if name != "tiny-random" and not name.endswith(".json"):
        import open_clip
        if not (open_clip.get_model_config(name) or {}).get("quick_gelu", False):
            raise ValueError(f"aesthetic: LAION's head reads OpenAI CLIP ViT-L/14 embeddings, a QuickGELU model; "
                             f"--clip-model {name} is not one (use {AESTHETIC_CLIP[0]})")
    embedder = _embedder(ctx)
    if embedder.clip.visual.output_dim != 768:
        raise ValueError(f"aesthetic needs a CLIP with 768-d image embeddings (ViT-L/14, as LAION's head was trained on); "
                         f"--clip-model {ctx.get('clip_model')} gives {embedder.clip.visual.output_dim}")
    return Aesthetic(embedder, load_aesthetic_head(ctx.get("aesthetic_head")).to(ctx["device"]))


def _clip(arg, ctx):
    if not arg:
        raise ValueError("clip needs a prompt: clip:a painting")
    return ClipScore(_embedder(ctx), ctx["tokenizer"], arg)


REGISTRY = {
    "brightness": _brightness("brightness"),
    "bright": _brightness("bright"),
    "dark": _brightness("dark"),
    "aesthetic": _aesthetic,
    "clip": _clip,
    "digit": _digit,
    "ocr": _ocr,
}


RETURNS = ("a reward must return a (B,) float tensor, one value per image (finite, or NaN for an"
           " image it cannot score)")


class RewardReturnError(TypeError):
    """A reward component returned something else than RETURNS says."""


def described(values) -> str:
    """What a reward returned, in a few words: its type, shape and dtype."""
    if torch.is_tensor(values):
        if values.dim() == 0:
            return f"a 0-d tensor ({values.dtype})"
        return f"a tensor of shape {tuple(values.shape)} ({values.dtype})"
    if isinstance(values, (list, tuple)):
        return f"a {type(values).__name__} of {len(values)}"
    return f"a {type(values).__name__}"


def checked(name: str, values, B: int) -> torch.Tensor:
    """A component's rewards for B images as float32: a (B,) floating-point tensor, else one
    RewardReturnError saying what is needed and what came back (integers too: a 0/1 reward
    is returned as floats, `.float()`)."""
    floats = torch.is_tensor(values) and values.is_floating_point()
    if floats and values.shape == (B,):
        return values.float()
    raise RewardReturnError(f"reward {name}: {RETURNS}; for {B} images it returned {described(values)}")


def classes_of(part) -> int | None:
    """The classes a reward component is made for (class labels 0..classes-1), or None for
    any: label-aware components read the label (digit:correct 10, ocr:N 10**N); a judge
    trained on one set of classes reads only those (digit:bold: the digits)."""
    return getattr(part, "reward_classes", None)


class Reward(nn.Module):
    """sum_i w_i * component_i(images[, labels]). Call: reward(images, labels) -> (B,), or with
    return_components=True -> ((B,), {component name: (B,)} plus logged extras such as CLIPScore).
    Label-aware components (`needs_labels`, e.g. digit:correct) get the images' class labels (B,);
    label-blind ones ignore them, and sums mix both. No autograd graph unless built with
    differentiable=True (gradients then reach the images)."""
    def __init__(self, terms, differentiable: bool = False):
        super().__init__()
        self.names = [name for _, name, _ in terms]
        self.weights = [w for w, _, _ in terms]
        self.parts = nn.ModuleList([m for _, _, m in terms])
        self.differentiable = differentiable
        self.needs_labels = any(getattr(p, "needs_labels", False) for p in self.parts)

    def check_labels(self, images_B3HW, labels_B):
        """The labels a label-aware reward needs: one class per image, on the images' device."""
        names = [n for n, p in zip(self.names, self.parts) if getattr(p, "needs_labels", False)]
        if labels_B is None:
            raise ValueError(f"{', '.join(names)} scores an image against its class label: pass labels=")
        labels_B = torch.as_tensor(labels_B, device=images_B3HW.device)
        if labels_B.shape != images_B3HW.shape[:1]:
            raise ValueError(f"{', '.join(names)}: {len(images_B3HW)} images but labels of shape "
                             f"{tuple(labels_B.shape)}; give one label per image")
        return labels_B

    def forward(self, images_B3HW, labels=None, return_components: bool = False):
        if self.needs_labels:
            labels = self.check_labels(images_B3HW, labels)
        call = lambda part: part(images_B3HW, labels) if getattr(part, "needs_labels", False) else part(images_B3HW)
        B = len(images_B3HW)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            values = {name: checked(name, call(part), B) for name, part in zip(self.names, self.parts)}
            total = sum(w * values[name] for w, name in zip(self.weights, self.names))
        if not return_components:
            return total
        logs = dict(values)
        for name, part in zip(self.names, self.parts):
            if hasattr(part, "extra_logs"):
                for key, v in part.extra_logs(values[name], images_B3HW, labels).items():
                    logs[f"{name}/{key}"] = v
        return total, logs

    def region_mask(self, H: int, W: int, device=None):
        """The union of the components' regions (H, W) when every component scores a region, else
        None: a term that looks at the whole image (plain brightness, CLIP) has gradient outside
        any region, so a region mask would drop part of the reward's gradient (MP uses saliency then)."""
        if not all(hasattr(p, "region_mask") for p in self.parts):
            return None
        return torch.stack([p.region_mask(H, W, device) for p in self.parts]).amax(0)

    def region_masks(self, images_B3HW, labels=None):
        """Each image's region (B, H, W): the union of the components' regions, a fixed box
        (`region_mask`) or what a component finds in the image (`region_masks`: the OCR's text
        boxes), when every component scores one; else None, as region_mask."""
        B, _, H, W = images_B3HW.shape
        masks = []
        for part in self.parts:
            if hasattr(part, "region_masks"):
                masks.append(part.region_masks(images_B3HW, labels))
            elif hasattr(part, "region_mask"):
                box = part.region_mask(H, W, images_B3HW.device)
                masks.append(box.expand(B, H, W))
            else:
                return None
        return torch.stack(masks).amax(0)


TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([a-z_]+)(?::(.*))?$")


def parse_spec(spec: str):
    """'0.5*aesthetic+clip:a painting' -> [(0.5, 'aesthetic', None), (1.0, 'clip', 'a painting')].
    Terms are split at a '+' that starts another [weight*]name term, so prompts and weights such as
    'clip:a+b' or '1e+1*dark' keep theirs."""
    names = "|".join(sorted(REGISTRY, key=len, reverse=True))
    starts_term = rf"(?<![0-9.][eE])\+(?=\s*(?:[0-9.eE+-]+\s*\*\s*)?(?:{names})\s*(?::|\+|$))"
    terms = []
    for raw in re.split(starts_term, spec):
        m = TERM.match(raw)
        if not m or m.group(2) not in REGISTRY:
            raise ValueError(f"cannot parse reward term {raw.strip()!r} of {spec!r}; "
                             f"use [weight*]name[:argument] joined by '+', names: {', '.join(REGISTRY)}")
        try:
            weight = float(m.group(1)) if m.group(1) else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"bad weight {m.group(1)!r} in reward spec {spec!r}: use a finite number such as 0.5")
        terms.append((weight, m.group(2), m.group(3).strip() if m.group(3) else None))
    return terms


def build_reward(spec: str, device="cpu", differentiable: bool = False, clip_model: str | None = None,
                 clip_pretrained: str | None = AESTHETIC_CLIP[1], clip_weights: str | None = None,
                 aesthetic_head: str | None = None, weights_dir: str | None = None) -> Reward:
    """One Reward for a spec. CLIP options: clip_model (open_clip name, a JSON config path, or
    'tiny-random'; default ViT-L-14-quickgelu), clip_pretrained (tag, 'none' = random),
    clip_weights (local checkpoint file), aesthetic_head (local head file); weights_dir: a folder that
    may hold judge_digits.safetensors (else weights/ beside this file)."""
    ctx = dict(device=device, clip_model=clip_model, clip_pretrained=clip_pretrained,
               clip_weights=clip_weights, aesthetic_head=aesthetic_head, weights_dir=weights_dir)
    if clip_model == "tiny-random" and clip_pretrained == AESTHETIC_CLIP[1]:
        ctx["clip_pretrained"] = None  # there are no pretrained weights for the tiny config
    terms = []
    for weight, name, arg in parse_spec(spec):
        label = name if arg is None else f"{name}:{arg}"
        terms.append((weight, label, REGISTRY[name](arg, ctx)))
    return Reward(terms, differentiable).to(device)


class FunctionReward(nn.Module):
    """A reward given as a plain function fn(images (B, 3, H, W) in [0, 1], labels (B,)) -> (B,)
    (see register)."""
    needs_labels = True

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, images_B3HW, labels_B):
        return self.fn(images_B3HW, labels_B)


def register(name: str, fn):
    """Adds fn(images, labels) -> (B,) rewards to REGISTRY as `name`, in this process: then
    `--reward name`, build_reward("name") and sums such as "0.5*name+brightness" call it."""
    if not re.fullmatch(r"[a-z_]+", name):
        raise ValueError(f"reward name {name!r}: use lower-case letters and '_' only")
    if name in REGISTRY:
        raise ValueError(f"a reward named {name!r} exists already; choose another name")

    def make(arg, ctx):
        if arg is not None:
            raise ValueError(f"{name} takes no argument, got {arg!r}")
        return FunctionReward(fn)

    REGISTRY[name] = make
