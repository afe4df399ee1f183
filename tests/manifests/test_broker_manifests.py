"""Checks of the broker's manifests (examples/kubevirt/broker/): strict schemas (Kubernetes'
own through kubernetes-validate, KubeVirt's copies), misspelled fields rejected, least-privilege
RBAC, availability, the wiring between Deployment, Service, NetworkPolicies and the broker's
flags, and that the broker pool's VM is the pool's VM but for its identity disk."""

import copy
import re
from pathlib import Path

from test_manifests import (  # noqa: F401 (fixtures: evaluated_runner_image, runner_image)
    evaluated_runner_image,
    runner_image,
    EXAMPLES,
    ROOT,
    field_paths,
    get,
    load_docs,
    misspell,
    rel,
    selects,
    validate,
)

BROKER_DIR = EXAMPLES / "broker"
BROKER = BROKER_DIR / "broker.yaml"
BROKER_POOL = BROKER_DIR / "pool.yaml"
POOL = EXAMPLES / "pool.yaml"
SETTINGS = ROOT / "broker" / "src" / "settings.rs"
VM_ACCOUNT = "gitlab-runner-vm-identity"


def broker_files():
    return sorted(BROKER_DIR.glob("*.yaml"))


def kind(docs, k):
    return [d for d in docs if d.get("kind") == k]


def one(docs, k):
    (d,) = kind(docs, k)
    return d


def broker_env():
    deployment = one(load_docs(BROKER), "Deployment")
    (container,) = get(deployment, "spec.template.spec.containers")
    return deployment, container, {e["name"]: e for e in container.get("env", [])}


def test_every_broker_document_validates():
    problems = []
    for path in broker_files():
        for doc in load_docs(path):
            for error in validate(doc):
                problems.append(f"{rel(path)}: {doc.get('kind')} {get(doc, 'metadata.name')}: {error}")
    assert not problems, "\n".join(problems)


def test_every_field_name_misspelled_is_rejected():
    missed = []
    for path in broker_files():
        for doc in load_docs(path):
            for field in field_paths(doc):
                # A Service's selector is a plain map of labels: any key is right there.
                if doc.get("kind") == "Service" and field[:2] == ("spec", "selector") and len(field) > 2:
                    continue
                if not validate(misspell(doc, field)):
                    missed.append(f"{rel(path)}: {doc.get('kind')}: {'.'.join(map(str, field))}")
    assert not missed, "misspelled fields that validate:\n" + "\n".join(missed)


def test_the_broker_may_review_tokens_and_read_and_annotate_pods_nothing_more():
    docs = load_docs(BROKER)
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    cluster_role, role = one(docs, "ClusterRole"), one(docs, "Role")
    assert cluster_role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]}]
    crb, rb = one(docs, "ClusterRoleBinding"), one(docs, "RoleBinding")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role["metadata"]["name"]}
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert [s["name"] for s in crb["subjects"]] == [sa] and crb["subjects"][0]["kind"] == "ServiceAccount"
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    deployment = one(docs, "Deployment")
    assert get(deployment, "spec.template.spec.serviceAccountName") == sa


def test_the_vms_account_has_no_rights_at_all():
    bindings = [d for p in [POOL, *broker_files()] for d in load_docs(p) if d.get("kind") in ("RoleBinding", "ClusterRoleBinding")]
    for b in bindings:
        assert all(s.get("name") != VM_ACCOUNT for s in b.get("subjects", [])), f"{b['metadata']['name']} binds {VM_ACCOUNT}"
    assert VM_ACCOUNT in [d["metadata"]["name"] for d in kind(load_docs(BROKER_POOL), "ServiceAccount")]


def test_the_broker_survives_a_node_drain():
    docs = load_docs(BROKER)
    deployment, pdb = one(docs, "Deployment"), one(docs, "PodDisruptionBudget")
    assert deployment["spec"]["replicas"] >= 2
    pod_labels = get(deployment, "spec.template.metadata.labels")
    assert selects(get(pdb, "spec.selector"), pod_labels)
    assert pdb["spec"]["minAvailable"] == 1


def test_the_service_and_probe_reach_the_brokers_port_and_only_broker_vms_may_call():
    docs = load_docs(BROKER)
    deployment, container, env = broker_env()
    pod_labels = get(deployment, "spec.template.metadata.labels")
    service = one(docs, "Service")
    assert get(service, "spec.selector") == pod_labels
    (port,) = container["ports"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert f"--listen=0.0.0.0:{port['containerPort']}" in container["args"]
    assert get(container, "readinessProbe.httpGet.path") == "/healthz"
    (policy,) = kind(docs, "NetworkPolicy")
    assert selects(get(policy, "spec.podSelector"), pod_labels)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    vm_pod_labels = get(one(load_docs(BROKER_POOL), "VirtualMachinePool"), "spec.virtualMachineTemplate.spec.template.metadata.labels")
    assert [selects(p["podSelector"], vm_pod_labels) for p in rule["from"]] == [True]
    # And the broker pool's egress policy lets exactly those VMs reach exactly the broker's port.
    to_broker = [p for p in kind(load_docs(BROKER_POOL), "NetworkPolicy") if p["metadata"]["name"] == "gitlab-runner-vm-to-broker"]
    (egress,) = to_broker
    assert selects(get(egress, "spec.podSelector"), vm_pod_labels)
    assert egress["spec"]["policyTypes"] == ["Egress"]
    (rule,) = egress["spec"]["egress"]
    assert [selects(p["podSelector"], pod_labels) for p in rule["to"]] == [True]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]


def test_the_brokers_settings_are_its_own_and_admit_the_broker_pool():
    _deployment, container, env = broker_env()
    declared = set(re.findall(r'env = "([A-Z_]+)"', SETTINGS.read_text()))
    assert set(env) <= declared, f"unknown settings: {sorted(set(env) - declared)}"
    assert get(env["BROKER_NAMESPACE"], "valueFrom.fieldRef.fieldPath") == "metadata.namespace"
    flags = set(re.findall(r"--([a-z-]+)", " ".join(container.get("args", []))))
    names = {n.lower().replace("_", "-").removeprefix("broker-") for n in declared}
    assert flags <= names, f"unknown flags: {sorted(flags - names)}"
    # The pool's pods carry every label of the broker's --vm-selector and run as its account.
    pool = one(load_docs(BROKER_POOL), "VirtualMachinePool")
    labels = get(pool, "spec.virtualMachineTemplate.spec.template.metadata.labels")
    for term in env["BROKER_VM_SELECTOR"]["value"].split(","):
        key, _, value = term.partition("=")
        assert labels.get(key) == value, f"the pool's pods lack {term} of --vm-selector"
    volumes = get(pool, "spec.virtualMachineTemplate.spec.template.spec.volumes")
    accounts = [v["serviceAccount"]["serviceAccountName"] for v in volumes if "serviceAccount" in v]
    assert accounts == [env["BROKER_VM_SERVICE_ACCOUNT"]["value"]] == [VM_ACCOUNT]
    # The access token comes from a mounted Secret, never from an environment value.
    token_dir = str(Path(env["BROKER_ACCESS_TOKEN_FILE"]["value"]).parent)
    assert [m["mountPath"] for m in container["volumeMounts"]] == [token_dir]
    assert not any("glpat-" in str(e) for e in env.values())


def test_the_broker_pool_is_the_pools_vm_with_an_identity_disk_instead_of_a_token():
    pool = one(load_docs(POOL), "VirtualMachinePool")
    broker_pool = one(load_docs(BROKER_POOL), "VirtualMachinePool")
    assert "v1alpha1" in BROKER_POOL.read_text()
    expected = copy.deepcopy(pool["spec"]["virtualMachineTemplate"]["spec"])
    tmpl = expected["template"]
    tmpl["metadata"]["labels"].update({"gitlab-runner-vm/pool": "gitlab-runner-broker-pool", "gitlab-runner-vm/identity": "broker"})
    disks = tmpl["spec"]["domain"]["devices"]["disks"]
    disks[[d["name"] for d in disks].index("runner-info")] = {"name": "identity", "serial": "identity", "disk": {"bus": "virtio"}}
    volumes = tmpl["spec"]["volumes"]
    volumes[[v["name"] for v in volumes].index("runner-info")] = {"name": "identity", "serviceAccount": {"serviceAccountName": VM_ACCOUNT}}
    # The runner image built for the broker (nixos-runner-broker: --config-source broker).
    root = volumes[[v["name"] for v in volumes].index("rootdisk")]["containerDisk"]
    root["image"] = root["image"].replace("/nixos-runner-containerdisk:", "/nixos-runner-broker-containerdisk:")
    assert broker_pool["spec"]["virtualMachineTemplate"]["spec"] == expected
    assert not kind(load_docs(BROKER_POOL), "Secret") or all(
        "runner.json" not in s.get("stringData", {}) for s in kind(load_docs(BROKER_POOL), "Secret")
    ), "the broker pool carries no runner token"
    # Same selector-vs-labels rule and update strategy as the pool.
    assert broker_pool["spec"]["updateStrategy"] == {"opportunistic": {}}
    match = get(broker_pool, "spec.selector.matchLabels")
    assert all(get(broker_pool, "spec.virtualMachineTemplate.metadata.labels").get(k) == v for k, v in match.items())
    assert match != get(pool, "spec.selector.matchLabels"), "the two pools must not claim each other's VMs"


def test_the_broker_pool_ships_the_pools_policy_and_lifetime_cap():
    shared = ("NetworkPolicy", "CronJob", "Role", "RoleBinding")
    pool = [d for d in load_docs(POOL) if d.get("kind") in shared]
    broker_pool = [d for d in load_docs(BROKER_POOL) if d.get("kind") in shared and d["metadata"]["name"] != "gitlab-runner-vm-to-broker"]
    assert pool == broker_pool
    secrets = {d["metadata"]["name"]: d for d in load_docs(POOL) if d.get("kind") == "Secret"}
    for s in kind(load_docs(BROKER_POOL), "Secret"):
        assert s == secrets[s["metadata"]["name"]], "a Secret differs from the pool's"


def test_the_broker_pools_identity_disk_is_where_the_broker_image_reads_the_pods_token(runner_image):
    """The broker pool's identity disk (its serial) is the disk the nixos-runner-broker image
    mounts, and that image's agent asks the broker, with the token file on that disk."""
    image = runner_image["broker"]
    broker_pool = one(load_docs(BROKER_POOL), "VirtualMachinePool")
    disks = get(broker_pool, "spec.virtualMachineTemplate.spec.template.spec.domain.devices.disks")
    (identity,) = [d for d in disks if d["name"] == "identity"]
    assert image["identityDisk"]["enable"] and image["configSource"] == "broker", image
    assert identity["serial"] == image["identityDisk"]["serial"], (identity, image["identityDisk"])
    assert image["identityDisk"]["mount"]["device"] == f"/dev/disk/by-id/virtio-{identity['serial']}", image
    assert image["tokenFile"] == image["identityDisk"]["mountPoint"] + "/token", image
    assert {"ro", "mode=0400", "dmode=0500", "overriderockperm"} <= set(image["identityDisk"]["mount"]["options"]), image
    assert not image["configDisk"], "no runner.json disk in the broker's runner image"
    # The agent's default broker URL is the broker's Service, in the VMs' namespace.
    (service,) = [d for d in load_docs(BROKER) if d.get("kind") == "Service"]
    assert image["brokerUrl"] in (None, f"http://{service['metadata']['name']}"), image["brokerUrl"]
    assert get(service, "spec.ports")[0]["port"] == 80
