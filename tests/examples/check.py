#!/usr/bin/env python3
"""Checks of the cloud fleet examples under examples/ (KubeVirt's are tests/manifests').

1. CloudFormation (examples/aws/*.yaml): cfn-lint, then what the fleet needs of the template:
   instances terminate themselves on power-off, IMDSv2 with one hop, the AMI, instance type and
   runner.json (NoEcho) as parameters, runner.json as user-data, an Auto Scaling group of a
   fixed size; the egress of its security group (HTTPS, optional HTTP) and its lifetime cap
   (MaxInstanceLifetime, and a scheduled Lambda function run here against a stand-in EC2
   client). The parameter files (x86_64 and Graviton) name only parameters of the template,
   every one without a default, and instance types of their architecture; cfn-lint
   --parameter-files passes (on a copy with the list parameter as the array cfn-lint wants:
   the files themselves are what the AWS CLI takes, and it refuses the array). docs/aws.md's
   deploy as written: its jq run (a 0600 parameters file with runner.json), its aws commands
   through the AWS CLI, its instance types of the architecture each line names.
2. Shell scripts (examples/**/*.sh): shellcheck, and each one run against a stand-in of its
   cloud's CLI (fakecli.py) that records the calls:
   - aws/import-image.sh: the vmimport role; both architectures from image-info.json
     (x86_64 + legacy-bios, arm64 + uefi), the upload, the snapshot import and the AMI's root
     device. With the real AWS CLI installed (install-deps), every call also passes its checks.
   - gce/runner-fleet.sh: the image of each architecture (GVNIC; UEFI_COMPATIBLE on Arm; as
     docs/gce.md shows), the upload removed also on failure; METADATA_KEY (CircleCI's key, as
     docs/circleci.md and the module name it); the instance template (runner.json as user-data, no service account,
     deleted after MAX_RUN_DURATION), the fleet's own network and firewall rules (egress to
     private ranges denied, SSH in only from SSH_SOURCE_RANGES), the MIG that repairs stopped
     VMs, updates, resizes, removal. Where the Google Cloud CLI
     is installed, every call also passes its checks.
   - digital-ocean/runner-fleet.sh: powered-off Droplets destroyed, those older than the cap
     shut down first, missing ones created (at most ten per request), the cloud firewall,
     removal by tag; a failed, hung or malformed list, a failed firewall or destroy creates and
     destroys nothing; overlapping runs create once (the lock); watch goes on after failures.
   - proxmox/runner-fleet.sh, against stand-ins of pvesh and qm: stopped runner VMs destroyed
     with their ISOs, those past the cap shut down first, clones of the template with runner.json
     on an ISO 9660 CD-ROM each (read back: label, content, modes), the same failures, lock and
     watch as DigitalOcean's.
   - runner-fleet.service and fleet.env of both: systemd-analyze verify, every setting with the
     script's defaults, the defaults the pages state.
   - the KubeVirt lifetime-cap CronJob's script (vm-template.yaml, pool.yaml): shellcheck -s sh,
     old runner VMIs deleted, young and foreign ones kept, a failed list deletes nothing.
3. Every example file is covered by a check here (a new example needs its validator).

Prints one line per check and a closing "N passed, N failed" line; exits 1 if any check failed.
"""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
AWS = EXAMPLES / "aws"
GCE = EXAMPLES / "gce"
DO = EXAMPLES / "digital-ocean"
FLEET_TEMPLATE = AWS / "runner-fleet.yaml"
BIN = Path(os.environ.get("EXAMPLES_BIN", "")) if os.environ.get("EXAMPLES_BIN") else None
# The Google Cloud CLI is not installable in CI (no Debian or PyPI package); where it is
# installed, it checks every gcloud call of the GCE script too (about 20 s; EXAMPLES_NO_GCLOUD=1
# leaves it out).
REAL_GCLOUD = None if os.environ.get("EXAMPLES_NO_GCLOUD") else shutil.which("gcloud")


class Skip(Exception):
    pass


def tool(name):
    """A validator: from the examples venv when there is one, else from PATH."""
    if BIN and (BIN / name).exists():
        return str(BIN / name)
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"{name} is missing; run: sudo tests/examples/install-deps")
    return found


def load_cfn(path):
    """A CloudFormation YAML template, its short-form tags (!Ref, !If...) read as {Fn: value}."""

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {("Ref" if suffix == "Ref" else "Fn::" + suffix): value}

    Loader.add_multi_constructor("!", tagged)
    with open(path) as f:
        return yaml.load(f, Loader=Loader)


# ---- 1. CloudFormation ----------------------------------------------------------------------

def test_cfn_lint():
    templates = sorted(AWS.glob("*.yaml"))
    assert templates, "no CloudFormation templates in examples/aws"
    proc = subprocess.run([tool("cfn-lint"), "--", *map(str, templates)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fleet_template_contract():
    t = load_cfn(FLEET_TEMPLATE)
    params, res = t["Parameters"], t["Resources"]
    assert params["ImageId"]["Type"] == "AWS::EC2::Image::Id", "ImageId must be an AMI parameter"
    assert "InstanceType" in params, "the instance type is a parameter"
    assert params["RunnerJson"].get("NoEcho") is True, "runner.json holds a token: NoEcho"
    (lt,) = [r for r in res.values() if r["Type"] == "AWS::EC2::LaunchTemplate"]
    data = lt["Properties"]["LaunchTemplateData"]
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate", "a powered-off runner must terminate"
    assert data["ImageId"] == {"Ref": "ImageId"} and data["InstanceType"] == {"Ref": "InstanceType"}
    assert data["UserData"] == {"Fn::Base64": {"Ref": "RunnerJson"}}, "runner.json is the user-data"
    md = data["MetadataOptions"]
    assert md["HttpTokens"] == "required", "IMDSv2 required"
    assert md["HttpPutResponseHopLimit"] == 1, "IMDS hop limit 1 (no containers)"
    assert md.get("HttpEndpoint", "enabled") == "enabled", "the image reads user-data from IMDS"
    (root,) = data["BlockDeviceMappings"]
    # import-image.sh registers the AMI with this root device; another name adds a second disk.
    script = (AWS / "import-image.sh").read_text()
    assert f"--root-device-name {root['DeviceName']}" in script, "root device differs from import-image.sh"
    assert root["Ebs"]["DeleteOnTermination"] is True, "a replaced runner leaves no volume"
    (asg,) = [r for r in res.values() if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"]
    p = asg["Properties"]
    count = {"Ref": "RunnerCount"}
    assert p["MinSize"] == p["MaxSize"] == p["DesiredCapacity"] == count, "the group keeps RunnerCount"
    assert p["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": next(k for k, v in res.items() if v is lt)}
    assert p.get("HealthCheckType", "EC2") == "EC2"
    # Egress and lifetime (issue 17).
    assert p["MaxInstanceLifetime"] == 86400, "the group's cap: AWS's minimum, one day"
    (sg,) = [r for r in res.values() if r["Type"] == "AWS::EC2::SecurityGroup"]
    egress = sg["Properties"]["SecurityGroupEgress"]
    plain = [r for r in egress if "Fn::If" not in r]
    assert {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in plain} == {("tcp", 443, 443)}, plain
    (http,) = [r["Fn::If"] for r in egress if "Fn::If" in r]
    assert http[0] == "HttpEgress" and (http[1]["FromPort"], http[1]["ToPort"]) == (80, 80) and http[2] == {"Ref": "AWS::NoValue"}
    ingress = sg["Properties"].get("SecurityGroupIngress")
    assert ingress["Fn::If"][0] == "HasSshCidr" and ingress["Fn::If"][2] == {"Ref": "AWS::NoValue"}, ingress
    assert [(r["FromPort"], r["ToPort"]) for r in ingress["Fn::If"][1]] == [(22, 22)], ingress
    assert params["MaxRunnerAge"]["Default"] == 21600 and params["MaxRunnerAge"]["MaxValue"] <= 86400
    fn = res["CleanupFunction"]["Properties"]
    assert fn["Environment"]["Variables"]["MAX_AGE_SECONDS"] == {"Ref": "MaxRunnerAge"}
    (rule,) = [r for r in res.values() if r["Type"] == "AWS::Events::Rule"]
    assert rule["Properties"]["ScheduleExpression"] == "rate(10 minutes)"
    statements = res["CleanupRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    actions = sorted(s["Action"] for s in statements)
    assert actions == ["ec2:DescribeInstances", "ec2:TerminateInstances"], actions
    terminate = next(s for s in statements if s["Action"] == "ec2:TerminateInstances")
    assert terminate["Condition"] == {"StringEquals": {"aws:ResourceTag/gitlab-runner-vm:fleet": {"Ref": "AWS::StackName"}}}
    tags = next(s for s in data["TagSpecifications"] if s["ResourceType"] == "instance")["Tags"]
    assert {"Key": "gitlab-runner-vm:fleet", "Value": {"Ref": "AWS::StackName"}} in tags, "the cleanup finds runners by this tag"


class FakeEC2:
    """Stand-in for boto3's EC2 client: describe_instances (paginated, honouring the filters)
    and terminate_instances; describe fails as botocore does when told to."""

    def __init__(self, instances, fail=None, page_size=2):
        self.instances, self.fail, self.page_size, self.terminated, self.calls = instances, fail, page_size, [], []

    def get_paginator(self, name):
        assert name == "describe_instances", name
        ec2 = self

        class Paginator:
            def paginate(self, Filters):
                ec2.calls.append(("describe_instances", Filters))
                if ec2.fail:
                    raise ec2.fail
                want = {f["Name"]: f["Values"] for f in Filters}
                chosen = [i for i in ec2.instances
                          if i["Tags"].get("gitlab-runner-vm:fleet") in want.get("tag:gitlab-runner-vm:fleet", [])
                          and i["State"] in want.get("instance-state-name", [])]
                for n in range(0, max(len(chosen), 1), ec2.page_size):
                    yield {"Reservations": [{"Instances": [
                        {"InstanceId": i["InstanceId"], "LaunchTime": i["LaunchTime"]} for i in chosen[n:n + ec2.page_size]]}]}

        return Paginator()

    def terminate_instances(self, InstanceIds):
        self.calls.append(("terminate_instances", InstanceIds))
        self.terminated += InstanceIds


def test_aws_cleanup_function():
    """The Lambda function of runner-fleet.yaml: old instances of this fleet terminated, young
    ones and other fleets' kept, nothing terminated when listing fails."""
    import datetime
    import types
    code = load_cfn(FLEET_TEMPLATE)["Resources"]["CleanupFunction"]["Properties"]["Code"]["ZipFile"]
    sys.modules.setdefault("boto3", types.SimpleNamespace(client=lambda name: None))
    module = types.ModuleType("index")
    exec(compile(code, "runner-fleet.yaml:CleanupFunction", "exec"), module.__dict__)
    now = datetime.datetime.now(datetime.timezone.utc)
    ago = lambda s: now - datetime.timedelta(seconds=s)  # noqa: E731
    instances = [
        {"InstanceId": "i-old", "LaunchTime": ago(6 * 3600 + 60), "State": "running", "Tags": {"gitlab-runner-vm:fleet": "runners"}},
        {"InstanceId": "i-ancient", "LaunchTime": ago(30 * 86400), "State": "pending", "Tags": {"gitlab-runner-vm:fleet": "runners"}},
        {"InstanceId": "i-young", "LaunchTime": ago(3600), "State": "running", "Tags": {"gitlab-runner-vm:fleet": "runners"}},
        {"InstanceId": "i-other", "LaunchTime": ago(30 * 86400), "State": "running", "Tags": {"gitlab-runner-vm:fleet": "other"}},
        {"InstanceId": "i-gone", "LaunchTime": ago(30 * 86400), "State": "shutting-down", "Tags": {"gitlab-runner-vm:fleet": "runners"}},
    ]
    env = {"FLEET": "runners", "MAX_AGE_SECONDS": "21600"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    quiet = contextlib.redirect_stdout(io.StringIO())
    quiet.__enter__()
    try:
        ec2 = FakeEC2(instances)
        out = module.handler({}, None, ec2=ec2)
        assert sorted(ec2.terminated) == ["i-ancient", "i-old"] == sorted(out["terminated"]), ec2.calls
        ec2 = FakeEC2([i for i in instances if i["InstanceId"] == "i-young"])
        module.handler({}, None, ec2=ec2)
        assert not [c for c in ec2.calls if c[0] == "terminate_instances"], ec2.calls
        ec2 = FakeEC2(instances, fail=RuntimeError("An error occurred (RequestLimitExceeded) when calling the DescribeInstances operation"))
        try:
            module.handler({}, None, ec2=ec2)
        except RuntimeError:
            pass
        else:
            raise AssertionError("a failed listing must fail the invocation")
        assert not ec2.terminated, ec2.calls
    finally:
        quiet.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_parameter_files():
    t = load_cfn(FLEET_TEMPLATE)
    params = t["Parameters"]
    files = sorted(AWS.glob("parameters-*.json"))
    assert {f.name for f in files} >= {"parameters-x86_64.json", "parameters-aarch64.json"}, files
    graviton = re.compile(r"^[a-z]+[0-9]+[a-z]*g[a-z]*\.")  # m7g, c7gn, r8g, t4g ...
    problems = []
    for f in files:
        values = {p["ParameterKey"]: p["ParameterValue"] for p in json.loads(f.read_text())}
        problems += [f"{f.name}: unknown parameter {k}" for k in values if k not in params]
        problems += [f"{f.name}: no value for {k}" for k, v in params.items() if "Default" not in v and k not in values]
        itype = values.get("InstanceType", params["InstanceType"].get("Default", ""))
        if not re.match(params["InstanceType"]["AllowedPattern"], itype):
            problems.append(f"{f.name}: {itype} does not match the template's pattern")
        arm = "aarch64" in f.name
        if bool(graviton.match(itype)) != arm:
            problems.append(f"{f.name}: {itype} is not an {'arm64 (Graviton)' if arm else 'x86_64'} type")
    assert not problems, "\n".join(problems)


def aws_cli_verdicts(calls, cwd):
    """The real AWS CLI's verdict on each call (None: accepted, else its message), run in cwd
    (file:// paths are read from there); None when the AWS CLI is not installed."""
    python = BIN / "python" if BIN else None
    if not python or not python.exists():
        return None
    verdicts = []
    for call in calls:
        proc = subprocess.run([str(python), str(HERE / "awscheck.py")], input=json.dumps(call) + "\n",
                              capture_output=True, text=True, timeout=300, cwd=cwd)
        verdicts.append(None if proc.returncode == 0 else proc.stdout + proc.stderr)
    return verdicts


def lint_copy(path, params, out_dir):
    """A copy of a parameter file with each List<...> parameter as the JSON array cfn-lint's E2900
    wants (CloudFormation's API, and the AWS CLI, take a comma-separated string)."""
    values = json.loads(path.read_text())
    for p in values:
        if "List" in params.get(p["ParameterKey"], {}).get("Type", ""):
            p["ParameterValue"] = p["ParameterValue"].split(",")
    out = Path(out_dir) / path.name
    out.write_text(json.dumps(values))
    return out


def test_parameter_files_lint_and_cli():
    """cfn-lint with the parameter files is clean, but for its array-for-lists false alarm (E2900,
    and the W1030 that follows), which docs/aws.md explains: the files themselves pass the AWS
    CLI, which refuses the array cfn-lint asks for."""
    params = load_cfn(FLEET_TEMPLATE)["Parameters"]
    lists = {k for k, v in params.items() if "List" in v.get("Type", "")}
    files = sorted(AWS.glob("parameters-*.json"))
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            copy = lint_copy(f, params, tmp)
            proc = subprocess.run([tool("cfn-lint"), "--parameter-files", str(copy), "--", str(FLEET_TEMPLATE)],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"cfn-lint --parameter-files {f.name}:\n{proc.stdout}{proc.stderr}"
            # The shipped file: nothing but the false alarm about the lists (if cfn-lint ever takes
            # comma-separated lists, this fails: then lint the files as they are).
            proc = subprocess.run([tool("cfn-lint"), "--format", "parseable", "--parameter-files", str(f), "--", str(FLEET_TEMPLATE)],
                                  capture_output=True, text=True)
            findings = [line for line in proc.stdout.splitlines() if line.strip()]
            assert findings, f"cfn-lint now accepts {f.name} as it is: lint the files directly and drop lint_copy"
            list_values = [p["ParameterValue"] for p in json.loads(f.read_text()) if p["ParameterKey"] in lists]
            others = [line for line in findings
                      if not (re.search(r":(E2900|W1030):", line) and "is not of type 'array'" in line
                              and any(f"'{v}'" in line for v in list_values))]
            assert not others, f"cfn-lint --parameter-files {f.name}: more than the list false alarm:\n" + "\n".join(others)
            calls = [["cloudformation", "create-stack", "--stack-name", "gitlab-runners",
                      "--template-body", f"file://{FLEET_TEMPLATE}", "--parameters", f"file://{f}"],
                     ["cloudformation", "create-stack", "--stack-name", "gitlab-runners",
                      "--template-body", f"file://{FLEET_TEMPLATE}", "--parameters", f"file://{copy}"]]
            verdicts = aws_cli_verdicts(calls, tmp)
            if verdicts is None:
                continue
            assert verdicts[0] is None, f"the AWS CLI rejects {f.name}:\n{verdicts[0]}"
            assert verdicts[1] and "valid types: <class 'str'>" in verdicts[1], \
                f"the AWS CLI now takes a list parameter as an array ({verdicts[1]}): docs/aws.md says it does not"


def page_commands(text):
    """The page's lines with continuations (a trailing backslash) joined."""
    return re.sub(r"\\\n\s*", "", text).splitlines()


GRAVITON = re.compile(r"^[a-z]+[0-9]+[a-z]*g[a-z]*\.")  # m7g, c7gn, r8g, t4g ...
INSTANCE_TYPE = re.compile(r"\b([a-z][a-z0-9-]*[0-9][a-z0-9-]*\.(?:nano|micro|small|medium|[0-9]*x?large|metal))\b")


def test_aws_page_deploy_commands():
    """docs/aws.md's deploy runs as written: its jq puts runner.json into a 0600 parameters file
    and changes nothing else; its aws commands pass the real AWS CLI's checks with that file;
    every instance type the page names with an architecture is of that architecture, and each
    run-instances command names the architecture of its AMI."""
    page = (ROOT / "docs" / "aws.md").read_text()
    lines = [line.strip() for line in page_commands(page)]
    (jq_line,) = [line for line in lines if line.startswith("(umask 077; jq ")]
    with tempfile.TemporaryDirectory() as tmp:
        runner_json = '{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n'
        (Path(tmp) / "runner.json").write_text(runner_json)
        shutil.copy(AWS / "parameters-x86_64.json", Path(tmp) / "my-parameters.json")
        (Path(tmp) / "examples").symlink_to(EXAMPLES)
        proc = subprocess.run(["bash", "-euc", jq_line], cwd=tmp, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out = Path(tmp) / "parameters.json"
        assert out.stat().st_mode & 0o777 == 0o600, oct(out.stat().st_mode)
        before = {p["ParameterKey"]: p["ParameterValue"] for p in json.loads((AWS / "parameters-x86_64.json").read_text())}
        after = {p["ParameterKey"]: p["ParameterValue"] for p in json.loads(out.read_text())}
        assert after == {**before, "RunnerJson": runner_json}, after
        commands = [shlex.split(line, comments=True) for line in lines
                    if re.match(r"aws (cloudformation (create|update)-stack|cloudformation wait|ec2 (run-instances|describe-instance-types|describe-instance-attribute)) ", line)]
        assert len(commands) >= 6, commands
        assert all("RunnerJson" not in " ".join(c) and "runner.json" not in " ".join(c) for c in commands), "runner.json on a command line"
        verdicts = aws_cli_verdicts([c[1:] for c in commands], tmp)
        if verdicts is not None:
            bad = [f"{' '.join(c)}\n  {v}" for c, v in zip(commands, verdicts) if v]
            assert not bad, "the AWS CLI rejects:\n" + "\n".join(bad)
    problems = []
    for line in lines:
        words = line.lower()
        arm = any(w in words for w in ("aarch64", "arm64", "graviton"))
        x86 = "x86_64" in words
        for itype in INSTANCE_TYPE.findall(line):
            if line.startswith("aws ec2 run-instances") and arm == x86:
                problems.append(f"run-instances names no one architecture for {itype}: {line}")
            elif arm != x86 and bool(GRAVITON.match(itype)) != arm:
                problems.append(f"{itype} is not an {'arm64' if arm else 'x86_64'} type: {line}")
    assert not problems, "\n".join(problems)


# ---- 2. Shell scripts -----------------------------------------------------------------------

def test_shellcheck():
    scripts = sorted(EXAMPLES.rglob("*.sh"))
    assert scripts, "no scripts in examples/"
    proc = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for s in scripts:
        assert os.access(s, os.X_OK), f"{s.relative_to(ROOT)} is not executable"


def check_aws_calls(calls):
    """Every aws call passes the real AWS CLI's parameter checks (awscheck.py)."""
    python = BIN / "python" if BIN else None
    if not calls or not python or not python.exists():
        return
    proc = subprocess.run([str(python), str(HERE / "awscheck.py")], input="".join(json.dumps(c) + "\n" for c in calls),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "the AWS CLI rejects:\n" + proc.stdout + proc.stderr


class Fake:
    """A directory with stand-ins for aws, gcloud and doctl, their log and their state."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        for cli in ("aws", "gcloud", "doctl", "kubectl", "pvesh", "qm"):
            target = self.bin / cli
            target.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fakecli.py'} {cli} \"$@\"\n")
            target.chmod(0o755)
        self.log = self.tmp / "calls.jsonl"
        self.state = self.tmp / "state.json"
        self.aws_calls = []
        self.tmpdir = self.tmp / "tmpdir"
        self.tmpdir.mkdir()

    def set_state(self, state):
        self.state.write_text(json.dumps(state))

    def get_state(self):
        return json.loads(self.state.read_text()) if self.state.exists() else {}

    def environ(self, env=None):
        """The environment a script runs in: the stand-ins first on PATH, their log and state."""
        e = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": str(self.tmp),
            "FAKE_LOG": str(self.log),
            "FAKE_STATE": str(self.state),
            "FAKE_HOME": str(self.tmp),
            "POLL_INTERVAL": "0",
            "TMPDIR": str(self.tmpdir),
            "LOCK_FILE": str(self.tmp / "fleet.lock"),
        }
        if REAL_GCLOUD:
            e["REAL_GCLOUD"] = REAL_GCLOUD
        e.update(env or {})
        return e

    def calls(self):
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run(self, script, *args, env=None, check=True):
        self.log.write_text("")
        proc = subprocess.run([str(script), *args], env=self.environ(env), cwd=self.tmp, capture_output=True, text=True, timeout=120)
        if check:
            assert proc.returncode == 0, f"{script.name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        calls = self.calls()
        self.aws_calls += [c[1:] for c in calls if c[0] == "aws"]
        return proc, calls

    def check_aws(self):
        """Every aws call made so far passes the real AWS CLI's parameter checks."""
        check_aws_calls(self.aws_calls)


def watch_until(script, env, cwd, done, limit=120):
    """Runs `script watch` until `done()` holds (polled), then stops it; returns its stderr.
    Waiting for the outcome, not a fixed time, keeps the test right on a busy machine."""
    proc = subprocess.Popen([str(script), "watch"], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + limit
    try:
        while not done():
            assert proc.poll() is None, f"watch ended (exit {proc.returncode}): {proc.communicate()[1]}"
            assert time.monotonic() < deadline, f"not done within {limit} s"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        _, err = proc.communicate(timeout=30)
    return err


def find(calls, *prefix):
    found = [c for c in calls if c[: len(prefix)] == list(prefix)]
    assert found, f"no call {' '.join(prefix)} in:\n" + "\n".join(" ".join(c) for c in calls)
    return found


def opt(call, name):
    for i, arg in enumerate(call):
        if arg == name:
            return call[i + 1]
    raise AssertionError(f"{name} missing from: {' '.join(call)}")


def image_result(tmp, system, boot_mode):
    """A build result laid out as images/amazon.nix writes it (nix-support/image-info.json)."""
    out = Path(tmp) / f"result-{system}"
    (out / "nix-support").mkdir(parents=True)
    disk = out / f"runner-amazon-26.05.20260715.abcdef0-{system}.vhd"
    disk.write_bytes(b"\0" * 512)
    info = {
        "label": "26.05.20260715.abcdef0",
        "boot_mode": boot_mode,
        "system": system,
        "logical_bytes": "4294967296",
        "file": str(disk),
        "disks": {"root": {"logical_bytes": "4294967296", "file": str(disk)}},
    }
    (out / "nix-support" / "image-info.json").write_text(json.dumps(info))
    return out, disk


def test_aws_import_image_both_architectures():
    script = AWS / "import-image.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        for system, arch, boot in (("x86_64-linux", "x86_64", "legacy-bios"), ("aarch64-linux", "arm64", "uefi")):
            result, disk = image_result(tmp, system, boot)
            proc, calls = fake.run(script, "import", "my-bucket", str(result))
            key = f"gitlab-runner-vm/{disk.name}"
            (cp,) = find(calls, "aws", "s3", "cp")
            assert cp[-2:] == [str(disk), f"s3://my-bucket/{key}"], cp
            (imp,) = find(calls, "aws", "ec2", "import-snapshot")
            assert opt(imp, "--disk-container") == f"Format=VHD,UserBucket={{S3Bucket=my-bucket,S3Key={key}}}", imp
            assert opt(imp, "--role-name") == "vmimport"
            (reg,) = find(calls, "aws", "ec2", "register-image")
            assert opt(reg, "--architecture") == arch, reg
            assert opt(reg, "--boot-mode") == boot, reg
            assert opt(reg, "--root-device-name") == "/dev/xvda"
            assert opt(reg, "--imds-support") == "v2.0"
            assert "--ena-support" in reg
            bdm = opt(reg, "--block-device-mappings")
            assert bdm.startswith("DeviceName=/dev/xvda,Ebs={SnapshotId=snap-0123456789abcdef0,"), bdm
            assert opt(reg, "--name") == disk.name.removesuffix(".vhd")
            (rm,) = find(calls, "aws", "s3", "rm")
            assert rm[-1] == f"s3://my-bucket/{key}", rm
            assert proc.stdout.strip().splitlines()[-1] == "ami-0123456789abcdef0", proc.stdout
        # Without image-info.json the script stops before any call.
        empty = Path(tmp) / "empty"
        empty.mkdir()
        proc, calls = fake.run(script, "import", "my-bucket", str(empty), check=False)
        assert proc.returncode != 0 and "image-info.json" in proc.stderr and not calls, proc.stderr
        fake.check_aws()


def test_aws_vmimport_role():
    script = AWS / "import-image.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        _, calls = fake.run(script, "role", "my-bucket")
        (create,) = find(calls, "aws", "iam", "create-role")
        trust = json.loads(opt(create, "--assume-role-policy-document"))
        (stmt,) = trust["Statement"]
        assert stmt["Principal"] == {"Service": "vmie.amazonaws.com"} and stmt["Action"] == "sts:AssumeRole"
        assert stmt["Condition"]["StringEquals"]["sts:Externalid"] == "vmimport"
        (put,) = find(calls, "aws", "iam", "put-role-policy")
        policy = json.loads(opt(put, "--policy-document"))
        s3 = next(s for s in policy["Statement"] if "s3:GetObject" in s["Action"])
        assert set(s3["Resource"]) == {"arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*"}
        ec2 = next(s for s in policy["Statement"] if "ec2:RegisterImage" in s["Action"])
        assert {"ec2:ModifySnapshotAttribute", "ec2:CopySnapshot", "ec2:Describe*"} <= set(ec2["Action"])
        # A second run updates the existing role instead of creating it again.
        _, calls = fake.run(script, "role", "my-bucket")
        assert not [c for c in calls if c[1:3] == ["iam", "create-role"]]
        find(calls, "aws", "iam", "update-assume-role-policy")
        fake.check_aws()


def test_gce_runner_fleet():
    script = GCE / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        runner_json = Path(tmp) / "runner.json"
        runner_json.write_text('{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n')
        env = {"ZONE": "europe-west1-b", "IMAGE": "runner-gce-x86-64", "SIZE": "3"}
        _, calls = fake.run(script, "create", env=env)
        (tpl,) = find(calls, "gcloud", "compute", "instance-templates", "create")
        name = tpl[4]
        assert re.fullmatch(r"gitlab-runners-[0-9]{8}-[0-9]{6}-[0-9a-f]{4}", name), name
        assert opt(tpl, "--metadata-from-file") == "user-data=runner.json"
        assert fake.get_state()["metadata"][name] == {"user-data": runner_json.read_text()}, "no SSH key unless asked"
        assert "--no-service-account" in tpl and "--no-scopes" in tpl, "jobs must get no Google credentials"
        assert opt(tpl, "--image") == "runner-gce-x86-64"
        # The lifetime cap: deleted (the MIG recreates it) 6 h after it started.
        assert opt(tpl, "--max-run-duration") == "6h" and opt(tpl, "--instance-termination-action") == "DELETE", tpl
        # Its own network, never `default`; created before the template.
        assert opt(tpl, "--network") == "gitlab-runners" and opt(tpl, "--subnet") == "gitlab-runners", tpl
        assert opt(tpl, "--region") == "europe-west1", tpl
        (net,) = find(calls, "gcloud", "compute", "networks", "create")
        assert net[4] == "gitlab-runners" and opt(net, "--subnet-mode") == "custom", net
        assert calls.index(net) < calls.index(tpl)
        rules = {c[4]: c for c in find(calls, "gcloud", "compute", "firewall-rules", "create")}
        assert set(rules) == {"gitlab-runners-deny-private"}, "no SSH_SOURCE_RANGES: no ingress rule at all"
        deny = rules["gitlab-runners-deny-private"]
        assert opt(deny, "--direction") == "EGRESS" and opt(deny, "--action") == "DENY" and opt(deny, "--rules") == "all"
        assert set(opt(deny, "--destination-ranges").split(",")) == {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"}
        (mig,) = find(calls, "gcloud", "compute", "instance-groups", "managed", "create")
        assert mig[5] == "gitlab-runners"
        assert opt(mig, "--template") == name, "the MIG must use the template just created"
        assert opt(mig, "--size") == "3" and opt(mig, "--zone") == "europe-west1-b"
        assert opt(mig, "--default-action-on-vm-failure") == "repair", "stopped VMs must be recreated"
        assert "--force-update-on-repair" in mig

        key = Path(tmp) / "id_ed25519.pub"
        key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyExampleKeyExampleKeyExampleKeyEx ops@example.com\n")
        _, calls = fake.run(script, "update", env={**env, "IMAGE": "runner-gce-v2", "SSH_PUBLIC_KEY": str(key)})
        (tpl2,) = find(calls, "gcloud", "compute", "instance-templates", "create")
        assert opt(tpl2, "--network") == "gitlab-runners" and opt(tpl2, "--max-run-duration") == "6h", "a MIG's templates share a network"
        metadata = fake.get_state()["metadata"][tpl2[4]]
        assert metadata["ssh-keys"] == "operator:" + key.read_text(), metadata
        assert not list(fake.tmpdir.iterdir()), "the script left temporary files behind"
        (sit,) = find(calls, "gcloud", "compute", "instance-groups", "managed", "set-instance-template")
        assert opt(sit, "--template") == tpl2[4] != name

        _, calls = fake.run(script, "resize", "0", env=env)
        (rs,) = find(calls, "gcloud", "compute", "instance-groups", "managed", "resize")
        assert opt(rs, "--size") == "0"

        _, calls = fake.run(script, "delete", env=env)
        find(calls, "gcloud", "compute", "instance-groups", "managed", "delete", "gitlab-runners")
        deleted = {c[4] for c in find(calls, "gcloud", "compute", "instance-templates", "delete")}
        assert deleted == {name, tpl2[4]}, deleted
        find(calls, "gcloud", "compute", "networks", "delete", "gitlab-runners")
        state = fake.get_state()
        assert not state["networks"] and not state["subnets"] and not state["firewall_rules"], state

        # Settings are checked before anything is created.
        proc, calls = fake.run(script, "create", env={"ZONE": "z", "IMAGE": "i", "RUNNER_JSON": "missing.json"}, check=False)
        assert proc.returncode != 0 and not calls, proc.stderr
        proc, calls = fake.run(script, "create", env={"IMAGE": "i"}, check=False)
        assert proc.returncode != 0 and "ZONE" in proc.stderr and not calls, proc.stderr


def test_gce_network_options():
    script = GCE / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        (Path(tmp) / "runner.json").write_text('{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n')
        env = {"ZONE": "europe-west1-b", "IMAGE": "runner-gce-x86-64", "SSH_SOURCE_RANGES": "203.0.113.0/24",
               "GITLAB_RANGES": "10.20.30.40/32", "MAX_RUN_DURATION": "3h"}
        _, calls = fake.run(script, "create", env=env)
        rules = {c[4]: c for c in find(calls, "gcloud", "compute", "firewall-rules", "create")}
        ssh = rules["gitlab-runners-allow-ssh"]
        assert opt(ssh, "--direction") == "INGRESS" and opt(ssh, "--rules") == "tcp:22", ssh
        assert opt(ssh, "--source-ranges") == "203.0.113.0/24" and opt(ssh, "--target-tags") == "gitlab-runners", ssh
        gitlab = rules["gitlab-runners-allow-gitlab"]
        assert opt(gitlab, "--action") == "ALLOW" and opt(gitlab, "--rules") == "tcp:443", gitlab
        assert int(opt(gitlab, "--priority")) < int(opt(rules["gitlab-runners-deny-private"], "--priority")), "the GitLab rule must win"
        (tpl,) = find(calls, "gcloud", "compute", "instance-templates", "create")
        assert opt(tpl, "--max-run-duration") == "3h", tpl
        # A second create reuses the network.
        fake.set_state({**fake.get_state(), "templates": []})
        _, calls = fake.run(script, "create", env=env)
        assert not [c for c in calls if c[2:4] in (["networks", "create"], ["firewall-rules", "create"])], calls
        # A network of the user's: used as it is, nothing created or deleted around it.
        fake.set_state({})
        _, calls = fake.run(script, "create", env={**env, "NETWORK": "corp", "SUBNET": "runners"})
        (tpl,) = find(calls, "gcloud", "compute", "instance-templates", "create")
        assert opt(tpl, "--network") == "corp" and opt(tpl, "--subnet") == "runners", tpl
        assert not [c for c in calls if c[2] in ("networks", "firewall-rules")], calls
        # A network that cannot be created: no template, no MIG.
        fake.set_state({"fail": {"compute networks create": "ERROR: (gcloud.compute.networks.create) Quota 'NETWORKS' exceeded."}})
        proc, calls = fake.run(script, "create", env=env, check=False)
        assert proc.returncode != 0 and not [c for c in calls if c[2] in ("instance-templates", "instance-groups") and "create" in c], calls


def test_gce_image_features_per_architecture():
    """`image` registers each architecture's build with the guest OS features its machine types
    need: GVNIC (C4A, T2A and the gVNIC-only x86 series refuse an image without it), and
    UEFI_COMPATIBLE on Arm; the upload is removed, also when the image cannot be created."""
    script = GCE / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        made = {}
        for system, arch, features, family in (
            ("x86_64-linux", "X86_64", {"GVNIC"}, "gitlab-runner-vm"),
            ("aarch64-linux", "ARM64", {"GVNIC", "UEFI_COMPATIBLE"}, "gitlab-runner-vm-arm64"),
        ):
            tarball = Path(tmp) / f"runner-gce-26.05.20260715.abcdef0-{system}.raw.tar.gz"
            tarball.write_bytes(b"\0" * 64)
            _, calls = fake.run(script, "image", "runner-gce-v1", str(tarball), "gs://my-image-bucket")
            object_url = "gs://my-image-bucket/runner-gce-v1.raw.tar.gz"
            (cp,) = find(calls, "gcloud", "storage", "cp")
            assert cp[3:] == [str(tarball), object_url], cp
            (img,) = find(calls, "gcloud", "compute", "images", "create", "runner-gce-v1")
            assert opt(img, "--source-uri") == object_url and opt(img, "--architecture") == arch, img
            assert set(opt(img, "--guest-os-features").split(",")) == features, img
            assert opt(img, "--family") == family, img
            find(calls, "gcloud", "storage", "rm", object_url)
            assert calls.index(cp) < calls.index(img) < calls.index(find(calls, "gcloud", "storage", "rm")[0])
            made[arch] = (opt(img, "--family"), opt(img, "--architecture"), set(opt(img, "--guest-os-features").split(",")))
        # docs/gce.md shows the same commands.
        page = re.sub(r"\\\n\s*", "", (ROOT / "docs" / "gce.md").read_text())
        shown = {m[1]: (m[0], m[1], set(m[2].split(",")))
                 for m in re.findall(r"gcloud compute images create \S+ .*?--family (\S+) --architecture (\S+) --guest-os-features (\S+)", page)}
        assert shown == made, f"docs/gce.md shows {shown}, the script makes {made}"
        # A failed create still removes the upload, and fails.
        fake.set_state({"fail": {"compute images create": "ERROR: (gcloud.compute.images.create) Quota 'IMAGES' exceeded."}})
        proc, calls = fake.run(script, "image", "runner-gce-v1", str(tarball), "my-image-bucket", check=False)
        assert proc.returncode != 0 and find(calls, "gcloud", "storage", "rm"), (proc.returncode, calls)
        # A name that says no architecture: refused before any upload, unless ARCH says it.
        other = Path(tmp) / "disk.raw.tar.gz"
        other.write_bytes(b"\0")
        proc, calls = fake.run(script, "image", "img", str(other), "b", check=False)
        assert proc.returncode != 0 and "ARCH" in proc.stderr and not calls, proc.stderr
        fake.set_state({})
        _, calls = fake.run(script, "image", "img", str(other), "b", env={"ARCH": "ARM64"})
        (img,) = find(calls, "gcloud", "compute", "images", "create")
        assert opt(img, "--architecture") == "ARM64" and "UEFI_COMPATIBLE" in opt(img, "--guest-os-features"), img
        proc, calls = fake.run(script, "image", "img", str(Path(tmp) / "missing.raw.tar.gz"), "b", check=False)
        assert proc.returncode != 0 and not calls, proc.stderr


def test_gce_metadata_key():
    """METADATA_KEY gives the file under another metadata key (CircleCI's machine runner reads
    its token from circleci-runner-token) without editing the script; a key that would break
    gcloud's list is refused before anything is created."""
    script = GCE / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        token = Path(tmp) / "token.txt"
        token.write_text("fake-circleci-resource-class-token\n")
        env = {"ZONE": "europe-west1-b", "IMAGE": "circleci-gce-v1", "RUNNER_JSON": "token.txt",
               "METADATA_KEY": "circleci-runner-token"}
        _, calls = fake.run(script, "create", env=env)
        (tpl,) = find(calls, "gcloud", "compute", "instance-templates", "create")
        assert opt(tpl, "--metadata-from-file") == "circleci-runner-token=token.txt", tpl
        assert fake.get_state()["metadata"][tpl[4]] == {"circleci-runner-token": token.read_text()}
        for bad in ("user-data,ssh-keys=/etc/passwd", "a=b", "", "x" * 129):
            fake.set_state({})
            proc, calls = fake.run(script, "create", env={**env, "METADATA_KEY": bad}, check=False)
            if bad == "":  # empty: the default, user-data
                assert proc.returncode == 0 and opt(find(calls, "gcloud", "compute", "instance-templates", "create")[0], "--metadata-from-file") == "user-data=token.txt"
                continue
            assert proc.returncode != 0 and "METADATA_KEY" in proc.stderr and not calls, (bad, proc.stderr, calls)


def test_circleci_page_names_the_modules_metadata_key():
    """docs/circleci.md's GCE fleet command gives the token under the key the machine runner
    module reads by default (token.metadataKey)."""
    module = (ROOT / "nixos-modules" / "circleci-machine-runner.nix").read_text()
    m = re.search(r'metadataKey = lib\.mkOption \{[^}]*?default = "([^"]+)"', module, re.S)
    assert m, "no default token.metadataKey in nixos-modules/circleci-machine-runner.nix"
    page = (ROOT / "docs" / "circleci.md").read_text()
    keys = set(re.findall(r"METADATA_KEY=(\S+) RUNNER_JSON=\S+ examples/gce/runner-fleet\.sh create", page))
    assert keys == {m.group(1)}, f"docs/circleci.md gives the token under {keys}, the module reads {m.group(1)}"


def iso(seconds_ago):
    """An RFC 3339 UTC time seconds_ago seconds before now, as the APIs write creation times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def test_digital_ocean_runner_fleet():
    script = DO / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        (Path(tmp) / "runner.json").write_text('{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n')
        env = {"IMAGE": "123456", "REGION": "ams3", "COUNT": "4"}
        young = iso(600)
        fake.set_state({"droplets": [
            {"id": 1, "status": "active", "tag": "gitlab-runners", "created_at": young},
            {"id": 2, "status": "off", "tag": "gitlab-runners", "created_at": young},
            {"id": 3, "status": "off", "tag": "gitlab-runners", "created_at": young},
            {"id": 4, "status": "new", "tag": "gitlab-runners", "created_at": young},
            {"id": 5, "status": "off", "tag": "something-else", "created_at": young},
        ]})
        _, calls = fake.run(script, "reconcile", env=env)
        (delete,) = find(calls, "doctl", "compute", "droplet", "delete")
        assert "--force" in delete and sorted(a for a in delete if a.isdigit()) == ["2", "3"], delete
        assert not [c for c in calls if c[2] == "droplet-action"], "powered-off Droplets need no shutdown"
        (create,) = find(calls, "doctl", "compute", "droplet", "create")
        names = [a for a in create[4:] if not a.startswith("-")][:2]
        assert all(n.startswith("gitlab-runners-") for n in names) and len(set(names)) == 2, create
        assert opt(create, "--user-data-file") == "runner.json" and opt(create, "--tag-names") == "gitlab-runners"
        assert opt(create, "--image") == "123456" and opt(create, "--region") == "ams3"
        state = {d["id"]: d["status"] for d in fake.get_state()["droplets"] if d["tag"] == "gitlab-runners"}
        assert sorted(state.values()) == ["active", "new", "new", "new"], state
        assert any(d["id"] == 5 for d in fake.get_state()["droplets"]), "another fleet's Droplet was touched"
        # The cloud firewall: created before any Droplet, applied by tag, SSH in only when asked.
        (fw,) = find(calls, "doctl", "compute", "firewall", "create")
        assert calls.index(fw) < calls.index(create), "Droplets were created before their firewall"
        assert opt(fw, "--name") == "gitlab-runners" and opt(fw, "--tag-names") == "gitlab-runners", fw
        assert "--inbound-rules" not in fw, "no SSH_SOURCE: nothing may come in"
        outbound = opt(fw, "--outbound-rules").split(" ")
        assert {r.split(",")[0] for r in outbound} == {"protocol:tcp", "protocol:udp", "protocol:icmp"}, outbound
        assert all("address:0.0.0.0/0" in r and "address:::/0" in r for r in outbound), outbound

        # Nothing to do: the two listings only (the firewall exists now).
        _, calls = fake.run(script, "reconcile", env=env)
        assert [c[1:4] for c in calls] == [["compute", "droplet", "list"], ["compute", "firewall", "list"]], calls

        # A large fleet is created ten names per request.
        fake.set_state({})
        _, calls = fake.run(script, "reconcile", env={**env, "COUNT": "23"})
        sizes = [len([a for a in c[4:] if a.startswith("gitlab-runners-")]) for c in find(calls, "doctl", "compute", "droplet", "create")]
        assert sizes == [10, 10, 3], sizes

        # COUNT=0 drains: finished Droplets are destroyed, none created.
        fake.set_state({"droplets": [{"id": 7, "status": "off", "tag": "gitlab-runners", "created_at": young}]})
        _, calls = fake.run(script, "reconcile", env={**env, "COUNT": "0"})
        assert not [c for c in calls if c[3:4] == ["create"] and c[2] == "droplet"]
        assert fake.get_state()["droplets"] == []

        # delete: every Droplet still up is shut down (the agent deregisters) before the destroy.
        fake.set_state({**fake.get_state(), "droplets": [
            {"id": 7, "status": "off", "tag": "gitlab-runners", "created_at": young},
            {"id": 8, "status": "active", "tag": "gitlab-runners", "created_at": young},
            {"id": 9, "status": "new", "tag": "gitlab-runners", "created_at": young},
            {"id": 5, "status": "active", "tag": "something-else", "created_at": young}]})
        _, calls = fake.run(script, "delete", env=env)
        (delete,) = find(calls, "doctl", "compute", "droplet", "delete")
        assert opt(delete, "--tag-name") == "gitlab-runners" and "--force" in delete
        shutdowns = find(calls, "doctl", "compute", "droplet-action", "shutdown")
        assert sorted(c[4] for c in shutdowns) == ["8", "9"] and all("--wait" in c for c in shutdowns), shutdowns
        assert all(calls.index(c) < calls.index(delete) for c in shutdowns), calls
        assert [d["id"] for d in fake.get_state()["droplets"]] == [5]
        (fwdel,) = find(calls, "doctl", "compute", "firewall", "delete")
        assert "--force" in fwdel and not fake.get_state()["firewalls"], fwdel
        # An empty fleet: nothing to shut down.
        _, calls = fake.run(script, "delete", env=env)
        assert not find_none(calls, "doctl", "compute", "droplet-action"), calls

        proc, calls = fake.run(script, "reconcile", env={"REGION": "ams3"}, check=False)
        assert proc.returncode != 0 and "IMAGE" in proc.stderr and not calls, proc.stderr


def test_digital_ocean_lifetime_cap_and_ssh_source():
    """Droplets older than MAX_AGE (default 6 h) are destroyed and replaced; young ones kept."""
    script = DO / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        (Path(tmp) / "runner.json").write_text('{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n')
        env = {"IMAGE": "123456", "REGION": "ams3", "COUNT": "3", "SSH_SOURCE": "203.0.113.7/32,2001:db8::/64"}
        fake.set_state({"droplets": [
            {"id": 1, "status": "active", "tag": "gitlab-runners", "created_at": iso(6 * 3600 + 120)},  # past the cap
            {"id": 2, "status": "new", "tag": "gitlab-runners", "created_at": iso(7 * 86400)},  # stuck, and old
            {"id": 3, "status": "active", "tag": "gitlab-runners", "created_at": iso(5 * 3600)},  # young enough
            {"id": 4, "status": "active", "tag": "other", "created_at": iso(30 * 86400)},  # not ours
        ]})
        proc, calls = fake.run(script, "reconcile", env=env)
        (delete,) = find(calls, "doctl", "compute", "droplet", "delete")
        assert sorted(a for a in delete if a.isdigit()) == ["1", "2"], delete
        # A destroy is no shutdown: each Droplet still up is shut down (ACPI) first, and waited for.
        shutdowns = find(calls, "doctl", "compute", "droplet-action", "shutdown")
        assert sorted(c[4] for c in shutdowns) == ["1", "2"] and all("--wait" in c for c in shutdowns), shutdowns
        assert all(calls.index(c) < calls.index(delete) for c in shutdowns), calls
        (create,) = find(calls, "doctl", "compute", "droplet", "create")
        assert len([a for a in create[4:] if a.startswith("gitlab-runners-")]) == 2, create
        assert calls.index(delete) < calls.index(create)
        ids = sorted(d["id"] for d in fake.get_state()["droplets"])
        assert 3 in ids and 4 in ids and 1 not in ids and 2 not in ids, ids
        (fw,) = find(calls, "doctl", "compute", "firewall", "create")
        assert opt(fw, "--inbound-rules") == "protocol:tcp,ports:22,address:203.0.113.7/32,address:2001:db8::/64", fw
        # A shorter cap, from the environment.
        fake.set_state({"droplets": [{"id": 9, "status": "active", "tag": "gitlab-runners", "created_at": iso(3600)}]})
        _, calls = fake.run(script, "reconcile", env={**env, "COUNT": "1", "MAX_AGE": "1800"})
        (delete,) = find(calls, "doctl", "compute", "droplet", "delete")
        assert [a for a in delete if a.isdigit()] == ["9"], delete


def test_digital_ocean_failures_create_and_destroy_nothing():
    """A list that fails as doctl fails (a 429 after its retries, exit 1) stops the run: no
    create, no destroy; so does a failed destroy (no replacement for Droplets still up)."""
    script = DO / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        (Path(tmp) / "runner.json").write_text('{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n')
        env = {"IMAGE": "123456", "REGION": "ams3", "COUNT": "3"}
        droplets = [
            {"id": 1, "status": "off", "tag": "gitlab-runners", "created_at": iso(600)},
            {"id": 2, "status": "active", "tag": "gitlab-runners", "created_at": iso(86400)},
        ]
        too_many = "Error: GET https://api.digitalocean.com/v2/droplets?tag_name=gitlab-runners: 429 Too many requests"
        for fail in ({"compute droplet list": too_many},
                     {"compute firewall list": too_many.replace("droplets?tag_name=gitlab-runners", "firewalls")},
                     {"compute firewall create": "Error: POST https://api.digitalocean.com/v2/firewalls: 500 Server Error"}):
            fake.set_state({"droplets": droplets, "fail": fail})
            proc, calls = fake.run(script, "reconcile", env=env, check=False)
            changes = [c for c in calls if c[2:4] in (["droplet", "create"], ["droplet", "delete"])]
            assert proc.returncode != 0 and not changes, (fail, proc.stdout, proc.stderr, changes)
            assert "nothing created or destroyed" in proc.stderr, proc.stderr
            assert fake.get_state()["droplets"] == droplets
        # A destroy that fails: nothing is created in its place.
        fake.set_state({"droplets": droplets, "firewalls": [{"id": "fw-0", "name": "gitlab-runners"}],
                        "fail": {"compute droplet delete": "Error: DELETE https://api.digitalocean.com/v2/droplets/1: 503"}})
        proc, calls = fake.run(script, "reconcile", env=env, check=False)
        assert proc.returncode != 0 and not [c for c in calls if c[2:4] == ["droplet", "create"]], calls
        # An answer that is not the JSON expected is a failure, not an empty fleet.
        fake.set_state({"droplets": droplets, "fail": {}})
        bad = Path(tmp) / "bin-bad"
        bad.mkdir()
        (bad / "doctl").write_text("#!/bin/sh\necho \"$*\" >>\"$FAKE_LOG.bad\"\necho '<html>Bad gateway</html>'\n")
        (bad / "doctl").chmod(0o755)
        proc, _ = fake.run(script, "reconcile", env={**env, "PATH": f"{bad}:{os.environ['PATH']}"}, check=False)
        made = Path(str(fake.log) + ".bad").read_text().splitlines()
        assert proc.returncode != 0 and not [m for m in made if m.startswith(("compute droplet create", "compute droplet delete"))], made
        # Lists that doctl could print cut short or malformed (exit 0): each a failure, never an
        # empty fleet. An empty list is an empty fleet.
        for raw in ('{"id": "too_many_requests", "message": "API Rate limit exceeded."}',
                    '[{"id": 1, "status": "off", "created_at": "2026-12-06T06:',
                    '[{"id": 1, "status": "active"}]',
                    '[{"id": "1 off 2026-01-01T00:00:00Z", "status": "active", "created_at": "2026-01-01T00:00:00Z"}]',
                    '[{"id": 1, "status": "active", "created_at": "yesterday"}]',
                    ''):
            fake.set_state({"droplets": droplets, "raw": {"compute droplet list": raw}})
            proc, calls = fake.run(script, "reconcile", env=env, check=False)
            changes = [c for c in calls if c[2:4] in (["droplet", "create"], ["droplet", "delete"])]
            assert proc.returncode != 0 and not changes, (raw, proc.stdout, proc.stderr, changes)
            assert "nothing created or destroyed" in proc.stderr, (raw, proc.stderr)
        fake.set_state({"droplets": droplets, "raw": {"compute droplet list": "[]\n"}})
        proc, calls = fake.run(script, "reconcile", env=env)
        (create,) = find(calls, "doctl", "compute", "droplet", "create")
        assert len([a for a in create if a.startswith("gitlab-runners-")]) == 3, create
        # A list that hangs (a connection that never answers): cut at CLI_TIMEOUT, nothing changed.
        fake.set_state({"droplets": droplets, "hang": {"compute droplet list": 60}})
        start = time.monotonic()
        proc, calls = fake.run(script, "reconcile", env={**env, "CLI_TIMEOUT": "1"}, check=False)
        assert time.monotonic() - start < 15, "the hung list was not cut at CLI_TIMEOUT"
        assert proc.returncode != 0 and "did not finish within 1 s" in proc.stderr, proc.stderr
        assert not [c for c in calls if c[2:4] in (["droplet", "create"], ["droplet", "delete"])], calls
        # Settings that are not numbers stop the run before any call.
        for bad in ({"COUNT": "3; reboot"}, {"MAX_AGE": "6h"}, {"CLI_TIMEOUT": "-1"}):
            proc, calls = fake.run(script, "reconcile", env={**env, **bad}, check=False)
            assert proc.returncode != 0 and not calls and next(iter(bad)) in proc.stderr, (bad, proc.stderr, calls)


def do_fleet(tmp):
    fake = Fake(tmp)
    (Path(tmp) / "runner.json").write_text('{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME"}\n')
    return fake


def test_digital_ocean_lock():
    """Two reconciles at once (the first slowed down, as doctl's retries of a 429 do): the second
    finds the fleet's lock held, calls nothing and exits 0; COUNT Droplets are created once.
    The same two runs without a shared lock both create: the test can fail. `delete` waits for
    the lock instead of racing a reconcile."""
    script = DO / "runner-fleet.sh"
    env = {"IMAGE": "123456", "REGION": "ams3", "COUNT": "3"}

    def overlapping(fake, lock_first, lock_second):
        fake.log.write_text("")
        fake.set_state({"firewalls": [{"id": "fw-0", "name": "gitlab-runners"}], "hang": {"compute droplet list": 3}})
        first = subprocess.Popen([str(script), "reconcile"], env=fake.environ({**env, "LOCK_FILE": lock_first}),
                                 cwd=fake.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        second = subprocess.run([str(script), "reconcile"], env=fake.environ({**env, "LOCK_FILE": lock_second}),
                                cwd=fake.tmp, capture_output=True, text=True, timeout=60)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, out + err
        return second, fake.calls()

    with tempfile.TemporaryDirectory() as tmp:
        fake = do_fleet(tmp)
        lock = str(Path(tmp) / "fleet.lock")
        second, calls = overlapping(fake, lock, lock)
        assert second.returncode == 0 and "holds the fleet's lock" in second.stderr, second.stderr
        lists = find(calls, "doctl", "compute", "droplet", "list")
        assert len(lists) == 1, "the second run called doctl although the lock was held"
        (create,) = find(calls, "doctl", "compute", "droplet", "create")
        assert len([a for a in create if a.startswith("gitlab-runners-")]) == 3, create
        assert len(fake.get_state()["droplets"]) == 3, fake.get_state()["droplets"]
        # Without a shared lock: both list an empty fleet and both create (what the lock prevents).
        _, calls = overlapping(fake, str(Path(tmp) / "a.lock"), str(Path(tmp) / "b.lock"))
        assert len(find(calls, "doctl", "compute", "droplet", "create")) == 2, calls

        # delete during a reconcile: waits for it, then destroys what it created.
        fake.log.write_text("")
        fake.set_state({"firewalls": [{"id": "fw-0", "name": "gitlab-runners"}], "hang": {"compute droplet list": 2}})
        first = subprocess.Popen([str(script), "reconcile"], env=fake.environ(env), cwd=fake.tmp,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        delete = subprocess.run([str(script), "delete"], env=fake.environ(env), cwd=fake.tmp, capture_output=True, text=True, timeout=60)
        first.communicate(timeout=60)
        assert delete.returncode == 0, delete.stderr
        calls = fake.calls()
        (create,) = find(calls, "doctl", "compute", "droplet", "create")
        (destroy,) = find(calls, "doctl", "compute", "droplet", "delete")
        assert calls.index(create) < calls.index(destroy) and not fake.get_state()["droplets"], calls
        # A lock file that cannot be opened: a clear error, nothing called.
        proc, calls = fake.run(script, "reconcile", env={**env, "LOCK_FILE": str(Path(tmp) / "no" / "such" / "dir")}, check=False)
        assert proc.returncode != 0 and "LOCK_FILE" in proc.stderr and not calls, proc.stderr


def test_digital_ocean_watch_keeps_going():
    """watch reports a failed run and runs again INTERVAL seconds later: a list that fails twice
    (429) and then answers leads to COUNT Droplets; within a run a failed create stops that run
    (set -e holds in each run), and the next run creates what is missing."""
    script = DO / "runner-fleet.sh"
    too_many = "Error: GET https://api.digitalocean.com/v2/droplets?tag_name=gitlab-runners: 429 Too many requests"
    with tempfile.TemporaryDirectory() as tmp:
        fake = do_fleet(tmp)
        env = fake.environ({"IMAGE": "123456", "REGION": "ams3", "COUNT": "2", "INTERVAL": "1"})
        fake.set_state({"fail_times": {"compute droplet list": [2, too_many]}})
        err = watch_until(script, env, tmp, lambda: len(fake.get_state().get("droplets", [])) == 2)
        assert err.count("reconcile failed (exit 1); trying again in 1 s") == 2, err
        assert len(fake.get_state()["droplets"]) == 2 and len(find(fake.calls(), "doctl", "compute", "droplet", "create")) == 1
        # A failed create (the first of three requests) ends that run; the next run lists again.
        fake.log.write_text("")
        fake.set_state({"fail_times": {"compute droplet create": [1, "Error: POST https://api.digitalocean.com/v2/droplets: 503"]}})
        err = watch_until(script, {**env, "COUNT": "23"}, tmp, lambda: len(fake.get_state().get("droplets", [])) >= 23)
        calls = fake.calls()
        first = calls.index(find(calls, "doctl", "compute", "droplet", "create")[0])
        assert calls[first + 1][1:4] == ["compute", "droplet", "list"], calls[first:first + 3]
        assert "creating Droplets failed" in err and len(fake.get_state()["droplets"]) == 23, err


def test_digital_ocean_shutdown_that_hangs():
    """A Droplet past the cap whose shutdown never completes is destroyed after SHUTDOWN_TIMEOUT
    all the same, with a warning, and replaced; so is one whose shutdown action fails."""
    script = DO / "runner-fleet.sh"
    with tempfile.TemporaryDirectory() as tmp:
        fake = do_fleet(tmp)
        env = {"IMAGE": "123456", "REGION": "ams3", "COUNT": "1", "SHUTDOWN_TIMEOUT": "1"}
        old = [{"id": 1, "status": "active", "tag": "gitlab-runners", "created_at": iso(7 * 3600)}]
        for trouble in ({"hang": {"compute droplet-action shutdown": 60}},
                        {"fail": {"compute droplet-action shutdown": "Error: POST https://api.digitalocean.com/v2/droplets/1/actions: 429 Too many requests"}}):
            fake.set_state({"droplets": old, **trouble})
            start = time.monotonic()
            proc, calls = fake.run(script, "reconcile", env=env)
            assert time.monotonic() - start < 15, "the shutdown was waited for past SHUTDOWN_TIMEOUT"
            assert "Droplet 1 did not shut down within 1 s" in proc.stderr, proc.stderr
            (delete,) = find(calls, "doctl", "compute", "droplet", "delete")
            assert "1" in delete, delete
            assert [d["id"] for d in fake.get_state()["droplets"]] != [1] and len(fake.get_state()["droplets"]) == 1


def script_settings(script):
    """{NAME: default or None} of a fleet script: the settings its header lists, with the
    defaults its code gives them (`${NAME:-x}`, `whole NAME x`)."""
    text = script.read_text()
    header = text.split("\nset -euo pipefail", 1)[0]
    block = header.split("# Settings (environment", 1)[1]
    names = re.findall(r"^#   ([A-Z][A-Z0-9_]+)\b", block, re.M)
    defaults = dict(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-([^}$]+)\}", text))
    defaults.update(re.findall(r"\$\(whole ([A-Z][A-Z0-9_]+) ([^)\s]+)\)", text))
    return {n: defaults.get(n) for n in names}


def env_file(path):
    """{KEY: value} of a KEY=value file, commented-out keys as None."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]+)=(\S*)", line.strip())
        if m:
            out[m[2]] = None if m[1] else m[3]
    return out


FLEET_UNITS = {"digital-ocean": "DIGITALOCEAN_ACCESS_TOKEN", "proxmox": None}


def test_fleet_settings_units_and_pages():
    """Each fleet script's fleet.env names every setting of the script (and nothing else but
    the CLI's token), with the script's defaults; sh reads it; its service runs `watch` with
    that file, restarts, and passes `systemd-analyze verify`; the page states the defaults the
    script has, and installs the files where the unit looks for them."""
    problems = []
    for platform, extra in FLEET_UNITS.items():
        script = EXAMPLES / platform / "runner-fleet.sh"
        settings = script_settings(script)
        env = env_file(EXAMPLES / platform / "fleet.env")
        page = (ROOT / "docs" / f"{platform}.md").read_text()
        where = f"examples/{platform}"
        problems += [f"{where}/fleet.env: no {n}" for n in settings if n not in env]
        problems += [f"{where}/fleet.env: {k} is no setting of runner-fleet.sh" for k in env if k not in settings and k != extra]
        for name, default in settings.items():
            value = env.get(name)
            if default and value is not None and "$" not in default and value != default and name not in ("RUNNER_JSON", "LOCK_FILE", "IMAGE"):
                problems.append(f"{where}/fleet.env: {name}={value}, the script's default is {default}")
            # The page's "default N" next to a setting is the script's.
            for m in re.finditer(rf"`{name}`[^`]{{0,40}}?default\s+`?([0-9]+)", page):
                if default != m[1]:
                    problems.append(f"docs/{platform}.md: {name} default {m[1]}, the script's is {default}")
        proc = subprocess.run(["sh", "-c", 'set -a; . "$1"; printf %s "$TAG"', "sh", str(EXAMPLES / platform / "fleet.env")],
                              capture_output=True, text=True)
        if proc.returncode or proc.stderr:
            problems.append(f"{where}/fleet.env: sh cannot read it: {proc.stderr}")
        unit = (EXAMPLES / platform / "runner-fleet.service").read_text()
        service = dict(re.findall(r"^(\w+)=(.*)$", unit.split("[Service]", 1)[1].split("[Install]", 1)[0], re.M))
        exe, _, verb = service["ExecStart"].partition(" ")
        if verb != "watch" or service.get("Restart") != "always":
            problems.append(f"{where}/runner-fleet.service: ExecStart {service['ExecStart']}, Restart {service.get('Restart')}")
        for path in (exe, service["EnvironmentFile"]):
            if path not in page:
                problems.append(f"docs/{platform}.md does not install {path} (runner-fleet.service uses it)")
        if service["EnvironmentFile"] not in (EXAMPLES / platform / "fleet.env").read_text():
            problems.append(f"{where}/fleet.env does not say it goes to {service['EnvironmentFile']}")
        if shutil.which("systemd-analyze"):
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "gitlab-runner-fleet.service"
                copy.write_text(unit.replace(exe, str(script)))
                proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
                if proc.returncode or str(copy) in proc.stderr:
                    problems.append(f"{where}/runner-fleet.service: systemd-analyze verify: {proc.stdout}{proc.stderr}")
    assert not problems, "\n".join(problems)


def test_fleet_shutdown_timeout_covers_the_agent():
    """SHUTDOWN_TIMEOUT's default leaves the agent its --stop-timeout and --deregister-timeout
    (README's table), as each script's comment and page say; MAX_AGE's 6 h is the agent's
    --hold-max (4 h) and a job's hour with margin."""
    readme = (ROOT / "README.md").read_text()

    def flag(name):
        return int(re.search(rf"^\| `--{name}` \|[^|]*\| (\d+) \|", readme, re.M)[1])

    stop, deregister, hold = flag("stop-timeout"), flag("deregister-timeout"), flag("hold-max")
    problems = []
    for platform in FLEET_UNITS:
        script = EXAMPLES / platform / "runner-fleet.sh"
        text, page = script.read_text(), (ROOT / "docs" / f"{platform}.md").read_text()
        settings = script_settings(script)
        if not int(settings["SHUTDOWN_TIMEOUT"]) > stop + deregister:
            problems.append(f"{platform}: SHUTDOWN_TIMEOUT {settings['SHUTDOWN_TIMEOUT']} <= {stop} + {deregister}")
        if f"--stop-timeout ({stop} s) and --deregister-timeout ({deregister} s)" not in text:
            problems.append(f"{platform}: the script's comment does not give the agent's {stop} s and {deregister} s")
        if not re.search(rf"`--stop-timeout`, {stop} s, and\s+`--deregister-timeout`, {deregister} s", page):
            problems.append(f"docs/{platform}.md does not give the agent's {stop} s and {deregister} s")
        if not (int(settings["MAX_AGE"]) > hold + 3600 and f"--hold-max ({hold // 3600} h)" in text):
            problems.append(f"{platform}: MAX_AGE {settings['MAX_AGE']} against --hold-max {hold}")
    assert not problems, "\n".join(problems)


PVE = EXAMPLES / "proxmox"
PVE_RUNNER_JSON = '{"url": "https://gitlab.example.com", "token": "glrt-REPLACE-ME", "max_jobs": 1}\n'


def pve_fleet(tmp, vms):
    """A Proxmox node with a runner template (9000) and the given VMs; (fake, env)."""
    fake = Fake(tmp)
    (Path(tmp) / "runner.json").write_text(PVE_RUNNER_JSON)
    fake.set_state({"node": "pve", "vms": [
        {"vmid": 9000, "name": "gitlab-runner-template", "status": "stopped", "template": True,
         "config": {"scsi0": "local-lvm:base-9000-disk-0", "serial0": "socket", "agent": "1"}}, *vms]})
    env = {"TEMPLATE": "9000", "NODE": "pve", "COUNT": "3", "ISO_DIR": str(Path(tmp) / "iso")}
    return fake, env


def pve_name(seconds_ago, n=0):
    """A fleet VM's name, created seconds_ago seconds ago (UTC in the name, as the script makes it)."""
    return "gitlab-runners-" + time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() - seconds_ago)) + f"-{n}"


def iso_contents(path):
    """(volume label, runner.json) of a config ISO, read as the guest reads it."""
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(path)], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runner.json"
        subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(path), "-extract", "/runner.json", str(out)],
                       capture_output=True, check=True)
        return label, json.loads(out.read_text())


def pve_changes(calls):
    return [c for c in calls if c[0] == "qm" and c[1] in ("clone", "destroy", "start", "set", "shutdown", "stop")]


def test_proxmox_runner_fleet():
    """Stopped runner VMs destroyed with their ISOs, other VMs untouched, missing ones cloned from
    the template, each with runner.json (its own name) on an ISO 9660 CD-ROM labelled cfgdata,
    root's only, then started; COUNT=0 drains; leftovers swept; removal."""
    with tempfile.TemporaryDirectory() as tmp:
        young, stopped = pve_name(600, 0), pve_name(900, 1)
        fake, env = pve_fleet(tmp, [
            {"vmid": 101, "name": young, "status": "running"},
            {"vmid": 102, "name": stopped, "status": "stopped"},
            {"vmid": 200, "name": "db", "status": "stopped"},
            {"vmid": 201, "name": "gitlab-runners-prod", "status": "stopped"},
            {"vmid": 202, "name": "gitlab-runners-20200101000000-0-x", "status": "stopped"},
        ])
        iso = Path(env["ISO_DIR"])
        iso.mkdir(mode=0o700)
        (iso / f"{stopped}.iso").write_text("old")
        (iso / f"{young}.iso").write_text("in use")
        (iso / "gitlab-runners-20200101000000-7.iso").write_text("orphan")  # its VM is gone
        (iso / ".stage.abc123").mkdir()  # a killed run's staging copy
        (iso / ".stage.abc123" / "runner.json").write_text(PVE_RUNNER_JSON)
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env)
        (listing,) = find(calls, "pvesh", "get", "/nodes/pve/qemu")
        assert opt(listing, "--output-format") == "json"
        (destroy,) = find(calls, "qm", "destroy")
        assert destroy[2] == "102" and opt(destroy, "--purge") == "1" and opt(destroy, "--destroy-unreferenced-disks") == "1", destroy
        assert not find_none(calls, "qm", "shutdown"), "a stopped VM needs no shutdown"
        state = fake.get_state()
        ids = {v["vmid"] for v in state["vms"]}
        assert {9000, 101, 200, 201, 202} <= ids and 102 not in ids, ids
        new = [v for v in state["vms"] if v["vmid"] not in (9000, 101, 200, 201, 202)]
        assert len(new) == 2 and all(v["status"] == "running" and v["clone_of"] == 9000 and not v["full"] for v in new), new
        for v in new:
            assert re.fullmatch(r"gitlab-runners-[0-9]{14}-[0-9]+", v["name"]), v
            assert v["tags"] == "gitlab-runners", v
            path, _, media = v["config"]["ide2"].partition(",")
            assert media == "media=cdrom" and path == str(iso / f"{v['name']}.iso"), v["config"]
            label, runner = iso_contents(path)
            assert label == "cfgdata", label
            assert runner == {**json.loads(PVE_RUNNER_JSON), "name": v["name"]}, runner
            assert os.stat(path).st_mode & 0o777 == 0o600, oct(os.stat(path).st_mode)
            order = [c[1] for c in calls if c[0] == "qm" and str(v["vmid"]) == (c[3] if c[1] == "clone" else c[2])]
            assert order == ["clone", "set", "start"], order
        assert os.stat(iso).st_mode & 0o777 == 0o700
        assert sorted(p.name for p in iso.iterdir()) == sorted([f"{young}.iso"] + [f"{v['name']}.iso" for v in new]), list(iso.iterdir())
        assert "1 VM(s) up, 3 wanted: creating 2" in proc.stdout, proc.stdout
        assert "glrt-" not in proc.stdout + proc.stderr, "the token was printed"

        # Nothing to do: the listing only.
        _, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env)
        assert [c[:2] for c in calls] == [["pvesh", "get"]], calls

        # Full clones on a storage, a scratch disk.
        fake.set_state({**fake.get_state(), "vms": [v for v in fake.get_state()["vms"] if v["vmid"] in (9000, 200)]})
        _, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "COUNT": "1", "CLONE_STORAGE": "tank", "SCRATCH": "local-lvm:50"})
        (clone,) = find(calls, "qm", "clone")
        assert opt(clone, "--full") == "1" and opt(clone, "--storage") == "tank", clone
        (qset,) = find(calls, "qm", "set")
        assert opt(qset, "--virtio1") == "local-lvm:50,serial=scratch", qset

        # COUNT=0 drains: the stopped one destroyed, none cloned.
        vms = fake.get_state()["vms"]
        for v in vms:
            if v["vmid"] not in (9000, 200):
                v["status"] = "stopped"
        fake.set_state({**fake.get_state(), "vms": vms})
        _, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "COUNT": "0"})
        assert not find_none(calls, "qm", "clone") and len(find(calls, "qm", "destroy")) == 1
        assert not list(iso.glob("*.iso")), list(iso.iterdir())

        # A TEMPLATE that is no template: nothing cloned, the reason said.
        fake.set_state({**fake.get_state(), "vms": [*fake.get_state()["vms"], {"vmid": 300, "name": "plain-vm", "status": "stopped"}]})
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "TEMPLATE": "300"}, check=False)
        assert proc.returncode != 0 and "no template" in proc.stderr and not find_none(calls, "qm", "clone"), proc.stderr

        # delete: running VMs shut down first, then every fleet VM destroyed, ISOs removed.
        fake.run(PVE / "runner-fleet.sh", "reconcile", env=env)
        vms = fake.get_state()["vms"]
        next(v for v in vms if v["vmid"] not in (9000, 200, 300))["status"] = "stopped"
        fake.set_state({**fake.get_state(), "vms": vms})
        _, calls = fake.run(PVE / "runner-fleet.sh", "delete", env=env)
        shutdowns = find(calls, "qm", "shutdown")
        destroys = find(calls, "qm", "destroy")
        assert len(shutdowns) == 2 and len(destroys) == 3, calls
        assert max(calls.index(c) for c in shutdowns) < min(calls.index(c) for c in destroys), calls
        assert {v["vmid"] for v in fake.get_state()["vms"]} == {9000, 200, 300} and not list(iso.glob("*.iso"))
        _, calls = fake.run(PVE / "runner-fleet.sh", "delete", env=env)
        assert not pve_changes(calls), "an empty fleet: nothing to shut down or destroy"

        # Settings are checked before any call.
        for bad, word in (({"TEMPLATE": ""}, "TEMPLATE"), ({"TEMPLATE": "90; reboot"}, "TEMPLATE"), ({"SCRATCH": "local-lvm"}, "SCRATCH"),
                          ({"COUNT": "two"}, "COUNT"), ({"RUNNER_JSON": "missing.json"}, "missing.json"),
                          ({"TAG": "runners.*"}, "TAG"), ({"TAG": "Runners"}, "TAG")):
            proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, **bad}, check=False)
            assert proc.returncode != 0 and word in proc.stderr and not calls, (bad, proc.stderr, calls)
        (Path(tmp) / "bad.json").write_text('{"url": "https://gitlab.example.com", "token": ')
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "RUNNER_JSON": "bad.json"}, check=False)
        assert proc.returncode != 0 and "not a JSON object" in proc.stderr and not calls, proc.stderr
        assert "glrt-" not in proc.stdout + proc.stderr


def find_none(calls, *prefix):
    return [c for c in calls if c[: len(prefix)] == list(prefix)]


def test_proxmox_lifetime_cap():
    """A running VM past MAX_AGE is shut down (qm shutdown --timeout SHUTDOWN_TIMEOUT --forceStop 1),
    then destroyed and replaced; one whose shutdown fails or hangs is stopped hard, then destroyed."""
    with tempfile.TemporaryDirectory() as tmp:
        old = pve_name(6 * 3600 + 120)
        fake, env = pve_fleet(tmp, [{"vmid": 101, "name": old, "status": "running"},
                                    {"vmid": 102, "name": pve_name(5 * 3600, 1), "status": "running"}])
        env["COUNT"] = "2"
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env)
        (shutdown,) = find(calls, "qm", "shutdown")
        assert shutdown[2] == "101" and opt(shutdown, "--timeout") == "120" and opt(shutdown, "--forceStop") == "1", shutdown
        (destroy,) = find(calls, "qm", "destroy")
        assert destroy[2] == "101" and calls.index(shutdown) < calls.index(destroy)
        assert fake.get_state()["destroyed"] == [{"vmid": 101, "shut_down": True, "purge": "1", "unreferenced": "1"}]
        assert len(find(calls, "qm", "clone")) == 1 and len(fake.get_state()["vms"]) == 3
        # A shorter cap.
        _, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "MAX_AGE": "3600"})
        assert [c[2] for c in find(calls, "qm", "destroy")] == ["102"], calls
        for trouble in ({"fail": {"shutdown": "VM quit/powerdown failed"}}, {"hang": {"shutdown": 60}}):
            young = [v for v in fake.get_state()["vms"] if v["vmid"] != 9000]
            for v in young:
                v["name"] = pve_name(7 * 3600, v["vmid"])
            fake.set_state({**fake.get_state(), "vms": [*fake.get_state()["vms"][:1], *young], **trouble})
            start = time.monotonic()
            proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "SHUTDOWN_TIMEOUT": "1"})
            assert time.monotonic() - start < 30, "a hung shutdown was waited for"
            assert "did not shut down within 1 s" in proc.stderr, proc.stderr
            stops = find(calls, "qm", "stop")
            destroys = find(calls, "qm", "destroy")
            assert sorted(c[2] for c in stops) == sorted(c[2] for c in destroys) == sorted(str(v["vmid"]) for v in young), calls
            fake.set_state({**fake.get_state(), "fail": {}, "hang": {}})


def test_proxmox_failures_create_and_destroy_nothing():
    """A list that fails (an unknown node, pvesh's error), hangs, or is not one JSON array of VMs
    creates and destroys nothing; a failed destroy clones nothing; a failed clone leaves no ISO;
    a VM left stopped by a failed `qm set` or `qm start` is destroyed by the next run."""
    with tempfile.TemporaryDirectory() as tmp:
        vms = [{"vmid": 101, "name": pve_name(600), "status": "stopped"}]
        fake, env = pve_fleet(tmp, vms)
        base = fake.get_state()
        for trouble, extra in (({}, {"NODE": "pve2"}),
                               ({"fail": {"get /nodes/pve/qemu": "ipcc_send_rec[1] failed: Connection refused"}}, {}),
                               ({"hang": {"get /nodes/pve/qemu": 60}}, {"CLI_TIMEOUT": "1"}),
                               ({"raw": {"get /nodes/pve/qemu": ""}}, {}),
                               ({"raw": {"get /nodes/pve/qemu": '{"data": []}'}}, {}),
                               ({"raw": {"get /nodes/pve/qemu": '[{"vmid": 101, "name": "x"'}}, {}),
                               ({"raw": {"get /nodes/pve/qemu": '[{"vmid": "101", "status": "stopped"}]'}}, {}),
                               ({"raw": {"get /nodes/pve/qemu": "[] []"}}, {})):
            fake.set_state({**base, **trouble})
            start = time.monotonic()
            proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, **extra}, check=False)
            assert time.monotonic() - start < 20
            assert proc.returncode != 0 and not pve_changes(calls), (trouble, extra, proc.stderr, calls)
            assert "nothing created or destroyed" in proc.stderr, (trouble, proc.stderr)
        # A destroy that fails: no clone.
        fake.set_state({**base, "fail": {"destroy": "VM 101 is locked (backup)"}})
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env, check=False)
        assert proc.returncode != 0 and not find_none(calls, "qm", "clone"), calls
        # A clone that fails: its ISO (with the token) is removed at once.
        fake.set_state({**base, "fail": {"clone": "clone failed: cfs-lock 'storage-local-lvm' error: got lock request timeout"}})
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env, check=False)
        assert proc.returncode != 0 and len(find(calls, "qm", "clone")) == 1 and not list(Path(env["ISO_DIR"]).glob("*")), proc.stderr
        # A failed set or start leaves a stopped VM: the next run destroys it (and its ISO).
        for verb in ("set", "start"):
            fake.set_state({**base, "vms": base["vms"][:1], "fail_times": {verb: [1, f"{verb} failed: got timeout"]}})
            proc, _ = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env, check=False)
            assert proc.returncode != 0 and "the next run destroys it" in proc.stderr, proc.stderr
            (left,) = [v for v in fake.get_state()["vms"] if v["vmid"] != 9000]
            assert left["status"] == "stopped"
            proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env=env)
            assert [c[2] for c in find(calls, "qm", "destroy")] == [str(left["vmid"])], calls
            running = [v for v in fake.get_state()["vms"] if v["vmid"] != 9000]
            assert len(running) == 3 and all(v["status"] == "running" for v in running)
            assert sorted(p.name for p in Path(env["ISO_DIR"]).glob("*.iso")) == sorted(f"{v['name']}.iso" for v in running)
        # A locked VM (a task of Proxmox's on it) is left alone and counted, with the fix said.
        fake.set_state({**base, "vms": [*base["vms"][:1], {"vmid": 101, "name": pve_name(600), "status": "stopped", "lock": "clone"}]})
        proc, calls = fake.run(PVE / "runner-fleet.sh", "reconcile", env={**env, "COUNT": "1"})
        assert not pve_changes(calls) and "qm unlock 101" in proc.stderr, (proc.stderr, calls)


def test_proxmox_lock_and_watch():
    """Two reconciles at once: the second finds the lock held and calls nothing; COUNT VMs are
    cloned once (without a shared lock, twice). watch goes on after failed runs."""
    with tempfile.TemporaryDirectory() as tmp:
        fake, env = pve_fleet(tmp, [])
        base = fake.get_state()

        def overlapping(lock_first, lock_second):
            fake.log.write_text("")
            fake.set_state({**base, "hang": {"get /nodes/pve/qemu": 3}})
            first = subprocess.Popen([str(PVE / "runner-fleet.sh"), "reconcile"], env=fake.environ({**env, "LOCK_FILE": lock_first}),
                                     cwd=fake.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(1)
            second = subprocess.run([str(PVE / "runner-fleet.sh"), "reconcile"], env=fake.environ({**env, "LOCK_FILE": lock_second}),
                                    cwd=fake.tmp, capture_output=True, text=True, timeout=90)
            out, err = first.communicate(timeout=90)
            return first, err, second, fake.calls()

        lock = str(Path(tmp) / "fleet.lock")
        first, err, second, calls = overlapping(lock, lock)
        assert first.returncode == 0, err
        assert second.returncode == 0 and "holds the fleet's lock" in second.stderr, second.stderr
        assert len(find(calls, "pvesh", "get", "/nodes/pve/qemu")) == 1 and len(find(calls, "qm", "clone")) == 3, calls
        # Without a shared lock the runs trip over each other (both clone, the second's clone
        # collides with the first's VM id, its sweep removes the first's new ISO): the check
        # above can fail.
        first, _, second, calls = overlapping(str(Path(tmp) / "a.lock"), str(Path(tmp) / "b.lock"))
        assert len(find(calls, "qm", "clone")) > 3 or first.returncode or second.returncode, calls

        fake.log.write_text("")
        fake.set_state({**base, "fail_times": {"get /nodes/pve/qemu": [2, "ipcc_send_rec[1] failed: Connection refused"]}})
        err = watch_until(PVE / "runner-fleet.sh", fake.environ({**env, "INTERVAL": "1"}), tmp,
                          lambda: len([v for v in fake.get_state()["vms"] if v["vmid"] != 9000]) >= 3)
        assert err.count("reconcile failed (exit 1); trying again in 1 s") == 2, err
        running = [v for v in fake.get_state()["vms"] if v["vmid"] != 9000]
        assert len(running) == 3 and len(find(fake.calls(), "qm", "clone")) == 3, running


REAPER_SOURCES = (ROOT / "vm-template.yaml", EXAMPLES / "kubevirt" / "pool.yaml")


def reaper(path):
    """(script, env) of the lifetime-cap CronJob in a KubeVirt manifest."""
    cron = next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"], container["command"]
    (script,) = container["args"]
    return script, {e["name"]: e["value"] for e in container["env"]}


def test_kubevirt_reaper_script():
    """The CronJob's script: shellcheck as POSIX sh, then against a stand-in kubectl: old runner
    VMIs deleted, young ones and other VMIs kept, a failed list deletes nothing."""
    scripts = {reaper(p)[0] for p in REAPER_SOURCES}
    assert len(scripts) == 1, "vm-template.yaml and pool.yaml carry different reaper scripts"
    script, env = reaper(REAPER_SOURCES[0])
    proc = subprocess.run([tool("shellcheck"), "-s", "sh", "-"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tempfile.TemporaryDirectory() as tmp:
        fake = Fake(tmp)
        path = Path(tmp) / "reaper.sh"
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
        runner = {"app.kubernetes.io/name": "gitlab-runner-vm"}
        cap = int(env["MAX_AGE_SECONDS"])
        vmis = [
            {"name": "gitlab-runner-nixos", "labels": runner, "created": iso(cap + 60)},
            {"name": "gitlab-runner-pool-1", "labels": runner, "created": iso(40 * 86400)},
            {"name": "gitlab-runner-pool-2", "labels": runner, "created": iso(cap - 600)},
            {"name": "someone-elses-vm", "labels": {"app": "db"}, "created": iso(400 * 86400)},
        ]
        fake.set_state({"vmis": vmis})
        proc, calls = fake.run(path, env=env)
        (get,) = find(calls, "kubectl", "get", "virtualmachineinstances")
        assert opt(get, "-l") == env["SELECTOR"] == "app.kubernetes.io/name=gitlab-runner-vm", get
        (delete,) = find(calls, "kubectl", "delete", "virtualmachineinstances")
        assert "--wait=false" in delete, delete
        assert sorted(a for a in delete[3:] if not a.startswith("-")) == ["gitlab-runner-nixos", "gitlab-runner-pool-1"], delete
        assert sorted(v["name"] for v in fake.get_state()["vmis"]) == ["gitlab-runner-pool-2", "someone-elses-vm"]
        # Nothing old: the list only, exit 0.
        proc, calls = fake.run(path, env=env)
        assert [c[1] for c in calls] == ["get"] and "no runner VMI" in proc.stdout, calls
        # No VMI at all.
        fake.set_state({"vmis": []})
        proc, calls = fake.run(path, env=env)
        assert [c[1] for c in calls] == ["get"], calls
        # A list that fails as kubectl fails (exit 1): nothing deleted, the Job fails.
        fake.set_state({"vmis": vmis, "fail": {"get virtualmachineinstances": "error: You must be logged in to the server (Unauthorized)"}})
        proc, calls = fake.run(path, env=env, check=False)
        assert proc.returncode != 0 and not [c for c in calls if c[1] == "delete"], calls
        assert "nothing deleted" in proc.stderr, proc.stderr
        # A bad cap: nothing is called.
        proc, calls = fake.run(path, env={**env, "MAX_AGE_SECONDS": "6h"}, check=False)
        assert proc.returncode != 0 and not calls, calls


# ---- 3. Coverage and the pages that use the examples ------------------------------------------

def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file, and an anchor it has."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {}
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        anchors[page.resolve()] = {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}
    problems = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page.resolve()
            if not dest.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest in anchors and anchor not in anchors[dest]:
                problems.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_docs_name_the_example_files():
    """The example files a page tells users to run or apply exist, and each example has a page."""
    docs = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    problems = []
    for name, text in docs.items():
        for ref in set(re.findall(r"examples/[\w./-]+\.(?:sh|yaml|json|service|env)", text)):
            if not (ROOT / ref).exists():
                problems.append(f"docs/{name}: {ref} does not exist")
    for example in [*EXAMPLES.rglob("*.sh"), *EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.service"), *EXAMPLES.rglob("*.env")]:
        ref = str(example.relative_to(ROOT))
        if not any(ref in text for text in docs.values()):
            problems.append(f"{ref} is on no page of docs/")
    assert not problems, "\n".join(problems)


def test_every_example_is_checked():
    covered = {
        *AWS.glob("*.yaml"), *AWS.glob("parameters-*.json"), *EXAMPLES.rglob("*.sh"),
        *EXAMPLES.rglob("runner-fleet.service"), *EXAMPLES.rglob("fleet.env"),  # test_fleet_settings_units_and_pages
        *(EXAMPLES / "kubevirt").glob("*.yaml"),  # tests/manifests
        *(EXAMPLES / "kubevirt" / "broker").glob("*.yaml"),  # tests/manifests/test_broker_manifests.py
    }
    others = [p for p in EXAMPLES.rglob("*") if p.is_file() and p not in covered and p.name != "README.md"]
    assert not others, "examples without a validator: " + ", ".join(str(p.relative_to(ROOT)) for p in others)


def main():
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    # `tests/examples/run digital_ocean proxmox`: only the checks whose names hold one of those.
    if sys.argv[1:]:
        tests = [(name, fn) for name, fn in tests if any(word in name for word in sys.argv[1:])]
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
