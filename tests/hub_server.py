"""A local stand-in for the Hugging Face Hub HTTP API, for tests (127.0.0.1, in-memory, threaded).

It implements the endpoints huggingface_hub 2.4 calls to create a repo, create a branch, plan an
upload (``preupload``), upload large files over the plain git-LFS "basic" transfer (batch, PUT,
verify), commit (NDJSON), validate a model card's YAML, describe a repo (info, tree listing) and
serve files (``resolve`` with the ``X-Repo-Commit``/``ETag``/``X-Linked-*`` headers the client
reads). Writes need ``Authorization: Bearer <one of tokens>``.

Limits (what it does not do):
- no Xet storage: clients must set ``HF_HUB_DISABLE_XET=1`` (huggingface_hub then uses LFS);
- no multipart LFS, no CDN redirects (files are served directly), no pagination of tree listings,
  one byte range per request (``bytes=a-b`` or ``bytes=a-``);
- commits are flat snapshots with made-up hashes, no git objects, history or merges; a pull
  request is just a ``refs/pr/N`` branch; no gated repos, no rate limits, no ``.gitignore`` rules;
- "LFS or regular" is decided by a NUL byte in the first 512 bytes or a size over 10 MB,
  as a simplification of the Hub's ``.gitattributes`` rules.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

INITIAL_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs_paths: dict[str, set[str]] = field(default_factory=dict)
    prs: int = 0


@dataclass
class Fault:
    """Let ``skip`` requests matching ``method`` and ``path`` (regex) through, then answer the next
    ``count`` of them with ``status``."""

    method: str
    path: str
    status: int
    count: int = 1
    skip: int = 0


class HubStandIn:
    """Start with :meth:`start`; ``url`` is the ``HF_ENDPOINT``; ``log`` lists ``(method, path)``."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_test_token",), user: str = "tester"):
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.ranged: list[str] = []  # paths read with a Range header
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self._counter = 0
        self._server: Optional[ThreadingHTTPServer] = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "HubStandIn":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection helpers for tests ------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``, LFS content resolved."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches[revision]])

    def requests(self, method: str, pattern: str = "") -> list[str]:
        return [p for m, p in self.log if m == method and re.search(pattern, p)]

    # -- state changes (called under the lock) ---------------------------------------------------
    def _new_commit(self, repo: Repo, files: dict[str, bytes], lfs: set[str]) -> str:
        self._counter += 1
        sha = hashlib.sha1(f"commit-{self._counter}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.lfs_paths[sha] = lfs
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: Any = None, headers: Optional[dict[str, str]] = None,
              content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: Optional[str] = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.hub.tokens

    def _fault(self, method: str, path: str) -> Optional[int]:
        with self.hub.lock:
            for fault in self.hub.faults:
                if fault.count > 0 and fault.method == method and re.search(fault.path, path):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.count -= 1
                    return fault.status
        return None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body() if method in ("POST", "PUT") else b""
        self.hub.log.append((method, path))
        status = self._fault(method, path)
        if status is not None:
            self._error(status, f"stand-in fault injected ({status})")
            return
        for verb, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                handler(self, body, query, *[unquote(g) for g in match.groups()])
                return
        self._error(404, f"stand-in: no route for {method} {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- repo lookups ----------------------------------------------------------------------------
    def _repo(self, repo_id: str, write: bool = False) -> Optional[Repo]:
        repo = self.hub.repos.get(repo_id)
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Optional[str]:
        sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _snapshot(self, repo_id: str, revision: str) -> tuple[Optional[Repo], Optional[str]]:
        """The readable repo and the commit ``revision`` names, or ``(.., None)`` once an error is sent."""
        repo = self._repo(repo_id)
        return (repo, self._commit_of(repo, revision)) if repo is not None else (None, None)

    # -- endpoints -------------------------------------------------------------------------------
    def whoami(self, body: bytes, query: dict) -> None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return
        self._send(200, {"type": "user", "name": self.hub.user, "auth": {"type": "access_token"}})

    def create_repo(self, body: bytes, query: dict) -> None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the Hub names the existing repo's url in its 409
                self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
                return
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.branches["main"] = self.hub._new_commit(repo, {".gitattributes": INITIAL_GITATTRIBUTES}, set())
            self.hub.repos[repo_id] = repo
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def create_branch(self, body: bytes, query: dict, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.branches:
                self._error(409, f"Reference already exists: refs/heads/{branch}")
                return
            repo.branches[branch] = repo.branches.get(start, start)
        self._send(200, {})

    def validate_yaml(self, body: bytes, query: dict) -> None:
        content = json.loads(body)["content"]
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as exc:
                meta, errors = {}, [{"message": f"invalid YAML: {exc}"}]
            relation = meta.get("base_model_relation")
            if relation is not None and relation not in RELATIONS:
                errors.append({"message": f'"base_model_relation" must be one of {sorted(RELATIONS)}'})
            if not isinstance(meta.get("tags", []), list):
                errors.append({"message": '"tags" must be an array'})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, body: bytes, query: dict, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        sha = self._commit_of(repo, revision) if "create_pr" not in query else repo.branches["main"]
        if sha is None:
            return
        current, lfs_paths = repo.commits[sha], repo.lfs_paths[sha]
        files = []
        for entry in json.loads(body)["files"]:
            sample = base64.b64decode(entry["sample"])
            is_lfs = b"\0" in sample or entry["size"] > 10_000_000
            path = entry["path"]
            oid = None
            if path in current:
                data = current[path]
                oid = hashlib.sha256(data).hexdigest() if path in lfs_paths else git_blob_sha1(data)
            files.append({"path": path, "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": sha})

    def lfs_batch(self, body: bytes, query: dict, repo_id: str) -> None:
        if self._repo(repo_id, write=True) is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:
                href = f"{self.hub.url}/_lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, body: bytes, query: dict, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            self._error(400, "content does not match its oid")
            return
        with self.hub.lock:
            self.hub.lfs[oid] = body
        self._send(200, {})

    def lfs_verify(self, body: bytes, query: dict, oid: str) -> None:
        payload = json.loads(body)
        ok = oid in self.hub.lfs and len(self.hub.lfs[oid]) == payload.get("size")
        self._send(200 if ok else 404, {} if ok else {"error": "object not uploaded"})

    def commit(self, body: bytes, query: dict, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        create_pr = "create_pr" in query
        base = self._commit_of(repo, "main" if create_pr else revision)
        if base is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files, lfs = dict(repo.commits[base]), set(repo.lfs_paths[base])
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    return
                files[value["path"]] = self.hub.lfs[value["oid"]]
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
        with self.hub.lock:
            sha = self.hub._new_commit(repo, files, lfs)
            pr_url = None
            if create_pr:
                repo.prs += 1
                repo.branches[f"refs/pr/{repo.prs}"] = sha
                pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
            else:
                repo.branches[revision] = sha
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": pr_url, "success": True})

    def model_info(self, body: bytes, query: dict, repo_id: str, revision: str = "main") -> None:
        repo, sha = self._snapshot(repo_id, revision)
        if sha is None:
            return
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})

    def tree(self, body: bytes, query: dict, repo_id: str, revision: str, prefix: str = "") -> None:
        repo, sha = self._snapshot(repo_id, revision)
        if sha is None:
            return
        entries = []
        for path, data in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in repo.lfs_paths[sha]:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)

    def resolve(self, body: bytes, query: dict, repo_id: str, revision: str, path: str) -> None:
        repo, sha = self._snapshot(repo_id, revision)
        if sha is None:
            return
        data = repo.commits[sha].get(path)
        if data is None:
            self._error(404, f"Entry not found: {path}", "EntryNotFound")
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        if path in repo.lfs_paths[sha]:
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        status, ranged = 200, self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            self.hub.ranged.append(urlsplit(self.path).path)
            first, _, last = ranged[6:].partition("-")
            start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data, status = data[start:stop], 206
        self._send(status, data, headers, content_type="application/octet-stream")


_REPO = r"([^/]+/[^/]+)"
_REV = r"([^/]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/branch/{_REV}", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", _Handler.commit),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/_lfs/([0-9a-f]{64})", _Handler.lfs_put),
    ("POST", r"/_lfs/([0-9a-f]{64})/verify", _Handler.lfs_verify),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/{_REV}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}", _Handler.tree),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}/(.+)", _Handler.tree),
    ("GET", rf"/{_REPO}/resolve/{_REV}/(.+)", _Handler.resolve),
    ("HEAD", rf"/{_REPO}/resolve/{_REV}/(.+)", _Handler.resolve),
]
