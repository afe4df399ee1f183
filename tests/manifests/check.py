#!/usr/bin/env python3
"""Checks of the KubeVirt manifests: vm-template.yaml and examples/kubevirt/*.yaml.

1. Schemas: every document validates against ../shared/schemas/kubevirt/v1.9.0 (KubeVirt kinds;
   the single VirtualMachine also against datreeio-v1.6.2) or against the small strict schema
   below (core Secret). The CRD schemas leave the root and every `metadata` open, so this file
   closes those too: with that, every field name anywhere is checked.
2. Mutation: each field name in each document, misspelled, must be rejected.
3. Rules no schema holds (KubeVirt's webhook and this project's needs): runStrategy, serials,
   the grace period against the agent's unit, networking, probes, the disks and their volumes,
   the Secrets, the pool's selector and update strategy, and that the pool's VM is the VM.
4. Cross-check with nixos-modules/ (and images/kubevirt.nix): the disk serials, the mount
   points and the user name that the manifests rely on are the ones the NixOS modules declare,
   and the image runs the guest agent that readiness and SSH keys use.
5. The example runner.json passes the agent's own `gitlab-runner-vm check` (when it is built).

Prints one line per check and a closing "N passed, N failed" line; exits 1 if any check failed.
"""

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The schemas this test needs, copied from shared/schemas/kubevirt (data, with their origin in
# schemas/README.md) so that a clone validates on its own; the copy is compared with shared/
# whenever shared/ sits beside the repository.
SCHEMAS = Path(os.environ.get("KUBEVIRT_SCHEMAS", Path(__file__).resolve().parent / "schemas"))
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kubevirt"
DEFAULT_SCHEMAS = SCHEMAS / "v1.9.0"
OLD_SCHEMAS = SCHEMAS / "datreeio-v1.6.2"
VM_TEMPLATE = ROOT / "vm-template.yaml"
EXAMPLES = ROOT / "examples" / "kubevirt"
README = ROOT / "README.md"
KUBEVIRT_DOC = ROOT / "docs" / "kubevirt.md"
UNIT = ROOT / "agent" / "dist" / "gitlab-runner-vm.service"
MODULES = ROOT / "nixos-modules"

# Contracts with the NixOS modules and the agent (README, DESIGN.md).
PLACEHOLDER_TOKEN = "glrt-REPLACE-ME"
CONFIG_KEY = "runner.json"
AGENT_CONFIG_PATH = "/runner-info/runner.json"  # the agent's default --config
CONFIG_DISK_LABEL = "cfgdata"  # KubeVirt's label for a secret disk without volumeLabel
# A guest shutdown needs time beyond the agent's own stop (TimeoutStopSec): other units, job
# containers, unmounting. The grace period must cover both.
SHUTDOWN_MARGIN_S = 30
MIN_GRACE_S = 120
SERIAL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # KubeVirt's webhook
SERIAL_MAX = 20  # what virtio-blk carries
TOKEN_LEAK_RE = re.compile(r"glrt-[A-Za-z0-9_-]{20,}")
POOL_API = "pool.kubevirt.io/v1beta1"  # v1alpha1 before KubeVirt 1.8
APPLY_SELECTOR = "app.kubernetes.io/component=runner"

# Fields of the root and of any `metadata` that a manifest may use (the CRD schemas accept
# anything there, so a misspelling would pass them).
ROOT_KEYS = {"apiVersion", "kind", "metadata", "spec"}
METADATA_KEYS = {"name", "namespace", "labels", "annotations"}

# Core kinds have no file in shared/schemas; this is the part of a v1 Secret manifests use.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SECRET_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "Secret"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "type": {"type": "string"},
        "immutable": {"type": "boolean"},
        "data": {**STRING_MAP, "propertyNames": {"pattern": "^[-._a-zA-Z0-9]+$"}},
        "stringData": {**STRING_MAP, "propertyNames": {"pattern": "^[-._a-zA-Z0-9]+$"}},
    },
}
SECRET_VALIDATOR = jsonschema.Draft7Validator(SECRET_SCHEMA)


class Skip(Exception):
    """A check that cannot run here (says why)."""


# ---------------------------------------------------------------------------------------------
# Loading and validating


def manifest_files():
    return [VM_TEMPLATE] + sorted(EXAMPLES.glob("*.yaml"))


def rel(path):
    return str(Path(path).relative_to(ROOT))


def load_docs(path):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    assert docs, f"{rel(path)} holds no document"
    return docs


_validators = {}


def validator(path):
    if path not in _validators:
        _validators[path] = jsonschema.Draft7Validator(json.loads(path.read_text()))
    return _validators[path]


def schema_file(doc, base=DEFAULT_SCHEMAS):
    """{group}/{kind}_{version}.json, the layout of shared/schemas/kubevirt."""
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = api.rpartition("/")
    return base / group / f"{kind.lower()}_{version}.json"


def loose_metadata_errors(node, path=()):
    """Field names of the root and of every `metadata`, which the CRD schemas leave open."""
    errors = []
    if not path and isinstance(node, dict):
        errors += [f"unknown field {k!r} at the root" for k in node if k not in ROOT_KEYS]
    if isinstance(node, dict):
        for key, value in node.items():
            here = path + (key,)
            if key == "metadata" and isinstance(value, dict):
                errors += [
                    f"unknown field {'.'.join(map(str, here + (k,)))!r}"
                    for k in value
                    if k not in METADATA_KEYS
                ]
            errors += loose_metadata_errors(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            errors += loose_metadata_errors(value, path + (i,))
    return errors


def validate(doc, base=DEFAULT_SCHEMAS):
    """All problems of one document, as strings; an empty list means valid."""
    if not isinstance(doc, dict):
        return ["a document is not a mapping"]
    if (doc.get("apiVersion"), doc.get("kind")) == ("v1", "Secret"):
        return [
            f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
            for e in SECRET_VALIDATOR.iter_errors(doc)
        ]
    path = schema_file(doc, base)
    if not path.is_file():
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}: {path} not found (tests/manifests/schemas holds the copies)"]
    errors = [
        f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
        for e in validator(path).iter_errors(doc)
    ]
    return errors + loose_metadata_errors(doc)


# Maps whose keys are data, not field names: any key is right there.
FREE_FORM_PARENTS = {"labels", "annotations", "matchLabels", "stringData", "data", "requests", "limits"}


def field_paths(node, path=()):
    """Paths (tuples) of every field name in a document, outside free-form maps."""
    if isinstance(node, dict):
        if path and path[-1] in FREE_FORM_PARENTS:
            return
        for key, value in node.items():
            yield path + (key,)
            yield from field_paths(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from field_paths(value, path + (i,))


def misspell(doc, path):
    """A copy of doc with the field at path renamed as by a typo (its last letter dropped)."""
    out = copy.deepcopy(doc)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1]
    # Rebuild the mapping to keep the order; the misspelled name replaces the right one.
    items = list(parent.items())
    parent.clear()
    for k, v in items:
        parent[k[:-1] if k == key else k] = v
    return out


def get(node, dotted, default=None):
    for step in dotted.split("."):
        if not isinstance(node, dict) or step not in node:
            return default
        node = node[step]
    return node


def label_selector_matches(selector, labels):
    """A kubectl -l selector of comma-separated key=value terms."""
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if (labels or {}).get(key) != value:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The agent's unit and the NixOS modules


def systemd_seconds(text):
    total = 0
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", text):
        if unit not in units:
            raise AssertionError(f"cannot read the time span {text!r}")
        total += int(number) * units[unit]
    return total


def unit_timeout_stop():
    if not UNIT.is_file():
        raise AssertionError(f"{rel(UNIT)} is missing: the grace period is checked against its TimeoutStopSec")
    m = re.search(r"^TimeoutStopSec=(.+)$", UNIT.read_text(), re.M)
    assert m, f"{rel(UNIT)} sets no TimeoutStopSec"
    return systemd_seconds(m.group(1).strip())


NIX_OPS = ("...", "==", "!=", "<=", ">=", "&&", "||", "->", "//", "++")
NIX_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")


def _nix_interp_end(src, i):
    """Index just past the `}` closing an interpolation whose body starts at i."""
    depth = 1
    while i < len(src):
        if src[i] == '"':
            i, _, _ = _nix_string(src, i + 1)
            continue
        if src.startswith("''", i):
            i, _, _ = _nix_indented(src, i + 2)
            continue
        if src[i] == "#":
            i = src.find("\n", i)
            i = len(src) if i < 0 else i
            continue
        if src[i] == "{":
            depth += 1
        elif src[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unterminated ${")


def _nix_string(src, i):
    """Scan a "..." string whose body starts at i: (end, text, has no interpolation)."""
    out, plain = [], True
    while i < len(src):
        c = src[i]
        if c == "\\":
            out.append(src[i + 1 : i + 2])
            i += 2
        elif c == '"':
            return i + 1, "".join(out), plain
        elif src.startswith("${", i):
            end = _nix_interp_end(src, i + 2)
            out.append(src[i:end])
            plain = False
            i = end
        else:
            out.append(c)
            i += 1
    raise ValueError("unterminated string")


def _nix_indented(src, i):
    """Scan a ''...'' string whose body starts at i."""
    out, plain = [], True
    while i < len(src):
        if src.startswith("'''", i):
            out.append("''")
            i += 3
        elif src.startswith("''$", i):
            out.append("$")
            i += 3
        elif src.startswith("''\\", i):
            out.append(src[i + 3 : i + 4])
            i += 4
        elif src.startswith("''", i):
            return i + 2, "".join(out), plain
        elif src.startswith("${", i):
            end = _nix_interp_end(src, i + 2)
            out.append(src[i:end])
            plain = False
            i = end
        else:
            out.append(src[i])
            i += 1
    raise ValueError("unterminated indented string")


def nix_tokens(src):
    """Tokens of a Nix file: ("id", name), ("str", text), ("istr", text with ${..}), ("dyn", ${..}), ("op", text)."""
    toks, i = [], 0
    while i < len(src):
        c = src[i]
        if c.isspace():
            i += 1
        elif c == "#":
            i = src.find("\n", i)
            i = len(src) if i < 0 else i
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = len(src) if j < 0 else j + 2
        elif c == '"':
            i, text, plain = _nix_string(src, i + 1)
            toks.append(("str" if plain else "istr", text))
        elif src.startswith("''", i):
            i, text, plain = _nix_indented(src, i + 2)
            toks.append(("str" if plain else "istr", text))
        elif src.startswith("${", i):
            end = _nix_interp_end(src, i + 2)
            toks.append(("dyn", src[i:end]))
            i = end
        elif NIX_IDENT.match(src, i):
            m = NIX_IDENT.match(src, i)
            toks.append(("id", m.group()))
            i = m.end()
        else:
            op = next((o for o in NIX_OPS if src.startswith(o, i)), c)
            toks.append(("op", op))
            i += len(op)
    return toks


def _attrpath_before_eq(stmt):
    """For statement tokens `... a.b."c" = rhs`, (["a", "b", "c"], rhs tokens); else None."""
    try:
        eq = stmt.index(("op", "="))
    except ValueError:
        return None
    lhs, path, want_name = stmt[:eq], [], True
    for kind, text in reversed(lhs):
        if want_name and kind in ("id", "str", "dyn"):
            path.append(text)
            want_name = False
        elif not want_name and (kind, text) == ("op", "."):
            want_name = True
        else:
            break
    if not path or want_name:
        return None
    return list(reversed(path)), stmt[eq + 1 :]


def nix_assignments(src):
    """Every `attr.path = value` of a Nix file, with the paths of the enclosing attribute sets.

    Returns (path tuple, value tokens) pairs; a value that is an attribute set gives the pair
    (path, [("op", "{")]) and its own attributes below it. Good enough for NixOS modules: it
    reads `options.a.b = mkOption { default = "x"; }` and the nested-set spelling alike.
    """
    frames, stmt, out = [], [], []
    for tok in nix_tokens(src):
        if tok == ("op", "{"):
            found = _attrpath_before_eq(stmt)
            label = found[0] if found else []
            if found:
                out.append((tuple(sum(frames, []) + label), [tok]))
            frames.append(label)
            stmt = []
        elif tok == ("op", "}"):
            if frames:
                frames.pop()
            stmt = []
        elif tok == ("op", ";"):
            found = _attrpath_before_eq(stmt)
            if found:
                out.append((tuple(sum(frames, []) + found[0]), found[1]))
            stmt = []
        else:
            stmt.append(tok)
    return out


def assignments_ending(assignments, suffix):
    return [(path, value) for path, value in assignments if path[-len(suffix) :] == suffix]


def option_default(assignments, option):
    """The string default of an option such as runnerImage.configDisk.serial, or None."""
    want = tuple(option.split(".")) + ("default",)
    values = [
        value[0][1]
        for path, value in assignments
        if path[-len(want) :] == want and len(value) == 1 and value[0][0] == "str"
    ]
    assert len(set(values)) <= 1, f"{option} has several string defaults: {values}"
    return values[0] if values else None


def read_module(name):
    path = MODULES / name
    if not path.is_file():
        raise AssertionError(
            f"{rel(path)} is missing: this check reads it to compare the manifests with the "
            f"NixOS modules (it is written by the NixOS side of the project)"
        )
    return nix_assignments(path.read_text())


def runner_module_defaults():
    """The disk contract of nixos-modules/runner.nix."""
    assigns = read_module("runner.nix")
    out = {}
    for option in ("configDisk.serial", "configDisk.mountPoint", "scratchDisk.serial", "scratchDisk.mountPoint"):
        value = option_default(assigns, "runnerImage." + option)
        assert value is not None, (
            f"nixos-modules/runner.nix declares no string default for runnerImage.{option} "
            f'(expected one line `default = "<value>";` in its mkOption)'
        )
        out[option] = value
    return out


# ---------------------------------------------------------------------------------------------
# What the manifests contain


def secrets_of(docs):
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}


def vm_specs(path):
    """(where, VirtualMachine spec, labels of the VM object) for each VM in a file, pools included."""
    out = []
    for doc in load_docs(path):
        name = get(doc, "metadata.name")
        if doc.get("kind") == "VirtualMachine":
            out.append((f"{rel(path)}: VirtualMachine {name}", doc["spec"], get(doc, "metadata.labels", {})))
        elif doc.get("kind") == "VirtualMachinePool":
            template = doc["spec"]["virtualMachineTemplate"]
            out.append((f"{rel(path)}: VirtualMachinePool {name}", template["spec"], get(template, "metadata.labels", {})))
    return out


def disk_roles(spec):
    """{"root"|"config"|"scratch": (disk, volume)} from the volume behind each disk."""
    tmpl = spec["template"]["spec"]
    volumes = {v["name"]: v for v in tmpl.get("volumes", [])}
    roles = {}
    for disk in get(tmpl, "domain.devices.disks", []):
        volume = volumes.get(disk["name"])
        assert volume is not None, f"disk {disk['name']} has no volume of that name"
        if "containerDisk" in volume:
            role = "root"
        elif "secret" in volume:
            role = "config"
        elif "emptyDisk" in volume:
            role = "scratch"
        else:
            raise AssertionError(f"disk {disk['name']}: unexpected volume type {sorted(volume)}")
        assert role not in roles, f"two {role} disks"
        roles[role] = (disk, volume)
    assert set(roles) == {"root", "config", "scratch"}, f"disks found: {sorted(roles)}"
    return roles


def guest_comments(path):
    """`# in the guest: DEVICE -> MOUNTPOINT` comments, keyed by the disk named on the next `- name:` line."""
    lines = Path(path).read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*in the guest:\s*(\S+)\s*->\s*(\S+)\s*$", line)
        if not m:
            continue
        for later in lines[i + 1 :]:
            n = re.match(r"\s*-\s*name:\s*(\S+)", later)
            if n:
                out[n.group(1)] = (m.group(1), m.group(2))
                break
    return out


def readme_commands(pattern):
    text = "".join(p.read_text() + "\n" for p in (README, KUBEVIRT_DOC) if p.is_file())
    for path in manifest_files():
        text += "\n" + path.read_text()
    return re.findall(pattern, text)


# ---------------------------------------------------------------------------------------------
# The checks


def test_every_document_validates_against_v1_9_0():
    problems = []
    for path in manifest_files():
        for doc in load_docs(path):
            for error in validate(doc):
                problems.append(f"{rel(path)}: {doc.get('kind')} {get(doc, 'metadata.name')}: {error}")
    assert not problems, "\n".join(problems)


def test_schema_copies_match_shared():
    """The copied schemas are byte for byte the ones in shared/ (when it is there)."""
    if not SHARED_SCHEMAS.is_dir():
        raise Skip("shared/schemas/kubevirt is not beside the repository")
    for copy in sorted(SCHEMAS.glob("*/*/*.json")):
        original = SHARED_SCHEMAS / copy.relative_to(SCHEMAS)
        assert original.read_bytes() == copy.read_bytes(), f"{copy} differs from {original}"


def test_single_vm_validates_against_datreeio_v1_6_2():
    vms = [d for d in load_docs(VM_TEMPLATE) if d.get("kind") == "VirtualMachine"]
    assert len(vms) == 1, f"vm-template.yaml should hold one VirtualMachine, holds {len(vms)}"
    errors = validate(vms[0], OLD_SCHEMAS)
    assert not errors, "\n".join(errors)


def test_pool_without_update_strategy_validates_for_kubevirt_1_6():
    """The note in pool.yaml: on KubeVirt 1.6, v1alpha1 minus updateStrategy is accepted."""
    checked = 0
    for path in manifest_files():
        for doc in load_docs(path):
            if doc.get("kind") != "VirtualMachinePool":
                continue
            old = copy.deepcopy(doc)
            old["apiVersion"] = "pool.kubevirt.io/v1alpha1"
            assert validate(old, OLD_SCHEMAS), "expected v1.6.2 to reject updateStrategy"
            del old["spec"]["updateStrategy"]
            errors = validate(old, OLD_SCHEMAS)
            assert not errors, f"{rel(path)}: " + "\n".join(errors)
            checked += 1
    assert checked, "no VirtualMachinePool found"


def test_a_misspelled_field_is_rejected():
    vm = next(d for d in load_docs(VM_TEMPLATE) if d.get("kind") == "VirtualMachine")
    assert not validate(vm)
    bad = copy.deepcopy(vm)
    devices = bad["spec"]["template"]["spec"]["domain"]["devices"]
    devices["rngg"] = devices.pop("rng")
    errors = validate(bad)
    assert any("rngg" in e for e in errors), f"devices.rngg was accepted: {errors}"
    bad = copy.deepcopy(vm)
    bad["metadata"]["label"] = bad["metadata"].pop("labels")
    assert validate(bad), "metadata.label was accepted"
    bad = copy.deepcopy(vm)
    bad["spec"]["template"]["metadata"]["lables"] = bad["spec"]["template"]["metadata"].pop("labels")
    assert validate(bad), "spec.template.metadata.lables was accepted"


def test_every_field_name_misspelled_is_rejected():
    """Each field of each document, with its last letter dropped, must fail validation."""
    survivors, tried = [], 0
    for path in manifest_files():
        for doc in load_docs(path):
            for field in field_paths(doc):
                tried += 1
                if not validate(misspell(doc, field)):
                    survivors.append(f"{rel(path)}: {doc.get('kind')}: {'.'.join(map(str, field))}")
    assert tried > 100, f"only {tried} fields tried"
    assert not survivors, "misspelling these fields still validates:\n" + "\n".join(survivors)


def test_vm_rules_no_schema_holds():
    timeout_stop = unit_timeout_stop()
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            tmpl = spec["template"]["spec"]
            devices = get(tmpl, "domain.devices", {})

            def need(ok, message):
                if not ok:
                    problems.append(f"{where}: {message}")

            need(spec.get("runStrategy") == "Always", "runStrategy must be Always (a powered-off VM comes back fresh)")
            need("running" not in spec, "`running` is deprecated and may not be set with runStrategy")
            grace = tmpl.get("terminationGracePeriodSeconds", 30)
            need(
                grace >= max(MIN_GRACE_S, timeout_stop + SHUTDOWN_MARGIN_S),
                f"terminationGracePeriodSeconds {grace} < max({MIN_GRACE_S}, the unit's TimeoutStopSec "
                f"{timeout_stop} + {SHUTDOWN_MARGIN_S}): the VM could be killed before it deregisters",
            )
            need(tmpl.get("evictionStrategy") == "None", "evictionStrategy must be None")
            requests = get(tmpl, "domain.resources.requests", {})
            need("memory" in requests and "cpu" in requests, "needs CPU and memory requests")
            need(get(tmpl, "domain.cpu.cores", 1) >= 1, "cpu.cores must be at least 1")
            need(devices.get("rng") == {}, "needs a virtio RNG (devices.rng: {})")
            need(devices.get("autoattachGraphicsDevice") is False, "autoattachGraphicsDevice must be false")
            need(
                devices.get("interfaces") == [{"name": "default", "masquerade": {}}],
                "needs exactly one interface: {name: default, masquerade: {}}",
            )
            need(tmpl.get("networks") == [{"name": "default", "pod": {}}], "needs the pod network named default")
            need("guestAgentPing" in get(tmpl, "readinessProbe", {}), "readiness must use guestAgentPing")
            need("livenessProbe" not in tmpl, "no livenessProbe: a failing one stops the VMI and its job")
            names = [d["name"] for d in get(tmpl, "domain.devices.disks", [])]
            volumes = [v["name"] for v in tmpl.get("volumes", [])]
            need(len(set(names)) == len(names), f"disk names repeat: {names}")
            need(sorted(names) == sorted(volumes), f"disks {names} and volumes {volumes} differ")
            try:
                roles = disk_roles(spec)
            except AssertionError as e:
                problems.append(f"{where}: {e}")
                continue
            for role in ("config", "scratch"):
                serial = roles[role][0].get("serial")
                need(serial is not None, f"the {role} disk needs a serial (the guest finds it by id)")
                if serial is not None:
                    need(SERIAL_RE.match(serial) is not None, f"serial {serial!r} has characters KubeVirt rejects")
                    need(len(serial) <= SERIAL_MAX, f"serial {serial!r} is longer than virtio-blk's {SERIAL_MAX} bytes")
            for role, (disk, _volume) in roles.items():
                need(get(disk, "disk.bus") == "virtio", f"the {role} disk must be on the virtio bus (by-id/virtio-<serial>)")
            need(roles["root"][0].get("bootOrder") == 1, "the containerDisk must boot first (bootOrder: 1)")
            need(
                roles["config"][1]["secret"].get("volumeLabel", CONFIG_DISK_LABEL) == CONFIG_DISK_LABEL,
                f"the config disk's label must stay {CONFIG_DISK_LABEL}",
            )
            need("capacity" in roles["scratch"][1]["emptyDisk"], "the scratch emptyDisk needs a capacity")
    assert not problems, "\n".join(problems)


def test_secrets_the_vms_use_are_in_the_same_file():
    problems = []
    for path in manifest_files():
        docs = load_docs(path)
        secrets = secrets_of(docs)
        for where, spec, _labels in vm_specs(path):
            tmpl = spec["template"]["spec"]
            wanted = [v["secret"]["secretName"] for v in tmpl.get("volumes", []) if "secret" in v]
            wanted += [get(c, "sshPublicKey.source.secret.secretName") for c in tmpl.get("accessCredentials", [])]
            for name in wanted:
                if name not in secrets:
                    problems.append(f"{where}: Secret {name} is used but not in {rel(path)}")
            config_name = disk_roles(spec)["config"][1]["secret"]["secretName"]
            config = secrets.get(config_name, {})
            if CONFIG_KEY not in config.get("stringData", {}):
                problems.append(f"{where}: Secret {config_name} has no key {CONFIG_KEY}")
        for name, secret in secrets.items():
            if not get(secret, "metadata.labels", {}).get("app.kubernetes.io/component"):
                problems.append(f"{rel(path)}: Secret {name} needs an app.kubernetes.io/component label")
    assert not problems, "\n".join(problems)


def test_runner_json_is_a_marked_placeholder():
    problems = []
    for path in manifest_files():
        text = path.read_text()
        for leak in TOKEN_LEAK_RE.findall(text):
            if not re.fullmatch(r"glrt-(x+|X+)", leak):
                problems.append(f"{rel(path)}: something like a real token: {leak[:9]}...")
        for name, secret in secrets_of(load_docs(path)).items():
            raw = secret.get("stringData", {}).get(CONFIG_KEY)
            if raw is None:
                continue
            try:
                config = json.loads(raw)
            except ValueError as e:
                problems.append(f"{rel(path)}: {name}/{CONFIG_KEY} is not JSON: {e}")
                continue
            if config.get("token") != PLACEHOLDER_TOKEN:
                problems.append(f"{rel(path)}: {name}/{CONFIG_KEY} must carry the placeholder token {PLACEHOLDER_TOKEN}")
            if not str(config.get("url", "")).startswith("https://"):
                problems.append(f"{rel(path)}: {name}/{CONFIG_KEY} needs an https url")
            if "PLACEHOLDER" not in text:
                problems.append(f"{rel(path)}: the placeholder token is not marked PLACEHOLDER in a comment")
    assert not problems, "\n".join(problems)


def _agent_binary():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    found = [p for p in (target / "debug" / "gitlab-runner-vm", target / "release" / "gitlab-runner-vm") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def test_agent_accepts_the_example_runner_json():
    binary = _agent_binary()
    if binary is None:
        raise Skip("no built gitlab-runner-vm in target/ (tests/run builds it with cargo test first)")
    problems = []
    for path in manifest_files():
        for name, secret in secrets_of(load_docs(path)).items():
            raw = secret.get("stringData", {}).get(CONFIG_KEY)
            if raw is None:
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
                f.write(raw)
                f.flush()
                run = subprocess.run([str(binary), "check", "--config", f.name], capture_output=True, text=True, timeout=30)
            if run.returncode != 0:
                problems.append(f"{rel(path)}: {name}/{CONFIG_KEY}: `gitlab-runner-vm check` exited {run.returncode}:\n{run.stdout}{run.stderr}")
    assert not problems, "\n".join(problems)


def test_pool_is_the_same_vm_with_opportunistic_updates():
    vm_docs = load_docs(VM_TEMPLATE)
    vm = next(d for d in vm_docs if d.get("kind") == "VirtualMachine")
    pools = [(p, d) for p in manifest_files() for d in load_docs(p) if d.get("kind") == "VirtualMachinePool"]
    assert (EXAMPLES / "pool.yaml").is_file(), "examples/kubevirt/pool.yaml is missing"
    assert pools, "no VirtualMachinePool found"
    problems = []
    for path, pool in pools:
        where = f"{rel(path)}: VirtualMachinePool {get(pool, 'metadata.name')}"
        spec = pool["spec"]
        if pool["apiVersion"] != POOL_API:
            problems.append(f"{where}: apiVersion should be {POOL_API} (with the v1alpha1 note)")
        if "v1alpha1" not in path.read_text():
            problems.append(f"{where}: the note on v1alpha1 for KubeVirt before 1.8 is missing")
        if spec.get("updateStrategy") != {"opportunistic": {}}:
            problems.append(f"{where}: updateStrategy must be {{opportunistic: {{}}}} so updates never kill jobs")
        match = get(spec, "selector.matchLabels", {})
        labels = get(spec, "virtualMachineTemplate.metadata.labels", {})
        if not match or any(labels.get(k) != v for k, v in match.items()):
            problems.append(f"{where}: selector {match} does not select its template labels {labels}")
        if all(get(vm, "metadata.labels", {}).get(k) == v for k, v in match.items()):
            problems.append(f"{where}: its selector also matches the single VM of vm-template.yaml")
        if get(spec, "nameGeneration.appendIndexToSecretRefs"):
            problems.append(f"{where}: appendIndexToSecretRefs would give each VM its own Secret, not the shared one")
        if spec["virtualMachineTemplate"]["spec"] != vm["spec"]:
            problems.append(f"{where}: its VM spec differs from the VirtualMachine in vm-template.yaml")
        pool_secrets, vm_secrets = secrets_of(load_docs(path)), secrets_of(vm_docs)
        for name, secret in pool_secrets.items():
            if name in vm_secrets and secret != vm_secrets[name]:
                problems.append(f"{where}: Secret {name} differs from the one in vm-template.yaml")
    assert not problems, "\n".join(problems)


def test_documented_commands_match_the_manifests():
    applies = readme_commands(r"kubectl apply -f (\S+) -l (\S+)")
    assert applies, "no `kubectl apply -f FILE -l SELECTOR` command in README.md, docs/kubevirt.md or the manifests"
    problems = []
    for file, selector in applies:
        path = ROOT / file
        if not path.is_file():
            problems.append(f"`kubectl apply -f {file}`: no such file")
            continue
        chosen = [d for d in load_docs(path) if label_selector_matches(selector, get(d, "metadata.labels"))]
        kinds = sorted(d["kind"] for d in chosen)
        if kinds not in (["VirtualMachine"], ["VirtualMachinePool"]):
            problems.append(f"`kubectl apply -f {file} -l {selector}` applies {kinds}, not just the runner VM or pool")
        if selector != APPLY_SELECTOR:
            problems.append(f"`kubectl apply -f {file} -l {selector}`: use -l {APPLY_SELECTOR}")
    created = set(readme_commands(r"kubectl create secret generic ([a-z0-9-]+)"))
    used = set()
    for path in manifest_files():
        for _where, spec, _labels in vm_specs(path):
            tmpl = spec["template"]["spec"]
            used |= {v["secret"]["secretName"] for v in tmpl.get("volumes", []) if "secret" in v}
            used |= {get(c, "sshPublicKey.source.secret.secretName") for c in tmpl.get("accessCredentials", [])}
    if created != used:
        problems.append(f"`kubectl create secret generic` names {sorted(created)} differ from the Secrets the VMs use {sorted(used)}")
    assert not problems, "\n".join(problems)


def test_readme_has_the_deploy_sizing_and_debug_sections():
    text = README.read_text()
    for heading in ("## Deploy to KubeVirt", "## Sizing a fleet", "## Debug a runner VM"):
        assert re.search(rf"^{re.escape(heading)}\s*$", text, re.M), f"README.md lacks the section {heading!r}"


def test_disk_serials_and_mount_points_agree_with_runner_nix():
    module = runner_module_defaults()
    # The contract with the NixOS side.
    assert module["configDisk.serial"] == "runner-info", f"runner.nix configDisk.serial is {module['configDisk.serial']!r}"
    assert module["scratchDisk.serial"] == "scratch", f"runner.nix scratchDisk.serial is {module['scratchDisk.serial']!r}"
    problems = []
    for path in manifest_files():
        comments = guest_comments(path)
        for where, spec, _labels in vm_specs(path):
            roles = disk_roles(spec)
            for role in ("config", "scratch"):
                disk = roles[role][0]
                serial, mount = module[f"{role}Disk.serial"], module[f"{role}Disk.mountPoint"]
                if disk.get("serial") != serial:
                    problems.append(f"{where}: the {role} disk's serial is {disk.get('serial')!r}, runner.nix expects {serial!r}")
                comment = comments.get(disk["name"])
                expected = (f"/dev/disk/by-id/virtio-{serial}", mount)
                if comment != expected:
                    problems.append(
                        f"{where}: above disk {disk['name']} write `# in the guest: {expected[0]} -> {expected[1]}` "
                        f"(found {comment})"
                    )
    assert not problems, "\n".join(problems)


def test_the_agent_reads_the_secret_key_where_the_config_disk_is_mounted():
    mount = runner_module_defaults()["configDisk.mountPoint"]
    guest_path = mount.rstrip("/") + "/" + CONFIG_KEY
    agent_default = option_default(read_module("gitlab-runner-vm.nix"), "services.gitlab-runner-vm.configFile")
    assert agent_default == guest_path == AGENT_CONFIG_PATH, (
        f"the Secret's key {CONFIG_KEY} appears as {guest_path}; gitlab-runner-vm.nix's configFile "
        f"defaults to {agent_default}; the agent's documented default is {AGENT_CONFIG_PATH}"
    )
    for _path, value in assignments_ending(read_module("runner.nix"), ("services", "gitlab-runner-vm", "configFile")):
        text = "".join(t[1] for t in value)
        assert text.endswith("/" + CONFIG_KEY), f"runner.nix points the agent at {text}, not at the Secret's key {CONFIG_KEY}"


def test_runner_nix_mounts_the_config_disk_by_id_as_iso9660():
    read_module("runner.nix")  # fails, naming the file, if it is missing
    text = (MODULES / "runner.nix").read_text()
    for needle in ("/dev/disk/by-id/virtio-", "iso9660"):
        assert needle in text, f"nixos-modules/runner.nix does not mention {needle!r}: how does it find the config disk?"


def test_ssh_and_job_user_is_the_ci_user_of_the_modules():
    base = read_module("base.nix")
    ci_user = option_default(base, "baseImage.user")
    assert ci_user, 'nixos-modules/base.nix declares no `default = "<name>";` for baseImage.user (the CI user)'
    made = [p[i + 2] for p, _ in base for i in range(len(p) - 2) if p[i : i + 2] == ("users", "users")]
    assert any(u == ci_user or re.fullmatch(r"\$\{\s*cfg\.user\s*\}", u) for u in made), (
        f"nixos-modules/base.nix defines users {sorted(set(made))}, not the CI user {ci_user!r}"
    )
    runner_user = option_default(read_module("gitlab-runner-vm.nix"), "services.gitlab-runner-vm.runnerUser")
    assert runner_user == ci_user, f"gitlab-runner-vm.nix runs jobs as {runner_user!r}, base.nix's CI user is {ci_user!r}"
    for _path, value in assignments_ending(read_module("runner.nix"), ("services", "gitlab-runner-vm", "runnerUser")):
        text = "".join(t[1] for t in value)
        assert text in ("config.baseImage.user", ci_user), f"runner.nix runs jobs as {text}, not as the CI user {ci_user!r}"
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            for cred in spec["template"]["spec"].get("accessCredentials", []):
                users = get(cred, "sshPublicKey.propagationMethod.qemuGuestAgent.users", [])
                if users != [ci_user]:
                    problems.append(f"{where}: SSH keys go to {users}, the CI user is {ci_user!r}")
    assert not problems, "\n".join(problems)


def test_the_kubevirt_image_runs_the_guest_agent():
    """Readiness (guestAgentPing) and the SSH keys of accessCredentials need qemu-guest-agent."""
    path = ROOT / "images" / "kubevirt.nix"
    assert path.is_file(), f"{rel(path)} is missing: the guest agent that readiness relies on is enabled there"
    files = [path] + sorted(MODULES.glob("*.nix"))
    found = [
        rel(f)
        for f in files
        for _p, value in assignments_ending(nix_assignments(f.read_text()), ("services", "qemuGuest", "enable"))
        if value == [("id", "true")]
    ]
    assert found, f"none of {[rel(f) for f in files]} sets services.qemuGuest.enable = true"


def test_nix_reader_understands_both_option_spellings():
    nested = """{ lib, config, ... }:
    let cfg = config.runnerImage; in {
      options.runnerImage = {
        configDisk = {
          serial = lib.mkOption { type = lib.types.str; default = "runner-info"; description = "x { y"; };
          mountPoint = lib.mkOption { default = "/runner-info"; };
        };
      };
      config.fileSystems.${cfg.configDisk.mountPoint} = { device = "/dev/disk/by-id/virtio-${cfg.configDisk.serial}"; };
      # default = "commented-out";
      config.users.users.runner = { isNormalUser = true; };
    }"""
    flat = """{ lib, ... }: {
      options.runnerImage.scratchDisk.serial = lib.mkOption {
        default = "scratch";
        description = ''
          Say ''${x} and "quotes" and { braces.
        '';
      };
      options.runnerImage.scratchDisk.mountPoint = lib.mkOption { default = "/var/lib/scratch"; };
    }"""
    a = nix_assignments(nested)
    assert option_default(a, "runnerImage.configDisk.serial") == "runner-info"
    assert option_default(a, "runnerImage.configDisk.mountPoint") == "/runner-info"
    assert option_default(a, "runnerImage.scratchDisk.serial") is None
    assert any(p[-3:] == ("users", "users", "runner") for p, _ in a)
    b = nix_assignments(flat)
    assert option_default(b, "runnerImage.scratchDisk.serial") == "scratch"
    assert option_default(b, "runnerImage.scratchDisk.mountPoint") == "/var/lib/scratch"
    assert systemd_seconds("90s") == 90 and systemd_seconds("1min 30s") == 90 and systemd_seconds("90") == 90


# ---------------------------------------------------------------------------------------------


def main():
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    passed = failed = skipped = 0
    for name, fn in tests:
        try:
            fn()
        except Skip as e:
            skipped += 1
            print(f"skip {name}: {e}")
        except AssertionError as e:
            failed += 1
            message = str(e) or "assertion failed"
            print(f"FAIL {name}:\n  " + message.replace("\n", "\n  "))
        except Exception as e:  # a crash in a check is a failure of that check
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            passed += 1
            print(f"ok   {name}")
    summary = f"{passed} passed, {failed} failed"
    print(summary + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
