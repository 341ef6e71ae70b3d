"""A small Hugging Face hub on 127.0.0.1 for download tests: serves model folders as hub repos
through the endpoints huggingface_hub's ``snapshot_download`` / ``hf download`` use (revision info,
the recursive file tree, and ``resolve`` for each file, HEAD and GET), and logs every request, so a
test can say which files a download fetched. Point ``HF_ENDPOINT`` at :attr:`Hub.url`."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {rid: Path(p) for rid, p in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self, repo_id: str) -> list[str]:
        root = self.repos[repo_id]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def fetched(self, repo_id: str) -> set[str]:
        """The files of ``repo_id`` whose content was sent (GET)."""
        prefix = f"/{repo_id}/resolve/{COMMIT}/"
        return {unquote(p[len(prefix):]) for m, p in self.requests if m == "GET" and p.startswith(prefix)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: bytes, headers: dict, head: bool = False):
            self.send_response(code)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, code=200, head=False):
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

        def _route(self, head: bool):
            hub.requests.append((self.command, self.path))
            parts = unquote(urlparse(self.path).path).strip("/").split("/")
            if parts[:2] == ["api", "models"] and "/".join(parts[2:4]) in hub.repos:
                rid = "/".join(parts[2:4])
                if parts[4:5] == ["revision"]:
                    return self._json({"id": rid, "sha": COMMIT, "siblings": [{"rfilename": f} for f in hub.files(rid)]})
                if parts[4:5] == ["tree"]:
                    tree = []
                    for f in hub.files(rid):
                        data = (hub.repos[rid] / f).read_bytes()
                        tree.append({"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
                    return self._json(tree)
            rid = "/".join(parts[:2])
            if rid in hub.repos and parts[2:3] == ["resolve"]:
                f = hub.repos[rid] / "/".join(parts[4:])
                if f.is_file():
                    data = f.read_bytes()
                    return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                  "Content-Type": "application/octet-stream"}, head)
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)

        def do_GET(self):
            self._route(False)

        def do_HEAD(self):
            self._route(True)

    return Handler
