"""Downloads the way the ecosystem does them: the official VAR files through
huggingface_hub, CLIP through open_clip (which uses huggingface_hub), the aesthetic head and the
ResNet-50 through torch.hub; their settings honoured (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE,
TORCH_HOME, HTTP(S)_PROXY), and every failure one line naming the file and the flag.

Nothing leaves this machine: a stand-in hub (the /resolve/ answers of the real one, with the
redirect of an LFS file to a second server, its "CDN") and a forwarding proxy that counts what
passes and refuses to tunnel anywhere run on 127.0.0.1. The code under test runs in subprocesses:
huggingface_hub reads its environment variables once, at import. Each subprocess has a timeout
(a guard against hangs, scaled by VARGRPO_TEST_TIMEOUT_SCALE).
"""
import hashlib
import http.client
import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

import vargrpo as vg
import vargrpo_run as vr
from helpers import ROOT, timeout

TIMEOUT = timeout(300)  # seconds per subprocess: generous for a busy 2-core machine, a guard for hangs
REPO = vr.OFFICIAL_REPO
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "server", "date"}


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 (daemon thread) whose handler calls `answer(handler)`
    for HEAD, GET and CONNECT; `requests` lists (method, path) as they arrive."""
    def __init__(self, answer):
        self.requests = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle_one(self):
                owner.requests.append((self.command, self.path))
                answer(self)

            do_HEAD = do_GET = do_CONNECT = handle_one

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler, status, headers=(), body=b""):
    """Status, headers, Content-Length and (not for HEAD) the body: bytes, or a file streamed."""
    handler.send_response(status)
    for key, value in dict(headers).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(body.stat().st_size if isinstance(body, Path) else len(body)))
    handler.end_headers()
    if handler.command == "HEAD":
        return
    if isinstance(body, Path):
        with body.open("rb") as f:
            shutil.copyfileobj(f, handler.wfile)
    else:
        handler.wfile.write(body)


def sha256(data) -> str:
    """Of bytes, or of a file read in chunks."""
    if not isinstance(data, Path):
        return hashlib.sha256(data).hexdigest()
    with data.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class StandInHub:
    """Files of Hugging Face repositories, answered as the hub does: HEAD/GET
    /{repo}/resolve/{revision}/{file} is a 302 to the blob on the "CDN" (another origin, so
    huggingface_hub does not follow it with HEAD) with X-Repo-Commit, X-Linked-Etag and
    X-Linked-Size; a missing file is a 404 with X-Error-Code: EntryNotFound. `raw(name, data)`
    serves a plain file at {cdn.url}/raw/{name} (the torch.hub downloads)."""
    def __init__(self):
        self.blobs, self.files = {}, {}
        self.cdn = Server(self.answer_cdn)
        self.hub = Server(self.answer_hub)

    def add(self, repo: str, name: str, data):
        """data: bytes, or a Path (streamed)."""
        sha = sha256(data)
        self.blobs[f"/blobs/{sha}"] = data
        self.files[f"/{repo}/resolve/main/{name}"] = sha

    def raw(self, name: str, data: bytes) -> str:
        self.blobs[f"/raw/{name}"] = data
        return f"{self.cdn.url}/raw/{name}"

    def answer_hub(self, handler):
        sha = self.files.get(urllib.parse.urlsplit(handler.path).path)
        if sha is None:
            return reply(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = self.blobs[f"/blobs/{sha}"]
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        reply(handler, 302, {"Location": f"{self.cdn.url}/blobs/{sha}", "X-Repo-Commit": COMMIT,
                             "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": size})

    def answer_cdn(self, handler):
        data = self.blobs.get(urllib.parse.urlsplit(handler.path).path)
        if data is None:
            return reply(handler, 404)
        reply(handler, 200, {"ETag": f'"{sha256(data)}"', "Content-Type": "application/octet-stream"}, data)

    def close(self):
        self.hub.close()
        self.cdn.close()


def forward(handler):
    """A forwarding proxy for plain-HTTP requests to 127.0.0.1; anything else (CONNECT, the
    tunnel an https:// download asks for, or another host) is refused with a 403."""
    url = urllib.parse.urlsplit(handler.path)
    if handler.command == "CONNECT" or url.hostname != "127.0.0.1":
        return reply(handler, 403, {"Content-Type": "text/plain"}, b"this test proxy stays on 127.0.0.1")
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
    upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    upstream.request(handler.command, url.path + (f"?{url.query}" if url.query else ""), headers=headers)
    response = upstream.getresponse()
    body = response.read()
    upstream.close()
    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
    reply(handler, response.status, kept, body)


@pytest.fixture
def stand_in():
    hub = StandInHub()
    yield hub
    hub.close()


@pytest.fixture
def proxy():
    server = Server(forward)
    yield server
    server.close()


def clean_env() -> dict:
    """This process's environment without its download settings (HF_*, TORCH_HOME, VARGRPO_*,
    proxies): a test states the ones it means."""
    return {k: v for k, v in os.environ.items()
            if not k.upper().startswith(("HF_", "HUGGINGFACE", "TORCH_HOME", "VARGRPO_"))
            and "PROXY" not in k.upper()}


def run_python(code: str, env: dict, *args):
    """`python -c code args` in the repository, with the download settings of `env` only."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env={**clean_env(), **env},
                          capture_output=True, text=True, timeout=TIMEOUT)


def homes(tmp_path) -> dict:
    """Empty caches for huggingface_hub, torch.hub and the old vargrpo cache."""
    return {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "VARGRPO_CACHE": str(tmp_path / "old")}


def downloads(requests) -> list:
    """The requests of downloads: huggingface_hub also asks its endpoint for /api/agent-harnesses
    (its user-agent data), when online."""
    return [r for r in requests if "/api/" not in r[1]]


def via_proxy(proxy) -> dict:
    return {name: proxy.url for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")}


FIND = """
import sys, vargrpo_run as vr
for name in sys.argv[1:]:
    try:
        print("PATH", vr.find_or_download(name))
    except vr.CheckpointError as e:
        print("ERROR", e)
"""


def results(res, prefix: str) -> list:
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith(prefix + " ")]
    return [line[len(prefix) + 1:] for line in lines]


def tiny_official_files(hub):
    """The tiny preset's VAR and VQVAE state_dicts, served under the official file names."""
    vae, var = vg.build_vae_var(vg.VARConfig.preset("tiny"), seed=3)
    served = {}
    for name, module in (("var_d16.pth", var), (vg.VAE_FILE, vae)):
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        served[name] = buffer.getvalue()
        hub.add(REPO, name, served[name])
    return served, var.state_dict()


def test_official_files_come_from_hf_endpoint_into_the_hf_cache_and_are_found_offline(stand_in, tmp_path):
    """HF_ENDPOINT (a mirror) is honoured, the files land in the standard cache under HF_HOME,
    whole; with HF_HUB_OFFLINE=1 the next process finds them there without a request."""
    served, var_sd = tiny_official_files(stand_in)
    env = {**homes(tmp_path), "HF_ENDPOINT": stand_in.hub.url}
    paths = results(run_python(FIND, env, "var_d16.pth", vg.VAE_FILE), "PATH")
    snapshot = tmp_path / "hf" / "hub" / "models--FoundationVision--var" / "snapshots" / COMMIT
    assert paths == [str(snapshot / "var_d16.pth"), str(snapshot / vg.VAE_FILE)]
    for name, path in zip(served, paths):
        assert Path(path).read_bytes() == served[name]
    loaded = vg.read_state_dict(paths[0])
    assert loaded.keys() == var_sd.keys() and all(torch.equal(loaded[k], var_sd[k]) for k in var_sd)
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.name.endswith(".incomplete")]
    assert downloads(stand_in.hub.requests) == [("HEAD", f"/{REPO}/resolve/main/{name}") for name in served]
    assert sorted(stand_in.cdn.requests) == sorted(("GET", f"/blobs/{hashlib.sha256(d).hexdigest()}")
                                                   for d in served.values())
    before = len(stand_in.hub.requests) + len(stand_in.cdn.requests)
    again = results(run_python(FIND, {**env, "HF_HUB_OFFLINE": "1"}, "var_d16.pth", vg.VAE_FILE), "PATH")
    assert again == paths
    assert len(stand_in.hub.requests) + len(stand_in.cdn.requests) == before


def test_official_file_download_goes_through_the_http_proxy(stand_in, proxy, tmp_path):
    """With HTTP_PROXY / http_proxy set, every request of the download passes the proxy (it
    forwarded exactly what the servers received)."""
    served, _ = tiny_official_files(stand_in)
    env = {**homes(tmp_path), "HF_ENDPOINT": stand_in.hub.url, **via_proxy(proxy)}
    [path] = results(run_python(FIND, env, "var_d16.pth"), "PATH")
    assert Path(path).read_bytes() == served["var_d16.pth"]
    sha = hashlib.sha256(served["var_d16.pth"]).hexdigest()
    assert downloads(proxy.requests) == [("HEAD", f"{stand_in.hub.url}/{REPO}/resolve/main/var_d16.pth"),
                                         ("GET", f"{stand_in.cdn.url}/blobs/{sha}")]
    assert len(proxy.requests) == len(stand_in.hub.requests) + len(stand_in.cdn.requests)
    assert downloads(stand_in.hub.requests + stand_in.cdn.requests) == [
        ("HEAD", f"/{REPO}/resolve/main/var_d16.pth"), ("GET", f"/blobs/{sha}")]


def test_official_file_failures_are_one_line_naming_the_file_and_weights_dir(stand_in, proxy, tmp_path):
    """Offline with an empty cache: no request at all. The default hub behind HTTPS_PROXY: the
    request goes to the proxy (a CONNECT, no hand-made reachability probe), which refuses it.
    A file the mirror does not have. A file that is not official. Each: one line, the flag."""
    env = {**homes(tmp_path), **via_proxy(proxy)}
    offline = results(run_python(FIND, {**env, "HF_HUB_OFFLINE": "1"}, "var_d16.pth"), "ERROR")
    assert proxy.requests == []
    refused = results(run_python(FIND, env, "var_d20.pth"), "ERROR")
    assert proxy.requests and all(r == ("CONNECT", "huggingface.co:443") for r in proxy.requests)
    missing = results(run_python(FIND, {**homes(tmp_path), "HF_ENDPOINT": stand_in.hub.url},
                                 "var_d24.pth", "var_mine.pth"), "ERROR")
    assert downloads(stand_in.hub.requests)[0] == ("HEAD", f"/{REPO}/resolve/main/var_d24.pth")
    for message, name, url in ((offline[0], "var_d16.pth", "https://huggingface.co"),
                               (refused[0], "var_d20.pth", "https://huggingface.co"),
                               (missing[0], "var_d24.pth", stand_in.hub.url)):
        assert message.startswith(f"{name} is not in ") and str(tmp_path / "hf" / "hub") in message
        assert f"download {url}/{REPO}/resolve/main/{name} yourself and pass --weights-dir" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in offline[0]
    assert "downloading it failed (ProxyError: 403 Forbidden)" in refused[0]
    assert "downloading it failed (" in missing[0] and "404" in missing[0]
    assert missing[1].startswith("var_mine.safetensors (or var_mine.pth) is not in ") and (
        "pass --weights-dir naming the folder that holds it" in missing[1])


def test_old_vargrpo_cache_is_still_read(tmp_path):
    """Files users put in ~/.cache/vargrpo ($VARGRPO_CACHE) before are still found, offline."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "var_d30.safetensors").write_bytes(b"x")
    paths = results(run_python(FIND, {**homes(tmp_path), "HF_HUB_OFFLINE": "1"}, "var_d30.pth"), "PATH")
    assert paths == [str(tmp_path / "old" / "var_d30.safetensors")]


CLIP = """
import sys, torch, open_clip.pretrained as P, reward_models as rm
P._PRETRAINED["tiny-random"] = {"standin": P._pcfg(hf_hub="test/tiny-clip/")}
try:
    r = rm.build_reward("clip:a dog", "cpu", clip_model="tiny-random", clip_pretrained=sys.argv[1])
    print("SUM", sum(v.double().sum().item() for v in r.parts[0].embedder.clip.state_dict().values()))
except RuntimeError as e:
    print("ERROR", e)
"""


@pytest.mark.slow  # > 10 s: subprocesses importing torch, open_clip or torchvision
def test_clip_weights_come_through_huggingface_hub_and_are_found_offline(stand_in, proxy, tmp_path):
    """open_clip's hub download (a tag registered for the tiny CLIP, its weights served by the
    stand-in hub) honours HF_ENDPOINT, HF_HOME and the proxy; offline, the cache serves them."""
    import reward_models as rm
    clip = rm.build_reward("clip:a dog", "cpu", clip_model="tiny-random", clip_pretrained="none").parts[0].embedder.clip
    g = torch.Generator().manual_seed(7)
    weights = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in clip.state_dict().items()}  # not the seeded random init: loading shows
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    stand_in.add("test/tiny-clip", "open_clip_pytorch_model.bin", buffer.getvalue())
    expected = sum(v.double().sum().item() for v in weights.values())
    assert expected != pytest.approx(sum(v.double().sum().item() for v in clip.state_dict().values()))
    env = {**homes(tmp_path), "HF_ENDPOINT": stand_in.hub.url, **via_proxy(proxy)}
    [total] = results(run_python(CLIP, env, "standin"), "SUM")
    assert float(total) == pytest.approx(expected, rel=1e-9)
    file = f"{stand_in.hub.url}/test/tiny-clip/resolve/main/open_clip_pytorch_model.bin"
    assert ("HEAD", file) in proxy.requests
    assert len(proxy.requests) == len(stand_in.hub.requests) + len(stand_in.cdn.requests)
    seen = len(proxy.requests)
    assert results(run_python(CLIP, {**env, "HF_HUB_OFFLINE": "1"}, "standin"), "SUM") == [total]
    assert len(proxy.requests) == seen


@pytest.mark.slow  # > 10 s: subprocesses importing torch, open_clip or torchvision
def test_clip_failures_are_one_line_naming_clip_weights(proxy, tmp_path):
    """The real CLIP tag, not cached: behind HTTPS_PROXY the hub is asked through the proxy
    (which refuses); offline nothing is asked. `vargrpo.py train` ends with one line and exit 2."""
    train = [ROOT / "vargrpo.py", "train", "--preset", "tiny", "--reward", "aesthetic", "--steps", "1"]
    env = {**homes(tmp_path), **via_proxy(proxy)}
    for extra, label in (({"HF_HUB_OFFLINE": "1"}, "offline"), ({}, "refused")):
        res = subprocess.run([sys.executable, *map(str, train), "--out", str(tmp_path / label)], cwd=ROOT,
                             env={**clean_env(), **env, **extra}, capture_output=True, text=True, timeout=TIMEOUT)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and last.startswith("vargrpo: error: reward 'aesthetic': cannot load CLIP "
                                                       "ViT-L-14-quickgelu weights 'openai' ("), res.stderr[-2000:]
        assert last.endswith("; download the open_clip checkpoint of the hub repository "
                             "timm/vit_large_patch14_clip_224.openai elsewhere and pass --clip-weights PATH "
                             "(or --clip-pretrained none for random weights)")
        if label == "offline":
            assert f"(HF_HUB_OFFLINE=1 and they are not in the Hugging Face cache {tmp_path / 'hf' / 'hub'})" in last
            assert proxy.requests == []
        else:
            assert "Last error: 403 Forbidden)" in last
    assert proxy.requests and all(r == ("CONNECT", "huggingface.co:443") for r in proxy.requests)


HEAD = """
import sys, reward_models as rm
if len(sys.argv) > 1:
    rm.AESTHETIC_HEAD_URL, rm.AESTHETIC_HEAD_SHA256 = sys.argv[1:3]
try:
    head = rm.load_aesthetic_head(None)
    print("SUM", sum(p.double().sum().item() for p in head.state_dict().values()))
except FileNotFoundError as e:
    print("ERROR", e)
"""


@pytest.mark.slow  # > 10 s: subprocesses importing torch, open_clip or torchvision
def test_aesthetic_head_comes_through_torch_hub_into_its_cache_and_is_found_offline(stand_in, proxy, tmp_path):
    """torch.hub downloads the head through the proxy into $TORCH_HOME/hub/checkpoints, checking its
    sha256; offline the next process reads it there. A wrong sha256 leaves no file under the real
    name; offline with an empty cache asks nothing. Failures: one line naming --aesthetic-head."""
    import reward_models as rm
    head = rm.AestheticHead()
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    data = buffer.getvalue()
    url, sha = stand_in.raw(rm.AESTHETIC_HEAD, data), hashlib.sha256(data).hexdigest()
    env = {**homes(tmp_path), **via_proxy(proxy)}
    wrong = results(run_python(HEAD, env, url, "0" * 64), "ERROR")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / rm.AESTHETIC_HEAD
    assert not cached.exists() and "invalid hash value" in wrong[0]
    [total] = results(run_python(HEAD, env, url, sha), "SUM")
    assert cached.read_bytes() == data
    assert float(total) == pytest.approx(sum(p.double().sum().item() for p in head.state_dict().values()))
    assert proxy.requests == [("GET", url)] * 2 and stand_in.cdn.requests == [("GET", f"/raw/{rm.AESTHETIC_HEAD}")] * 2
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    assert results(run_python(HEAD, offline, url, sha), "SUM") == [total]
    empty = results(run_python(HEAD, {**offline, "TORCH_HOME": str(tmp_path / "empty")}, url, sha), "ERROR")
    assert len(proxy.requests) == 2
    for message in wrong + empty:
        assert message.startswith(f"{rm.AESTHETIC_HEAD} is not in ")
        assert message.endswith(f"download {url} yourself and pass --aesthetic-head PATH")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in empty[0]


RESNET = """
import vargrpo_tools as tools
try:
    model, _ = tools.load_resnet50(None, "cpu")
    print("SUM", model.fc.bias.double().sum().item())
except tools.CheckpointError as e:
    print("ERROR", e)
"""


@pytest.mark.slow  # > 10 s: subprocesses importing torch, open_clip or torchvision
def test_resnet50_weights_come_from_the_torch_hub_cache_and_failures_name_resnet_weights(proxy, tmp_path):
    """A file in torch.hub's cache ($TORCH_HOME) is used offline. Not cached: offline asks
    nothing; behind HTTPS_PROXY the download goes to the proxy (which refuses). One line each."""
    import torchvision
    spec = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    env = {**homes(tmp_path), **via_proxy(proxy)}
    offline = results(run_python(RESNET, {**env, "HF_HUB_OFFLINE": "1"}), "ERROR")
    assert proxy.requests == []
    refused = results(run_python(RESNET, env), "ERROR")
    assert proxy.requests == [("CONNECT", "download.pytorch.org:443")]
    for message in offline + refused:
        assert message.startswith("ResNet-50 weights resnet50-11ad3fa6.pth")
        assert message.endswith(f"download {spec.url} yourself and pass --resnet-weights PATH")
    assert "HF_HUB_OFFLINE=1 forbids downloading them" in offline[0]
    model = torchvision.models.resnet50()
    torch.nn.init.normal_(model.fc.bias)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(spec.url).name
    assert not cached.parent.is_dir() or not list(cached.parent.iterdir())  # no partial file left
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, cached)
    [total] = results(run_python(RESNET, {**env, "HF_HUB_OFFLINE": "1"}), "SUM")
    assert float(total) == pytest.approx(model.fc.bias.half().double().sum().item(), abs=1e-6)
    assert len(proxy.requests) == 1


@pytest.mark.slow
def test_official_d16_files_download_and_load_strictly(stand_in, tmp_path):
    """A random VAR-d16 + VQVAE saved as the official files (1.6 GB), downloaded from the stand-in
    hub into the Hugging Face cache, loaded strictly from there: the loaded model computes exactly
    what the saved one did."""
    src = tmp_path / "served"
    src.mkdir()
    vae, var = vg.build_vae_var(vg.VARConfig.preset("d16"), seed=1)
    torch.save(var.state_dict(), src / "var_d16.pth")
    torch.save(vae.state_dict(), src / vg.VAE_FILE)
    for name in ("var_d16.pth", vg.VAE_FILE):
        stand_in.add(REPO, name, src / name)
    env = {**homes(tmp_path), "HF_ENDPOINT": stand_in.hub.url}
    paths = results(run_python(FIND, env, "var_d16.pth", vg.VAE_FILE), "PATH")
    snapshot = Path(paths[0]).parent
    assert snapshot == tmp_path / "hf" / "hub" / "models--FoundationVision--var" / "snapshots" / COMMIT
    assert [sha256(Path(p)) for p in paths] == [sha256(src / "var_d16.pth"), sha256(src / vg.VAE_FILE)]
    vae2, var2 = vg.load_pretrained("d16", weights_dir=snapshot)
    labels, idx = torch.tensor([3]), torch.randint(0, 4096, (1, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(var2(labels, idx), var(labels, idx))
    assert not any(p.requires_grad for p in vae2.parameters()) and var2.vae is vae2
