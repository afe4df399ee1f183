#!/usr/bin/env python3
"""images/host-key-fingerprints.sh, run as the GCE and DigitalOcean images' unit runs it, with
the real ssh-keygen, against host keys made here: one console line per key whose fingerprint
is computed here independently (SHA-256 of the key blob, base64 without padding), nothing of a
key file's comment (which could carry escape sequences), files that are no keys skipped, a
line that says so when there is no key, and a hostile ssh-keygen's output never printed.
Then shellcheck. Prints "ok"/"FAIL" lines; exits 1 if any failed.
"""

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "images" / "host-key-fingerprints.sh"
# The agent's console prefix, as the image's unit hands it to the script (from the agent's facts).
PREFIX = json.loads((ROOT / "agent" / "facts.json").read_text())["console_prefix"]
LINE = re.compile(re.escape(PREFIX) + r"ssh host key [0-9]+ SHA256:[A-Za-z0-9+/]+ \([A-Z0-9-]+\)")


def run(keygen, directory):
    out = subprocess.run(["sh", str(SCRIPT), PREFIX, keygen, str(directory)], capture_output=True, check=True, timeout=60)
    return out.stdout.decode()


def fingerprint(pub):
    blob = base64.b64decode(pub.read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_keys(tmp):
    keys = tmp / "ssh"
    keys.mkdir()
    made = {"ed25519": ("ED25519", "256"), "rsa": ("RSA", "3072"), "ecdsa": ("ECDSA", "256")}
    for kind in made:
        # A comment with an escape sequence and a newline-like byte: none of it may show.
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "root@vm\x1b]0;owned\x07\x85",
                        "-f", str(keys / f"ssh_host_{kind}_key")], check=True)
    (keys / "ssh_host_junk_key.pub").write_text("not a key\n")
    (keys / "ssh_host_empty_key.pub").write_text("")
    (keys / "unrelated.pub").write_text((keys / "ssh_host_rsa_key.pub").read_text())
    out = run("ssh-keygen", keys)
    lines = out.splitlines()
    expected = sorted(f"{PREFIX}ssh host key {bits} {fingerprint(keys / f'ssh_host_{kind}_key.pub')} ({name})"
                      for kind, (name, bits) in made.items())
    assert sorted(lines) == expected, f"got:\n{out}\nexpected:\n" + "\n".join(expected)
    assert all(LINE.fullmatch(line) for line in lines), out
    assert "owned" not in out and "\x1b" not in out and "root@" not in out, repr(out)


def check_no_keys(tmp):
    empty = tmp / "none"
    empty.mkdir()
    for directory in (empty, tmp / "missing"):
        out = run("ssh-keygen", directory)
        assert out == f"{PREFIX}no SSH host keys in {directory} to print\n", repr(out)


def check_hostile_keygen(tmp):
    keys = tmp / "hostile"
    keys.mkdir()
    (keys / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA x\n")
    fake = tmp / "fake-keygen"
    outputs = [
        "256 SHA256:abc root@x (ED25519\x1b]0;t\x07)",
        "256 SHA256:a\x1b[2Jb root@x (ED25519)",
        "25x SHA256:abc root@x (ED25519)",
        "256 MD5:ab:cd root@x (ED25519)",
        "256 SHA256:abc root@x ED25519",
        "256 SHA256: root@x (ED25519)",
        "",
    ]
    for output in outputs:
        fake.write_text("#!/bin/sh\nprintf '%s\\n' " + shlex_quote(output) + "\n")
        fake.chmod(0o755)
        out = run(str(fake), keys)
        assert out == f"{PREFIX}no SSH host keys in {keys} to print\n", f"{output!r} gave {out!r}"
    # A keygen that fails: the key is skipped, the script still succeeds.
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 255\n")
    out = run(str(fake), keys)
    assert "ssh host key" not in out, out


def shlex_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def check_shellcheck(_tmp):
    subprocess.run(["shellcheck", str(SCRIPT)], check=True, capture_output=True)


def main():
    if shutil.which("ssh-keygen") is None:
        print("FAIL  ssh-keygen is missing: run tests/nix/install-deps")
        return 1
    failed = 0
    for name, fn in [(n, f) for n, f in globals().items() if n.startswith("check_")]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fn(Path(tmp))
            except Exception as e:  # an assertion or a failed command
                failed += 1
                detail = getattr(e, "stderr", None) or str(e)
                print(f"FAIL  {name}: {detail}")
            else:
                print(f"ok    {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
