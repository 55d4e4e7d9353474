"""vargrpo_run: the run machinery behind vargrpo.py's trainer.

What a trainer needs and a reader of the method does not: errors and
their exit codes, the distributed helpers, settings from the command
line and --config, argument checks, the run folder (lock, atomic
checkpoints, exact resume, --overwrite rules), the metrics (their
reductions, the step's timing), the log and its TensorBoard mirror,
and Ctrl-C / SIGTERM handling. `train` reaches it through `Run` (one
object per run: three calls per step) and a few named helpers.

vargrpo.py imports this module; this module never imports vargrpo.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F


# ---- Errors. Each message ends with what to do; the exit code says which kind: 2 a user's
# mistake, 1 a failed run, 128 + signal.
class UsageError(ValueError):
    """A bad flag, file or folder (exit code 2)."""


class CheckpointError(RuntimeError):
    """A weights file that cannot be used (exit code 2)."""


class RunFailed(RuntimeError):
    """The run cannot go on (a reward that keeps raising, a diverged policy, a disk error); the
    message says what was saved (exit 1)."""


class Stopped(RuntimeError):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stopped (exit code 128 + signal, as
    shells report it)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class PeerFailed(RuntimeError):
    """Another process of the job failed (`message`: its reason; exit code: its code)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.everywhere = True


def everywhere(e: BaseException) -> BaseException:
    """Mark an error that every process of a torchrun job raises alike: process 0 alone reports
    it."""
    e.everywhere = True
    return e


def exit_code(e: BaseException) -> int:
    """The exit code of an error: 2 a user's mistake, 1 a failed run (or a bug), 128 + the
    signal after a signal."""
    if isinstance(e, PeerFailed):
        return e.code
    if isinstance(e, Stopped):
        return 128 + e.signum
    if isinstance(e, (UsageError, CheckpointError)):
        return 2
    return 1


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (200 characters)."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return lines[0][:200]


def need(ok, message: str):
    if not ok:
        raise UsageError(message)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- Distributed helpers. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python`
# run is rank 0 of 1 and never touches torch.distributed.
@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


# How long a process waits for the others in a collective (--dist-timeout): process 0 alone
# writes a checkpoint while the others wait in their next collective, and a d30 checkpoint (24 GB
# of .pt and an 8 GB safetensors built in memory) can take many minutes on network storage.
# NCCL's own default is 10 minutes, gloo's 30.
DIST_TIMEOUT_MINUTES = 60.0


def process_group_options(device: str, minutes: float) -> dict:
    """init_process_group's settings: the timeout of every collective (--dist-timeout) and, on
    a GPU, this process's device (NCCL binds its communicator to it at once)."""
    need(math.isfinite(minutes) and minutes > 0,
         f"--dist-timeout must be a positive number of minutes, got {minutes}")
    options = dict(timeout=datetime.timedelta(minutes=minutes))
    if device.startswith("cuda"):
        options["device_id"] = torch.device(device)
    return options


def setup_distributed(device=None, timeout_minutes: float = DIST_TIMEOUT_MINUTES) -> Dist:
    if device is None:
        device = "cpu"
        if torch.cuda.is_available():
            device = "cuda"

    if "RANK" not in os.environ:
        return Dist(device=device)

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])

    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"

    if not torch.distributed.is_initialized():
        backend = "gloo"
        if device.startswith("cuda"):
            backend = "nccl"
        options = process_group_options(device, timeout_minutes)
        torch.distributed.init_process_group(backend, **options)

    return Dist(rank, world, local, device)


def run_dist_timeout(args, given) -> float:
    """The process group's timeout: --dist-timeout, or resuming without it the run's own, from
    its args.json (the group starts before the checkpoint is read)."""
    if not args.resume or "dist_timeout" in given:
        return args.dist_timeout
    try:
        saved = json.loads((Path(args.resume) / "args.json").read_text())
        return float(saved["dist_timeout"])
    except (OSError, ValueError, KeyError, TypeError):  # an older run; its checks come later
        return args.dist_timeout


def why_no_cuda() -> str:
    """Why torch cannot use a CUDA GPU, in its own words: the warning torch.cuda.is_available()
    gives (a driver too old for this wheel) or the error of torch.cuda.init()."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return ""

    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as e:
        return first_line(e)
    for w in caught:
        return first_line(w.message)
    return "torch sees no CUDA device"


def default_device(device, preset: str) -> str:
    """--device when given; else cuda when torch can use a GPU, else the CPU. Not silently for
    an official preset (d16-d30, the paper's shape, fp32 on the CPU): one UsageError saying why
    CUDA is unavailable and that --device cpu insists."""
    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if preset in OFFICIAL_PRESETS:
        raise UsageError(
            f"--preset {preset} needs a CUDA GPU and torch cannot use one"
            f" ({why_no_cuda()}); fix CUDA, or pass --device cpu to run it"
            " on the CPU anyway (fp32, very slow)"
        )
    return "cpu"


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_initialized():
        reduce_op = getattr(torch.distributed.ReduceOp, op.upper())
        torch.distributed.all_reduce(t, reduce_op)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Equal-shaped tensors of all ranks, concatenated along dim 0 (rank order)."""
    if not torch.distributed.is_initialized():
        return t
    world = torch.distributed.get_world_size()
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """One picklable object of each rank, in rank order ([obj] in a single process)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def synced_time(device) -> float:
    """time.perf_counter() once the device has done its queued work (GPU work is asynchronous)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---- Settings: one --flag per dataclass field, --config, checks.
def arg(default, help, **extra):
    """A settings field: its default and its --help line."""
    return field(default=default, metadata=dict(help=help, **extra))


def add_dataclass_args(parser, cls):
    """One --flag per dataclass field, its help from the field's metadata. Defaults are
    suppressed so that the namespace holds only the flags actually given."""
    for f in fields(cls):
        meta = dict(f.metadata)
        help = f"{meta.pop('help')} (default: {f.default})"
        if isinstance(f.default, bool):
            kw = dict(action="store_true")
        else:
            kind = meta.pop("type", type(f.default))
            kw = dict(type=kind, **meta)
        parser.add_argument(flag(f.name), help=help, **kw)


def read_config(path: str, cls) -> dict:
    """--config FILE: a run's args.json (without its resume and
    overwrite settings); unknown keys are refused."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--config {path}: cannot read it as JSON ({first_line(e)});"
            " pass a run's args.json"
        ) from None

    if isinstance(saved, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - known)
    else:
        unknown = ["(not a JSON object)"]

    need(
        not unknown,
        f"--config {path}: unknown settings {', '.join(unknown)}; it must"
        " hold train flags, as a run's args.json does",
    )
    for f in fields(cls):
        if f.name in saved:
            check_config_value(path, f, saved[f.name])
    # where a run goes is said on the command line: a config never replaces a folder
    left_out = ("resume", "overwrite", "out")
    return {k: v for k, v in saved.items() if k not in left_out}


def check_config_value(path: str, f, value):
    """A --config value of the type (and among the choices) its flag takes: one UsageError
    naming the key."""
    kind = f.metadata.get("type", type(f.default))
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True  # JSON writes 1.0 as 1 at times
    if value is None and f.default is None:
        ok = True

    choices = f.metadata.get("choices")
    if ok and choices:
        ok = value in choices
    kinds = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
    want = kinds.get(kind, kind.__name__)
    if choices:
        want = f"one of {', '.join(choices)}"
    need(ok, f"--config {path}: {f.name!r} is {json.dumps(value)}, not {want} (as {flag(f.name)}"
         " takes); fix it in the file")


def parse_train_args(argv, cls):
    """`vargrpo.py train` flags (and --config FILE) -> (settings, the names of the flags
    given); argparse's own errors exit with code 2."""
    parser = argparse.ArgumentParser(prog="vargrpo.py",
                                     description="GRPO fine-tuning of VAR image models")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="GRPO fine-tuning (also under torchrun --nproc-per-node=N)",
        description="GRPO fine-tuning of a VAR model (labels per step and minibatch sizes"
        " are global). Exit codes: 0 done, 1 the run failed (what was saved is printed),"
        " 2 a bad flag, file or folder (nothing changed), 130 / 143 stopped by Ctrl-C /"
        " SIGTERM after saving.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="start from a run's args.json; flags given here win")
    add_dataclass_args(p, cls)
    given = vars(parser.parse_args(argv))
    given.pop("command")
    config = {}

    if "config" in given:
        config = read_config(given.pop("config"), cls)

    return cls(**{**config, **given}), set(given)


EXIT_FILE = "VARGRPO_EXIT_FILE"  # set by `launch`: where a process records its exit code


def exit_with(e: BaseException, prog: str):
    """One line on stderr for one of the errors above (under torchrun, an error every process
    raised is reported by process 0 alone), then its exit code; under `launch` the first process
    to fail also records its code in $VARGRPO_EXIT_FILE."""
    code = exit_code(e)
    quiet = getattr(e, "everywhere", False) and os.environ.get("RANK", "0") != "0"

    if not quiet:
        kind = "stopped" if isinstance(e, Stopped) else "error"
        print(f"{prog}: {kind}: {e}", file=sys.stderr, flush=True)
    if os.environ.get(EXIT_FILE):
        try:  # the first process to record one wins (O_EXCL)
            fd = os.open(os.environ[EXIT_FILE], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, str(code).encode())
            os.close(fd)
        except OSError:
            pass
    raise SystemExit(code)


# What a resumed run may change: neither the samples nor the updates depend on it.
RESUME_OVERRIDABLE = (
    "steps", "save_every", "keep_last", "image_every", "tracker",
    "device", "micro_batch", "sample_batch", "reward_batch",
    "grad_checkpointing", "weights_dir", "fsdp", "dist_timeout",
)


def check_train_args(a, world: int, presets: dict):
    """Every setting a user can get wrong: one UsageError naming it and what to do.
    `presets`: name -> VARConfig."""
    import reward_models

    for f in fields(a):  # NaN / inf would silently turn checks off
        value = getattr(a, f.name)
        finite = not isinstance(value, float) or math.isfinite(value)
        need(finite, f"{flag(f.name)}: not a finite number")

    try:
        terms = reward_models.parse_spec(a.reward)
    except ValueError as e:
        raise UsageError(f"--reward: {e}") from None
    need(a.preset in presets, f"--preset {a.preset!r}: choose one of {', '.join(presets)}")
    check_weights_dir(a, [name for _, name, _ in terms])

    positive = ("steps", "labels_per_step", "minibatch", "ppo_epochs", "lr", "temperature",
                "save_every", "keep_last", "reward_batch", "adv_eps", "dist_timeout")
    for name in positive:
        value = getattr(a, name)
        need(value > 0, f"{flag(name)} must be > 0, got {value}")
    not_negative = ("sample_batch", "micro_batch", "beta", "max_grad_norm", "weight_decay",
                    "image_every", "panw_alpha")
    for name in not_negative:
        value = getattr(a, name)
        need(value >= 0, f"{flag(name)} must be >= 0, got {value}")

    check_batch_sizes(a, world)
    need(0 < a.clip_eps < 1 and 0 < a.mp_keep <= 1,
         f"need 0 < --clip-eps < 1 and 0 < --mp-keep <= 1, got {a.clip_eps}, {a.mp_keep}")
    K = presets[a.preset].num_scales
    schedule = re.fullmatch(r"\d+:\d+", a.vmr_schedule)
    if schedule:
        schedule = sum(map(int, a.vmr_schedule.split(":"))) > 0
    need(0 <= a.vmr_m < K and a.vmr_k >= 2 and a.vmr_eta > 0 and schedule,
         f"need 0 <= --vmr-m < {K} (0 = auto), --vmr-k >= 2, --vmr-eta > 0 and"
         f" --vmr-schedule P:S (e.g. 3:1); got {a.vmr_m}, {a.vmr_k}, {a.vmr_eta},"
         f" {a.vmr_schedule!r}")

    need(a.tracker == "none" or importlib.util.find_spec("tensorboard"),
         "--tracker tensorboard: pip install tensorboard")
    need(a.device is None or re.fullmatch(r"cpu|cuda(:\d+)?", a.device),
         f"--device {a.device!r}: use cpu, cuda or cuda:N")
    cuda = (a.device or "").startswith("cuda")
    need(not cuda or torch.cuda.is_available(),
         f"--device {a.device}: this machine has no CUDA GPU")
    default_device(a.device, a.preset)  # an official preset: a GPU, or --device cpu
    sharded = not a.fsdp or torch.distributed.is_initialized()
    need(sharded or not a.resume,
         f"--resume {a.resume}: the run shards its model with --fsdp (its saved setting),"
         " which needs torchrun's processes: resume it under torchrun (python"
         f" vargrpo_run.py torchrun --nproc-per-node=N vargrpo.py train --resume {a.resume})")
    need(sharded, "--fsdp shards the model across torchrun's processes: launch with torchrun"
         " (bash run.sh does) or drop --fsdp")


def check_weights_dir(a, reward_names):
    """--weights-dir names a folder, and one that is read: the tiny preset and --random-init
    start from random weights (only the digit reward's judge may come from it)."""
    if not a.weights_dir:
        return
    need(Path(a.weights_dir).is_dir(), f"--weights-dir {a.weights_dir}: no such folder; name"
         " the folder that holds the preset's weight files")
    random = a.preset == "tiny" or a.random_init
    need(not random or "digit" in reward_names,
         f"--weights-dir {a.weights_dir} does nothing here: the tiny preset and --random-init"
         " start from random weights; drop --weights-dir")


def check_batch_sizes(a, world: int):
    """Labels, samples, minibatches and micro-batches that divide as they must."""
    need(a.lr < 1, f"--lr {a.lr:g}: AdamW at a learning rate >= 1 diverges at once; the paper"
         " uses 1e-4")
    need(a.group_size >= 2, "--group-size must be >= 2 (advantages compare samples of one"
         f" label), got {a.group_size}")
    need(a.labels_per_step % world == 0,
         f"--labels-per-step {a.labels_per_step} must be divisible by the {world} processes")
    samples = a.labels_per_step * a.group_size
    need(samples % a.minibatch == 0 and a.minibatch % world == 0,
         f"--minibatch {a.minibatch} must divide labels*group = {samples} and be divisible"
         f" by the {world} processes")
    share = a.minibatch // world
    need(not a.micro_batch or share % a.micro_batch == 0,
         f"--micro-batch {a.micro_batch} must divide the per-process minibatch {share}")


def resolve_args(a, given, saved: dict | None):
    """The run's settings: a resumed run's saved ones, with only RESUME_OVERRIDABLE flags
    changed; flags that would do nothing are refused."""
    cls = type(a)

    if saved is None:
        idle = []
        for k in sorted(given):
            if k.startswith("vmr_") and not a.vmr:
                idle.append(k)
            if k == "mp_keep" and not a.mask_propagation:
                idle.append(k)
        need(
            not idle,
            f"{', '.join(map(flag, idle))} only act with --vmr /"
            " --mask-propagation; add the switch or drop the flag",
        )
        return a

    unknown = sorted(set(saved) - {f.name for f in fields(cls)})
    need(
        not unknown,
        f"the checkpoint's settings hold {', '.join(unknown)}, unknown"
        " to this vargrpo version",
    )
    fixed = RESUME_OVERRIDABLE + ("resume", "out")
    changed = []

    for k in given:
        if k not in fixed and getattr(a, k) != saved.get(k):
            changed.append(k)

    need(
        not changed,
        "--resume keeps the run's settings;"
        f" {', '.join(map(flag, changed))} cannot change (only"
        f" {', '.join(map(flag, RESUME_OVERRIDABLE))} can)",
    )
    settings = dict(saved)

    for k in RESUME_OVERRIDABLE:
        if k in given:
            settings[k] = getattr(a, k)

    settings["resume"] = a.resume
    settings["out"] = a.resume
    return cls(**settings)


# ---- The run folder. Nothing in DIR but a run's own files is ever touched; a lock keeps a
# second trainer out; checkpoints are atomic and resume exactly.
LOCK_NAME = ".vargrpo.lock"
# The exact names of the files a run writes (the trainer, the demo, eval), and of their
# temporary twins: --overwrite and --keep-last touch these and nothing else.
STEP_FILE = re.compile(r"step_\d{6}\.(pt|safetensors)")
RUN_FILE = re.compile(
    r"(args\.json|metrics\.jsonl|reward_curve\.png|summary\.json|before\.png|after\.png"
    r"|eval\.md|eval\.json|eval_(pre-trained|fine-tuned)_(all|seen|unseen)\.png"
    r"|checkpoints/(step_\d{6}|last)\.(pt|safetensors)|images/step_\d{6}\.png"
    r"|tb/events\.out\.tfevents\.[\w.-]+)(\.tmp)?"
)


def lock_holder(out: Path) -> str | None:
    """Who holds DIR/.vargrpo.lock now (its pid, host and since when), or None when no live
    trainer does (the lock goes with its process, kill -9 included)."""
    import fcntl  # POSIX

    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None

    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # (closing the file releases it)
    except BlockingIOError:
        note = os.read(fd, 300).decode(errors="replace").strip()
        return note or "a trainer"
    finally:
        os.close(fd)


def run_files(out: Path) -> list[Path]:
    """The files of a run in DIR, found by their exact names."""
    found = []
    for folder in (out, out / "checkpoints", out / "images", out / "tb"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.relative_to(out).as_posix()
            if p.is_file() and RUN_FILE.fullmatch(name):
                found.append(p)
    return sorted(found)


def atomic_write(path: Path, write, advice="what was there before is intact; fix that, retry"):
    """write(file) into path.tmp, then rename it to path: a crash never leaves a torn file
    under the real name. An I/O error (disk full, read-only, ...) is one RunFailed naming
    the path, the cause and `advice`."""
    tmp = path.with_name(path.name + ".tmp")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        cause = getattr(e, "strerror", None) or first_line(e)
        # torch.save reports a short write as "unexpected pos" / "file write failed"
        short = re.search("unexpected pos|write failed", str(e))
        if path.parent.is_dir():
            free_mib = shutil.disk_usage(path.parent).free / 2**20
            if short or free_mib < 1:
                cause = f"No space left on device (it did not fit in {free_mib:.1f} MiB)"
        raise RunFailed(f"cannot write {path}: {cause}; {advice}") from None


def cannot_write(folder: Path) -> str | None:
    """Why no file can be made in an existing folder (a read-only disk, permissions), or
    None: one is made and removed (os.access cannot tell, e.g. for root on a read-only
    mount)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def run_state(out: Path) -> str:
    """'new' (absent, or empty but for our lock, or a start that never got past its settings:
    args.json alone), 'run' (a vargrpo run's folder) or 'other'."""
    if not out.exists():
        return "new"
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if not names:
        return "new"

    try:
        saved = json.loads((out / "args.json").read_text())
    except (OSError, ValueError):
        saved = None
    settings = {"reward", "preset", "steps"}
    is_args = isinstance(saved, dict) and settings <= saved.keys()
    if is_args and names == {"args.json"}:
        return "new"  # a start that stopped before its first step
    if is_args or (out / "checkpoints" / "last.pt").is_file():
        return "run"
    return "other"


def load_pth(path, hint: str):
    """torch.load(path, weights_only=True) onto the CPU; a file it cannot read is one
    CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if is_safetensors(path):
            raise CheckpointError(
                f"{path} is a safetensors file named .pth; rename it"
                f" {Path(path).stem}.safetensors"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint"
            f" ({first_line(e)}); {hint}"
        ) from None


def is_safetensors(path) -> bool:
    """Whether a file begins as safetensors files do: an 8-byte header length, then the JSON
    header ('{')."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    size = int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:] == b"{" and 0 < size < 100_000_000


def load_run_checkpoint(path, hint: str, keys, advice: str = "") -> dict:
    """A vargrpo run checkpoint (load_pth) that holds `keys`: one CheckpointError otherwise,
    ending with `advice`. Its contents must match the sha256 recorded when it was saved (a
    checkpoint saved before they were recorded has none) and its weights be finite, else one
    CheckpointError naming the file, ending with `hint`."""
    ckpt = load_pth(path, hint)
    if not (isinstance(ckpt, dict) and set(keys) <= ckpt.keys()):
        raise CheckpointError(f"{path} is not a vargrpo run checkpoint (it lacks"
                              f" {'/'.join(keys)}){advice}")
    recorded = ckpt.pop("sha256", None)
    check_sha256(path, ckpt, recorded, hint)
    check_finite(path, ckpt["model"], hint)
    return ckpt


def tensor_sha256(t: torch.Tensor) -> bytes:
    """The sha256 of a tensor's bytes (row-major, on the CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).digest()


def state_sha256(state) -> str:
    """The sha256 of a checkpoint's contents: every tensor's bytes, dtype and shape; numbers,
    strings and containers by value. What a save records and a load checks. The tensors are
    hashed in threads (hashlib releases the GIL): a d30 checkpoint's 24 GB in seconds."""
    from concurrent.futures import ThreadPoolExecutor

    tensors = []

    def outline(obj):
        if torch.is_tensor(obj):
            tensors.append(obj)
            return ["tensor", str(obj.dtype), list(obj.shape)]
        if isinstance(obj, dict):
            items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
            return ["dict", [[repr(k), outline(v)] for k, v in items]]
        if isinstance(obj, (list, tuple)):
            return ["list", [outline(v) for v in obj]]
        return repr(obj)

    digest = hashlib.sha256(json.dumps(outline(state)).encode())
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for tensor_digest in pool.map(tensor_sha256, tensors):
            digest.update(tensor_digest)
    return digest.hexdigest()


def export_sha256(weights: dict, meta: dict) -> str:
    """The sha256 of a .safetensors export: its tensors and its metadata (state_sha256)."""
    meta = {k: v for k, v in meta.items() if k != "vargrpo_sha256"}
    return state_sha256({"weights": weights, "metadata": meta})


def check_export(path, weights: dict):
    """A .safetensors export (its `weights` read) matches the sha256 in its metadata (an export
    saved before they were recorded has none): one CheckpointError naming the file otherwise."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    recorded = meta.get("vargrpo_sha256")
    if recorded is not None and export_sha256(weights, meta) != recorded:
        raise CheckpointError(
            f"{path} is damaged: its weights or settings are not what was saved (sha256"
            f" {recorded[:12]}... recorded); use the run's .pt checkpoint, or another step's"
        )


def check_sha256(path, state, recorded: str | None, hint: str):
    """state_sha256(state) is the `recorded` one (None: nothing recorded, nothing to check);
    else one CheckpointError naming the file, ending with `hint`."""
    if recorded is None:
        return
    actual = state_sha256(state)
    if actual != recorded:
        raise CheckpointError(
            f"{path} is damaged: its contents (sha256 {actual[:12]}...) are not what was"
            f" saved (sha256 {str(recorded)[:12]}...); {hint}"
        )


def check_finite(path, state: dict, hint: str):
    """Every floating weight of a state_dict finite (the block mask's -inf apart), else one
    CheckpointError naming the file and the weight, ending with `hint`."""
    for k, v in state.items():
        if k == "attn_bias_for_masking":  # the block mask: -inf by design
            continue
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: {k} holds inf or NaN values, so the file is"
                                  f" damaged; {hint}")


# ---- Pre-trained weights: where the files come from and what they hold.
# vargrpo.load_pretrained loads them strictly.
OFFICIAL_REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"
OFFICIAL_PRESETS = ("d16", "d20", "d24", "d30")
OFFICIAL_FILES = [VAE_FILE] + [f"var_{p}.pth" for p in OFFICIAL_PRESETS]


def find_or_download(filename: str, weights_dir=None) -> Path:
    """`filename` (or the .safetensors of that name) in weights_dir, in weights/ beside this
    file or in the old cache ($VARGRPO_CACHE, default ~/.cache/vargrpo; read, never written).
    Else an official file comes from huggingface_hub as it is configured: its cache
    ($HF_HOME/hub) first, then $HF_ENDPOINT through any proxy (HTTPS_PROXY), no download with
    HF_HUB_OFFLINE=1; no partial file is left under the real name."""
    old_cache = os.environ.get("VARGRPO_CACHE")
    old_cache = Path(old_cache or Path.home() / ".cache" / "vargrpo")
    here = Path(__file__).resolve().parent / "weights"
    folders = [Path(f) for f in (weights_dir, here, old_cache) if f]
    names = (filename, Path(filename).stem + ".safetensors")

    for folder in folders:
        found = [folder / name for name in names if (folder / name).is_file()]
        if found:
            return recorded_one(found)

    where = ", ".join(str(f) for f in folders)
    if filename not in OFFICIAL_FILES:
        raise CheckpointError(
            f"{names[1]} (or {filename}) is not in {where}; pass --weights-dir naming the"
            " folder that holds it, or build it with `python vargrpo_tools.py prepare`"
        )

    from huggingface_hub import constants, hf_hub_download, hf_hub_url

    try:
        return Path(hf_hub_download(OFFICIAL_REPO, filename))
    except Exception as e:  # offline, unreachable, proxy refused, 404, disk full
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            cause = e.__cause__ or e
            why = (f"downloading it failed ({type(cause).__name__}:"
                   f" {first_line(cause)})")
        url = hf_hub_url(OFFICIAL_REPO, filename)
        raise CheckpointError(
            f"{filename} is not in {where} or {constants.HF_HUB_CACHE}"
            f" (the Hugging Face cache), and {why}; download {url}"
            " yourself and pass --weights-dir naming its folder"
        ) from None


def recorded_one(found: list[Path]) -> Path:
    """Of a weights file's forms in one folder (X.pth, X.safetensors), the one that the folder's
    record (<preset>.json) lists, else the only one; two that no record decides between, or a file
    where the record lists its other form, are one CheckpointError."""
    import reward_models

    recorded, _ = reward_models.weight_records(found[0].parent)
    listed = [p for p in found if p.name in recorded]
    if len(listed) == 1:
        return listed[0]

    names = [p.name for p in found]
    twin = names[0].replace(".pth", ".safetensors")
    if len(found) == 1 and twin not in recorded:
        return found[0]
    if len(found) == 1:
        record = recorded[twin][0][0]
        raise CheckpointError(
            f"{found[0]} is not the file {record} records ({twin}); put that file"
            " back, or move the record away to load this one"
        )
    raise CheckpointError(
        f"{found[0].parent} holds both {' and '.join(names)}, and no record there"
        " lists just one of them; move the one that is not the preset's away"
    )


def read_state_dict(path) -> dict:
    """The state_dict in a .safetensors or .pth file: a plain state_dict, the official training
    script's wrapper (ckpt['trainer']['var_wo_ddp']) or a vargrpo checkpoint
    (ckpt['model']). A file whose sha256 a record beside it holds must match it (the shipped
    weights); a non-finite weight is blamed on the file."""
    import reward_models

    try:
        reward_models.check_recorded_sha256(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    state = read_tensors(path)
    check_finite(path, state, "fetch or build it again")
    return state


def read_tensors(path) -> dict:
    """read_state_dict's reading."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file"
                f" ({first_line(e)}); export it again"
            ) from None

    hint = "if it is a partial download, delete it and fetch it again"
    obj = load_pth(path, hint)

    if isinstance(obj, dict):
        trainer = obj.get("trainer")
        if isinstance(trainer, dict) and "var_wo_ddp" in trainer:
            obj = trainer["var_wo_ddp"]
        elif isinstance(obj.get("model"), dict):
            obj = obj["model"]

    tensors = isinstance(obj, dict) and obj

    if not tensors or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no model state_dict; pass an official"
            " VAR/VQVAE .pth file"
        )

    return obj


def check_depth(var_sd: dict, depth: int, path):
    """A VAR state_dict of another depth than the preset's: one CheckpointError."""
    depths = [int(k.split(".")[1]) + 1 for k in var_sd if k.startswith("blocks.")]
    found = max(depths, default=0)
    if found == depth:
        return
    advice = ("replace it with the preset's own file (an official preset's download, or"
              " what `python vargrpo_tools.py prepare` builds)")
    if f"d{found}" in OFFICIAL_PRESETS:
        advice = f"use --preset d{found}, the preset it was made for, or {advice}"
    raise CheckpointError(
        f"{path} holds a depth-{found} VAR (by its shapes), not depth {depth}; {advice}"
    )


def load_checked(module, state_dict: dict, path,
                 assign: bool = False):
    """load_state_dict(strict=True), with a one-line error naming what differs: names, shapes,
    and the kind of each dtype (a float weight never loads from an integer tensor, which
    load_state_dict would cast)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = []
    kinds = []

    for k in own:
        if k not in state_dict:
            continue
        given = state_dict[k]
        if given.shape != own[k].shape:
            shapes = f"{tuple(given.shape)} vs {tuple(own[k].shape)}"
            wrong.append(f"{k} {shapes}")
        if given.is_floating_point() != own[k].is_floating_point():
            dtypes = f"{given.dtype} vs {own[k].dtype}".replace("torch.", "")
            kinds.append(f"{k} {dtypes}")

    problems = []

    for name, keys in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", wrong), ("wrong dtype", kinds)):
        if keys:
            more = ", ..." if len(keys) > 3 else ""
            shown = ", ".join(keys[:3])
            problems.append(f"{name} ({len(keys)}): {shown}{more}")

    advice = "check that the file and the preset/config belong together"
    if kinds:
        advice = ("float weights cannot load from integers (a converted file): use the"
                  " file as it was saved")
    if problems:
        raise CheckpointError(
            f"{path} does not match {type(module).__name__}:"
            f" {'; '.join(problems)}; {advice}"
        )

    module.load_state_dict(state_dict, strict=True, assign=assign)


def to_float32(state_dict: dict) -> dict:
    """Floating-point tensors in float32 (files may hold fp16)."""
    out = {}
    for k, v in state_dict.items():
        if v.is_floating_point():
            v = v.float()
        out[k] = v
    return out


# ---- Setting up a run: the reward, DDP, autocast, step timing.
def make_reward(spec: str, device, a, differentiable: bool = False):
    """reward_models.build_reward with the CLIP / aesthetic options of `a`; its errors become
    one line."""
    import reward_models

    try:
        return reward_models.build_reward(
            spec, device, differentiable, clip_model=a.clip_model,
            clip_pretrained=a.clip_pretrained,
            clip_weights=a.clip_weights,
            aesthetic_head=a.aesthetic_head, weights_dir=a.weights_dir,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"reward {spec!r}: {e}") from None


def check_reward_classes(reward, a, num_classes: int):
    """A reward made for fewer classes than the preset draws (digit:correct reads the digits
    0-9, a 1000-class preset asks for others): one UsageError, before anything is sampled."""
    import reward_models

    for name, part in zip(reward.names, reward.parts):
        classes = reward_models.classes_of(part)
        if classes is None:
            continue
        need(num_classes <= classes,
             f"--reward {a.reward}: {name} is made for the classes 0-{classes - 1}, and"
             f" --preset {a.preset} draws {num_classes} classes; choose a reward for that"
             " preset (brightness, aesthetic, clip:PROMPT) or a preset it reads")


def distribute(policy, ref, d, fsdp: bool = False):
    """The model step 5 trains: under torchrun the policy in a DistributedDataParallel wrapper,
    or with --fsdp the policy and the frozen reference sharded in place by FSDP2 (shard_fsdp) and
    returned as they are; in one process the policy itself. DDP does not broadcast the buffers
    before every forward: they are constants (the block-causal mask, the scale ids, a zero
    bias)."""
    if fsdp:
        shard_fsdp(ref, d.device)
        return shard_fsdp(policy, d.device)
    if d.world == 1:
        return policy

    device_ids = None
    if d.device.startswith("cuda"):
        device_ids = [d.local_rank]
    return torch.nn.parallel.DistributedDataParallel(
        policy, device_ids=device_ids, gradient_as_bucket_view=True,
        broadcast_buffers=False,
    )


def grad_sync(model, last: bool):
    """The context of one micro-batch's backward pass: under DDP, all but a minibatch's last
    micro-batch keep their gradients local (no_sync: they add up, and the last one all-reduces
    the sum). Under --fsdp every micro-batch reduce-scatters its gradients into the shards
    (accumulating them unreduced would hold the whole gradient on every process)."""
    if last or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (max_norm 0 = no clipping); returns the norm before
    clipping as a plain tensor on the device (under --fsdp, the norm of all shards)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor
        norm = norm.full_tensor()
    return norm


# ---- --fsdp: PyTorch FSDP2. Each process holds 1 / world of every weight, gradient and AdamW
# moment; a block's weights are gathered for its forward and backward only. Checkpoints hold
# the whole state in the layout of an unsharded run, so either kind resumes the other.
def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_fsdp(var, device: str):
    """FSDP2 (fully_shard) in place: every transformer block its own unit, then the root (the
    embeddings and the head). The weights stay fp32 (no MixedPrecisionPolicy): autocast casts
    them as an unsharded run does, and the head runs in fp32 [C5]."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that a sharded module returns a view (F.linear's logits): nothing modifies
    # the logits in place (process_logits builds new tensors), so its hooks are kept
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.split(":")[0], (world,))
    for block in var.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(var, mesh=mesh)
    return var


def sampling_policy(policy):
    """The policy step 1 samples from: itself, or under --fsdp a plain copy of it holding the
    gathered weights (the sampler calls the blocks and embeddings one scale at a time, outside
    the forward pass through which FSDP gathers them). The copy is freed with the rollout."""
    if not is_sharded(policy):
        return policy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    options = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(policy, options=options)  # every process: whole tensors
    mro = type(policy).__mro__[1:]
    plain = next(c for c in mro if not issubclass(c, FSDPModule))  # the VAR class
    with torch.device("meta"):
        copy = plain(policy.config, policy.vae)
    copy.load_state_dict(state, assign=True)
    return copy


def optimizer_names(opt, model) -> list:
    """The parameter name of each optimizer index (its state_dict numbers the parameters of
    its groups in order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def renumber(optim_sd: dict, keys: list, new_keys: list) -> dict:
    """An optimizer state_dict with its parameter keys mapped keys[i] -> new_keys[i]."""
    if not optim_sd:
        return optim_sd
    new = dict(zip(keys, new_keys))
    state = {new[k]: v for k, v in optim_sd["state"].items()}
    groups = []
    for g in optim_sd["param_groups"]:
        groups.append({**g, "params": [new[k] for k in g["params"]]})
    return {"state": state, "param_groups": groups}


def full_state(policy, opt) -> tuple:
    """(model, optimizer) state_dicts, whole, in the layout of an unsharded run: the model's
    official keys, the optimizer's parameters numbered. Call on every process: under --fsdp
    they gather the shards onto rank 0's CPU (the other processes get {})."""
    if not is_sharded(policy):
        return policy.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(policy, options=options)
    optim_sd = get_optimizer_state_dict(policy, opt, options=options)
    names = optimizer_names(opt, policy)
    return model_sd, renumber(optim_sd, names, list(range(len(names))))


def load_optimizer(opt, policy, optim_sd: dict):
    """A whole optimizer state_dict (full_state's layout) into the optimizer; under --fsdp
    each process keeps its shard of it."""
    if not is_sharded(policy):
        opt.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_optimizer_state_dict,
    )

    names = optimizer_names(opt, policy)
    by_name = renumber(optim_sd, list(range(len(names))), names)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(policy, opt, by_name, options=options)


def weights_finite(module, device) -> bool:
    """Whether every weight is finite, on every process (under --fsdp each holds a shard)."""
    ok = True
    for p in module.parameters():
        if hasattr(p, "to_local"):  # a DTensor: this process's shard
            p = p.to_local()
        ok = ok and bool(torch.isfinite(p).all())
    flag = torch.tensor([float(ok)], device=device)
    return bool(all_reduce(flag, "min").item())


def autocast(dtype: str, device: str):
    """A factory of the model's autocast context: bf16 on GPUs and fp32 on the CPU by default."""
    chosen = {"bf16": torch.bfloat16, "fp32": None}
    chosen["auto"] = None
    if device.startswith("cuda"):
        chosen["auto"] = torch.bfloat16
    if chosen[dtype] is None:
        return nullcontext
    device_type = device.split(":")[0]
    return functools.partial(torch.autocast, device_type,
                             dtype=chosen[dtype])


# ---- How many rows a sample() call can take (--sample-batch 0 on a GPU). README, "Memory:
# what fits on one GPU", derives these counts.
def sample_row_bytes(config, dtype_bytes: int) -> int:
    """Peak bytes one row adds to the trainer's sample() call (no CFG / top-k / top-p), which
    it reaches at the last scale. dtype_bytes: of the autocast dtype (2 for bf16; 4 in fp32).
    D blocks, width C, L tokens of which l at the last scale, vocabulary V:
      KV cache   2 D L C s                  k and v of every block and scale, in that dtype
      then the larger of two moments of the last scale:
      logits     4 l (C + 3 V)              fp32: the last block's output, and three (l, V)
                                            tensors alive at once (logits, probabilities and
                                            the draw's exponentials, or the log-probs)
      attention  l C (20 + 7 s) + 2 L C s   a block's residual and LayerNorm (fp32), q and k
                                            (fp32 under CUDA autocast), qkv, casts and output
                                            (s), and the cache's new k and v while its old
                                            ones are still referenced"""

    D = config.depth
    C = config.embed_dim
    L = config.seq_len
    V = config.vocab_size
    l = config.patch_nums[-1] ** 2
    s = dtype_bytes
    cache = 2 * D * L * C * s
    logits = 4 * l * (C + 3 * V)
    attention = l * C * (20 + 7 * s) + 2 * L * C * s
    return cache + max(logits, attention)


SAMPLE_MEMORY_SHARE = 0.9  # of the free memory; the rest: the allocator's fragmentation


def rows_that_fit(free_bytes: int, config, dtype_bytes: int, group_size: int) -> int:
    """The rows of one sample() call that fit in free_bytes: whole groups, at least one
    group. Under autocast (dtype_bytes < 4) the blocks' weights are first cast to that dtype
    and the casts kept (18 C^2 weights per block)."""
    fixed = weight_cast_bytes(config, dtype_bytes)
    usable = free_bytes * SAMPLE_MEMORY_SHARE - fixed
    rows = max(0, int(usable)) // sample_row_bytes(config, dtype_bytes)
    groups = max(1, rows // group_size)
    return groups * group_size


def groups_per_sample_call(sample_batch: int, group_size: int, n_groups: int, config,
                           device) -> int:
    """Groups per sample() call: --sample-batch rows in whole groups (at least one); 0: on a
    GPU as many as fit in its free memory now (torch.cuda.mem_get_info, plus what PyTorch's
    allocator holds unused), on the CPU all of the process's groups."""
    if sample_batch:
        return max(1, sample_batch // group_size)
    device = torch.device(device)
    if device.type != "cuda":
        return n_groups

    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    dtype = torch.float32
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    rows = rows_that_fit(free, config, dtype.itemsize, group_size)
    return min(n_groups, rows // group_size)


# ---- How many samples a forward/backward pass of the update takes (--micro-batch 0 on a
# GPU), and what a run holds on one. docs/memory.md's tables are these numbers (`python
# vargrpo_tools.py bench --memory-plan`): worked out, not measured.
def weight_cast_bytes(config, dtype_bytes: int) -> int:
    """The blocks' weights cast to the autocast dtype (dtype_bytes < 4; 0 in fp32), which a pass
    keeps whole: autocast's cache while it runs, the backward's saved tensors after it. 18 C^2
    per block: qkv 3, proj 1, FFN 8, adaLN 6."""
    if dtype_bytes >= 4:
        return 0
    return 18 * config.depth * config.embed_dim ** 2 * dtype_bytes


# Per token and channel of one block: the bytes autograd keeps for the backward pass.
#   fp32 (4 bytes each): both LayerNorms' inputs (the residual) and outputs, the normalised q the
#     learned scale multiplies, and under autocast the fp32 copies of q and k that F.normalize
#     makes (CUDA autocast runs norm in fp32): 7 tensors, or 5 in fp32
#   the autocast dtype (s bytes): the inputs of qkv, proj and fc1 (3), qkv (3), q and k cast for
#     attention (2), attention's output (1), the proj and fc2 outputs the gates multiply (2),
#     fc1's and the GELU's outputs (8): 19
# 7 x 4 + 19 x 2 = 66 bytes under bf16 autocast, 5 x 4 + 19 x 4 = 96 in fp32.
BLOCK_SAVED_FP32 = {2: 7, 4: 5}
BLOCK_SAVED_CAST = 19
# fp32 (L, V) logits tensors per sample: the kept logits, the previous micro-batch's (held until
# the next forward returns) and four in the backward of log-softmax and gather; the exact KL adds
# the reference's logits, both log-softmaxes and its terms (12)
LOGITS_TENSORS = 6
EXACT_KL_LOGITS_TENSORS = 12


def update_sample_bytes(config, dtype_bytes: int, checkpointing: bool = False,
                        kl_exact: bool = False) -> int:
    """Peak bytes one sample adds to the update's forward and backward pass (all L tokens
    teacher-forced), as CUDA autocast runs it (LayerNorm and F.normalize in fp32). D blocks, width
    C, vocabulary V:
      blocks    D L C (4 f + 19 s)     what each block keeps for the backward (f fp32 tensors:
                                       7 under autocast, 5 in fp32; above)
                with checkpointing: each block's fp32 input, and one block's set again
      head      12 L C                 fp32 LayerNorm input and output, the head's input
      logits    4 L V n                n fp32 (L, V) tensors: 6 (k3), 18 (exact KL)"""
    L = config.seq_len
    C = config.embed_dim
    s = dtype_bytes
    block = L * C * (4 * BLOCK_SAVED_FP32[s] + BLOCK_SAVED_CAST * s)
    blocks = config.depth * block
    if checkpointing:
        blocks = config.depth * L * C * 4 + block

    n = LOGITS_TENSORS
    if kl_exact:
        n += EXACT_KL_LOGITS_TENSORS
    return blocks + 12 * L * C + 4 * L * config.vocab_size * n


def largest_divisor_up_to(n: int, most: int) -> int:
    """The largest divisor of n that is <= most (1 when most < 1)."""
    for d in range(min(n, most), 1, -1):
        if n % d == 0:
            return d
    return 1


def micro_batch_that_fits(free_bytes: int, share: int, config, dtype_bytes: int,
                          pending_bytes: int = 0, checkpointing: bool = False,
                          kl_exact: bool = False) -> int:
    """Samples per forward/backward pass: the largest divisor of the process's share of a
    minibatch whose pass fits in SAMPLE_MEMORY_SHARE of free_bytes, after pending_bytes (what
    the pass allocates besides its activations: the gradients; under --fsdp the gathered blocks)
    and the weight casts. At least 1."""
    fixed = pending_bytes + weight_cast_bytes(config, dtype_bytes)
    usable = free_bytes * SAMPLE_MEMORY_SHARE - fixed
    per_sample = update_sample_bytes(config, dtype_bytes, checkpointing, kl_exact)
    fit = max(0, int(usable)) // per_sample
    return largest_divisor_up_to(share, fit)


def var_block_params(config) -> int:
    """One transformer block's parameters: 18 C^2 + 14 C + heads."""
    C = config.embed_dim
    return 18 * C * C + 14 * C + config.num_heads


def var_param_count(config) -> int:
    """The VAR's parameters (tested against the model): its blocks (var_block_params); the
    embeddings, positions and the head."""
    C = config.embed_dim
    V = config.vocab_size
    block = var_block_params(config)
    first = config.patch_nums[0] ** 2
    rows = config.num_classes + 1 + first + config.seq_len + config.num_scales
    embeddings = config.z_channels * C + C + rows * C
    head = 2 * C * C + 2 * C + C * V + V
    return config.depth * block + embeddings + head


def fsdp_transient_bytes(config) -> int:
    """What --fsdp gathers whole while a pass runs: two blocks (the running one and the
    prefetched next) and the root (embeddings, head), in fp32, and their unsharded gradients."""
    block = var_block_params(config)
    root = var_param_count(config) - config.depth * block
    return 2 * 4 * (2 * block + root)


def pending_update_bytes(model, config) -> int:
    """What the update allocates besides activations and weight casts, on this process: the
    gradients the optimizer set to None (DDP keeps them in its buckets, allocated), and under
    --fsdp the gathered blocks (fsdp_transient_bytes)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return 0
    grads = 0
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            if hasattr(p, "to_local"):  # a DTensor: this process's shard
                p = p.to_local()
            grads += 4 * p.numel()
    if is_sharded(model):
        grads += fsdp_transient_bytes(config)
    return grads


def micro_batch_size(model, a, share: int, device) -> int:
    """--micro-batch; 0: on a GPU the largest divisor of `share` that fits its free memory now
    (micro_batch_that_fits: torch.cuda.mem_get_info plus what PyTorch's allocator holds unused),
    on the CPU `share`."""
    if a.micro_batch:
        return a.micro_batch
    device = torch.device(device)
    if device.type != "cuda":
        return share

    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    config = getattr(model, "module", model).config
    dtype_bytes = 2
    if a.dtype == "fp32":
        dtype_bytes = 4
    pending = pending_update_bytes(model, config)
    return micro_batch_that_fits(free, share, config, dtype_bytes, pending,
                                 a.grad_checkpointing, a.kl == "exact")


# What the memory plan keeps free besides: the CUDA context and the allocator's own
CUDA_CONTEXT_BYTES = 2 * 2**30
# open_clip's ViT-L-14(-quickgelu), both towers (the aesthetic and clip rewards share one): 1.59
# GiB in fp32
CLIP_L14_PARAMS = 427_616_513
# the reference's log-prob pass (step 4): rows per chunk (vargrpo.reference_logprobs), and per
# row its fp32 logits, their tempered copy and log-softmax's exponentials (3 L V), and at most
# 40 bytes per token and channel of one block's temporaries (no graph is kept)
REFERENCE_CHUNK = 64


@dataclass
class GpuMemory:
    """What one process of a run holds on its GPU, in bytes, worked out (gpu_memory_plan):
    resident all run long; each update pass's own allocations besides its activations; the
    samples per pass that fit and --micro-batch 0's choice; the peaks of the update, of a
    sample() call (--sample-batch 0's rows) and of the reference's pass."""

    resident: dict  # name -> bytes: weights, AdamW moments, VQVAE, CLIP
    pass_fixed: dict  # name -> bytes: gradients, weight casts, --fsdp's gathered blocks
    per_sample: int  # update_sample_bytes
    samples_fit: int  # samples per pass that fit (0: not one)
    micro_batch: int  # --micro-batch 0's choice, a divisor of the share
    update_peak: int
    sample_rows: int  # rows per sample() call, whole groups, at most `rows` (0: not one group)
    sample_peak: int
    reference_peak: int


def gpu_memory_plan(config, vae_params: int, card_bytes: int, share: int, *,
                    group_size: int = 16, rows: int = 512, clip_params: int = 0,
                    world: int = 1, fsdp: bool = False, checkpointing: bool = False,
                    dtype_bytes: int = 2, kl_exact: bool = False) -> GpuMemory:
    """One process of a run on a card of card_bytes (share: its samples per minibatch; rows: its
    samples per step, at most one sample() call's), as the trainer sizes it: CUDA_CONTEXT_BYTES
    kept free, the rest read as free by micro_batch_that_fits and rows_that_fit. --fsdp over
    `world` processes: a 1/world shard of the policy, its gradients and AdamW moments and of the
    reference; sampling adds a gathered fp32 copy of the policy."""
    P = var_param_count(config)
    shards = world if fsdp else 1
    resident = {"policy": 4 * P // shards, "AdamW moments": 8 * P // shards,
                "reference": 4 * P // shards, "VQVAE": 4 * vae_params,
                "CLIP": 4 * clip_params}
    pass_fixed = {"gradients": 4 * P // shards,
                  "weight casts": weight_cast_bytes(config, dtype_bytes)}
    if fsdp:
        pass_fixed["FSDP gathers"] = fsdp_transient_bytes(config)
    held = CUDA_CONTEXT_BYTES + sum(resident.values())
    free = max(0, card_bytes - held)

    pending = sum(pass_fixed.values()) - pass_fixed["weight casts"]
    per_sample = update_sample_bytes(config, dtype_bytes, checkpointing, kl_exact)
    usable = free * SAMPLE_MEMORY_SHARE - sum(pass_fixed.values())
    fit = max(0, int(usable)) // per_sample
    micro = micro_batch_that_fits(free, share, config, dtype_bytes, pending, checkpointing,
                                  kl_exact)
    update_peak = held + sum(pass_fixed.values()) + micro * per_sample

    copy = 0
    if fsdp:
        copy = 4 * P
    per_call = rows_that_fit(max(0, free - copy), config, dtype_bytes, group_size)
    per_call = min(per_call, rows)
    row_bytes = sample_row_bytes(config, dtype_bytes)
    casts = weight_cast_bytes(config, dtype_bytes)
    if per_call * row_bytes + casts > (free - copy) * SAMPLE_MEMORY_SHARE:
        per_call = 0  # not even one group
    sample_peak = held + copy + casts + per_call * row_bytes

    L = config.seq_len
    ref_row = 4 * L * config.vocab_size * 3 + 40 * L * config.embed_dim
    reference_peak = held + REFERENCE_CHUNK * ref_row
    return GpuMemory(resident, pass_fixed, per_sample, fit, micro, update_peak, per_call,
                     sample_peak, reference_peak)


def reward_passes(reward, a) -> int:
    """Reward evaluations per image: 2 when MP takes its mask from gradient saliency (a reward
    without a region), else 1."""
    if not a.mask_propagation:
        return 1
    if hasattr(reward, "region_mask"):
        if reward.region_mask(8, 8) is not None:
            return 1
    return 2


def run_metrics(step: int, times: dict, n_samples: int, a, reward_passes: int) -> dict:
    """The metrics of the run itself: the time of each part of the step, samples per second,
    and what the run has used so far (samples sampled, decoded and rewarded; reward images)."""
    out = {}
    for name, seconds in times.items():
        out[f"time/{name}"] = seconds
    out["time/step"] = sum(times.values())
    out["perf/samples_per_s"] = n_samples / sum(times.values())
    samples = (step + 1) * a.labels_per_step * a.group_size
    if a.vmr:
        samples *= a.vmr_k
    out["budget/samples"] = samples
    out["budget/reward_images"] = samples * reward_passes
    return out


class RunFolder:
    """DIR of one run: its settings, checkpoints, metrics and images."""

    def __init__(self, out: Path, d: Dist, presets: dict):
        self.out = out
        self.d = d
        self.presets = presets
        self.lock_fd = None
        self.tb = None
        self.warned = False
        self.last = out / "checkpoints" / "last.pt"
        self.together = False  # every process ends where this one does
        self.created = False  # DIR made by this start
        self.made_lock = False  # and its lock file
        self.begun = False  # past `begin`: the run has written its settings
        self.weights = {}  # the weights files the run started from (weights_record)
        self.lost_args = None  # resumed without args.json: the checkpoint's settings
        self.start = 0  # the step this start continues from

    def open(self, a, given):
        """The run's settings and, when resuming, its checkpoint; nothing is written yet.

        Rank 0 applies the folder rules: refuse anything that could lose a file, lock DIR,
        check again under the lock (a trainer started at the same moment may have claimed
        it first). `begin` writes, once the reward and the weights have loaded."""
        if a.resume and "out" in given and a.out:
            same = Path(a.out).resolve() == Path(a.resume).resolve()
            need(same, f"--resume {a.resume} continues in that directory; drop --out {a.out}")
        need(a.resume or a.out, "--out DIR is required (or --resume DIR)")

        ckpt = None
        saved = None
        if a.resume and self.d.main:
            holder = lock_holder(self.out)
            need(not holder, f"--resume {a.resume}: {self.out} is in use by another trainer"
                 f" ({holder}); wait for it to end, or stop it first (kill -TERM on its pid"
                 " saves and stops it)")
        if a.resume:
            ckpt = self.read_checkpoint(a)
            saved = ckpt["args"]
        a = resolve_args(a, given, saved)
        self.args = a
        check_train_args(a, self.d.world, self.presets)
        if ckpt:
            need(a.steps > ckpt["step"],
                 f"--resume {a.resume}: the run is at step {ckpt['step']} already; pass"
                 f" --steps N with N > {ckpt['step']} to train on")
        if self.d.main:
            self.claim(a)
        return a, ckpt

    def read_checkpoint(self, a) -> dict:
        """checkpoints/last.pt of the run to resume, checked against its args.json."""
        if not self.last.is_file():
            need(not (self.out / "args.json").is_file(),
                 f"--resume {a.resume}: that run stopped before its first checkpoint; start"
                 f" it again: --config {a.resume}/args.json --out {a.resume} --overwrite")
            need(False, f"--resume {a.resume}: no checkpoints/last.pt there; start a new run"
                 " with --out instead")
        keys = ("model", "optimizer", "step", "args")
        ckpt = load_run_checkpoint(self.last, self.previous(), keys)

        recorded = self.recorded_args(ckpt)
        if isinstance(recorded, dict):
            differ = sorted(k for k in ckpt["args"]
                            if k not in RESUME_OVERRIDABLE + ("resume", "out", "overwrite")
                            and recorded.get(k) != ckpt["args"][k])
            need(not differ,
                 f"{self.last} belongs to another run: its {', '.join(map(flag, differ))}"
                 f" differ from {self.out}/args.json; put back this run's checkpoint, or"
                 " resume the run it comes from in a folder with that run's args.json")
        return ckpt

    def previous(self) -> str:
        """How to resume from the newest checkpoint other than last.pt (--resume never falls
        back on its own)."""
        folder = self.last.parent
        steps = [p for p in folder.iterdir()
                 if STEP_FILE.fullmatch(p.name) and p.suffix == ".pt"]
        others = [p for p in sorted(steps) if not os.path.samefile(p, self.last)]
        if not others:
            return ("no other checkpoint is kept: start the run again with --config"
                    f" {self.out}/args.json --out {self.out} --overwrite")
        return (f"to resume from the previous checkpoint, {others[-1]}: ln -f"
                f" {others[-1]} {self.last}, then --resume {self.out} again")

    def check_weights(self, found: dict, ckpt):
        """The run's weights files (weights_record), recorded in each checkpoint; resumed, they
        must be those it started from (check_weights)."""
        self.weights = found
        if not ckpt:
            return
        advice = ("a run keeps the weights it started from: pass --weights-dir naming the"
                  " folder that holds that file, or start a new run (--out) with these")
        check_weights(ckpt.get("weights"), found, f"--resume {self.out}", advice)

    def recorded_args(self, ckpt: dict):
        """The run's args.json when resuming; when it is gone, `begin` writes it again from
        the checkpoint (one line says so); an unreadable one is refused."""
        args_json = self.out / "args.json"
        if not args_json.exists():
            self.lost_args = ckpt["args"]
            return None

        try:
            return json.loads(args_json.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{args_json} is unreadable ({first_line(e)}); put back the run's, or"
                f" delete it: --resume then writes it again from {self.last}"
            ) from None

    def claim(self, a):
        """Refuse a folder that holds something else; lock it."""
        out = self.out
        need(not out.exists() or out.is_dir(),
             f"{out} is a file, not a folder; choose a folder for the run")
        for locked in (False, True):
            if locked:
                self.lock()
            self.state = run_state(out)
            taken = self.state == "run" and not a.resume
            need(not (taken and not a.overwrite),
                 f"{out} already holds a run; continue it with --resume {out}, choose"
                 " another --out, or pass --overwrite to replace it")
            if self.state == "other":
                names = sorted(p.name for p in out.iterdir())[:3]
                raise UsageError(f"{out} holds files that are not a vargrpo run"
                                 f" ({', '.join(names)}); choose a new or empty folder")

        tb = out / "tb"
        if a.tracker == "tensorboard" and tb.exists():
            need(tb.is_dir(), f"--tracker tensorboard: {tb} is a file; move it away or"
                 " choose another --out")
            problem = cannot_write(tb)
            need(not problem, f"--tracker tensorboard: cannot write in {tb} ({problem}); fix"
                 " that or choose another --out")

    def begin(self):
        """Rank 0, once everything has loaded: a new run's args.json (--overwrite: the old
        run's files removed first, and nothing else), the TensorBoard writer."""
        a = self.args
        self.begun = True
        if not self.d.main:
            return
        if not a.resume:
            if self.state == "run":
                for p in run_files(self.out):
                    p.unlink()
            for sub in ("checkpoints", "images", "tb"):
                folder = self.out / sub
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            text = json.dumps(asdict(a), indent=1).encode()
            atomic_write(self.out / "args.json", lambda f: f.write(text),
                         "nothing else was written: fix that and start again")

        elif self.lost_args:  # the run's settings, as its checkpoint holds them
            path = self.out / "args.json"
            text = json.dumps(self.lost_args, indent=1).encode()
            atomic_write(path, lambda f: f.write(text))
            print(f"[vargrpo] {path} was missing: written again from {self.last}",
                  file=sys.stderr)

        if a.tracker == "tensorboard":  # the curves, also in DIR/tb
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))

    def agree(self, error: BaseException | None):
        """Every process learns whether any process failed to start, and why: a refusal on one
        rank alone would leave the others waiting in a collective. Re-raises `error`; a process
        whose peer failed raises PeerFailed with the first failed process's reason and code."""
        mine = (0, "")
        if error is not None:
            mine = (exit_code(error), first_line(error))
        failed = [(rank, code, why) for rank, (code, why) in enumerate(all_gather_objects(mine))
                  if code]
        self.together = bool(failed)
        if error is not None:
            raise everywhere(error)
        if failed:
            rank, code, why = failed[0]
            raise PeerFailed(code, f"process {rank}: {why}")

    @contextlib.contextmanager
    def starting(self):
        """The start of a run (settings, folder, reward, weights) on every process, then
        `agree`: all processes go on, or all stop with the first one's reason."""
        try:
            yield
        except Exception as e:
            self.agree(e)
        self.agree(None)

    def lock(self):
        """An exclusive flock on DIR/.vargrpo.lock, held until the trainer exits (kill -9
        included)."""
        import fcntl  # POSIX

        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            self.made_lock = not (self.out / LOCK_NAME).exists()
            flags = os.O_RDWR | os.O_CREAT
            self.lock_fd = os.open(self.out / LOCK_NAME, flags, 0o644)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (close() closes the file)
            owner = os.read(self.lock_fd, 300)
            owner = owner.decode(errors="replace").strip()
            raise UsageError(
                f"{self.out} is in use by another trainer ({owner});"
                " wait for it to end or choose another --out"
            ) from None
        except OSError as e:
            lock = self.out / LOCK_NAME

            if lock.exists() and not cannot_write(self.out):
                raise UsageError(
                    f"cannot open the lock file {lock}: {e.strerror}; it records"
                    " only which trainer holds the folder: remove it, or make it"
                    " a file you can write"
                ) from None
            raise UsageError(
                f"cannot write in {self.out}: {e.strerror}; choose a"
                " folder you can write to"
            ) from None

        os.ftruncate(self.lock_fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M")
        host = os.uname().nodename
        note = f"pid {os.getpid()} on {host} since {since}"
        os.write(self.lock_fd, note.encode())

    def close(self):
        """Close the TensorBoard file and the lock; under torchrun, leave the process group.
        When every process is here (done; stopped by a signal or a failure that all of them
        saw) they wait for each other, as a gloo rank that exits while its peer still talks
        can abort at exit; when one process failed alone it leaves at once, as a barrier
        would wait for the others forever (torchrun then stops them)."""
        together = self.together

        if self.tb is not None:
            self.tb.close()
        if self.lock_fd is not None and not self.begun:  # a refused start leaves no trace
            if self.made_lock:
                (self.out / LOCK_NAME).unlink(missing_ok=True)
            if self.created:
                self.out.rmdir()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock
        if torch.distributed.is_initialized():
            if together:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def restore(self, ckpt, opt, policy) -> int:
        """The optimizer from the checkpoint (the caller loads the policy); the metrics log cut
        back to the steps it covers (a later line is redone now; a torn last line, from a
        crash mid-write, is dropped). Returns the step to continue from (0 without a
        checkpoint)."""
        self.start = 0
        if not ckpt:
            return 0
        start = int(ckpt["step"])
        self.start = start

        try:
            load_optimizer(opt, policy, ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"{self.last}: its optimizer state does not fit this"
                f" model ({first_line(e)})"
            ) from None

        path = self.out / "metrics.jsonl"
        if not self.d.main:
            return start
        if not path.exists():
            print(f"[vargrpo] {path} is missing: the log starts again at step {start} (the"
                  " checkpoint is intact)", file=sys.stderr)
            return start

        kept = []

        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < start:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                print(
                    f"[vargrpo] {path}: dropping an unreadable line (a"
                    " write cut short)",
                    file=sys.stderr,
                )

        text = "".join(line + "\n" for line in kept).encode()
        atomic_write(path, lambda f: f.write(text))
        return start

    def log(self, metrics: dict, step: int, images):
        """Step 6 (rank 0): a metrics.jsonl line (and TensorBoard), a sample grid every
        --image-every steps."""
        if not self.d.main:
            return

        path = self.out / "metrics.jsonl"

        try:
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:
            raise RunFailed(f"cannot write {path}: {e.strerror}; {self.advice()}") from None

        self.print_step(metrics, step)

        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, str):
                    self.tb.add_text(k, v, step)
                else:
                    self.tb.add_scalar(k, v, step)

        every = self.args.image_every

        if every and step % every == 0:
            # one image of each group first
            groups = self.args.labels_per_step // self.d.world
            order = torch.arange(len(images)).view(groups, -1)
            pick = order.T.reshape(-1)[:16]
            name = f"step_{step:06d}.png"
            path = self.out / "images" / name
            grid = save_grid(images[pick], path, advice=self.advice())
            if self.tb:
                self.tb.add_image("samples", grid, step)

    def print_step(self, metrics: dict, step: int):
        print(
            f"[vargrpo] step {step}: reward"
            f" {metrics['reward/mean']:.4f}, KL"
            f" {metrics['policy/kl']:.4f},"
            f" {metrics['time/step']:.1f} s",
            flush=True,
        )

        if metrics["reward/nonfinite"]:
            print(
                f"[vargrpo] step {step}: {metrics['reward/nonfinite']}"
                " non-finite rewards; those samples get no gradient",
                file=sys.stderr,
            )

        if metrics["adv/abs_max"] == 0 and not self.warned:
            self.warned = True
            print(
                f"[vargrpo] step {step}: every group's samples got equal"
                " rewards, so every advantage is 0 and only the KL acts;"
                " check that the reward can tell samples apart",
                file=sys.stderr,
            )

    def halt_if_nonfinite(self, sampling_nonfinite, stats, step: int,
                          policy, opt):
        """A diverged policy (a non-finite sampling distribution or gradient, on any process)
        stops the run, saving the weights (no update was taken with a non-finite gradient)."""
        flags = [
            float(sampling_nonfinite > 0),
            float(stats.nonfinite is not None),
        ]
        bad = all_reduce(torch.tensor(flags, device=self.d.device), "max")
        bad = bad.tolist()

        if not any(bad):
            return

        self.together = True  # every process saw it
        what = []

        if bad[0]:
            what.append("the sampling distribution")

        if bad[1]:
            what.append(stats.nonfinite or "the loss gradient")

        finite = weights_finite(policy, self.d.device)
        saved = "saved nothing"

        if finite:
            path = self.save(policy, opt, step)
            saved = (
                f"saved {path} (the weights after the last finite"
                " update)"
            )

        raise everywhere(RunFailed(
            f"step {step}: {' and '.join(what)} went non-finite (the"
            f" policy diverged); {saved}; start again with a lower --lr"
            f" (now {self.args.lr:g}) or a --max-grad-norm"
        ))

    def retry_once(self, score, step: int, policy, opt):
        """score() (step 2), retried once if it raises. If it raises again (on any process) the
        run saves the steps done and stops."""
        import reward_models

        error = None
        result = None
        returned = ""  # what a reward returned that it must not

        for attempt in (1, 2):
            try:
                result = score()
                error = None
                break
            except reward_models.RewardReturnError as e:  # retrying cannot help
                error = returned = first_line(e)
                break
            except Exception as e:  # a user's reward can fail any way
                error = f"{type(e).__name__}: {first_line(e)}"
                retry = ""
                if attempt == 1:
                    retry = "; retrying once"
                print(
                    f"[vargrpo] the reward raised {error}{retry}",
                    file=sys.stderr,
                )

        # every process's, None where it worked
        errors = all_gather_objects((error, returned))
        failed = [(rank, e, r) for rank, (e, r) in enumerate(errors) if e]
        if failed:
            self.reward_failed(failed[0], step, policy, opt)
        return result

    def reward_failed(self, failed: tuple, step: int, policy, opt):
        """The reward failed at `step` on process `rank`: raised twice (error), or returned
        what a reward must not (returned: never retried, and at a start's first step
        nothing is saved, as the checks of a start save nothing). Every process raises."""
        rank, error, returned = failed
        self.together = True  # every process saw it
        where = ""
        if self.d.world > 1:
            where = f" on process {rank}"

        if returned and step == self.start:
            raise everywhere(UsageError(
                f"{returned}{where}; nothing was saved: fix the reward and run"
                " the same command again"
            ))
        path = self.save(policy, opt, step)
        if returned:
            raise everywhere(RunFailed(
                f"{returned}{where} at step {step}; saved {path}: fix the reward"
                f" and continue with --resume {self.out}"
            ))

        raise everywhere(RunFailed(
            f"the reward raised twice at step {step}{where} ({error}); saved {path}"
            f" (the {step} steps done); fix the reward and continue with --resume"
            f" {self.out}"
        ))

    def save_or_stop(self, signum: int, policy, opt, done: int):
        """After step `done`: a checkpoint every --save-every steps, at the end, and when a
        process got Ctrl-C / SIGTERM; then, on such a signal, Stopped."""
        signum_1 = torch.tensor([signum], device=self.d.device)
        signum = int(all_reduce(signum_1, "max").item())  # any process's
        a = self.args
        if signum or done == a.steps:
            self.together = True
        if signum or done % a.save_every == 0 or done == a.steps:
            self.save(policy, opt, done)
        if signum and done < a.steps:
            raise everywhere(Stopped(
                signum,
                f"stopped after step {done}; continue with --resume {self.out}",
            ))

    def save(self, policy, opt, step: int):
        """A checkpoint after `step` completed steps (rank 0; returns its path).

        checkpoints/step_N.pt holds the policy, optimizer, step and settings (an exact
        resume); step_N.safetensors the policy alone (official key layout, the settings in
        its metadata). Each is written atomically; last.pt and last.safetensors are hard
        links to the newest; --keep-last of each are kept. Call on every process: under
        --fsdp they gather the whole state for rank 0."""
        model_sd, optim_sd = full_state(policy, opt)
        if not self.d.main:
            return self.last  # (rank 0 writes it)

        from safetensors.torch import save as safetensors_bytes

        a = self.args
        folder = self.out / "checkpoints"
        meta = {
            "vargrpo_args": json.dumps(asdict(a)),
            "vargrpo_step": str(step),
        }
        state = {
            "model": model_sd,
            "optimizer": optim_sd,
            "step": step,
            "args": asdict(a),
            "weights": self.weights,  # the files it started from
        }
        weights = {}

        for k, v in model_sd.items():
            weights[k] = v.detach().cpu().contiguous()

        # what a load checks: a changed bit is named, never trained on
        meta["vargrpo_weights"] = json.dumps(self.weights)
        meta["vargrpo_sha256"] = export_sha256(weights, meta)
        state["sha256"] = state_sha256(state)

        def write_pt(f):
            torch.save(state, f)

        def write_safetensors(f):
            f.write(safetensors_bytes(weights, metadata=meta))

        writers = {".pt": write_pt, ".safetensors": write_safetensors}

        advice = self.advice()
        for suffix, write in writers.items():
            path = folder / f"step_{step:06d}{suffix}"
            atomic_write(path, write, advice)
            self.link_last(path, suffix)
            steps = [p for p in folder.iterdir() if STEP_FILE.fullmatch(p.name)]
            oldest_first = sorted(p for p in steps if p.suffix == suffix)
            for old in oldest_first[:-a.keep_last]:
                old.unlink()

        return self.last

    def advice(self) -> str:
        """What to do after a write failed, by what the run has saved."""
        if self.last.is_file():
            return f"the checkpoints are intact: fix that and continue with --resume {self.out}"
        return "no checkpoint was written yet: fix that and start again with --overwrite"

    def link_last(self, path: Path, suffix: str):
        """checkpoints/last<suffix>: a hard link to path (a copy on a filesystem without hard
        links), replaced atomically."""
        folder = path.parent
        link = folder / f"last{suffix}.tmp"
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
            os.replace(link, folder / f"last{suffix}")
        except OSError:
            data = path.read_bytes()
            atomic_write(folder / f"last{suffix}", lambda f: f.write(data))


def save_grid(images_B3HW, path: Path, nrow: int = 8, advice="") -> torch.Tensor:
    """A PNG grid of images in [0, 1] (upscaled to >= 128 px each); returns it, (3, H, W).
    `advice`: what to do if it cannot be written."""
    from torchvision.utils import make_grid, save_image

    factor = max(1, 128 // images_B3HW.shape[-1])
    images = images_B3HW.float().cpu()
    images = F.interpolate(images, scale_factor=factor)
    grid = make_grid(images, nrow, 2, pad_value=1)
    atomic_write(path, lambda f: save_image(grid, f, format="PNG"), advice or "fix that")
    return grid


class StopRequest:
    """Ctrl-C / SIGTERM / SIGHUP (the terminal closed): finish the current step, save, exit
    (128 + the signal). A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        # handlers can only be set from the main thread
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum:
            if signum != signal.SIGINT:
                return
            if under_launcher():  # it aborts every trainer, and says so
                os._exit(128 + signum)
            # under plain torchrun a Ctrl-C reaches a process twice at once (from the
            # terminal, and passed on by torchrun): that is one request; a later one aborts
            if time.monotonic() > self.since + 1:
                raise KeyboardInterrupt
            return

        self.signum = signum
        self.since = time.monotonic()
        print(
            f"\n[vargrpo] signal {signum}: finishing this step, saving a"
            " checkpoint, then exiting (Ctrl-C again aborts without"
            " saving)",
            file=sys.stderr,
            flush=True,
        )

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- The trainer's run: what `train` calls into, few names. Run opens the run (processes,
# DIR, lock, signals, the reward), resumes it and, after each step, reduces its metrics, logs
# them, halts a diverged policy and saves; `timed` times the step's parts.
RUN_ERRORS = (UsageError, CheckpointError, RunFailed, Stopped, PeerFailed)


def load_weight_files(var, vae, preset: str, weights_dir=None):
    """The pre-trained weights of a preset into `var` and `vae` (built on the meta device):
    the files found or downloaded (find_or_download), read, in float32, the VAR's depth checked,
    then loaded strictly (load_checked)."""
    import reward_models

    vae_file = f"vae_{preset}.pth"
    if preset in OFFICIAL_PRESETS:
        vae_file = VAE_FILE
    var_path = find_or_download(f"var_{preset}.pth", weights_dir)
    vae_path = find_or_download(vae_file, weights_dir)
    if preset not in OFFICIAL_PRESETS:  # prepared files: their record, or one line
        try:
            reward_models.check_prepared_file(var_path)
            reward_models.check_prepared_file(vae_path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    var_sd = to_float32(read_state_dict(var_path))
    vae_sd = to_float32(read_state_dict(vae_path))

    # a wrong file: one line saying which preset
    check_depth(var_sd, var.config.depth, var_path)
    load_checked(var, var_sd, var_path, assign=True)
    load_checked(vae, vae_sd, vae_path, assign=True)
    var.loaded_from = var_path  # weights_record: what a run starts from
    vae.loaded_from = vae_path


def file_identity(path) -> dict:
    """A weights file as a run records it: its path and its sha256 (reward_models.file_sha256:
    read once per process; a Hugging Face cache file's is its name)."""
    import reward_models

    return {"file": str(Path(path).absolute()),
            "sha256": reward_models.file_sha256(path)}


def weights_record(*modules) -> dict:
    """{class name: file_identity} of the weights files that `modules` (and their submodules:
    a reward's judges) were loaded from (their `loaded_from`): a run's VQVAE, its pre-trained
    VAR (the KL reference), the judges of its reward."""
    record = {}
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for m in module.modules():
            path = getattr(m, "loaded_from", None)
            if path is not None:
                record[type(m).__name__] = file_identity(path)
    return record


def check_weights(recorded, found: dict, what: str, advice: str):
    """The weights files loaded now (`found`, weights_record) are the ones the run started
    from (`recorded`; None for a checkpoint saved before runs recorded them): one
    CheckpointError naming both files otherwise, ending with `advice`."""
    for name, then in (recorded or {}).items():
        now = found.get(name)
        if now is None or now["sha256"] == then["sha256"]:
            continue
        raise CheckpointError(
            f"{what}: the run started from {then['file']} (sha256 {then['sha256'][:12]}...),"
            f" not {now['file']} (sha256 {now['sha256'][:12]}...): another preparation;"
            f" {advice}"
        )


class StepClock:
    """The wall time of each part of a step (queued GPU work included): a part's time runs
    from the end of the one before it (or the step's start) to its own end."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.times = {}
        self.last = time.perf_counter()

    def lap(self, name: str):
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now


STEP_CLOCK = StepClock()


def timed(name: str):
    """Decorator: each call's time, as step part `name` (time/NAME in the metrics)."""

    def decorate(fn):
        @functools.wraps(fn)
        def timed_fn(*args, **kwargs):
            out = fn(*args, **kwargs)
            STEP_CLOCK.lap(name)
            return out

        return timed_fn

    return decorate


def my_micro_batches(model, order, mb: int, a, device):
    """This process's share of minibatch `mb` of the global row `order` (the same on every
    process), in parts of micro_batch_size: (ids, part, sync) each, `part` its fraction of the
    share (its loss weight: the parts' gradients add up to the share's), `sync` the context of
    its backward pass (grad_sync: under DDP the last part all-reduces the sum)."""
    world = 1
    rank = 0
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()

    share = a.minibatch // world
    micro = micro_batch_size(model, a, share, device)
    begin = mb * a.minibatch + rank * share
    mine = order[begin:][:share].to(device)

    for c0 in range(0, share, micro):
        ids = mine[c0:c0 + micro]
        last = c0 + micro >= share
        yield ids, len(ids) / share, grad_sync(model, last)


@dataclass
class MicroBatch:
    """One micro-batch of a step's update, detached: what step 6's metrics read."""

    ids: torch.Tensor  # (n,) its rows of the step's UpdateBatch
    logp: torch.Tensor  # (n, L) log pi_theta (tempered, as sampled)
    kl: torch.Tensor  # (n, L) per-token KL to pi_ref
    surrogate: torch.Tensor  # (n, L) the clipped objective
    loss: torch.Tensor  # () its share of the minibatch's loss
    entropy: torch.Tensor | None  # (n, L) the first minibatch's entropy, else None


@dataclass
class Update:
    """What step 5 did: its micro-batches, the gradient norm of each optimizer step, and why
    it stopped early (a non-finite gradient), or None."""

    si_L: torch.Tensor  # (L,) scale ids, for the per-scale metrics
    num_scales: int
    parts: list = field(default_factory=list)  # [MicroBatch]
    grad_norms: list = field(default_factory=list)  # [() tensor]
    nonfinite: str | None = None

    def add(self, ids, logp, kl, surrogate, loss, entropy=None):
        part = MicroBatch(ids, logp.detach(), kl.detach(), surrogate.detach(),
                          loss.detach(), entropy)
        self.parts.append(part)


def step_metrics(step, scored, adv_NG, b, update, times, a, stage,
                 reward_passes: int) -> dict:
    """One metrics.jsonl line (the README explains each). Call on every rank: it gathers and
    reduces; besides one per optimizer step, its host reads are the step's only ones."""
    r = all_gather_cat(scored.rewards)
    nan = torch.tensor(math.nan, device=r.device)
    finite = nan.view(1)
    if torch.isfinite(r).any():
        finite = r[torch.isfinite(r)]
    sums = update_sums(update, b)
    kl, clipped, tokens, ent, ent_tokens = all_reduce(sums["per_scale"])
    ratio_sum, loss_sum = all_reduce(sums["sums"])
    total = tokens.sum().clamp_min(1)
    flat_groups = (adv_NG == 0).all(1).sum().float()
    n_groups = torch.tensor(float(len(adv_NG)), device=r.device)
    flat = all_reduce(torch.stack([flat_groups, n_groups]))
    grad_norm = nan
    if update.grad_norms:
        grad_norm = torch.stack(update.grad_norms).mean()
    processes = len(r) // len(scored.rewards)
    updates = max(1, len(update.grad_norms))

    on_device = {
        "reward/mean": finite.mean(),
        "reward/std": finite.std(unbiased=False),
        "reward/min": finite.min(),
        "reward/max": finite.max(),
        "reward/nonfinite": (~torch.isfinite(r)).sum(),
        "adv/mean": b.adv.mean(),
        "adv/std": b.adv.std(unbiased=False),
        "adv/abs_max": b.adv.abs().max(),
        "adv/zero_std_group_frac": flat[0] / flat[1],
        "policy/kl": kl.sum() / total,
        "policy/clip_frac": clipped.sum() / total,
        "policy/entropy": ent.sum() / ent_tokens.sum().clamp_min(1),
        "policy/ratio_mean": ratio_sum / total,
        "policy/ratio_dev_first_minibatch":
            all_reduce(sums["first_dev"], "max"),
        "loss/loss": loss_sum / processes / updates,
        "loss/grad_norm": grad_norm,
    }

    for name, v in scored.components.items():
        on_device[f"reward/{name}"] = all_gather_cat(v).nanmean()
    for si in range(len(kl)):
        n = tokens[si].clamp_min(1)
        on_device[f"scale/kl_s{si}"] = kl[si] / n
        on_device[f"scale/clip_frac_s{si}"] = clipped[si] / n
        on_device[f"scale/entropy_s{si}"] = ent[si] / ent_tokens[si].clamp_min(1)
    if a.mask_propagation:
        kept = b.pg_w.gt(0).float().mean()
        on_device["mp/kept_fraction"] = kept

    # one host read for all of them
    values = torch.stack([v.float() for v in on_device.values()]).tolist()
    metrics = {"step": step, **dict(zip(on_device, values)), "lr": a.lr}
    metrics["reward/nonfinite"] = int(metrics["reward/nonfinite"])
    metrics.update(run_metrics(step, times, len(r), a, reward_passes))
    if stage:
        metrics["vmr/stage"] = stage
    return metrics


@torch.no_grad()
def update_sums(update, b) -> dict:
    """The sums of a step's updates, on the device, by name: per_scale (5, K) = KL, clipped
    tokens, tokens with KL weight, entropy and tokens of the first minibatch; sums (2,) =
    ratio, loss; first_dev = max |ratio - 1| before the first update."""
    device = b.idx.device
    si_L = update.si_L
    per_scale = torch.zeros(5, update.num_scales, device=device)
    sums = torch.zeros(2, device=device)
    first_dev = torch.zeros((), device=device)

    for part in update.parts:
        ids = part.ids
        on_nL = (b.kl_w[ids] > 0).float()
        ratio = (part.logp - b.old_logp[ids]).exp()
        # the clipped term is the smaller: no gradient
        clipped = part.surrogate < ratio * b.adv[ids, None]
        per_token = [part.kl, clipped, torch.ones_like(part.kl)]
        if part.entropy is not None:  # the first minibatch: ratio 1 up to float error
            per_token += [part.entropy, torch.ones_like(part.kl)]
            dev = ((ratio - 1).abs() * on_nL).amax()
            first_dev = torch.maximum(first_dev, dev)
        for i, v in enumerate(per_token):
            per_scale[i].index_add_(0, si_L, (v.float() * on_nL).sum(0))
        ratio_sum = (ratio * on_nL).sum()
        sums += torch.stack([ratio_sum, part.loss.float()])

    return {"per_scale": per_scale, "sums": sums, "first_dev": first_dev}


class Run:
    """One `train` call's run machinery: `with Run(args, given, presets) as run` sets up the
    processes (setup_distributed) and Ctrl-C / SIGTERM handling; leaving it closes the run
    folder, unlocks DIR and leaves the process group."""

    def __init__(self, args, given, presets: dict):
        self.stop = StopRequest()  # first: a signal from now on stops the run
        follow_launcher()  # under torchrun: dies with it
        self.dist = setup_distributed(args.device, run_dist_timeout(args, given))
        self.device = self.dist.device
        out = Path(args.resume or args.out)
        self.folder = RunFolder(out, self.dist, presets)
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.restore()
        self.model = None  # the DDP wrapper holds the process group: drop it first
        self.folder.close()  # unlock; leave the process group

    def starting(self):
        """The start of a run on every process, then all go on or none does (then nothing is
        written): RunFolder.starting."""
        return self.folder.starting()

    def open(self, args, given):
        """The run's settings (new, overwritten or resumed: DIR locked), its reward, its
        autocast (`run.amp`) and, resumed, its checkpoint. Returns (args, reward)."""
        args, self.ckpt = self.folder.open(args, given)
        self.args = args
        mp = args.mask_propagation
        self.reward = make_reward(args.reward, self.device, args, mp)
        classes = self.folder.presets[args.preset].num_classes
        check_reward_classes(self.reward, args, classes)
        self.amp = autocast(args.dtype, self.device)
        return args, self.reward

    def load_checkpoint(self, policy):
        """A resumed run: the checkpoint's policy weights (strict)."""
        if self.ckpt:
            load_checked(policy, self.ckpt["model"], self.folder.last)

    def distribute(self, policy, ref, make_optimizer):
        """DDP, or --fsdp's shards (distribute); make_optimizer(policy, args, device); resumed,
        the optimizer's state. Returns (opt, start): the optimizer and the step to continue
        from (0 for a new run); `run.model` is the model the update trains (held here alone:
        leaving the run drops it before the process group)."""
        found = weights_record(policy.vae, ref, self.reward)  # the files loaded

        self.model = distribute(policy, ref, self.dist, self.args.fsdp)
        opt = make_optimizer(policy, self.args, self.device)
        self.policy = policy
        self.opt = opt
        with self.folder.starting():  # then all go on, or none
            self.folder.check_weights(found, self.ckpt)  # resumed: the same files
            start = self.folder.restore(self.ckpt, opt, policy)
            self.folder.begin()  # a new run's args.json
        self.ckpt = None
        return opt, start

    def sampling_policy(self, policy):
        """A step begins (its clock starts): the policy step 1 samples from (itself, or under
        --fsdp a gathered copy: sampling_policy) and the groups per sample() call
        (groups_per_sample_call)."""
        STEP_CLOCK.restart()
        sampler = sampling_policy(policy)
        a = self.args
        n_groups = a.labels_per_step // self.dist.world
        with self.amp():
            per_call = groups_per_sample_call(
                a.sample_batch, a.group_size, n_groups, policy.config, self.device)
        return sampler, per_call

    def retry(self, step: int, score, *args):
        """score(*args) (step 2), retried once if it raises; raised twice (on any process),
        the run saves the steps done and stops (RunFolder.retry_once)."""

        def call():
            return score(*args)

        return self.folder.retry_once(call, step, self.policy, self.opt)

    def after_step(self, step, vmr, images, roll, scored, adv_NG, batch, update) -> dict:
        """Step 6: the metrics (step_metrics), logged (RunFolder.log); a diverged policy stops
        the run (halt_if_nonfinite); a checkpoint every --save-every steps, and Ctrl-C /
        SIGTERM stops after saving (save_or_stop). Returns the metrics."""
        stage = getattr(vmr, "stage", None)  # VMR's, or None
        passes = reward_passes(self.reward, self.args)
        metrics = step_metrics(step, scored, adv_NG, batch, update, STEP_CLOCK.times,
                               self.args, stage, passes)
        self.folder.log(metrics, step, images)
        self.folder.halt_if_nonfinite(roll.nonfinite, update, step, self.policy, self.opt)
        self.folder.save_or_stop(self.stop.signum, self.policy, self.opt, step + 1)
        return metrics


def command_line(argv, cls, train):
    """`python vargrpo.py train ...` (argv; None: sys.argv): the settings (parse_train_args),
    then train(args, given); a user's mistake, a failed run or a signal ends in one line and
    its exit code (exit_with)."""
    args = None

    try:
        args, given = parse_train_args(argv, cls)
        return train(args, given)
    except RUN_ERRORS as e:
        if launcher_aborting():
            os._exit(128 + signal.SIGINT)
        exit_with(e, "vargrpo")
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest)
        out = None
        if args is not None:
            out = args.resume or args.out
        exit_with(aborted(out), "vargrpo")
    except RuntimeError as e:
        if launcher_aborting():
            os._exit(128 + signal.SIGINT)
        failed = collective_failed(e, args)
        if failed is None:
            raise
        exit_with(failed, "vargrpo")


def collective_failed(e: BaseException, args) -> RunFailed | None:
    """A collective of a torchrun job that failed, as one line: it waited past the process
    group's timeout (--dist-timeout; gloo raises it, NCCL's watchdog ends the process itself
    with its own log), or another process left the job. None for any other error."""
    if "RANK" not in os.environ:
        return None
    rank = os.environ["RANK"]
    text = str(e)

    if re.search(r"timed out", text, re.IGNORECASE):
        return RunFailed(
            f"process {rank} waited more than --dist-timeout {args.dist_timeout:g} minutes"
            f" for the other processes ({first_line(e)}); if process 0 was saving a"
            " checkpoint on slow storage, raise --dist-timeout and continue with --resume"
        )
    if re.search(r"connection (closed|reset) by peer", text, re.IGNORECASE):
        return RunFailed(
            f"process {rank}: another process left the job ({first_line(e)}); its own"
            " message says why"
        )
    return None


# ---- Launching: torchrun with the processes' own exit code, owning its trainers.
LAUNCHER_DIR = "VARGRPO_LAUNCHER_DIR"  # set by `launch`: each trainer records its pid there
LAUNCHER_PID = "VARGRPO_LAUNCHER_PID"  # the launcher's pid, the trainers' parent
ABORT_GRACE_S = 3  # a second Ctrl-C: seconds before a trainer still running is killed
ABORTING = "aborting"  # the file in LAUNCHER_DIR that says the launcher is aborting


def follow_launcher():
    """A trainer started by torchrun dies with it: Linux's PR_SET_PDEATHSIG sends it SIGKILL
    when the process that started it ends (kill -9 included), so no trainer trains on as an
    orphan. Under `launch` it also records its pid, for the launcher to pass on signals."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL))

    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and os.getppid() != int(launcher):
        os._exit(128 + signal.SIGKILL)  # it ended before this process could follow it
    folder = os.environ.get(LAUNCHER_DIR)
    if folder:
        (Path(folder) / f"trainer_{os.getpid()}").touch()


def under_launcher() -> bool:
    return bool(os.environ.get(LAUNCHER_DIR))


def launcher_aborting() -> bool:
    """The launcher aborts its trainers (a second Ctrl-C; it says so itself): a trainer whose
    collective failed as a peer ended first has nothing to add."""
    folder = os.environ.get(LAUNCHER_DIR)
    return bool(folder) and (Path(folder) / ABORTING).exists()


def aborted(out) -> Stopped:
    """Ctrl-C a second time (or before the run could stop at a step's end): the run DIR
    (`out`) aborted without saving, and what it holds."""
    last = None
    if out:
        last = Path(out) / "checkpoints" / "last.pt"

    advice = "nothing was saved"
    if last and last.is_file():
        advice = f"its last checkpoint is intact: continue with --resume {out}"
    elif last and (Path(out) / "args.json").is_file():
        advice = (f"it saved no checkpoint: start it again with --config {out}/args.json"
                  f" --out {out} --overwrite")
    return Stopped(
        signal.SIGINT,
        f"Ctrl-C aborted the run without saving the step in progress; {advice}",
    )


def run_dir_in(argv) -> str | None:
    """The run folder a trainer's command line names (--resume DIR, else --out DIR)."""
    for name in ("--resume", "--out"):
        for i, arg in enumerate(argv):
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def send(pid: int, signum: int):
    """signum to a trainer's process group (torchrun starts each in its own), or to the
    trainer alone; a trainer already gone is skipped."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signum)
            return
        except (ProcessLookupError, PermissionError):
            continue


class Trainers:
    """The launcher's side of its trainers' signals. Ctrl-C / SIGTERM / SIGHUP reach the
    launcher (torchrun starts each trainer in a session of its own, out of the terminal's
    reach): the first is passed on to every trainer (each finishes its step, saves and exits
    128 + the signal), also to one that starts later; a later Ctrl-C aborts: Ctrl-C to every
    trainer (it exits at once, saving nothing), SIGKILL after ABORT_GRACE_S to one still
    running (blocked in a reward or a collective)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.received = []
        self.signum = 0
        self.told = set()
        self.abort = False

    def handle(self, signum, frame):
        self.received.append(signum)

    def pids(self) -> list:
        names = [p.name for p in self.folder.glob("trainer_*")]
        return [int(n.split("_")[1]) for n in names]

    def pass_on(self):
        """The signals received since the last call: the first one to every trainer (new
        ones included), a later Ctrl-C an abort."""
        while self.received:
            signum = self.received.pop(0)
            if not self.signum:
                self.signum = signum
            elif signum == signal.SIGINT:
                self.abort = True
        if not self.signum:
            return
        for pid in self.pids():
            if pid not in self.told:
                self.told.add(pid)
                send(pid, self.signum)

    def kill(self, job):
        """The abort: Ctrl-C to every trainer, then SIGKILL after ABORT_GRACE_S. (A trainer
        that a peer's end wakes first ends without a word: launcher_aborting.)"""
        (self.folder / ABORTING).touch()
        for pid in self.pids():
            send(pid, signal.SIGINT)
        job.join(ABORT_GRACE_S)
        for pid in self.pids():
            send(pid, signal.SIGKILL)
        job.join(ABORT_GRACE_S)


def launch(argv) -> int:
    """`python vargrpo_run.py torchrun [torchrun flags] vargrpo.py train ...`: torchrun, run in a
    thread of this process, that exits as its processes did (2 a refusal, 1 a failed run, 130 /
    143 / 129 after a signal); torchrun itself ends any failure or signal with a traceback and
    exit code 1.

    The first process to fail records its exit code in a file (exit_with); a process that
    died without recording one (a crash, a kill) gives 1. This process owns the trainers'
    signals (Trainers): the first Ctrl-C / SIGTERM / SIGHUP is passed on, and the trainers
    finish their step and save (a trainer that fails meanwhile: torchrun stops the others,
    waiting up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, an hour here, not 30 s, for them
    to save); a second Ctrl-C aborts them all, in one line; they die with this process
    (follow_launcher)."""
    import logging
    import tempfile

    from torch.distributed.run import parse_args

    args = parse_args(argv)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "3600")
    # torchrun's own log of a failure: our one line instead
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "exit_code"
        os.environ[EXIT_FILE] = str(recorded)
        os.environ[LAUNCHER_DIR] = tmp
        os.environ[LAUNCHER_PID] = str(os.getpid())
        trainers = Trainers(Path(tmp))
        job = TorchrunJob(args)
        previous = {}

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, trainers.handle)

        try:
            job.start()  # torchrun, in a thread: this one keeps the signals
            while job.is_alive() and not trainers.abort:
                job.join(0.2)
                trainers.pass_on()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        if trainers.abort:
            trainers.kill(job)
            stopped = aborted(run_dir_in(argv))
            print(f"vargrpo: stopped: {stopped}", file=sys.stderr, flush=True)
            if job.is_alive():  # torchrun itself is stuck: leave without it
                shutil.rmtree(tmp, ignore_errors=True)
                os._exit(exit_code(stopped))
            return exit_code(stopped)
        return job.exit_code(recorded)


class TorchrunJob(threading.Thread):
    """torch.distributed.run.run(args) in a thread (torchrun then sets no signal handlers:
    Python allows them in the main thread alone); `error`: what it raised."""

    def __init__(self, args):
        super().__init__(daemon=True)
        self.args = args
        self.error = None

    def run(self):
        from torch.distributed.run import run

        try:
            run(self.args)
        except BaseException as e:
            self.error = e

    def exit_code(self, recorded: Path) -> int:
        """The trainers' exit code: the one recorded first, else 0 when all ended well, else
        1 with one line naming the processes' codes."""
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        e = self.error
        if e is None:
            return 0
        if recorded.is_file():
            return int(recorded.read_text())
        if isinstance(e, SystemExit):
            return e.code
        if not isinstance(e, ChildFailedError):
            raise e
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        print(f"torchrun: error: processes failed (rank: exit code {codes}, a negative code"
              " is a signal); their messages are above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] != ["torchrun"]:
        print("usage: python vargrpo_run.py torchrun [torchrun flags] vargrpo.py train ...",
              file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(launch(sys.argv[2:]))
