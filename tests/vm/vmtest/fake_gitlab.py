"""The fake GitLab on the host's loopback: the runner API as far as the agent and the fake
gitlab-runner use it, every request recorded with its tokens masked. Also the small threaded
HTTP server that it and the evidence collector run on."""

import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import JOB_SECONDS


def mask(token):
    """What a token may look like in test output: its kind and four characters."""
    if not isinstance(token, str):
        return token
    return token[:9] + "..." if len(token) > 9 else "..."


def mask_in_text(text, token):
    """text with every occurrence of the runner token replaced by its masked form."""
    return text.replace(token, mask(token)) if token else text


def masked(value):
    if isinstance(value, dict):
        return {k: (mask(v) if k == "token" else masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def http_server(respond):
    """A threaded HTTP/1.1 server on a free loopback port; respond(method, path, headers, raw)
    returns (status, json payload or bytes or None, extra headers)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, payload, headers = respond(self.command, self.path, self.headers, raw)
            if payload is None:
                data = b""
            elif isinstance(payload, bytes):
                data = payload
            else:
                data = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if data and not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class FakeGitLab:
    """The runner API as far as the agent and the fake gitlab-runner use it (the reference is
    shared/reference/gitlab-runner-api.md). Every request is recorded, tokens masked, in memory
    and in a JSON-lines file."""

    def __init__(self, record_path, token, verify_status=200, job_seconds=JOB_SECONDS, jobs=1,
                 job_script=None):
        self.token = token
        self.verify_status = verify_status
        self.job_seconds = job_seconds
        # The job's script (its lines, as .gitlab-ci.yml's `script:`); by default a sleep.
        self.job_script = list(job_script) if job_script else [f"sleep {job_seconds}"]
        self.jobs_left = jobs
        self.managers = set()
        self.jobs = {}
        self.requests = []
        # Each job's trace as the runner sent it, unmasked: in memory only, never in the record
        # (a scenario whose job gets the token finds it here; the record shows it masked).
        self.traces = {}
        self.cond = threading.Condition()
        self.record_file = open(record_path, "w")
        self.server = http_server(self.respond)
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.record_file.close()

    def respond(self, method, path, headers, raw):
        now = time.time()
        try:
            # A trace (text/plain) stays text, even when the job printed JSON.
            if (headers.get("Content-Type") or "").startswith("text/plain"):
                raise ValueError
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace") if raw else None
        with self.cond:
            status, payload, extra = self.route(method, path.split("?")[0], headers, body)
            entry = {
                "t": now, "method": method, "path": path, "status": status,
                "token_ok": isinstance(body, dict) and body.get("token") == self.token,
                # JSON objects in "body" (tokens masked); anything else, e.g. a trace, in "text".
                "body": masked(body) if isinstance(body, dict) else {},
                "user_agent": headers.get("User-Agent"),
            }
            if body is not None and not isinstance(body, dict):
                text = body if isinstance(body, str) else json.dumps(body)
                entry["text"] = mask_in_text(text, self.token)
                entry["runner_token_in_text"] = bool(self.token) and self.token in text
            self.requests.append(entry)
            self.record_file.write(json.dumps(entry) + "\n")
            self.record_file.flush()
            self.cond.notify_all()
        return status, payload, extra

    def route(self, method, path, headers, body):
        body_dict = body if isinstance(body, dict) else {}
        token_ok = body_dict.get("token") == self.token
        system_id = body_dict.get("system_id")
        forbidden = (403, {"message": "403 Forbidden - invalid token supplied"}, {})
        if method == "POST" and path == "/api/v4/runners/verify":
            if self.verify_status != 200 or not token_ok:
                return forbidden
            self.managers.add(system_id)
            return 200, {"id": 1, "token": self.token, "token_expires_at": None}, {}
        if method == "POST" and path == "/api/v4/jobs/request":
            if not token_ok:
                return forbidden
            self.managers.add(system_id)
            if self.jobs_left <= 0:
                return 204, None, {"X-GitLab-Last-Update": secrets.token_hex(8)}
            self.jobs_left -= 1
            job_id = len(self.jobs) + 1
            job_token = "glcbt-" + secrets.token_hex(10)
            self.jobs[job_id] = {"token": job_token, "states": []}
            return 201, job_payload(job_id, job_token, self.job_seconds, self.job_script), {}
        m = re.fullmatch(r"/api/v4/jobs/(\d+)(/trace)?", path)
        if m and int(m.group(1)) in self.jobs:
            job = self.jobs[int(m.group(1))]
            if m.group(2) and method == "PATCH":
                if headers.get("JOB-TOKEN") not in (None, job["token"]):
                    return forbidden
                text = body if isinstance(body, str) else json.dumps(body) if body else ""
                self.traces[int(m.group(1))] = self.traces.get(int(m.group(1)), "") + text
                return 202, None, {"Range": f"0-{len(body or '')}", "Job-Status": "running"}
            if not m.group(2) and method == "PUT":
                if body_dict.get("token") != job["token"]:
                    return forbidden
                job["states"].append(body_dict.get("state"))
                return 200, None, {"Job-Status": body_dict.get("state") or "running"}
        if method == "DELETE" and path == "/api/v4/runners/managers":
            if not token_ok:
                return forbidden
            if system_id not in self.managers:
                return 404, {"message": "404 Runner manager not found"}, {}
            self.managers.discard(system_id)
            return 204, None, {}
        if method == "DELETE" and path == "/api/v4/runners":
            # Deletes the whole runner of a token that a fleet shares: the agent must never.
            return (204, None, {}) if token_ok else forbidden
        return 404, {"message": "404 Not Found"}, {}

    def find(self, method, path, pred=lambda r: True):
        with self.cond:
            return [r for r in self.requests if r["method"] == method and r["path"] == path and pred(r)]

    def wait_for(self, pred, timeout, vm=None):
        """The first recorded request matching pred, waiting up to timeout (or until vm exits)."""
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for r in self.requests:
                    if pred(r):
                        return r
                left = deadline - time.time()
                if left <= 0 or (vm is not None and vm.exited()):
                    return None
                self.cond.wait(min(left, 0.5))


def job_payload(job_id, job_token, seconds, script=None):
    """A job as GitLab hands it out (fields gitlab-runner decodes). The fake gitlab-runner reads
    id and token (the first two keys), the variables and the steps (its job runner,
    guest/vmtest-job-runner, builds each stage's script from them); FAKE_JOB_SECONDS is the
    length of the default script's sleep."""
    return {
        "id": job_id,
        "token": job_token,
        "allow_git_fetch": False,
        "job_info": {"id": job_id, "name": "vm-test", "stage": "test", "project_id": 1,
                     "project_name": "vmtest"},
        "git_info": {"repo_url": "http://gitlab.invalid/vmtest.git", "ref": "main",
                     "sha": "0" * 40, "before_sha": "0" * 40, "ref_type": "branch",
                     "refspecs": [], "depth": 0},
        "runner_info": {"timeout": 3600},
        "variables": [
            {"key": "CI_JOB_ID", "value": str(job_id), "public": True, "masked": False},
            {"key": "CI_JOB_TOKEN", "value": job_token, "public": False, "masked": True},
            {"key": "CI_PROJECT_PATH", "value": "vmtest/project", "public": True, "masked": False},
            {"key": "FAKE_JOB_SECONDS", "value": str(seconds), "public": True, "masked": False},
            {"key": "GIT_STRATEGY", "value": "none", "public": True, "masked": False},
        ],
        "steps": [{"name": "script", "script": list(script or [f"sleep {seconds}"]), "timeout": 3600,
                   "when": "on_success", "allow_failure": False}],
        "image": None, "services": [], "artifacts": [], "cache": [], "credentials": [],
        "dependencies": [], "features": {},
    }


# ---- what a recorded request is ----------------------------------------------------------------

def is_verify(r):
    return r["path"] == "/api/v4/runners/verify"


def is_job_request(r):
    return r["path"] == "/api/v4/jobs/request"


def is_job_start(r):
    return r["method"] == "PUT" and re.fullmatch(r"/api/v4/jobs/\d+", r["path"]) \
        and r["body"].get("state") == "running"


def is_job_end(r):
    return r["method"] == "PUT" and re.fullmatch(r"/api/v4/jobs/\d+", r["path"]) \
        and r["body"].get("state") in ("success", "failed")


def is_deregistration(r):
    return r["method"] == "DELETE" and r["path"] == "/api/v4/runners/managers"


def is_runner_deletion(r):
    return r["method"] == "DELETE" and r["path"] == "/api/v4/runners"
