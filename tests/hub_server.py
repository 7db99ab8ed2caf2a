"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for tests (the real Hub is unreachable here).

It implements only what huggingface_hub 2.x calls for create_repo / create_branch / create_commit (regular and
LFS files, basic LFS transfer) and for snapshot_download (repo info, tree listing, resolve HEAD/GET), for model
repos. It does NOT implement: Xet (clients must set HF_HUB_DISABLE_XET=1), multipart LFS, deletions, pull
requests, tags, datasets/spaces, pagination, redirects to a CDN, or access control beyond "a token was sent".
It records every request so tests can assert what arrived.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse

LFS_THRESHOLD = 10_000  # bytes: larger files are LFS (the Hub uses 10 MB; small here to exercise LFS)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    parent: Optional[str]
    files: dict[str, bytes]  # the whole tree at this commit


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[dict] = []
        # failure injection: these LFS PUTs (1-based) fail with a non-retryable 400, as a dropped upload would
        # after huggingface_hub's own retries
        self.fail_puts: set[int] = set()
        self.puts = 0
        self.lock = threading.Lock()

    def tree(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]]:
        repo = self.repos[repo_id]
        oid = repo.branches.get(rev, rev)
        return oid, repo.commits[oid].files

    def corrupt(self, repo_id: str, path: str) -> None:
        """Flip a byte of a stored file (as if the remote copy were damaged), keeping its size."""
        repo = self.repos[repo_id]
        files = repo.commits[repo.branches["main"]].files
        data = bytearray(files[path])
        data[len(data) // 2] ^= 0xFF
        files[path] = bytes(data)


class Handler(BaseHTTPRequestHandler):
    state: HubState
    base: str

    def log_message(self, *args) -> None:  # quiet
        pass

    # -------------------------------------------------------------- helpers
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, payload=None, headers: Optional[dict] = None, raw: Optional[bytes] = None) -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _record(self, body: bytes) -> None:
        with self.state.lock:
            self.state.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                        "body": body})

    def _error(self, code: int, msg: str) -> None:
        self._send(code, {"error": msg}, {"X-Error-Message": msg})

    # -------------------------------------------------------------- routing
    def do_POST(self) -> None:
        body = self._body()
        self._record(body)
        path = urlparse(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"})
            self.state.repos[repo_id] = Repo(private=bool(req.get("private")))
            init = Commit(hashlib.sha1(repo_id.encode()).hexdigest(), "initial commit", None, {})
            self.state.repos[repo_id].commits[init.oid] = init
            self.state.repos[repo_id].branches["main"] = init.oid
            return self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch":
            repo = self.state.repos.get(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return self._error(404, "Repository not found")
            branch = "/".join(parts[5:])
            if branch in repo.branches:
                return self._send(409, {"error": "branch exists"})
            repo.branches[branch] = repo.branches["main"]
            return self._send(200, {})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
            req = json.loads(body)
            out = [{"path": f["path"], "uploadMode": "lfs" if f["size"] > LFS_THRESHOLD else "regular",
                    "shouldIgnore": False} for f in req["files"]]
            return self._send(200, {"files": out})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
            return self._commit(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]), body)
        if path.endswith(".git/info/lfs/objects/batch"):
            req = json.loads(body)
            objects = []
            for o in req["objects"]:
                entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in self.state.lfs:  # already stored: no action, the client skips it
                    entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})
        return self._error(404, f"not implemented: POST {path}")

    def do_PUT(self) -> None:
        body = self._body()
        self._record(body)
        path = urlparse(self.path).path
        if path.startswith("/lfs-upload/"):
            oid = path.rsplit("/", 1)[1]
            with self.state.lock:
                self.state.puts += 1
                fail = self.state.puts in self.state.fail_puts
            if fail:
                return self._error(400, "injected failure: upload interrupted")
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            self.state.lfs[oid] = body
            return self._send(200, {})
        return self._error(404, f"not implemented: PUT {path}")

    def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "Repository not found")
        if rev not in repo.branches:
            return self._error(404, f"Revision not found: {rev}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(l["value"] for l in lines if l["key"] == "header")
        files = dict(repo.commits[repo.branches[rev]].files)
        for l in lines:
            v = l["value"]
            if l["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif l["key"] == "lfsFile":
                if v["oid"] not in self.state.lfs:
                    return self._error(422, f"LFS object {v['oid']} was not uploaded")
                files[v["path"]] = self.state.lfs[v["oid"]]
            elif l["key"] != "header":
                return self._error(400, f"not implemented: commit operation {l['key']}")
        message = header["summary"] + (("\n\n" + header["description"]) if header.get("description") else "")
        oid = hashlib.sha1((repo.branches[rev] + message + json.dumps(sorted(files))).encode()).hexdigest()
        repo.commits[oid] = Commit(oid, message, repo.branches[rev], files)
        repo.branches[rev] = oid
        return self._send(200, {"commitUrl": f"{self.base}/{repo_id}/commit/{oid}", "commitOid": oid,
                                "success": True, "pullRequestUrl": None})

    def _snapshot(self, repo_id: str, rev: str):
        """(commit oid, files) of repo_id at rev, or None after answering 404."""
        if repo_id not in self.state.repos:
            return self._error(404, "Repository not found")
        try:
            return self.state.tree(repo_id, rev)
        except KeyError:
            return self._error(404, "Revision not found")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record(b"")
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, rev = f"{parts[2]}/{parts[3]}", parts[5]
            found = self._snapshot(repo_id, rev)
            if found is None:
                return
            oid, files = found
            if parts[4] == "revision":
                return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private":
                                        self.state.repos[repo_id].private,
                                        "siblings": [{"rfilename": p} for p in sorted(files)]})
            prefix = "/".join(parts[6:])
            entries = []
            for p, data in sorted(files.items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
                if len(data) > LFS_THRESHOLD:
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._send(200, entries)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            found = self._snapshot(repo_id, rev)
            if found is None:
                return
            oid, files = found
            if path not in files:
                return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                      "X-Repo-Commit": oid})
            data = files[path]
            headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(data)}"'}
            if len(data) > LFS_THRESHOLD:
                headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                "X-Linked-Size": str(len(data))})
            return self._send(200, headers=headers, raw=data)
        return self._error(404, f"not implemented: GET {url.path}")


class LocalHub:
    """with LocalHub() as hub: os.environ["HF_ENDPOINT"] = hub.url ..."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.base = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
