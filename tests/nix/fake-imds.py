#!/usr/bin/env python3
"""A stand-in for EC2's instance metadata service (IMDSv2) in the NixOS VM tests.

Usage: fake-imds.py PORT USER_DATA_FILE SSH_PUBLIC_KEY

Serves what a cloud runner image reads there: a session token (PUT /latest/api/token with a
TTL header), then, with that token, the user-data and the key pair's public key (listed as
EC2 lists it, and by index). Without the token every read is 401, as on an instance that
requires IMDSv2. Each request is appended to $STATE_DIR/requests.jsonl (method, path,
whether it carried the token).
"""

import json
import os
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = secrets.token_hex(16)
STATE_DIR = os.environ.get("STATE_DIR", "/var/lib/fake-imds")


class Handler(BaseHTTPRequestHandler):
    user_data = b""
    ssh_key = b""

    def record(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        entry = {"method": self.command, "path": self.path,
                 "token": self.headers.get("X-aws-ec2-metadata-token") == TOKEN}
        with open(os.path.join(STATE_DIR, "requests.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        self.record()
        if self.path != "/latest/api/token":
            return self.answer(404)
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self.answer(400)
        self.answer(200, TOKEN.encode())

    def do_GET(self):
        self.record()
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            return self.answer(401)
        body = {
            "/latest/user-data": self.user_data,
            "/latest/meta-data/public-keys": b"0=key-pair",
            "/latest/meta-data/public-keys/": b"0=key-pair",
            "/latest/meta-data/public-keys/0/": b"openssh-key",
            "/latest/meta-data/public-keys/0/openssh-key": self.ssh_key,
        }.get(self.path)
        self.answer(404) if body is None else self.answer(200, body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port, user_data, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(user_data, "rb") as f:
        Handler.user_data = f.read()
    Handler.ssh_key = key.encode() + b"\n"
    ThreadingHTTPServer(("", port), Handler).serve_forever()
