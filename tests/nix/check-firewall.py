#!/usr/bin/env python3
"""The metadata firewall (issue 17): only the units that need the metadata service reach it,
matched by cgroup, never by uid.

  check-firewall.py script       runs nixos-modules/metadata-firewall.sh against stand-in
                                 iptables, ip6tables and nft (fake_netfilter.py) and checks
                                 the rules it makes: setup, allow-self with a fake
                                 /proc/self/cgroup, revoke, idempotence, refusals.
  check-firewall.py facts FILE   checks the JSON of tests/nix/firewall-facts.nix: every runner
                                 image, both systems, iptables and nftables variants.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "nixos-modules", "metadata-firewall.sh")
AGENT = "system.slice/gitlab-runner-vm.service"

problems = []


def need(condition, message):
    if not condition:
        problems.append(message)
    return condition


# ---- the script against stand-ins ---------------------------------------------------------

class Sandbox:
    def __init__(self, root, backend):
        self.root = root
        self.backend = backend
        self.bin = os.path.join(root, "bin")
        self.proc = os.path.join(root, "proc")
        self.cgroup = os.path.join(root, "cgroup")
        for d in (self.bin, os.path.join(self.proc, "self"), self.cgroup):
            os.makedirs(d)
        # The stand-in tells the tools apart by the name it is called by.
        for tool in ("iptables", "ip6tables", "nft"):
            os.symlink(os.path.join(HERE, "fake_netfilter.py"), os.path.join(self.bin, tool))
        self.in_cgroup(AGENT + "/.control")

    def in_cgroup(self, path):
        """What the next run reads as /proc/self/cgroup (cgroup v1 lines first, as in hybrid mode)."""
        with open(os.path.join(self.proc, "self", "cgroup"), "w") as f:
            f.write(f"1:name=systemd:/{path}\n0::/{path}\n" if path else "0::/\n")

    def run(self, *args, ok=True):
        env = dict(os.environ,
                   PATH=self.bin + os.pathsep + os.environ["PATH"],
                   FAKE_NETFILTER_DIR=self.root,
                   METADATA_FIREWALL_BACKEND=self.backend,
                   METADATA_FIREWALL_ADDRESSES="169.254.169.254 fd00:ec2::254",
                   METADATA_FIREWALL_PROC=self.proc,
                   METADATA_FIREWALL_CGROUP=self.cgroup)
        run = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True)
        if ok and run.returncode != 0:
            problems.append(f"{self.backend}: `{' '.join(args)}` failed ({run.returncode}): {run.stderr.strip()}")
        if not ok and run.returncode == 0:
            problems.append(f"{self.backend}: `{' '.join(args)}` succeeded; it must refuse")
        return run

    def state(self):
        try:
            with open(os.path.join(self.root, "state.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"iptables": {}, "nft": {}}

    def log(self):
        try:
            with open(os.path.join(self.root, "log.jsonl")) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    # iptables: the rules of one chain as strings; nft: the rules of one chain of our table.
    def ipt(self, tool, table, chain):
        return [" ".join(r) for r in self.state()["iptables"].get(f"{tool} {table}", {}).get(chain, [])]

    def nft(self, chain):
        table = self.state()["nft"].get("gitlab-runner-vm-metadata")
        if table is None or chain not in table["chains"]:
            return None
        return [r["rule"] for r in table["chains"][chain]["rules"]]


def ipt_allow(path):
    return f"-m cgroup --path {path} -m comment --comment gitlab-runner-vm-allow {path} -j ACCEPT"


def check_iptables(root):
    s = Sandbox(root, "iptables")
    s.run("setup")
    for tool, address in (("iptables", "169.254.169.254"), ("ip6tables", "fd00:ec2::254")):
        need(s.ipt(tool, "filter", "OUTPUT") == ["-j runner-metadata-out"], f"{tool} OUTPUT: {s.ipt(tool, 'filter', 'OUTPUT')}")
        need(s.ipt(tool, "raw", "PREROUTING") == ["-j runner-metadata-fwd"], f"{tool} raw PREROUTING: {s.ipt(tool, 'raw', 'PREROUTING')}")
        out = [
            f"-d {address} -m conntrack --ctdir REPLY -j RETURN",
            f"-d {address} -p udp -m multiport --dports 53,123 -j RETURN",
            f"-d {address} -p tcp -m multiport --dports 53 -j RETURN",
            f"-d {address} -j runner-metadata-allow",
            f"-d {address} -j REJECT",
        ]
        need(s.ipt(tool, "filter", "runner-metadata-out") == out, f"{tool} runner-metadata-out: {s.ipt(tool, 'filter', 'runner-metadata-out')}")
        fwd = ["-i lo -j RETURN"] + [r.replace("-j REJECT", "-j DROP") for r in out[1:] if "allow" not in r]
        need(s.ipt(tool, "raw", "runner-metadata-fwd") == fwd, f"{tool} raw runner-metadata-fwd: {s.ipt(tool, 'raw', 'runner-metadata-fwd')}")
        need(s.ipt(tool, "filter", "runner-metadata-allow") == [], f"{tool}: the allow chain is not empty after setup")
    # IPv4 addresses go to iptables only, IPv6 ones to ip6tables only.
    need(not any("fd00" in " ".join(e["argv"]) for e in s.log() if e["argv"][0] == "iptables"), "iptables got an IPv6 address")
    need(not any("169.254" in " ".join(e["argv"]) for e in s.log() if e["argv"][0] == "ip6tables"), "ip6tables got an IPv4 address")

    # The agent's unit (Delegate=yes: its ExecStartPre runs in .control) allows `agent` only.
    agent = AGENT + "/agent"
    s.run("mkdir-self", "runner")
    s.run("allow-self", "agent")
    need(os.path.isdir(os.path.join(s.cgroup, AGENT, "runner")), "mkdir-self runner made no cgroup")
    need(os.path.isdir(os.path.join(s.cgroup, agent)), "allow-self agent made no cgroup")
    for tool in ("iptables", "ip6tables"):
        need(s.ipt(tool, "filter", "runner-metadata-allow") == [ipt_allow(agent)], f"{tool} allow after allow-self agent: {s.ipt(tool, 'filter', 'runner-metadata-allow')}")
    # A restart does not pile rules up, and a firewall reload (setup) keeps them.
    s.run("allow-self", "agent")
    s.run("setup")
    s.in_cgroup("system.slice/fetch-ec2-metadata.service")
    s.run("allow-self")
    want = [ipt_allow(agent), ipt_allow("system.slice/fetch-ec2-metadata.service")]
    for tool in ("iptables", "ip6tables"):
        need(s.ipt(tool, "filter", "runner-metadata-allow") == want, f"{tool} allow after a second allow-self and setup: {s.ipt(tool, 'filter', 'runner-metadata-allow')}")
        need(s.ipt(tool, "filter", "OUTPUT") == ["-j runner-metadata-out"], f"{tool} OUTPUT after a second setup: {s.ipt(tool, 'filter', 'OUTPUT')}")
    # Revoking removes that unit's rule only, and again is no error.
    s.run("revoke-self")
    s.run("revoke-self")
    for tool in ("iptables", "ip6tables"):
        need(s.ipt(tool, "filter", "runner-metadata-allow") == [ipt_allow(agent)], f"{tool} allow after revoke-self: {s.ipt(tool, 'filter', 'runner-metadata-allow')}")
    s.in_cgroup(AGENT)
    s.run("revoke-self", "agent")
    need(s.ipt("iptables", "filter", "runner-metadata-allow") == [], "revoke-self agent left a rule")

    # An identity cache: the agent (in `agent`) admits gitlab-runner's `runner` by its path,
    # never the jobs' sibling; the unit's ExecStopPost (in .control) revokes both extras.
    runner = AGENT + "/runner"
    s.run("mkdir-self", "jobs")
    s.in_cgroup(AGENT + "/agent")
    s.run("allow", runner)
    for tool in ("iptables", "ip6tables"):
        need(s.ipt(tool, "filter", "runner-metadata-allow") == [ipt_allow(runner)], f"{tool} allow after the agent's allow of runner: {s.ipt(tool, 'filter', 'runner-metadata-allow')}")
    need(not any("/jobs" in " ".join(e["argv"]) for e in s.log()), "a rule names the jobs' cgroup")
    s.in_cgroup(AGENT + "/.control")
    s.run("revoke-self", "runner")
    s.run("revoke-self", "jobs")
    need(s.ipt("iptables", "filter", "runner-metadata-allow") == [], "the unit's revoke-self runner left gitlab-runner's rule")
    s.in_cgroup(AGENT)

    # Refusals: the root cgroup (it holds every process), a path out of the unit's, a
    # missing cgroup; none adds a rule.
    s.in_cgroup("")
    s.run("allow-self", ok=False)
    s.in_cgroup(AGENT)
    s.run("allow-self", "..", ok=False)
    s.run("allow-self", "a/b", ok=False)
    s.run("allow", "system.slice/missing.service", ok=False)
    s.run("allow", "system.slice/../x", ok=False)
    need(s.ipt("iptables", "filter", "runner-metadata-allow") == [], f"a refused allow added a rule: {s.ipt('iptables', 'filter', 'runner-metadata-allow')}")

    # No uid is exempt, anywhere.
    need(not any("--uid-owner" in e["argv"] or "owner" in e["argv"] for e in s.log()), "a rule matches by uid")

    # teardown keeps the allow chain (a reload is teardown then setup), --all removes it.
    s.run("allow", agent)
    s.run("teardown")
    need(s.ipt("iptables", "filter", "OUTPUT") == [] and "runner-metadata-out" not in s.state()["iptables"]["iptables filter"], "teardown left OUTPUT's jump or the out chain")
    need(s.ipt("iptables", "raw", "PREROUTING") == [], "teardown left PREROUTING's jump")
    need(s.ipt("iptables", "filter", "runner-metadata-allow") == [ipt_allow(agent)], "teardown dropped the allow rules")
    s.run("setup")
    need(s.ipt("iptables", "filter", "runner-metadata-allow") == [ipt_allow(agent)], "teardown then setup (a reload) dropped the allow rules")
    s.run("teardown", "--all")
    need("runner-metadata-allow" not in s.state()["iptables"]["iptables filter"], "teardown --all left the allow chain")


def check_nftables(root):
    s = Sandbox(root, "nftables")
    s.run("setup")
    setups = [e for e in s.log() if e["argv"][1:] == ["-f", "-"]]
    need(len(setups) == 1, f"setup is not one nft transaction: {s.log()}")
    out = s.nft("output")
    want = []
    for family, address in (("ip", "169.254.169.254"), ("ip6", "fd00:ec2::254")):
        want += [
            f"{family} daddr {address} ct direction reply return",
            f"{family} daddr {address} udp dport {{ 53,123 }} return",
            f"{family} daddr {address} tcp dport {{ 53 }} return",
            f"{family} daddr {address} jump allow",
            f"{family} daddr {address} reject",
        ]
    need(out == want, f"nft output chain: {out}")
    need(s.nft("prerouting") == ["iifname lo return"] + [r.replace("reject", "drop") for r in want if "jump" not in r and "reply" not in r], f"nft prerouting chain: {s.nft('prerouting')}")
    table = s.state()["nft"]["gitlab-runner-vm-metadata"]["chains"]
    need(table["output"]["spec"] == "type filter hook output priority filter; policy accept;", f"nft output hook: {table['output']['spec']}")
    need(table["prerouting"]["spec"] == "type filter hook prerouting priority raw; policy accept;", f"nft prerouting hook: {table['prerouting']['spec']}")

    agent = AGENT + "/agent"
    rule = f'socket cgroupv2 level 3 "{agent}" accept comment "gitlab-runner-vm-allow {agent}"'
    s.run("allow-self", "agent")
    s.run("allow-self", "agent")
    s.run("setup")
    need(s.nft("allow") == [rule], f"nft allow after allow-self agent twice and setup: {s.nft('allow')}")
    s.in_cgroup("system.slice/do-agent.service")
    s.run("allow-self")
    need(s.nft("allow") == [rule, 'socket cgroupv2 level 2 "system.slice/do-agent.service" accept comment "gitlab-runner-vm-allow system.slice/do-agent.service"'], f"nft allow: {s.nft('allow')}")
    s.run("revoke-self")
    s.run("revoke-self")
    need(s.nft("allow") == [rule], f"nft allow after revoke-self twice: {s.nft('allow')}")
    s.in_cgroup("")
    s.run("allow-self", ok=False)
    need(s.nft("allow") == [rule], "a refused allow changed the nft rules")
    s.run("teardown")
    need(s.nft("output") is None and s.nft("prerouting") is None and s.nft("allow") == [rule], "nft teardown: base chains gone, allow rules kept")
    s.run("setup")
    need(s.nft("allow") == [rule] and s.nft("output") == want, "nft teardown then setup")
    s.run("teardown", "--all")
    need("gitlab-runner-vm-metadata" not in s.state()["nft"], "nft teardown --all left the table")
    need(not any("uid" in " ".join(e["argv"]) + (e["stdin"] or "") for e in s.log()), "an nft rule matches by uid")


def check_script():
    for check in (check_iptables, check_nftables):
        with tempfile.TemporaryDirectory() as root:
            check(root)
    shellcheck = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    need(shellcheck.returncode == 0, f"shellcheck: {shellcheck.stdout}{shellcheck.stderr}")


# ---- the evaluated configurations ----------------------------------------------------------

# What reaches the metadata service in each image (read in the nixpkgs snapshot and images/):
# the agent and its SSH-keys unit, and the platform's own units.
EXPECT_UNITS = {
    "file": ["gitlab-runner-vm"],
    "aws": ["gitlab-runner-vm", "gitlab-runner-vm-ssh-keys", "fetch-ec2-metadata"],
    "gce": ["gitlab-runner-vm", "gitlab-runner-vm-ssh-keys", "google-guest-agent", "gce-set-hostname"],
    "digitalocean": ["gitlab-runner-vm", "gitlab-runner-vm-ssh-keys", "digitalocean-metadata", "digitalocean-set-hostname", "do-agent"],
}
# Units that never need it, whatever they run as: they must not be allowed.
NEVER = {"sshd", "docker", "podman", "nix-daemon", "apply-ec2-data", "amazon-ssm-agent", "google-startup-scripts", "google-shutdown-scripts"}
# Who reads the user-data left at rest, before it is removed.
USER_DATA_READERS = {
    "aws": ["fetch-ec2-metadata.service", "apply-ec2-data.service"],
    "digitalocean": ["digitalocean-metadata.service", "digitalocean-ssh-keys.service"],
}


def check_facts(path):
    with open(path) as f:
        facts = json.load(f)
    images = facts["images"]
    need(len(images) == 11, f"images: {sorted(images)}")
    for where, image in sorted(images.items()):
        p = f"{where}: "
        platform = image["platform"]
        need(platform in EXPECT_UNITS, p + f"platform {platform}")
        need(not image["failedAssertions"], p + f"failed assertions: {image['failedAssertions']}")
        need(image["enable"], p + "the metadata firewall is off")
        hooks = [c for u in image["units"].values() for c in u["execStartPre"] + u["execStartPost"] + u["execStopPost"]]
        for text in [image["extraCommands"], image["extraStopCommands"]] + hooks:
            need("uid-owner" not in text and "owner" not in text.split(), p + f"a uid exemption: {text}")
        exe = image["exe"]
        need(exe.endswith("/bin/gitlab-runner-vm-metadata-firewall"), p + f"the script: {exe}")
        if where.endswith("/nftables"):
            need(image["nftables"] and image["backend"] == "nftables", p + "not the nftables variant")
            need(image["extraCommands"].strip() == "" and image["extraStopCommands"].strip() == "", p + "nftables with iptables commands")
            nft = image["nftablesService"] or {}
            need(nft.get("execStartPost", [])[-1:] == [f"{exe} setup"] and nft.get("execReload", [])[-1:] == [f"{exe} setup"],
                 p + f"nftables.service does not set up the table last, at start and reload: {nft}")
            need(f"{exe} teardown --all" in nft.get("execStopPost", []), p + f"nftables.service does not remove the table: {nft}")
        else:
            need(not image["nftables"] and image["backend"] == "iptables", p + "nftables in the default variant")
            need(image["firewall"], p + "the firewall is off")
            need(f"{exe} setup" in image["extraCommands"], p + f"extraCommands do not run setup: {image['extraCommands']}")
            need(f"{exe} teardown" in image["extraStopCommands"] and "--all" not in image["extraStopCommands"],
                 p + f"extraStopCommands do not run teardown, keeping the allow rules over a reload: {image['extraStopCommands']}")
        allowed = image["allowedUnits"]
        for name in EXPECT_UNITS.get(platform, []):
            need(name in allowed, p + f"{name} is not allowed: {allowed}")
        for name in NEVER & set(allowed):
            problems.append(p + f"{name} is allowed")
        for name in image["namesMetadata"]:
            need(name in allowed, p + f"{name} reaches the metadata service but is not allowed")
        for name in allowed:
            unit = image["units"].get(name)
            if not need(unit is not None, p + f"allowed unit {name} is not in the facts"):
                continue
            need(unit["exists"], p + f"allowed unit {name} does not exist")
            sub = image["subgroups"].get(name)
            allow = f"+{exe} allow-self" + (f" {sub}" if sub else "")
            revoke = f"+{exe} revoke-self" + (f" {sub}" if sub else "")
            pre = unit["execStartPre"]
            # First, before the unit's own commands: only ours come before it.
            need(allow in pre and all(c.startswith(f"+{exe} ") for c in pre[:pre.index(allow)]),
                 p + f"{name}: ExecStartPre does not start with `{allow}`: {pre}")
            need(unit["execStopPost"].count(revoke) == 1, p + f"{name}: no ExecStopPost `{revoke}`: {unit['execStopPost']}")
            if unit["type"] == "oneshot":
                need(unit["execStartPost"][-1:] == [revoke], p + f"{name} (oneshot): ExecStartPost does not end with `{revoke}`: {unit['execStartPost']}")
        agent = image["units"]["gitlab-runner-vm"]
        need(image["subgroups"].get("gitlab-runner-vm") == "agent", p + f"the agent's allow names {image['subgroups'].get('gitlab-runner-vm')}, not its `agent` sub-cgroup")
        need(agent["execStartPre"][:2] == [f"+{exe} mkdir-self runner jobs", f"+{exe} allow-self agent"],
             p + f"the agent's unit does not make `runner` and `jobs` then allow `agent` first: {agent['execStartPre']}")
        # gitlab-runner's `runner` is allowed by the agent alone (an identity cache), with this
        # script; the unit's stop revokes it, and never allows `jobs`.
        need(image["agentFirewall"] == exe, p + f"the agent's --metadata-firewall is {image['agentFirewall']}, not {exe}")
        need(agent["execStopPost"].count(f"+{exe} revoke-self runner") == 1,
             p + f"the agent's ExecStopPost does not revoke `runner`: {agent['execStopPost']}")
        need(not any(c.endswith(("allow-self runner", "allow-self jobs")) for c in agent["execStartPre"]),
             p + f"the unit itself allows gitlab-runner or the jobs: {agent['execStartPre']}")
        need(not any(c.endswith("allow-self") for c in agent["execStartPre"]), p + "the agent's whole unit cgroup (jobs included) is allowed")
        need({"169.254.169.254", "fd00:ec2::254"} <= set(image["addresses"]), p + f"addresses {image['addresses']}")
        need(("fd20:ce::254" in image["addresses"]) == (platform == "gce"), p + f"GCE's IPv6 address on {platform}: {image['addresses']}")
        # User-data at rest is removed once its readers have run, before the agent starts.
        scrub = image["scrub"]
        if platform in USER_DATA_READERS:
            if need(scrub is not None, p + "no unit removes the user-data left at rest"):
                need("gitlab-runner-vm.service" in scrub["before"], p + f"the scrub does not run before the agent: {scrub['before']}")
                need(set(USER_DATA_READERS[platform]) <= set(scrub["after"]), p + f"the scrub does not wait for its readers: {scrub['after']}")
                need("multi-user.target" in scrub["wantedBy"] and scrub["type"] == "oneshot", p + f"the scrub: {scrub}")
                path = {"aws": "/etc/ec2-metadata/user-data", "digitalocean": "/run/do-metadata/v1.json"}[platform]
                need(path in scrub["script"], p + f"the scrub does not touch {path}")
        else:
            need(scrub is None, p + "a scrub unit where no user-data rests")
    need(any("no-such-unit" in m and "allowedUnits" in m for m in facts["typo"]), f"an unknown allowed unit is not refused: {facts['typo']}")
    need(any("allowedUsers" in m and "allowedUnits" in m for m in facts["removedOption"]), f"allowedUsers is not refused with a pointer to allowedUnits: {facts['removedOption']}")
    need(facts["nftablesToplevel"].endswith(".drv"), f"the nftables variant's system: {facts['nftablesToplevel']}")


def main():
    if sys.argv[1:] == ["script"]:
        check_script()
    elif len(sys.argv) == 3 and sys.argv[1] == "facts":
        check_facts(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
