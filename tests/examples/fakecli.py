#!/usr/bin/env python3
"""Stand-in for the CLIs (aws, gcloud, doctl, kubectl, Proxmox VE's pvesh and qm) the example
scripts call.

Called as `fakecli.py CLI ARGS...` by a wrapper named after the CLI in a directory put first on
PATH. Every call is appended to $FAKE_LOG as a JSON list (the CLI's name, then its arguments);
the answers are just enough for the scripts to go on, with the state kept in $FAKE_STATE (a JSON
file). check.py hands the aws calls to the real AWS CLI afterwards (awscheck.py). When
$REAL_GCLOUD names the Google Cloud CLI (where installed), each gcloud call is first given to it
without an account: it rejects an unknown flag or value first, and otherwise asks for an account.
"""
import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
import time


def load_state():
    try:
        with open(os.environ["FAKE_STATE"]) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save_state(state):
    # Replaced whole (write, then rename), so that a test reading the state while a script runs
    # never sees half of it.
    path = os.environ["FAKE_STATE"]
    with open(path + ".new", "w") as f:
        json.dump(state, f)
    os.replace(path + ".new", path)


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
    if failing("gcloud", args, state):
        return 1
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
    elif args[:3] == ["compute", "networks", "describe"]:
        if args[3] not in state.get("networks", []):
            sys.stderr.write("ERROR: (gcloud.compute.networks.describe) Could not fetch resource:\n"
                             f" - The resource 'projects/example-project/global/networks/{args[3]}' was not found\n")
            return 1
        print(args[3])
    elif args[:3] == ["compute", "networks", "create"]:
        state.setdefault("networks", []).append(args[3])
    elif args[:3] == ["compute", "networks", "delete"]:
        state["networks"].remove(args[3])
    elif args[:4] == ["compute", "networks", "subnets", "create"]:
        state.setdefault("subnets", []).append(args[4])
    elif args[:4] == ["compute", "networks", "subnets", "delete"]:
        state["subnets"].remove(args[4])
    elif args[:3] == ["compute", "firewall-rules", "create"]:
        state.setdefault("firewall_rules", {})[args[3]] = args[4:]
    elif args[:3] == ["compute", "firewall-rules", "list"]:
        for name in state.get("firewall_rules", {}):
            print(name)
    elif args[:3] == ["compute", "firewall-rules", "delete"]:
        del state["firewall_rules"][args[3]]
    return 0


def matching(table, args):
    """The value of the first key of table that starts the arguments ("compute droplet list")."""
    line = " ".join(args)
    for prefix, value in (table or {}).items():
        if line.startswith(prefix):
            return prefix, value
    return None, None


def failing(name, args, state):
    """A call the test made fail, as the real CLI fails: its message on stderr, exit 1.
    state["fail"] maps a prefix of the arguments ("compute droplet list") to the message;
    state["fail_times"] maps a prefix to [count, message]: the next count calls fail, then the
    CLI answers again (a 429 that passes)."""
    _, message = matching(state.get("fail"), args)
    if message is not None:
        sys.stderr.write(message + "\n")
        return True
    prefix, times = matching(state.get("fail_times"), args)
    if times and times[0] > 0:
        times[0] -= 1
        sys.stderr.write(times[1] + "\n")
        return True
    return False


def canned(args, state):
    """state["raw"] maps a prefix to what the CLI prints instead of its answer (exit 0): a cut
    short or malformed list."""
    _, text = matching(state.get("raw"), args)
    if text is not None:
        sys.stdout.write(text)
        return True
    return False


def doctl(args, state):
    if failing("doctl", args, state):
        return 1
    if canned(args, state):
        return 0
    droplets = state.setdefault("droplets", [])
    firewalls = state.setdefault("firewalls", [])
    if args[:3] == ["compute", "droplet", "list"]:
        tag = option(args, "--tag-name")
        mine = [d for d in droplets if d["tag"] == tag]
        if option(args, "--output") == "json":
            # The API's fields; doctl prints the list as a JSON array.
            print(json.dumps([{"id": d["id"], "name": d.get("name", f"droplet-{d['id']}"), "status": d["status"],
                               "created_at": d.get("created_at", "2026-01-01T00:00:00Z"), "tags": [d["tag"]]} for d in mine]))
        else:
            for d in mine:
                print(f"{d['id']}    {d['status']}")
    elif args[:3] == ["compute", "droplet-action", "shutdown"]:
        # The power button: the Droplet goes off (the test's stand-in for a guest that obeys).
        (droplet,) = [d for d in droplets if str(d["id"]) == args[3]]
        if "--wait" not in args:
            sys.stderr.write("fake doctl: the scripts wait for the shutdown\n")
            return 1
        droplet["status"] = "off"
        print(f"{args[3]}    shutdown    completed")
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
            new = {"id": 1000 + len(droplets), "name": name, "status": "new", "tag": option(args, "--tag-names"),
                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            droplets.append(new)
            print(f"{new['id']}    {name}")
    elif args[:3] == ["compute", "firewall", "list"]:
        for f in firewalls:
            print(f"{f['id']}    {f['name']}")
    elif args[:3] == ["compute", "firewall", "create"]:
        if not option(args, "--inbound-rules") and not option(args, "--outbound-rules"):
            sys.stderr.write("Error: POST https://api.digitalocean.com/v2/firewalls: 422 must contain at least one rule\n")
            return 1
        new = {"id": f"fw-{len(firewalls)}", "name": option(args, "--name"), "tags": option(args, "--tag-names"),
               "inbound": option(args, "--inbound-rules"), "outbound": option(args, "--outbound-rules")}
        firewalls.append(new)
        print(new["id"])
    elif args[:3] == ["compute", "firewall", "delete"]:
        state["firewalls"] = [f for f in firewalls if f["id"] not in args[3:]]
    return 0


def kubectl(args, state):
    """The calls of the reaper CronJob's script (vm-template.yaml): list and delete VMIs."""
    if failing("kubectl", args, state):
        return 1
    vmis = state.setdefault("vmis", [])
    if args[:2] == ["get", "virtualmachineinstances"]:
        selector = option(args, "-l")
        output = option(args, "-o")
        expected = 'jsonpath={range .items[*]}{.metadata.name}{" "}{.metadata.creationTimestamp}{"\\n"}{end}'
        if output != expected:
            sys.stderr.write(f"fake kubectl: unexpected output format {output!r}\n")
            return 1
        key, _, value = (selector or "").partition("=")
        for v in vmis:
            if v["labels"].get(key) == value:
                print(f"{v['name']} {v['created']}")
    elif args[:2] == ["delete", "virtualmachineinstances"]:
        names = positional(args, 2) + [a for a in args[2:] if not a.startswith("-")]
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in {v["name"] for v in vmis}]
        if missing:
            sys.stderr.write(f'Error from server (NotFound): virtualmachineinstances.kubevirt.io "{missing[0]}" not found\n')
            return 1
        state["vmis"] = [v for v in vmis if v["name"] not in names]
        for n in names:
            print(f'virtualmachineinstance.kubevirt.io "{n}" deleted')
    else:
        sys.stderr.write(f"fake kubectl: unexpected call {args}\n")
        return 1
    return 0


def pve_vm(state, vmid):
    return next((v for v in state.setdefault("vms", []) if str(v["vmid"]) == str(vmid)), None)


def pvesh(args, state):
    """The calls of examples/proxmox/runner-fleet.sh: the node's VMs (JSON), the next free id."""
    if failing("pvesh", args, state):
        return 255
    if canned(args, state):
        return 0
    vms = state.setdefault("vms", [])
    node = state.get("node", "pve")
    if args[:2] == ["get", f"/nodes/{node}/qemu"] and option(args, "--output-format") == "json":
        out = []
        for v in vms:
            entry = {"vmid": v["vmid"], "status": v["status"], "name": v.get("name"), "cpus": 2, "maxmem": 4294967296}
            if v.get("template"):
                entry["template"] = 1
            if v.get("lock"):
                entry["lock"] = v["lock"]
            if v.get("tags"):
                entry["tags"] = v["tags"]
            out.append({k: x for k, x in entry.items() if x is not None})
        print(json.dumps(out))
    elif args[:1] == ["get"] and args[1].startswith("/nodes/") and args[1].endswith("/qemu"):
        sys.stderr.write(f"hostname lookup '{args[1].split('/')[2]}' failed - failed to get address info for: "
                         f"{args[1].split('/')[2]}: Name or service not known\n")
        return 255
    elif args[:2] == ["get", "/cluster/nextid"]:
        print(max([99] + [v["vmid"] for v in vms]) + 1)
    else:
        sys.stderr.write(f"fake pvesh: unexpected call {args}\n")
        return 255
    return 0


def qm(args, state):
    """qm clone/set/start/shutdown/stop/destroy as Proxmox VE's qm answers them."""
    if failing("qm", args, state):
        return 255
    vms = state.setdefault("vms", [])
    verb, vmid = args[0], args[1] if len(args) > 1 else None
    vm = pve_vm(state, vmid)
    if verb != "clone" and vm is None:
        sys.stderr.write(f"Configuration file 'nodes/pve/qemu-server/{vmid}.conf' does not exist\n")
        return 2
    if verb == "clone":
        source, new = vm, args[2]
        if source is None:
            sys.stderr.write(f"Configuration file 'nodes/pve/qemu-server/{vmid}.conf' does not exist\n")
            return 2
        if pve_vm(state, new):
            sys.stderr.write(f"unable to create VM {new}: config file already exists\n")
            return 2
        if option(args, "--storage") and option(args, "--full") != "1":
            sys.stderr.write("parameter verification failed. storage: option is only allowed for full clones\n")
            return 255
        vms.append({"vmid": int(new), "name": option(args, "--name"), "status": "stopped",
                    "config": dict(source.get("config", {})), "clone_of": int(vmid),
                    "full": option(args, "--full") == "1", "storage": option(args, "--storage")})
    elif verb == "set":
        for i in range(2, len(args) - 1, 2):
            vm.setdefault("config", {})[args[i].lstrip("-")] = args[i + 1]
        if option(args, "--tags"):
            vm["tags"] = option(args, "--tags")
    elif verb == "start":
        cdrom = vm.get("config", {}).get("ide2", "").split(",")[0]
        if cdrom.startswith("/") and not os.path.exists(cdrom):
            sys.stderr.write(f"kvm: -drive file={cdrom},if=none,id=drive-ide2,media=cdrom: Could not open '{cdrom}': No such file or directory\n")
            return 255
        if vm["status"] == "running":
            sys.stderr.write(f"VM {vmid} already running\n")
            return 255
        vm["status"] = "running"
    elif verb == "shutdown":
        if option(args, "--forceStop") != "1" or not option(args, "--timeout"):
            sys.stderr.write("fake qm: the scripts shut down with --timeout and --forceStop 1\n")
            return 255
        vm["status"] = "stopped"
        vm["shut_down"] = True
    elif verb == "stop":
        vm["status"] = "stopped"
    elif verb == "destroy":
        if vm["status"] == "running":
            sys.stderr.write(f"VM {vmid} is running - destroy failed\n")
            return 255
        if vm.get("lock"):
            sys.stderr.write(f"VM is locked ({vm['lock']})\n")
            return 255
        state["vms"] = [v for v in vms if v is not vm]
        state.setdefault("destroyed", []).append({"vmid": vm["vmid"], "shut_down": vm.get("shut_down", False),
                                                  "purge": option(args, "--purge"),
                                                  "unreferenced": option(args, "--destroy-unreferenced-disks")})
    else:
        sys.stderr.write(f"fake qm: unexpected call {args}\n")
        return 255
    return 0


def main():
    name, args = sys.argv[1], sys.argv[2:]
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps([name, *args]) + "\n")
    # One call at a time changes the state (the scripts run some calls in parallel).
    out, err = io.StringIO(), io.StringIO()
    with open(os.environ["FAKE_STATE"] + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load_state()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = {"aws": aws, "gcloud": gcloud, "doctl": doctl, "kubectl": kubectl, "pvesh": pvesh, "qm": qm}[name](args, state)
        save_state(state)
    # state["hang"] maps a prefix to seconds the answer takes to arrive (a slow API, doctl's own
    # retries of a 429, a connection that hangs): the answer is the state's when the call came.
    _, seconds = matching(state.get("hang"), args)
    if seconds:
        time.sleep(seconds)
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    sys.exit(status)


if __name__ == "__main__":
    main()
