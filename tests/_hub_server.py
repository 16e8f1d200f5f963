"""The stand-in Hub the Hub tests push to and load from: a local HTTP server (`FakeHub`) and the `fake_hub` fixture
that points `huggingface_hub` and `transformers` at it.

The Hub cannot be reached from the tests, so `FakeHub` implements the few Hub endpoints the uploads and downloads
use (`POST /api/repos/create`, `/api/validate-yaml`, `/api/models/{repo}/preupload|commit|branch/{rev}` and
`GET|HEAD /{repo}/resolve/{rev}/{file}`) and keeps the committed files in memory. Everything above HTTP is the real
`huggingface_hub` / `transformers` code. The preupload answer makes every file a "regular" (inline, base64) upload,
so no LFS / Xet storage is needed. Mocking only the Hub's server side is the one stand-in of the suite: the upload
itself cannot run here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import yaml

__all__ = ["FakeHub", "fake_hub_fixture"]

REPO_RE = r"(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    """In-memory stand-in for the Hub's HTTP API (only the endpoints that uploads and `from_pretrained` use)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.snapshots: dict[str, dict[str, bytes]] = {}  # commit sha -> files
        self.commits: list[dict] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, body=b"", headers=None, head=False):
                data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                if isinstance(body, (dict, list)):
                    self.send_header("Content-Type", "application/json")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_POST(self):
                body = self._body()
                with hub.lock:
                    status, payload = hub.post(urlparse(self.path).path, body, self.headers)
                self._send(status, payload)

            def do_GET(self):
                with hub.lock:
                    self._send(*hub.get(urlparse(self.path).path))

            def do_HEAD(self):
                with hub.lock:
                    self._send(*hub.get(urlparse(self.path).path), head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- routes
    def post(self, path: str, body: bytes, headers) -> tuple[int, dict]:
        if path != "/api/validate-yaml" and not headers.get("Authorization", "").startswith("Bearer "):
            return 401, {"error": "Invalid credentials"}
        if path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {
                "private": data.get("visibility") == "private",
                "branches": {"main": {}},
                "heads": {"main": "0" * 40},
            }
            return 200, {"url": f"{self.url}/{repo_id}"}
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                if match is not None and not isinstance(yaml.safe_load(match.group(1)), dict):
                    raise yaml.YAMLError("metadata is not a mapping")
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": str(err)}]}
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(rf"/api/models/{REPO_RE}/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)", path)
        if match is None or match["repo"] not in self.repos:
            self.unhandled.append(f"POST {path}")
            return 404, {"error": "Repository not found"}
        repo, rev = self.repos[match["repo"]], unquote(match["rev"])
        if match["op"] == "branch":
            if rev in repo["branches"]:
                return 409, {"error": "Branch already exists"}
            repo["branches"][rev] = dict(repo["branches"]["main"])
            repo["heads"][rev] = repo["heads"]["main"]
            return 200, {}
        if rev not in repo["branches"]:
            return 404, {"error": f"Invalid rev id: {rev}"}
        if match["op"] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        files = {}
        for line in lines[1:]:
            if line["key"] != "file":  # LFS files, deletions, copies: never produced with regular upload modes
                return 400, {"error": f"unsupported commit operation {line['key']}"}
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        repo["branches"][rev].update(files)
        oid = hashlib.sha1(f"{len(self.commits)}".encode()).hexdigest()
        repo["heads"][rev] = oid
        self.snapshots[oid] = dict(repo["branches"][rev])
        self.commits.append({"repo": match["repo"], "revision": rev, "summary": header["summary"], "files": files})
        return 200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _revision(self, repo: dict, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) of a branch name or a commit sha."""
        if rev in repo["branches"]:
            return repo["heads"][rev], repo["branches"][rev]
        if rev in self.snapshots:
            return rev, self.snapshots[rev]
        return None

    def get(self, path: str) -> tuple[int, object, dict]:
        if path == "/api/agent-harnesses":  # huggingface_hub's best-effort user-agent registry fetch
            return 404, {"error": "not served"}, {}
        info = re.fullmatch(rf"/api/models/{REPO_RE}(?:/revision/(?P<rev>[^/]+))?", path)
        match = info or re.fullmatch(rf"/{REPO_RE}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if match is None:
            self.unhandled.append(f"GET {path}")
            return 404, {"error": "not found"}, {}
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        found = self._revision(repo, unquote(match["rev"] or "main"))
        if found is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        sha, files = found
        if info is not None:  # model_info / repo_info (transformers resolves the revision to a commit sha)
            siblings = [{"rfilename": name} for name in sorted(files)]
            return 200, {"id": match["repo"], "sha": sha, "private": repo["private"], "siblings": siblings}, {}
        name = unquote(match["file"])
        if name not in files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        content = files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
        return 200, content, headers


@pytest.fixture(name="fake_hub")
def fake_hub_fixture(monkeypatch, tmp_path):
    """A running `FakeHub`, with `huggingface_hub` and `transformers` pointed at it; checks at the end that every
    request it received was one it implements."""
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api_module
    import transformers.utils.hub as tf_hub

    hub = FakeHub()
    hub.thread.start()
    # conftest sets HF_HUB_OFFLINE=1 for the rest of the suite; the stand-in Hub is local.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # transformers 5.1+ keeps one shared HfApi for the Trainer, built lazily with the endpoint above (5.0 calls
    # the module-level `huggingface_hub` functions, patched below).
    monkeypatch.setattr(tf_hub, "_hf_api", None, raising=False)
    # `huggingface_hub.file_exists` & co. (used by peft) are methods of a default HfApi built at import time.
    monkeypatch.setattr(hf_api_module.api, "endpoint", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
    assert hub.unhandled == [], f"requests the stand-in Hub does not implement: {hub.unhandled}"
