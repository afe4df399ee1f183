"""A fake GitLab for the NixOS VM tests: just enough of the runner API for gitlab-runner-vm
(verify, manager deletion) and the real gitlab-runner (one shell job, its trace, its result).

Every request is appended to $STATE_DIR/requests.jsonl as {"method", "path", "body"}; the job's
trace goes to $STATE_DIR/job-1.trace and its final state to $STATE_DIR/job-1.state.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE_DIR = os.environ.get("STATE_DIR", "/var/lib/fake-gitlab")
JOB_ID = 1
JOB_TOKEN = "job-token-1"
SCRIPT = os.environ.get("JOB_SCRIPT", 'echo "job user: $(id -un)"')
LOCK = threading.Lock()
handed_out = False


def job_payload():
    return {
        "id": JOB_ID,
        "token": JOB_TOKEN,
        "allow_git_fetch": False,
        "job_info": {
            "id": JOB_ID,
            "name": "vm-test",
            "stage": "test",
            "project_id": 1,
            "project_name": "project",
        },
        "git_info": {
            "repo_url": "http://gitlab/group/project.git",
            "ref": "main",
            "sha": "0" * 40,
            "before_sha": "0" * 40,
            "ref_type": "branch",
            "refspecs": [],
            "depth": 0,
        },
        "runner_info": {"timeout": 600},
        "variables": [
            {"key": "CI_JOB_ID", "value": str(JOB_ID), "public": True},
            {"key": "GIT_STRATEGY", "value": "none", "public": True},
        ],
        "steps": [
            {
                "name": "script",
                "script": [SCRIPT],
                "timeout": 600,
                "when": "on_success",
                "allow_failure": False,
            }
        ],
        "image": {"name": ""},
        "services": [],
        "artifacts": [],
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": False},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def record(self, body):
        entry = {"method": self.command, "path": self.path, "body": body.decode("utf-8", "replace")}
        with LOCK, open(os.path.join(STATE_DIR, "requests.jsonl"), "a") as log:
            log.write(json.dumps(entry) + "\n")

    def reply(self, code, payload=None, headers=None):
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def handle_any(self):
        global handed_out
        body = self.body()
        self.record(body)
        path = self.path.split("?")[0]
        method = self.command
        if method == "POST" and path == "/api/v4/runners/verify":
            token = json.loads(body or b"{}").get("token", "")
            return self.reply(200, {"id": 42, "token": token, "token_expires_at": None})
        if method == "POST" and path == "/api/v4/runners":
            return self.reply(201, {"id": 43, "token": "glrt-registered-by-fake", "token_expires_at": None})
        if method == "DELETE" and path in ("/api/v4/runners/managers", "/api/v4/runners"):
            return self.reply(204)
        if method == "POST" and path == "/api/v4/jobs/request":
            with LOCK:
                first, handed_out = not handed_out, True
            return self.reply(201, job_payload()) if first else self.reply(204)
        if method == "PATCH" and path == f"/api/v4/jobs/{JOB_ID}/trace":
            with LOCK, open(os.path.join(STATE_DIR, f"job-{JOB_ID}.trace"), "ab") as trace:
                trace.write(body)
                length = trace.tell()
            return self.reply(202, headers={"Job-Status": "running", "Range": f"0-{length}",
                                            "X-GitLab-Trace-Update-Interval": "1"})
        if method == "PUT" and path == f"/api/v4/jobs/{JOB_ID}":
            state = json.loads(body or b"{}").get("state", "")
            with open(os.path.join(STATE_DIR, f"job-{JOB_ID}.state"), "w") as out:
                out.write(state + "\n")
            return self.reply(200, headers={"Job-Status": state or "running"})
        return self.reply(404, {"message": "404 Not Found"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-gitlab: " + fmt % args + "\n")


if __name__ == "__main__":
    os.makedirs(STATE_DIR, exist_ok=True)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    ThreadingHTTPServer(("", port), Handler).serve_forever()
