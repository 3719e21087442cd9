"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1 for the Hub tests.

It speaks the parts of the Hub's HTTP API that ``huggingface_hub`` (and through it
diffusers) use to create a repo, commit files and download them again, closely
enough for the real clients pointed at it with ``HF_ENDPOINT``:

    POST /api/repos/create                          409 with the url when it exists
    GET  /api/whoami-v2
    POST /api/validate-yaml                         the README front matter must parse
    POST /api/models/{repo}/preupload/{rev}         every file is answered "regular" (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}            NDJSON; ?create_pr=1 opens refs/pr/N
    POST /api/models/{repo}/branch/{branch}
    GET  /api/models/{repo}[/revision/{rev}]        sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     ?recursive=true
    HEAD/GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag, Content-Length
    POST /inference/{anything}                      text-to-image: a PNG made from the request

Repos live in memory: each is a set of refs pointing to commits, each commit a full
snapshot ``{path: bytes}``. Errors carry the Hub's ``X-Error-Code`` headers so the
client raises its own typed errors (RepositoryNotFoundError, EntryNotFoundError...).
Writes need ``Authorization: Bearer <token>`` with the server's token; private repos
need it for reads too.

    with HubServer(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.base_url, "HF_TOKEN": "hf_test", ...}
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from PIL import Image

from tests.fakes.local_server import LocalServer, QuietHandler

API_MODEL = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/(revision|tree|preupload|commit|branch)/([^/]+)(/.*)?)?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 payload: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, dict(headers or {})
        self.payload = {"error": message, **(payload or {})}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    pull_requests: int = 0

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The snapshot at a branch, a refs/pr/N ref or a commit id."""
        sha = self.refs.get(revision) or (revision if revision in self.commits else None)
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def sha(self, revision: str = "main") -> str:
        self.files(revision)
        return self.refs.get(revision, revision)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HubServer(LocalServer):
    """An in-memory stand-in for the Hub, served from a background thread."""

    def __init__(self, token: str = "hf_test_token", user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[Recorded] = []
        self.inference_requests: list[dict[str, Any]] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        super().__init__()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What a repo holds at a revision (a copy), for the tests' assertions."""
        with self._lock:
            return dict(self._repo(repo_id).files(revision))

    # ------------------------------------------------------------------ state changes (under the lock)

    def _repo(self, repo_id: str, authorized: bool = True) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _new_commit(self, repo: Repo, files: dict[str, bytes], summary: str) -> str:
        sha = hashlib.sha1(f"{repo.repo_id}:{next(self._counter)}:{summary}".encode()).hexdigest()
        repo.commits[sha] = files
        return sha

    def _create_repo(self, body: dict[str, Any]) -> dict[str, Any]:
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = f"{self.base_url}/{repo_id}"
        if repo_id in self.repos:
            raise HubHTTPError(409, "You already created this model repo", payload={"url": url})
        if body.get("type") not in (None, "model"):
            raise HubHTTPError(400, "this server only hosts model repos")
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.refs["main"] = self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n"},
                                             "initial commit")
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": repo_id}

    def _commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]], create_pr: bool) -> dict[str, Any]:
        header = lines[0]["value"] if lines and lines[0].get("key") == "header" else None
        if header is None or not header.get("summary"):
            raise HubHTTPError(400, "the commit needs a header line with a summary")
        files = dict(repo.files(revision))
        for line in lines[1:]:
            value = line.get("value", {})
            if line.get("key") == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line.get("key") == "deletedFile":
                files.pop(value["path"], None)
            elif line.get("key") == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubHTTPError(400, f"unsupported commit line {line.get('key')!r} (all files are 'regular')")
        sha = self._new_commit(repo, files, header["summary"])
        answer: dict[str, Any] = {"commitOid": sha, "commitUrl": f"{self.base_url}/{repo.repo_id}/commit/{sha}"}
        if create_pr:
            repo.pull_requests += 1
            repo.refs[f"refs/pr/{repo.pull_requests}"] = sha
            answer["pullRequestUrl"] = f"{self.base_url}/{repo.repo_id}/discussions/{repo.pull_requests}"
        else:
            repo.refs[revision] = sha
        return answer

    # ------------------------------------------------------------------ request routing

    def _authorized(self, headers: dict[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.token}"

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        """One request in, (status, headers, body) out; HubHTTPError becomes a Hub-style error answer."""
        split = urlsplit(raw_path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        with self._lock:
            self.requests.append(Recorded(method, raw_path, headers, body))
            try:
                return self._route(method, split.path, query, headers, body)
            except HubHTTPError as error:
                error_headers = dict(error.headers)
                if error.code:
                    error_headers["X-Error-Code"] = error.code
                error_headers["X-Error-Message"] = str(error)
                return error.status, error_headers, _json(error.payload) if method != "HEAD" else b""

    def _route(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        authorized = self._authorized(headers)
        write = method == "POST" and not path.startswith(("/api/validate-yaml", "/inference/"))
        if write and not authorized:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        if path == "/api/repos/create" and method == "POST":
            return 200, {}, _json(self._create_repo(json.loads(body)))
        if path == "/api/whoami-v2" and method == "GET":
            return 200, {}, _json({"type": "user", "name": self.user, "fullname": self.user, "orgs": [],
                                   "auth": {"accessToken": {"role": "write"}}})
        if path == "/api/validate-yaml" and method == "POST":
            return _validate_yaml(json.loads(body).get("content", ""))
        if path.startswith("/inference/") and method == "POST":
            return self._text_to_image(json.loads(body))
        if match := API_MODEL.match(path):
            return self._api_model(method, match, query, authorized, body)
        if match := RESOLVE.match(path):
            return self._resolve(method, match, authorized)
        raise HubHTTPError(404, f"no such endpoint: {method} {path}")

    def _api_model(self, method: str, match: re.Match, query: dict[str, str], authorized: bool, body: bytes
                   ) -> tuple[int, dict[str, str], bytes]:
        repo_id, action, revision, rest = match.group(1), match.group(2), unquote(match.group(3) or "main"), \
            unquote((match.group(4) or "").lstrip("/"))
        repo = self._repo(repo_id, authorized)
        if action in (None, "revision") and method == "GET":
            sha, files = repo.sha(revision), repo.files(revision)
            return 200, {}, _json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                   "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)]})
        if action == "tree" and method == "GET":
            return 200, {}, _json(_tree(repo.files(revision), rest, query.get("recursive") in ("true", "True", "1")))
        if action == "preupload" and method == "POST":
            files = repo.files(revision) if query.get("create_pr") != "1" else repo.files("main")
            wanted = json.loads(body).get("files", [])
            return 200, {}, _json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_id(files[f["path"]]) if f["path"] in files else None} for f in wanted]})
        if action == "commit" and method == "POST":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            return 200, {}, _json(self._commit(repo, revision, lines, query.get("create_pr") == "1"))
        if action == "branch" and method == "POST":
            if revision in repo.refs:
                raise HubHTTPError(409, f"branch {revision} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.refs[revision] = repo.sha(start)
            return 200, {}, _json({})
        raise HubHTTPError(404, f"no such endpoint: {method} {match.group(0)}")

    def _resolve(self, method: str, match: re.Match, authorized: bool) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(match.group(1), authorized)
        revision, path = unquote(match.group(2)), unquote(match.group(3))
        sha, files = repo.sha(revision), repo.files(revision)
        if path not in files:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Content-Length": str(len(data)),
                   "Content-Type": "application/octet-stream"}
        return 200, headers, b"" if method == "HEAD" else data

    def _text_to_image(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """A PNG whose size is the requested one and whose colour depends on prompt and seed."""
        self.inference_requests.append(body)
        parameters = body.get("parameters", {})
        digest = hashlib.sha256(f"{body.get('inputs')}|{parameters.get('seed')}".encode()).digest()
        image = Image.new("RGB", (int(parameters.get("width") or 64), int(parameters.get("height") or 64)),
                          tuple(digest[:3]))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return 200, {"Content-Type": "image/png"}, buffer.getvalue()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(QuietHandler):
            def _serve(self) -> None:
                headers = {key.lower(): value for key, value in self.headers.items()}
                self.answer(*server.handle(self.command, self.path, headers, self.read_body()))

            do_GET = do_POST = do_HEAD = _serve  # noqa: N815 (the names http.server calls)

        return Handler


def _json(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _validate_yaml(content: str) -> tuple[int, dict[str, str], bytes]:
    match = FRONT_MATTER.match(content)
    if match is None:
        return 200, {}, _json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return 400, {}, _json({"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []})
    if not isinstance(metadata, dict):
        return 400, {}, _json({"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
    return 200, {}, _json({"errors": [], "warnings": []})


def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = prefix.strip("/")
    base = f"{prefix}/" if prefix else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base):].split("/")
        for depth in range(1, len(parts)):
            folder = base + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    if prefix and not entries:
        raise HubHTTPError(404, f"{prefix} not found", "EntryNotFound")
    return list(entries.values())
