#!/usr/bin/env python3
"""Stand-in for the cloud CLIs (aws, gcloud, doctl) the example scripts call.

Called as `fakecli.py CLI ARGS...` by a wrapper named after the CLI in a directory put first on
PATH. Every call is appended to $FAKE_LOG as a JSON list (the CLI's name, then its arguments);
the answers are just enough for the scripts to go on, with the state kept in $FAKE_STATE (a JSON
file). check.py hands the aws calls to the real AWS CLI afterwards (awscheck.py). When
$REAL_GCLOUD names the Google Cloud CLI (where installed), each gcloud call is first given to it
without an account: it rejects an unknown flag or value first, and otherwise asks for an account.
"""
import json
import os
import subprocess
import sys


def load_state():
    try:
        with open(os.environ["FAKE_STATE"]) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save_state(state):
    with open(os.environ["FAKE_STATE"], "w") as f:
        json.dump(state, f)


def option(args, name):
    """The value after `name` (or of `name=value`) in args, else None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def positional(args, start):
    """Arguments from index start up to the first option."""
    out = []
    for arg in args[start:]:
        if arg.startswith("-"):
            break
        out.append(arg)
    return out


def validate_with_real_gcloud(args):
    real = os.environ.get("REAL_GCLOUD")
    if not real:
        return
    config = os.path.join(os.environ.get("FAKE_HOME", "/tmp"), "gcloud-config")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("FAKE_HOME", "/nonexistent"),
        "CLOUDSDK_CONFIG": config,
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_PROJECT": "example-project",
        # No probe for a GCE metadata server, no update check: offline and quick.
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
    }
    proc = subprocess.run([real, *args], env=env, capture_output=True, text=True, timeout=120)
    if "account" not in proc.stderr or "unrecognized arguments" in proc.stderr or "Invalid value" in proc.stderr:
        sys.stderr.write(f"fake gcloud: the real gcloud rejects `gcloud {' '.join(args)}`:\n{proc.stderr}")
        sys.exit(255)


def aws(args, state):
    if args[:2] == ["iam", "get-role"]:
        if not state.get("role"):
            sys.stderr.write("An error occurred (NoSuchEntity)\n")
            return 254
    elif args[:2] == ["iam", "create-role"]:
        state["role"] = True
    elif args[:2] == ["ec2", "import-snapshot"]:
        state["polls"] = 0
        print("import-snap-0123456789abcdef0")
    elif args[:2] == ["ec2", "describe-import-snapshot-tasks"]:
        state["polls"] = state.get("polls", 0) + 1
        print("active\tNone" if state["polls"] == 1 else "completed\tsnap-0123456789abcdef0")
    elif args[:2] == ["ec2", "register-image"]:
        print("ami-0123456789abcdef0")
    return 0


def gcloud(args, state):
    validate_with_real_gcloud(args)
    if args[:3] == ["compute", "instance-templates", "create"]:
        state.setdefault("templates", []).append(args[3])
        # The files of --metadata-from-file, read now: the script may delete them afterwards.
        files = {}
        for item in (option(args, "--metadata-from-file") or "").split(","):
            key, _, path = item.partition("=")
            with open(path) as f:
                files[key] = f.read()
        state.setdefault("metadata", {})[args[3]] = files
        # gcloud prints the new template as a table on stdout.
        print("NAME  MACHINE_TYPE  PREEMPTIBLE  CREATION_TIMESTAMP")
        print(f"{args[3]}  e2-standard-4")
    elif args[:3] == ["compute", "instance-templates", "list"]:
        for name in state.get("templates", []):
            print(name)
    elif args[:3] == ["compute", "instance-templates", "delete"]:
        state["templates"].remove(args[3])
    return 0


def doctl(args, state):
    droplets = state.setdefault("droplets", [])
    if args[:3] == ["compute", "droplet", "list"]:
        tag = option(args, "--tag-name")
        for d in droplets:
            if d["tag"] == tag:
                print(f"{d['id']}    {d['status']}")
    elif args[:3] == ["compute", "droplet", "delete"]:
        ids = [a for a in args[3:] if a.isdigit()]
        tag = option(args, "--tag-name")
        state["droplets"] = [d for d in droplets if str(d["id"]) not in ids and d["tag"] != tag]
    elif args[:3] == ["compute", "droplet", "create"]:
        names = positional(args, 3)
        if len(names) > 10:
            sys.stderr.write("fake doctl: more than ten names in one request\n")
            return 1
        for name in names:
            new = {"id": 1000 + len(droplets), "name": name, "status": "new", "tag": option(args, "--tag-names")}
            droplets.append(new)
            print(f"{new['id']}    {name}")
    return 0


def main():
    name, args = sys.argv[1], sys.argv[2:]
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps([name, *args]) + "\n")
    state = load_state()
    status = {"aws": aws, "gcloud": gcloud, "doctl": doctl}[name](args, state)
    save_state(state)
    sys.exit(status)


if __name__ == "__main__":
    main()
