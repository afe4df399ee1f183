"""Checks of the KubeVirt manifests: vm-template.yaml and examples/kubevirt/*.yaml, as pytest
tests (tests/manifests/run runs them).

1. Schemas: every document validates against ../shared/schemas/kubevirt/v1.9.0 (KubeVirt kinds;
   the single VirtualMachine also against datreeio-v1.6.2) or against the small strict schema
   below (core Secret). The CRD schemas leave the root and every `metadata` open, so this file
   closes those too: with that, every field name anywhere is checked.
2. Mutation: each field name in each document, misspelled, must be rejected.
3. Rules no schema holds (KubeVirt's webhook and this project's needs): runStrategy, serials,
   the grace period against the agent's unit, networking, probes, the disks and their volumes,
   the Secrets, the pool's selector and update strategy, and that the pool's VM is the VM.
4. Cross-check with the runner image as NixOS evaluates it (runner-image.nix, through
   tests/nix/eval-json): the disk serials, the mount points, runner.json's path and the user
   name that the manifests rely on are the image's, the image runs the guest agent that
   readiness and SSH keys use, and the grace period covers the unit's stop timeout. Skipped,
   with the reason, on a machine that cannot evaluate the flake.
5. The example runner.json passes the agent's own `gitlab-runner-vm check` (when it is built).
"""

import copy
import ipaddress
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import pytest
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

# Every other core kind (NetworkPolicy, CronJob, ServiceAccount, Role, RoleBinding) against
# Kubernetes' own OpenAPI schemas in their strict form (no unknown field anywhere), as packaged by
# kubernetes-validate, for the oldest and the newest Kubernetes the manifests target.
K8S_VERSIONS = ("1.30.0", "1.37.0")
_k8s_validators = {}


def k8s_validator(doc, version):
    """A Draft 2020-12 validator of kubernetes-validate's strict schema for doc's kind."""
    import kubernetes_validate.utils as kvu
    import referencing
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc.get("apiVersion", ""))
    key = (version, doc.get("kind", "").lower(), api)
    if key not in _k8s_validators:
        schema_dir = f"v{version}-local-strict"
        try:
            schema = kvu.schema_contents(f"kubernetes-json-schema/{schema_dir}/{key[1]}-{api}.json", version)
        except FileNotFoundError:
            _k8s_validators[key] = None
            return None
        definitions = kvu.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
        registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
        registry = referencing.Resource.from_contents(definitions) @ registry
        _k8s_validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return _k8s_validators[key]

# What a runner VM may write to the node's disk beyond the scratch disk's capacity: the
# containerDisk's overlay (up to the image's virtual size), plus a margin for logs.
EPHEMERAL_MARGIN_GI = 2


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
        return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in SECRET_VALIDATOR.iter_errors(doc)]
    if "kubevirt.io" not in str(doc.get("apiVersion", "")):
        errors = []
        for version in K8S_VERSIONS:
            v = k8s_validator(doc, version)
            if v is None:
                return [f"no Kubernetes {version} schema for {doc.get('apiVersion')} {doc.get('kind')}"]
            errors += [f"Kubernetes {version}: {'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in v.iter_errors(doc)]
        return errors
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


def unit_timeout_stop(image):
    """The unit's TimeoutStopSec: agent/dist's, or the runner image's (when it was evaluated)
    when its module raises it."""
    if not UNIT.is_file():
        raise AssertionError(f"{rel(UNIT)} is missing: the grace period is checked against its TimeoutStopSec")
    m = re.search(r"^TimeoutStopSec=(.+)$", UNIT.read_text(), re.M)
    assert m, f"{rel(UNIT)} sets no TimeoutStopSec"
    seconds = systemd_seconds(m.group(1).strip())
    raised = image["agent"]["timeoutStopSec"] if image else None
    return max(seconds, systemd_seconds(raised)) if raised else seconds


RUNNER_IMAGE_FACTS = Path(__file__).resolve().parent / "runner-image.nix"
EVAL_JSON = ROOT / "tests" / "nix" / "eval-json"


@pytest.fixture(scope="session")
def evaluated_runner_image():
    """(the runner image as NixOS evaluated it (tests/manifests/runner-image.nix), None) once
    per session, or (None, why not) on a machine that cannot evaluate it.

    Evaluated with the user's Nix when it has flakes, else with ../shared/nix-eval (see
    tests/nix/evaluator.sh); a machine with neither skips the checks that need it.
    """
    if not EVAL_JSON.is_file():
        raise AssertionError(f"{rel(EVAL_JSON)} is missing: it evaluates the NixOS modules")
    run = subprocess.run([str(EVAL_JSON), str(RUNNER_IMAGE_FACTS)], capture_output=True, text=True)
    if run.returncode == 3:
        return None, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "no Nix evaluator"
    if run.returncode != 0:
        raise AssertionError(f"evaluating {rel(RUNNER_IMAGE_FACTS)} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout), None


@pytest.fixture
def runner_image(evaluated_runner_image):
    """The evaluated runner image; a test that needs it is skipped, with the reason, without."""
    image, why_not = evaluated_runner_image
    if image is None:
        pytest.skip(why_not)
    return image


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
        pytest.skip("shared/schemas/kubevirt is not beside the repository")
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


def test_vm_rules_no_schema_holds(evaluated_runner_image):
    timeout_stop = unit_timeout_stop(evaluated_runner_image[0])
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
                devices.get("interfaces") == [{"name": "default", "masquerade": {}, "ports": [{"name": "ssh", "port": 22}]}],
                "needs exactly one interface: {name: default, masquerade: {}, ports: [{name: ssh, port: 22}]} "
                "(masquerade without ports forwards every port, also those job containers publish)",
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


def quantity_gi(text):
    m = re.fullmatch(r"(\d+)(Gi|Mi|Ti)", str(text))
    assert m, f"cannot read the quantity {text!r}"
    return int(m.group(1)) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[m.group(2)]


def test_ephemeral_storage_covers_what_a_vm_may_write(evaluated_runner_image):
    """Requests (and equal limits) cover the scratch disk plus the root overlay, so that disk
    pressure does not evict runner pods first."""
    image, _why_not = evaluated_runner_image
    # Without an evaluator: the runner image's documented size (images/kubevirt.nix).
    root_gi = image["diskSizeMiB"] / 1024 if image is not None else 20
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            tmpl = spec["template"]["spec"]
            requests = get(tmpl, "domain.resources.requests", {})
            limits = get(tmpl, "domain.resources.limits", {})
            scratch = quantity_gi(disk_roles(spec)["scratch"][1]["emptyDisk"]["capacity"])
            needed = scratch + root_gi + EPHEMERAL_MARGIN_GI
            request = requests.get("ephemeral-storage")
            if request is None or quantity_gi(request) < needed:
                problems.append(f"{where}: ephemeral-storage request {request} < scratch {scratch}Gi + root {root_gi:g}Gi + {EPHEMERAL_MARGIN_GI}Gi")
            if limits.get("ephemeral-storage") != request:
                problems.append(f"{where}: ephemeral-storage limit {limits.get('ephemeral-storage')} is not the request {request}")
    assert not problems, "\n".join(problems)


def test_the_pages_resource_figures_are_the_manifests(evaluated_runner_image):
    """What docs/kubevirt.md (and any other page) says a runner VM requests is what the
    manifests request: nodes sized from the page must fit the VMIs, or they stay Pending."""
    image, _why_not = evaluated_runner_image
    root_gi = image["diskSizeMiB"] / 1024 if image is not None else 20
    figures = set()
    for path in manifest_files():
        for _where, spec, _labels in vm_specs(path):
            requests = get(spec["template"]["spec"], "domain.resources.requests", {})
            scratch = quantity_gi(disk_roles(spec)["scratch"][1]["emptyDisk"]["capacity"])
            figures.add((int(requests["cpu"]), quantity_gi(requests["memory"]),
                         quantity_gi(requests["ephemeral-storage"]), scratch))
    assert len(figures) == 1, f"the VM and the pool request different resources {figures}: the page gives one set"
    ((cpu, memory, ephemeral, scratch),) = figures
    problems = []

    def claims(page, pattern, want, what, required=True):
        text = re.sub(r"\s+", " ", page.read_text())
        found = [float(x) for x in re.findall(pattern, text)]
        if required and not found:
            problems.append(f"{rel(page)}: states no figure for {what} (looked for {pattern!r})")
        problems.extend(f"{rel(page)}: {x:g} for {what}, the manifests {want:g}" for x in found if x != want)

    claims(KUBEVIRT_DOC, r"\b(\d+) CPUs\b", cpu, "the CPUs requested")
    claims(KUBEVIRT_DOC, r"\b(\d+) GiB of memory", memory, "the memory requested")
    claims(KUBEVIRT_DOC, r"sparse (\d+) GiB scratch disk", scratch, "the scratch disk's capacity")
    claims(KUBEVIRT_DOC, r"up to the image's (\d+) GiB", root_gi, "the root disk (the image's size)")
    claims(KUBEVIRT_DOC, r"and (\d+) GiB for logs", ephemeral - scratch - root_gi, "the margin beyond the two disks")
    claims(KUBEVIRT_DOC, r"holds (\d+) GiB", ephemeral, "the ephemeral storage one VM takes of a node")
    claims(KUBEVIRT_DOC, r"scratch \+ root \+ (\d+) GiB", EPHEMERAL_MARGIN_GI, "the margin the test requires")
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        claims(page, r"\b(\d+) GiB of (?:node-local )?ephemeral storage", ephemeral,
               "the ephemeral storage requested", required=page == KUBEVIRT_DOC)
        claims(page, r"`emptyDisk` \((\d+) GiB\)", scratch, "the scratch disk's capacity", required=False)
    assert not problems, "\n".join(problems)


def arm64_snippet():
    """The YAML that docs/kubevirt.md's "aarch64 nodes" section tells users to add."""
    section = KUBEVIRT_DOC.read_text().split("\n## aarch64 nodes\n", 1)
    assert len(section) == 2, "docs/kubevirt.md has no section \"## aarch64 nodes\""
    blocks = re.findall(r"```yaml\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert len(blocks) == 1, f"the aarch64 section should show one YAML snippet, not {len(blocks)}"
    return yaml.safe_load(blocks[0])


def merged(base, patch):
    """base with patch's mappings merged in (as the user edits the manifest)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def with_snippet(doc, snippet):
    if doc.get("kind") == "VirtualMachine":
        return merged(doc, snippet)
    out = copy.deepcopy(doc)
    out["spec"]["virtualMachineTemplate"] = merged(out["spec"]["virtualMachineTemplate"], snippet)
    return out


def test_the_arm64_snippet_is_valid_in_both_manifests():
    """The page's arm64 setting is KubeVirt's `architecture` field of the VMI spec, in the place
    the VM and the pool take it; KubeVirt's schema accepts both results (and would reject a
    misspelling there), and `arm64` is the value of the nodes' kubernetes.io/arch label that
    KubeVirt derives its node selector from."""
    snippet = arm64_snippet()
    assert get(snippet, "spec.template.spec.architecture") == "arm64", snippet
    problems, patched_kinds = [], []
    for path in manifest_files():
        for doc in load_docs(path):
            if doc.get("kind") not in ("VirtualMachine", "VirtualMachinePool"):
                continue
            patched = with_snippet(doc, snippet)
            patched_kinds.append(doc["kind"])
            bases = (DEFAULT_SCHEMAS, OLD_SCHEMAS) if doc["kind"] == "VirtualMachine" else (DEFAULT_SCHEMAS,)
            for base in bases:
                problems += [f"{rel(path)} with the snippet ({base.name}): {e}" for e in validate(patched, base)]
            wrong = with_snippet(doc, {"spec": {"template": {"spec": {"architectur": "arm64"}}}})
            if not validate(wrong):
                problems.append(f"{rel(path)}: the schema would accept a misspelled architecture field; the check proves nothing")
    assert sorted(patched_kinds) == ["VirtualMachine", "VirtualMachinePool"], patched_kinds
    assert not problems, "\n".join(problems)


# Egress a runner VM must not have: the cluster, nodes and private networks (issue 17).
PRIVATE_RANGES = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # shared address space (carrier-grade NAT, some clusters' pods)
    "169.254.0.0/16",  # link-local: cloud metadata services
    "fc00::/7", "fe80::/10",  # IPv6 unique local and link-local
)]
KUBE_DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
REAPER_KINDS = ["CronJob", "Role", "RoleBinding", "ServiceAccount"]


def selects(selector, labels):
    """A LabelSelector (matchLabels only, as the manifests use) against a label set."""
    match = (selector or {}).get("matchLabels", {})
    return bool(match) and all((labels or {}).get(k) == v for k, v in match.items())


def network_policies(path):
    return [d for d in load_docs(path) if d.get("kind") == "NetworkPolicy"]


def runner_policy(path, pod_labels):
    chosen = [d for d in network_policies(path) if selects(get(d, "spec.podSelector"), pod_labels)]
    assert len(chosen) == 1, f"{rel(path)}: {len(chosen)} NetworkPolicies select the runner pods {pod_labels}, one expected"
    return chosen[0]


def egress_problems(policy):
    """What the policy's egress allows beyond DNS to kube-dns and the internet minus the
    private ranges; an empty list means none."""
    problems = []
    spec = policy["spec"]
    if "Egress" not in spec.get("policyTypes", []):
        return ["policyTypes lacks Egress: egress is not restricted at all"]
    dns = False
    for i, rule in enumerate(spec.get("egress", [])):
        peers = rule.get("to")
        if not peers:
            problems.append(f"egress rule {i} has no `to`: it allows every destination")
            continue
        if peers == [KUBE_DNS_PEER]:
            if sorted(rule.get("ports", []), key=str) != sorted(DNS_PORTS, key=str):
                problems.append(f"egress rule {i} to kube-dns allows {rule.get('ports')}, not UDP and TCP 53 only")
            dns = True
            continue
        for peer in peers:
            if set(peer) != {"ipBlock"}:
                problems.append(f"egress rule {i}: peer {peer} reaches pods of the cluster")
                continue
            block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            excepted = [ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", [])]
            for private in PRIVATE_RANGES:
                if private.version != block.version or not private.overlaps(block):
                    continue
                if not any(private.subnet_of(e) for e in excepted if e.version == private.version):
                    problems.append(f"egress rule {i}: ipBlock {block} allows the private range {private}")
    if not dns:
        problems.append("no egress rule allows DNS (UDP and TCP 53) to kube-dns in kube-system")
    allowed = [p["ipBlock"]["cidr"] for r in spec.get("egress", []) for p in r.get("to", []) if "ipBlock" in p]
    for internet in ("0.0.0.0/0", "::/0"):
        if internet not in allowed:
            problems.append(f"no egress rule allows the internet ({internet} minus the private ranges)")
    return problems


def test_a_network_policy_in_the_same_file_selects_every_runner_vm():
    """Applied with the VM (same file, the documented apply selector), selecting the labels that
    KubeVirt copies from the VM's template to its virt-launcher pod."""
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            pod_labels = get(spec, "template.metadata.labels", {})
            chosen = [d for d in network_policies(path) if selects(get(d, "spec.podSelector"), pod_labels)]
            if len(chosen) != 1:
                problems.append(f"{where}: {len(chosen)} NetworkPolicies in {rel(path)} select its pods (labels {pod_labels})")
            for d in chosen:
                if not label_selector_matches(APPLY_SELECTOR, get(d, "metadata.labels")):
                    problems.append(f"{where}: NetworkPolicy {get(d, 'metadata.name')} is not applied with -l {APPLY_SELECTOR}")
    assert not problems, "\n".join(problems)


def test_the_network_policy_allows_only_ssh_in():
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            policy = runner_policy(path, get(spec, "template.metadata.labels", {}))
            if "Ingress" not in get(policy, "spec.policyTypes", []):
                problems.append(f"{where}: its NetworkPolicy does not restrict ingress")
            for i, rule in enumerate(get(policy, "spec.ingress", [])):
                if rule.get("ports") != [{"protocol": "TCP", "port": 22}]:
                    problems.append(f"{where}: ingress rule {i} allows {rule.get('ports', 'every port')}, only TCP 22 expected")
    assert not problems, "\n".join(problems)


def test_the_network_policy_denies_the_cluster_and_private_ranges():
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            policy = runner_policy(path, get(spec, "template.metadata.labels", {}))
            problems += [f"{where}: {p}" for p in egress_problems(policy)]
    assert not problems, "\n".join(problems)


def test_the_egress_check_fails_on_a_leaky_policy():
    """The checker itself: each way of opening a private range is caught."""
    policy = runner_policy(VM_TEMPLATE, {"app.kubernetes.io/name": "gitlab-runner-vm"})
    assert not egress_problems(policy)
    internet = next(i for i, r in enumerate(policy["spec"]["egress"]) if r["to"] != [KUBE_DNS_PEER])
    for private in PRIVATE_RANGES:
        leaky = copy.deepcopy(policy)
        for peer in leaky["spec"]["egress"][internet]["to"]:
            peer["ipBlock"]["except"] = [e for e in peer["ipBlock"]["except"] if ipaddress.ip_network(e) != private]
        assert any(str(private) in p for p in egress_problems(leaky)), f"{private} let through"
    for extra in ({"to": [{"podSelector": {}}]}, {"ports": [{"protocol": "TCP", "port": 443}]},
                  {"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}):
        leaky = copy.deepcopy(policy)
        leaky["spec"]["egress"].append(extra)
        assert egress_problems(leaky), f"{extra} let through"
    no_dns = copy.deepcopy(policy)
    no_dns["spec"]["egress"] = [r for r in no_dns["spec"]["egress"] if r["to"] != [KUBE_DNS_PEER]]
    assert any("DNS" in p for p in egress_problems(no_dns))


def commented_private_gitlab_rule(path):
    """The commented example rule for a private GitLab, uncommented (YAML list text)."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if "GitLab (or registry) on a private address" in l), None)
    assert start is not None, f"{rel(path)}: the commented rule for a private GitLab is missing"
    out = []
    for line in lines[start + 1:]:
        m = re.match(r"^(\s*)# ?(.*)$", line)
        if not m or not m.group(2).strip():
            break
        out.append(m.group(1) + m.group(2))
    return yaml.safe_load("\n".join(out))


def test_the_commented_private_gitlab_rule_is_valid_and_narrow():
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            policy = copy.deepcopy(runner_policy(path, get(spec, "template.metadata.labels", {})))
            rule = commented_private_gitlab_rule(path)
            assert isinstance(rule, list) and len(rule) == 1, f"{rel(path)}: the commented rule should be one egress rule: {rule}"
            (block,) = [p["ipBlock"]["cidr"] for p in rule[0]["to"]]
            assert ipaddress.ip_network(block).num_addresses == 1, f"{rel(path)}: the example should allow one address, not {block}"
            assert rule[0].get("ports") == [{"protocol": "TCP", "port": 443}], rule
            policy["spec"]["egress"] += rule
            assert not validate(policy), validate(policy)


def reaper_docs(path):
    docs = {d["kind"]: d for d in load_docs(path) if d.get("kind") in REAPER_KINDS}
    assert sorted(docs) == REAPER_KINDS, f"{rel(path)}: the lifetime cap needs {REAPER_KINDS}, found {sorted(docs)}"
    return docs


def readme_default(flag):
    m = re.search(rf"^\| `--{flag}` \| `[A-Z_]+` \| (\d+) \|", README.read_text(), re.M)
    assert m, f"README.md's table has no default for --{flag}"
    return int(m.group(1))


# A job's timeout when the runner sets no maximum_timeout: GitLab's default project timeout.
GITLAB_DEFAULT_JOB_TIMEOUT_S = 3600
# How long a deregistration may go on during a throttled boot storm (README, `deregistering`).
DEREGISTER_STORM_S = 600


def longest_honest_life(path, grace):
    """A VM's longest life without a hostile job, with the agent's defaults and runner.json."""
    config = json.loads(secrets_of(load_docs(path))["gitlab-runner-nixos-config"]["stringData"][CONFIG_KEY])
    jobs = config.get("max_jobs", 1) * (config.get("idle_timeout", 600) + config.get("maximum_timeout", GITLAB_DEFAULT_JOB_TIMEOUT_S))
    return (readme_default("config-wait") + readme_default("register-timeout") + jobs + DEREGISTER_STORM_S
            + readme_default("hold-max") + grace)


def test_the_lifetime_cap_outlives_an_honest_vm_and_is_documented():
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            cron = reaper_docs(path)["CronJob"]
            (container,) = get(cron, "spec.jobTemplate.spec.template.spec.containers")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            cap = int(env["MAX_AGE_SECONDS"])
            grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
            need = longest_honest_life(path, grace)
            if cap < need:
                problems.append(f"{where}: MAX_AGE_SECONDS {cap} < the longest honest life {need} s (jobs' timeout + hold-max ...)")
            if cap > need + 3 * 3600:
                problems.append(f"{where}: MAX_AGE_SECONDS {cap} is far above the longest honest life {need} s")
            if not label_selector_matches(env["SELECTOR"], get(spec, "template.metadata.labels")):
                problems.append(f"{where}: the reaper's SELECTOR {env['SELECTOR']} does not match its VMIs")
            if f"default {cap} (" not in path.read_text() or str(need) not in path.read_text():
                problems.append(f"{rel(path)}: the comment should give the cap's default ({cap}) and the sum it covers ({need})")
    doc = KUBEVIRT_DOC.read_text()
    if "MAX_AGE_SECONDS" not in doc or "21600" not in doc:
        problems.append("docs/kubevirt.md should name MAX_AGE_SECONDS and its default")
    assert not problems, "\n".join(problems)


def test_the_reaper_may_only_list_and_delete_vmis_in_its_namespace():
    problems = []
    for path in manifest_files():
        docs = reaper_docs(path)
        sa, role, binding, cron = docs["ServiceAccount"], docs["Role"], docs["RoleBinding"], docs["CronJob"]
        expected = [{"apiGroups": ["kubevirt.io"], "resources": ["virtualmachineinstances"], "verbs": ["list", "delete"]}]
        if role.get("rules") != expected:
            problems.append(f"{rel(path)}: the reaper's Role grants {role.get('rules')}, only {expected} needed")
        if any(d.get("kind") in ("ClusterRole", "ClusterRoleBinding") for d in load_docs(path)):
            problems.append(f"{rel(path)}: no cluster-wide RBAC")
        if binding.get("roleRef") != {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}:
            problems.append(f"{rel(path)}: the RoleBinding binds {binding.get('roleRef')}")
        if binding.get("subjects") != [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]:
            problems.append(f"{rel(path)}: the RoleBinding's subjects are {binding.get('subjects')}, only the reaper's ServiceAccount expected")
        pod = get(cron, "spec.jobTemplate.spec.template")
        if get(pod, "spec.serviceAccountName") != sa["metadata"]["name"]:
            problems.append(f"{rel(path)}: the CronJob does not run as the reaper's ServiceAccount")
        if cron["spec"].get("concurrencyPolicy") != "Forbid":
            problems.append(f"{rel(path)}: two reapers should never overlap (concurrencyPolicy: Forbid)")
        for policy in network_policies(path):
            if selects(get(policy, "spec.podSelector"), get(pod, "metadata.labels")):
                problems.append(f"{rel(path)}: NetworkPolicy {get(policy, 'metadata.name')} selects the reaper's pods: they need the API")
        (container,) = get(pod, "spec.containers")
        image = container["image"]
        if not re.fullmatch(r"alpine/k8s:\d+\.\d+\.\d+", image):
            problems.append(f"{rel(path)}: the reaper's image {image} should be alpine/k8s at a pinned version (it has no latest tag)")
        if container.get("command") != ["/bin/sh", "-c"] or len(container.get("args", [])) != 1:
            problems.append(f"{rel(path)}: the reaper runs one POSIX sh script (tests/examples runs it)")
        for d in docs.values():
            if not label_selector_matches(APPLY_SELECTOR, get(d, "metadata.labels")):
                problems.append(f"{rel(path)}: {d['kind']} is not applied with -l {APPLY_SELECTOR}")
    assert not problems, "\n".join(problems)


def test_vm_template_and_pool_ship_the_same_policy_and_reaper():
    """Applying both files in one namespace must not fight over the shared objects."""
    shared = ("NetworkPolicy", *REAPER_KINDS)
    vm = [d for d in load_docs(VM_TEMPLATE) if d.get("kind") in shared]
    pool = [d for d in load_docs(EXAMPLES / "pool.yaml") if d.get("kind") in shared]
    assert vm == pool, "vm-template.yaml and examples/kubevirt/pool.yaml differ in their NetworkPolicy or reaper"


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
        pytest.skip("no built gitlab-runner-vm in target/ (tests/run builds it with cargo test first)")
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
        # The VM or the pool, with its NetworkPolicy and the lifetime cap; never the Secrets.
        with_them = sorted(["NetworkPolicy", *REAPER_KINDS])
        if kinds not in (sorted(["VirtualMachine", *with_them]), sorted(["VirtualMachinePool", *with_them])):
            problems.append(f"`kubectl apply -f {file} -l {selector}` applies {kinds}, not the runner VM or pool with {with_them}")
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


def test_disk_serials_and_mount_points_agree_with_the_runner_image(runner_image):
    image = runner_image
    # The contract with the NixOS side.
    assert image["configDisk"]["serial"] == "runner-info", f"the runner image's config disk serial is {image['configDisk']['serial']!r}"
    assert image["scratchDisk"]["serial"] == "scratch", f"the runner image's scratch disk serial is {image['scratchDisk']['serial']!r}"
    assert image["scratchDisk"]["enable"], "the runner image does not use a scratch disk"
    problems = []
    for path in manifest_files():
        comments = guest_comments(path)
        for where, spec, _labels in vm_specs(path):
            roles = disk_roles(spec)
            for role in ("config", "scratch"):
                disk = roles[role][0]
                serial, mount = image[f"{role}Disk"]["serial"], image[f"{role}Disk"]["mountPoint"]
                if disk.get("serial") != serial:
                    problems.append(f"{where}: the {role} disk's serial is {disk.get('serial')!r}, the runner image expects {serial!r}")
                comment = comments.get(disk["name"])
                expected = (f"/dev/disk/by-id/virtio-{serial}", mount)
                if comment != expected:
                    problems.append(
                        f"{where}: above disk {disk['name']} write `# in the guest: {expected[0]} -> {expected[1]}` "
                        f"(found {comment})"
                    )
    assert not problems, "\n".join(problems)


def test_the_agent_reads_the_secret_key_where_the_config_disk_is_mounted(runner_image):
    image = runner_image
    guest_path = image["configDisk"]["mountPoint"].rstrip("/") + "/" + CONFIG_KEY
    agent_config = image["agent"]["config"]
    assert image["agent"]["enable"], "the runner image does not run the agent"
    assert agent_config == guest_path == AGENT_CONFIG_PATH, (
        f"the Secret's key {CONFIG_KEY} appears as {guest_path}; the runner image's agent reads "
        f"{agent_config} (GITLAB_RUNNER_VM_CONFIG); the agent's documented default is {AGENT_CONFIG_PATH}"
    )


def test_the_runner_image_mounts_the_config_disk_by_id_as_iso9660(runner_image):
    disk = runner_image["configDisk"]
    mount = disk["mount"]
    assert mount["device"] == f"/dev/disk/by-id/virtio-{disk['serial']}", f"the config disk is mounted from {mount['device']}"
    assert mount["fsType"] == "iso9660", f"the config disk is mounted as {mount['fsType']}, KubeVirt presents a Secret as ISO 9660"
    assert {"ro", "nofail"} <= set(mount["options"]), f"the config disk's mount options are {mount['options']}: ro and nofail expected"
    # KubeVirt's ISO keeps the Secret file's 0644 in Rock Ridge: the mount must override it.
    assert {"overriderockperm", "mode=0400", "dmode=0500"} <= set(mount["options"]), f"runner.json is readable by every user: {mount['options']}"


def test_ssh_keys_go_to_the_operator_user_not_the_job_user(runner_image):
    """accessCredentials name the image's operator user, whose ~/.ssh/authorized_keys (written
    by the QEMU guest agent) sshd reads; never the user jobs run as, who could plant keys."""
    image = runner_image
    ci_user, operator = image["ciUser"], image["operatorUser"]
    assert ci_user in image["normalUsers"], f"the runner image defines users {image['normalUsers']}, not the CI user {ci_user!r}"
    assert image["agent"]["jobUser"] == ci_user, f"the runner image runs jobs as {image['agent']['jobUser']!r}, its CI user is {ci_user!r}"
    assert operator in image["normalUsers"] and operator != ci_user, f"operator user {operator!r}, job user {ci_user!r}"
    assert image["operatorHomedirKeys"], "sshd must read the operator's ~/.ssh/authorized_keys, where the guest agent writes keys"
    problems = []
    for path in manifest_files():
        for where, spec, _labels in vm_specs(path):
            for cred in spec["template"]["spec"].get("accessCredentials", []):
                users = get(cred, "sshPublicKey.propagationMethod.qemuGuestAgent.users", [])
                if users != [operator]:
                    problems.append(f"{where}: SSH keys go to {users}, the operator user is {operator!r}")
    assert not problems, "\n".join(problems)


def test_the_kubevirt_image_runs_the_guest_agent(runner_image):
    """Readiness (guestAgentPing) and the SSH keys of accessCredentials need qemu-guest-agent."""
    assert runner_image["qemuGuest"], "the runner image does not enable services.qemuGuest"


def test_systemd_time_spans():
    assert systemd_seconds("90s") == 90 and systemd_seconds("1min 30s") == 90 and systemd_seconds("90") == 90

