"""A loopback stand-in for the Hugging Face hub's HTTP API, as the real `huggingface_hub` client (0.36)
calls it for `create_repo`, `create_branch`, `upload_folder` and `model_info`:

- POST /api/repos/create                                   {name, organization, private, type}
- POST /api/models/{repo}/branch/{branch}                  {startingPoint?}
- POST /api/models/{repo}/preupload/{revision}             {files: [{path, size, sample}]} → uploadMode per file
- POST /{repo}.git/info/lfs/objects/batch                  git-LFS batch API → a "basic" upload action per object
- PUT  /_lfs/{oid}                                         the object's bytes (like a presigned storage URL: no token)
- POST /_lfs/{oid}/verify                                  {oid, size}
- POST /api/models/{repo}/commit/{revision}                ndjson: header, file (base64), lfsFile, deletedFile
- GET  /api/models/{repo}[/revision/{revision}]            repo info (the client reads it after an empty commit)
- POST /api/validate-yaml                                  {content, repoType}: a README.md's metadata, checked

Every /api and LFS batch call must carry `Authorization: Bearer <token>`, else 401 as the hub answers a bad
token. Binary-looking files (by extension or size) are stored through LFS, so both upload paths run. The
server keeps the files of each branch with their bytes, and the requests it served (method, path, status;
no headers), for tests to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".npz", ".msgpack", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the hub's rule: larger files go through LFS whatever their name


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    lfs_paths: set[str] = field(default_factory=set)
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubServer:
    """The server's state plus a thread serving it on 127.0.0.1 (an ephemeral port)."""

    def __init__(self, token: str, user: str = "test-user", public_url: str = "https://huggingface.co"):
        # Like the production hub, answers name repos and commits under the public site's URL, not under the
        # address the request came to; the client maps that URL onto the endpoint it was given.
        self.token, self.user, self.public_url = token, user, public_url
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.validated_readmes: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _Reply(Exception):
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: tests read hub.requests instead
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                return self.rfile.read(n)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            return b""

        def _dispatch(self, method: str) -> None:
            path = urlsplit(self.path).path
            body = self._body()
            try:
                with hub.lock:
                    status, payload = _route(hub, method, path, body, self.headers)
                headers: dict[str, str] = {}
            except _Reply as r:
                status, payload, headers = r.status, r.body, r.headers
            hub.requests.append((method, path, status))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _yaml_errors(readme: str) -> list[str]:
    """The checks the hub makes of a model card's metadata that this project could get wrong."""
    import yaml

    if not readme.startswith("---\n"):
        return []
    end = readme.find("\n---", 3)
    try:
        meta = yaml.safe_load(readme[4:end])
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    if not isinstance(meta, dict):
        return ["the metadata must be a mapping"]
    errors = []
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    for key in ("license", "base_model", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    return errors


def _check_token(hub: HubServer, headers: Any) -> None:
    if headers.get("Authorization") != f"Bearer {hub.token}":
        message = "Invalid credentials in Authorization header"
        raise _Reply(401, {"error": message}, {"X-Error-Message": message})


def _repo(hub: HubServer, repo_id: str) -> Repo:
    if repo_id not in hub.repos:
        raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
    return hub.repos[repo_id]


def _branch(repo: Repo, revision: str) -> dict[str, bytes]:
    if revision not in repo.branches:
        raise _Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
    return repo.branches[revision]


def _split_repo_path(rest: str, marker: str) -> tuple[str, str]:
    """"ns/name/<marker>/<revision>" → ("ns/name", unquoted revision)."""
    repo_id, _, revision = rest.partition(f"/{marker}/")
    return repo_id, unquote(revision)


def _route(hub: HubServer, method: str, path: str, body: bytes, headers: Any) -> tuple[int, Any]:
    base = hub.endpoint
    if method == "PUT" and path.startswith("/_lfs/"):
        oid = path.split("/")[2]
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Reply(400, {"error": "sha256 of the uploaded bytes does not match the oid"})
        hub.lfs_objects[oid] = body
        return 200, {}
    if method == "POST" and path.startswith("/_lfs/") and path.endswith("/verify"):
        _check_token(hub, headers)
        req = json.loads(body)
        if hub.lfs_objects.get(req["oid"]) is None or len(hub.lfs_objects[req["oid"]]) != req["size"]:
            raise _Reply(404, {"error": "object not uploaded"})
        return 200, {}
    if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
        _check_token(hub, headers)
        _repo(hub, path[1 : -len(".git/info/lfs/objects/batch")])
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs_objects:  # already stored: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{base}/_lfs/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{base}/_lfs/{obj['oid']}/verify", "header": {}},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}
    if not path.startswith("/api/"):
        raise _Reply(404, {"error": f"no route for {method} {path}"})
    _check_token(hub, headers)
    if method == "POST" and path == "/api/validate-yaml":
        errors = _yaml_errors(json.loads(body)["content"])
        hub.validated_readmes.append(json.loads(body)["content"])
        if errors:
            raise _Reply(400, {"errors": [{"message": m} for m in errors], "warnings": []})
        return 200, {"errors": [], "warnings": []}
    if method == "POST" and path == "/api/repos/create":
        req = json.loads(body)
        if req.get("type", "model") != "model":
            raise _Reply(400, {"error": "this test hub serves model repos only"})
        repo_id = f"{req.get('organization') or hub.user}/{req['name']}"
        if repo_id in hub.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": f"{hub.public_url}/{repo_id}"})
        hub.repos[repo_id] = Repo(repo_id, bool(req.get("private")))
        repo_hash = hashlib.md5(repo_id.encode()).hexdigest()
        return 200, {"url": f"{hub.public_url}/{repo_id}", "name": repo_id, "id": repo_hash}
    if not path.startswith("/api/models/"):
        raise _Reply(404, {"error": f"no route for {method} {path}"})
    rest = path[len("/api/models/") :]
    if method == "POST" and "/branch/" in rest:
        repo_id, branch = _split_repo_path(rest, "branch")
        repo = _repo(hub, repo_id)
        if branch in repo.branches:
            raise _Reply(409, {"error": "Reference already exists"})
        start = unquote(json.loads(body or b"{}").get("startingPoint") or "main")
        repo.branches[branch] = dict(_branch(repo, start))
        repo.heads[branch] = repo.heads[start]
        return 200, {}
    if method == "POST" and "/preupload/" in rest:
        repo_id, revision = _split_repo_path(rest, "preupload")
        repo = _repo(hub, repo_id)
        files = _branch(repo, revision)
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            oid = None
            if f["path"] in files:
                data = files[f["path"]]
                oid = hashlib.sha256(data).hexdigest() if f["path"] in repo.lfs_paths else git_blob_sha1(data)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return 200, {"files": out}
    if method == "POST" and "/commit/" in rest:
        repo_id, revision = _split_repo_path(rest, "commit")
        repo = _repo(hub, repo_id)
        files = _branch(repo, revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise _Reply(400, {"error": "the commit payload must start with its header"})
        new_files, new_lfs = dict(files), set(repo.lfs_paths)
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                new_files[value["path"]] = base64.b64decode(value["content"])
                new_lfs.discard(value["path"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in hub.lfs_objects:
                    raise _Reply(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                new_files[value["path"]] = hub.lfs_objects[value["oid"]]
                new_lfs.add(value["path"])
            elif item["key"] == "deletedFile":
                new_files.pop(value["path"], None)
            else:
                raise _Reply(400, {"error": f"unsupported commit operation {item['key']}"})
        oid = hashlib.sha1(json.dumps([repo.heads[revision], lines], sort_keys=True).encode()).hexdigest()
        repo.branches[revision], repo.lfs_paths, repo.heads[revision] = new_files, new_lfs, oid
        repo.commits.append({"revision": revision, "oid": oid, "summary": lines[0]["value"]["summary"]})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.public_url}/{repo_id}/commit/{oid}"}
    if method == "GET":
        repo_id, revision = _split_repo_path(rest, "revision") if "/revision/" in rest else (rest, "main")
        repo = _repo(hub, repo_id)
        files = _branch(repo, revision)
        return 200, {"id": repo_id, "modelId": repo_id, "sha": repo.heads[revision], "private": repo.private,
                     "siblings": [{"rfilename": p} for p in sorted(files)]}
    raise _Reply(404, {"error": f"no route for {method} {path}"})
