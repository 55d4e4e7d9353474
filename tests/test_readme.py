"""The README and docs/: size, links, words, the demo's numbers and the custom-reward example.

Also reward_models.register, the small API the README's example uses."""
import json
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import reward_models
from helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"

# words of how a project was made, not of what it is
HISTORY = re.compile(
    r"\b(sessions?|issues?|reviewers?|review rounds?|round \d+|we tried|was added"
    r"|no longer|the old README|built this|now runs)\b",
    re.IGNORECASE,
)


def readme() -> str:
    return README.read_text()


def pages():
    return sorted(DOCS.glob("*.md"))


def local_links(path):
    """The relative link targets of a Markdown file (no URLs, no #anchors)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    found = []
    for target in targets:
        if "://" in target or target.startswith("#"):
            continue
        found.append(target.split("#")[0])
    return found


# ---- (a) the README's shape

def test_readme_is_read_in_five_minutes():
    lines = readme().splitlines()

    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move sections to docs/"


def test_every_local_link_resolves():
    for path in [README, *pages()]:
        for target in local_links(path):
            resolved = (path.parent / target).resolve()

            assert resolved.exists(), f"{path.name} links to {target}, which is missing"


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(local_links(README))

    assert pages(), "docs/ holds no pages"
    for page in pages():
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def test_no_text_tells_how_the_project_was_built():
    for path in [README, *pages()]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            hit = HISTORY.search(line)

            assert hit is None, f"{path.name}:{n}: {hit.group(0)!r} in {line!r}"


def test_the_readme_writes_the_objective_as_one_formula():
    text = readme()

    for name in ["clip", r"\beta", "A_b", "VMR", "PANW", "MP"]:
        assert name in text
    assert text.count("$$") >= 2


# ---- (b) the demo's numbers

def demo_claims(text):
    """What the README says the demo printed: the CPU, the numbers, the margin and floor."""
    cpu = re.search(r"on\s+`([^`]+)`\s+\(torch\s+CPU\s+capability\s+`(\w+)`,\s+(\d+)\s+threads?\)", text)
    commit = re.search(r"What\s+it\s+printed\s+at\s+commit\s+`([0-9a-f]+)`", text)
    row = re.search(r"^\| (\d\.\d+) -> (\d\.\d+) \| (\d\.\d+) -> (\d\.\d+) \| (\d\.\d+) -> (\d\.\d+) \|",
                    text, re.MULTILINE)
    margin = re.search(r"the reward gains\s+at\s+least\s+(\d\.\d+)", text)
    floor = re.search(r"both\s+judges\s+read\s+at\s+least\s+(\d+)%", text)
    assert cpu and commit and row and margin and floor, "the README's demo section lost its numbers"
    numbers = [float(v) for v in row.groups()]
    keys = ["reward_first", "reward_last", "class_acc_before", "class_acc_after",
            "class_acc2_before", "class_acc2_after"]
    return {
        "cpu": cpu.group(1), "capability": cpu.group(2), "threads": int(cpu.group(3)),
        "numbers": dict(zip(keys, numbers)),
        "margin": float(margin.group(1)), "floor": int(floor.group(1)) / 100,
    }


def cpu_model() -> str:
    """lscpu's model name (what the README names), else platform's processor."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def test_demo_claims_parse_and_hold_their_own_premise():
    claims = demo_claims(readme())
    n = claims["numbers"]

    assert n["reward_last"] >= n["reward_first"] + claims["margin"]
    assert n["class_acc_after"] >= claims["floor"]
    assert n["class_acc2_after"] >= claims["floor"]


@pytest.mark.slow
def test_the_readme_demo_numbers_are_what_the_demo_prints(tmp_path):
    """Runs `bash run.sh demo` (its default settings, with the README's thread count) and compares
    summary.json with the README. On the CPU the README names (same lscpu model name and torch
    CPU capability) the six numbers must agree to 3 decimals. On another CPU fp32 rounding
    differs in the last bits and the sampled images diverge, so there the test checks the
    demo's premise the README states instead (reward gain >= its margin, both judges after
    >= its floor) and prints how far the numbers are from the README's."""
    claims = demo_claims(readme())
    env = {**os.environ, "OMP_NUM_THREADS": str(claims["threads"])}
    out = tmp_path / "demo"

    res = subprocess.run(["bash", "run.sh", "demo", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)

    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    same_cpu = (cpu_model() == claims["cpu"]
                and torch.backends.cpu.get_cpu_capability() == claims["capability"])
    for key, stated in claims["numbers"].items():
        print(f"{key}: README {stated}, this run {summary[key]:.4f}")
        if same_cpu:
            assert abs(summary[key] - stated) < 5e-4, f"{key}: README {stated}, demo {summary[key]}"
    assert summary["reward_last"] >= summary["reward_first"] + claims["margin"]
    assert summary["class_acc_after"] >= claims["floor"]
    assert summary["class_acc2_after"] >= claims["floor"]


# ---- (c) your own reward: the README's example runs

def example_code(text) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    mine = [b for b in blocks if b.startswith("# my_reward.py")]
    assert len(mine) == 1, "the README's custom-reward example (# my_reward.py) is missing"
    return mine[0]


def test_the_readme_custom_reward_example_trains(tmp_path):
    (tmp_path / "my_reward.py").write_text(example_code(readme()))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    flags = ["--preset", "tiny", "--out", str(run), "--steps", "2", "--labels-per-step", "2",
             "--group-size", "4", "--minibatch", "8", "--image-every", "0"]

    res = subprocess.run([sys.executable, "my_reward.py", *flags], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)

    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert json.loads((run / "args.json").read_text())["reward"] == "parity_light"
    for r in rows:
        assert 0 <= r["reward/mean"] <= 1


def test_the_example_reward_is_what_its_docstring_says():
    space = {}
    exec(example_code(readme()).split("reward_models.register")[0], space)
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.25)])

    r = space["parity_light"](images, torch.tensor([2, 3]))

    assert torch.allclose(r, torch.tensor([0.25, 0.75]))


# ---- reward_models.register

def parity(images, labels):
    return images.mean(dim=(1, 2, 3)) * (labels % 2)


@pytest.fixture
def registered():
    reward_models.register("test_parity", parity)
    yield "test_parity"
    reward_models.REGISTRY.pop("test_parity")


def test_register_makes_a_spec_name_that_calls_the_function(registered):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])

    alone = reward_models.build_reward(registered)(images, labels)
    summed = reward_models.build_reward(f"0.5*{registered}+brightness")(images, labels)

    assert torch.allclose(alone, parity(images, labels))
    bright = reward_models.luma(images)
    assert torch.allclose(summed, 0.5 * parity(images, labels) + bright, atol=1e-6)


def test_register_refuses_taken_and_malformed_names(registered):
    with pytest.raises(ValueError, match="exists already"):
        reward_models.register(registered, parity)
    with pytest.raises(ValueError, match="exists already"):
        reward_models.register("brightness", parity)
    with pytest.raises(ValueError, match="lower-case"):
        reward_models.register("My Reward", parity)
    with pytest.raises(ValueError, match="takes no argument"):
        reward_models.build_reward(f"{registered}:x")
