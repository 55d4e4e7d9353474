"""Tests of reward_models.py in its order: brightness, CLIP and the LAION aesthetic head (the
preprocessing against open_clip's, model/weights pairs, local weights and offline failures), and the
registry of reward specs and their weighted sums, and the OCR reward (PP-OCR through
rapidocr-onnxruntime). (The digits judges: tests/test_digits.py.)
"""
import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import reward_models as rm
import vargrpo_tools as vt
from helpers import HEAD, ROOT, needs_head, timeout

# a process that loads a tiny CLIP, or a trainer that refuses its reward, takes ~10-20 s on a loaded
# 2-core machine
SUBPROCESS_TIMEOUT = timeout(300)


# ---- Brightness [GRPO-VAR 5.1]


def test_brightness_rewards():
    img = torch.zeros(3, 3, 4, 4)
    img[0] = 1.0
    img[1, 1] = 0.8 / 0.5870  # pure green of luma exactly 0.8
    img[2, 0] = 0.19 / 0.2989
    torch.testing.assert_close(rm.luma(img), torch.tensor([0.9999, 0.8, 0.19]))
    r = rm.build_reward("bright", "cpu")
    assert r(img).tolist() == [1.0, 1.0, 0.0]
    assert rm.build_reward("dark", "cpu")(img).tolist() == [0.0, 0.0, 1.0]
    total, parts = rm.build_reward("0.5*bright+2*dark", "cpu")(img, return_components=True)
    assert total.tolist() == [0.5, 0.5, 2.0] and set(parts) == {"bright", "dark"}


# ----------------------------------------------------------------------------------------------
# reward_models: aesthetic, CLIP score, preprocessing, weights


# ---- CLIP (open_clip) and the LAION aesthetic predictor v2


@pytest.mark.parametrize("size", [256, 64, 300])
def test_clip_preprocess_matches_open_clip_pil_transform(size):
    """Measured mean |ours - PIL| (normalised units): 0.005 on uniform noise, 0.0035 on smooth
    images at 256 px; the kernels differ (torch a=-0.75, PIL a=-0.5) and PIL rounds to uint8."""
    import open_clip
    pil_transform = open_clip.image_transform(224, is_train=False, mean=rm.OPENAI_MEAN, std=rm.OPENAI_STD)
    g = torch.Generator().manual_seed(size)
    x = (torch.rand(2, 3, size, size - 20 if size == 300 else size, generator=g) * 255).round() / 255
    ours = rm.clip_preprocess(x)
    ref = torch.stack([pil_transform(Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))) for im in x])
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert (ours - ref).abs().mean() < 0.01


def test_clip_model_pairs():
    import open_clip
    name, tag = rm.AESTHETIC_CLIP
    assert open_clip.get_model_config(name)["quick_gelu"] is True
    assert open_clip.get_pretrained_cfg(name, tag)["quick_gelu"] is True
    assert open_clip.get_model_config("ViT-L-14")["vision_cfg"] == open_clip.get_model_config(name)["vision_cfg"]
    assert not open_clip.get_model_config("ViT-L-14").get("quick_gelu", False)
    with pytest.raises(ValueError, match="quick_gelu=True.*ViT-L-14-quickgelu"):
        rm.check_clip_pair("ViT-L-14", "openai")  # silently wrong in open_clip (a warning): refused here
    rm.check_clip_pair(name, tag)


@pytest.mark.slow
def test_local_clip_weights_and_offline_failures(tmp_path):
    r = rm.build_reward("clip:a dog", "cpu", clip_model="tiny-random")
    torch.save(r.parts[0].embedder.clip.state_dict(), tmp_path / "clip.pt")
    code = ("import sys, torch, reward_models as rm\n"
            "r = rm.build_reward('clip:a dog', 'cpu', clip_model='tiny-random', clip_weights=sys.argv[1])\n"
            "import os; print(os.environ.get('HF_HUB_OFFLINE'))\n"  # local weights: the environment is left alone
            "print(r(torch.full((1, 3, 64, 64), 0.5)).item())\n")
    cwd = ROOT
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "clip.pt")], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0 and out.stdout.split()[-2] == "None", out.stdout + out.stderr
    assert float(out.stdout.split()[-1]) == pytest.approx(r(torch.full((1, 3, 64, 64), 0.5)).item(), abs=1e-5)
    # the real CLIP tag, not cached, hub off: a fast, clear failure naming --clip-weights
    t0 = time.time()
    res = subprocess.run([sys.executable, "vargrpo.py", "train", "--preset", "tiny", "--reward", "aesthetic",
                          "--out", str(tmp_path / "r"), "--steps", "1", "--aesthetic-head", str(HEAD)],
                         cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 2 and "--clip-weights PATH" in res.stderr and time.time() - t0 < 30, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "vargrpo.py", "train", "--preset", "tiny", "--reward", "aesthetic",
                          "--clip-model", "tiny-random", "--out", str(tmp_path / "r2"), "--steps", "1"],
                         cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "t"),
                                       "VARGRPO_CACHE": str(tmp_path / "c")},
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 2 and "sac+logos+ava1-l14-linearMSE.pth" in res.stderr and "--aesthetic-head" in res.stderr


@needs_head
def test_aesthetic_head_loads_strictly_and_is_affine():
    assert hashlib.sha256(HEAD.read_bytes()).hexdigest() == rm.AESTHETIC_HEAD_SHA256
    head = rm.load_aesthetic_head(str(HEAD))
    assert [k.rsplit(".", 1)[0] for k in head.state_dict()][::2] == ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]
    W, b = torch.eye(768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64)
    for i in (0, 2, 4, 6, 7):  # no activations: the MLP is one affine map w.x + b
        lin = head.layers[i]
        W, b = lin.weight.double() @ W, lin.weight.double() @ b + lin.bias.double()
    x = torch.nn.functional.normalize(torch.randn(16, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(head(x).double(), (x.double() @ W.T + b).squeeze(-1), atol=1e-4, rtol=1e-5)
    assert not head.training  # dropout off


@pytest.mark.slow
def test_clip_score_with_a_real_architecture():
    r = rm.build_reward("clip:an old picture", "cpu", clip_model="ViT-B-32", clip_pretrained="none")
    out = r(torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2,) and ((-1 <= out) & (out <= 1)).all()


# ---- Registry and weighted sums: parse_spec, build_reward


@pytest.mark.parametrize("spec, terms", [
    ("0.5*aesthetic+clip:a painting", [(0.5, "aesthetic", None), (1.0, "clip", "a painting")]),
    ("clip:salt+pepper", [(1.0, "clip", "salt+pepper")]),       # '+' inside a prompt
    ("1e+1*dark+bright", [(10.0, "dark", None), (1.0, "bright", None)]),  # '+' inside a weight
    ("clip:a house + 2*aesthetic", [(1.0, "clip", "a house"), (2.0, "aesthetic", None)]),
])
def test_reward_spec_terms(spec, terms):
    assert rm.parse_spec(spec) == terms


@pytest.fixture(scope="module")
def tiny_clip_reward():
    return rm.build_reward("aesthetic+0.5*clip:a painting", "cpu", clip_model="tiny-random",
                           aesthetic_head=str(HEAD), differentiable=False)


@needs_head
def test_combined_reward_components_and_clipscore(tiny_clip_reward):
    import open_clip
    img = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    total, parts = tiny_clip_reward(img, return_components=True)
    assert set(parts) == {"aesthetic", "clip:a painting", "clip:a painting/clipscore"}
    torch.testing.assert_close(total, parts["aesthetic"] + 0.5 * parts["clip:a painting"])
    torch.testing.assert_close(parts["clip:a painting/clipscore"], 100 * parts["clip:a painting"].clamp_min(0))
    clip_part = tiny_clip_reward.parts[1]
    assert clip_part.embedder is tiny_clip_reward.parts[0].embedder  # one CLIP shared by both
    clip = clip_part.embedder.clip
    text = clip.encode_text(open_clip.get_tokenizer("tiny-random")(["a painting"]))
    emb = clip.encode_image(rm.clip_preprocess(img))
    cos = torch.nn.functional.cosine_similarity(emb, text)
    torch.testing.assert_close(parts["clip:a painting"], cos, atol=1e-5, rtol=1e-4)
    x = img.clone().requires_grad_(True)
    assert not tiny_clip_reward(x).requires_grad  # no graph by default


@needs_head
def test_differentiable_reward_reaches_the_images():
    r = rm.build_reward("aesthetic+clip:a painting+brightness", "cpu", clip_model="tiny-random",
                        aesthetic_head=str(HEAD), differentiable=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    r(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_reward_input_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no pixel of a 64x64 image"):
        rm.build_reward("brightness:region=0.5,0.5,0.505,0.505", "cpu")(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="is not one"):
        rm.build_reward("aesthetic", "cpu", clip_model="ViT-L-14", clip_weights=str(tmp_path / "openai.pt"))
    (tmp_path / "head.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not LAION's aesthetic head"):
        rm.load_aesthetic_head(str(tmp_path / "head.pth"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not LAION's aesthetic head"):
        rm.load_aesthetic_head(str(tmp_path / "other.pth"))


# ---- OCR [VAR-RL's text rendering task]


@pytest.mark.parametrize("read, target, score, ned", [
    ("42", "42", 1.0, 1.0),
    ("43", "42", 0.5, 0.5),
    ("4", "42", 0.5, 0.5),
    ("", "42", 0.0, 0.0),
    ("A42", "42", 0.5, 2 / 3),
    ("A4299", "42", 0.0, 0.4),
    ("24", "42", 0.0, 0.0),
])
def test_ocr_score_and_ned_values(read, target, score, ned):
    """The documented values: 1 exactly right, 0 for nothing read, 1 - d/|t| clipped at 0; NED
    divides by the longer string."""
    assert rm.ocr_score(read, target) == pytest.approx(score)
    assert rm.ned_similarity(read, target) == pytest.approx(ned)
    assert rm.edit_distance(read, target) == rm.edit_distance(target, read)


@pytest.fixture(scope="module")
def numbers():
    """20 rendered two-digit numbers (held-out seed of the numbers preset), in [0, 1]."""
    images_u8, labels, _ = vt.render_digits(20, seed=999, res=64, digits=2)
    return images_u8.float() / 255, labels


def test_ocr_reads_rendered_numbers(numbers):
    """PP-OCR reads clean renders: reward 1 for the asked number, word accuracy and NED logged;
    asked for another number, the reward drops (in [0, 1] always)."""
    images, labels = numbers
    reward = rm.build_reward("ocr")
    total, logs = reward(images, labels, return_components=True)
    assert set(logs) == {"ocr", "ocr/word_accuracy", "ocr/ned"}
    assert logs["ocr/word_accuracy"].mean() >= 0.95
    assert total.mean() >= 0.95
    wrong = (labels + 11) % 100  # both digits differ
    other = reward(images, wrong)
    assert other.max() <= 0.5
    assert 0 <= other.min() and total.max() <= 1


def test_ocr_label_errors_are_one_line(numbers):
    images, labels = numbers
    reward = rm.build_reward("ocr")
    with pytest.raises(ValueError, match=r"ocr:2 reads the numbers 0-99; got labels .*numbers preset"):
        reward(images[:2], torch.tensor([5, 100]))
    with pytest.raises(ValueError, match="pass labels="):
        reward(images)
    with pytest.raises(ValueError, match="give the number of digits"):
        rm.build_reward("ocr:x")
    single = rm.build_reward("ocr:1")
    with pytest.raises(ValueError, match="ocr:1 reads the numbers 0-9"):
        single(images[:1], torch.tensor([12]))


def test_ocr_boxes_land_on_the_drawn_number(numbers):
    """MP's mask from the OCR's detected boxes covers the drawn number (the pixels away from the
    background colour) and leaves most of the background out."""
    images, labels = numbers
    reward = rm.build_reward("ocr", differentiable=True)
    masks = reward.region_masks(images[:6], labels[:6])
    assert masks.shape == (6, 64, 64)
    background = images[:6, :, :2, :2].mean((2, 3))[:, :, None, None]
    ink = (images[:6] - background).abs().amax(1) > 0.25
    covered = (masks.bool() & ink).sum((1, 2)) / ink.sum((1, 2))
    assert covered.min() >= 0.9, covered
    assert masks.mean((1, 2)).max() <= 0.8
