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
            f"-d {address} -p udp -m multiport --dports 53,123 -j RETURN",
            f"-d {address} -p tcp -m multiport --dports 53 -j RETURN",
            f"-d {address} -j runner-metadata-allow",
            f"-d {address} -j REJECT",
        ]
        need(s.ipt(tool, "filter", "runner-metadata-out") == out, f"{tool} runner-metadata-out: {s.ipt(tool, 'filter', 'runner-metadata-out')}")
        fwd = ["-i lo -j RETURN"] + [r.replace("-j REJECT", "-j DROP") for r in out if "allow" not in r]
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
            f"{family} daddr {address} udp dport {{ 53,123 }} return",
            f"{family} daddr {address} tcp dport {{ 53 }} return",
            f"{family} daddr {address} jump allow",
            f"{family} daddr {address} reject",
        ]
    need(out == want, f"nft output chain: {out}")
    need(s.nft("prerouting") == ["iifname lo return"] + [r.replace("reject", "drop") for r in want if "jump" not in r], f"nft prerouting chain: {s.nft('prerouting')}")
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

def check_facts(path):
    with open(path) as f:
        facts = json.load(f)
    need(len(facts["images"]) >= 7, f"too few images: {sorted(facts['images'])}")
    for where, image in sorted(facts["images"].items()):
        p = f"{where}: "
        need(not image["failedAssertions"], p + f"failed assertions: {image['failedAssertions']}")
        need(image["enable"], p + "the metadata firewall is off")
        for text in (image["extraCommands"], image["extraStopCommands"]) + tuple(u["execStartPre"] + u["execStopPost"] for u in image["units"].values()):
            need("--uid-owner" not in str(text) and "uid" not in str(text).replace("gitlab-runner-vm", ""), p + f"a uid exemption: {text}")
        exe = image["exe"]
        if image["nftables"]:
            need(image["extraCommands"] == "" and image["extraStopCommands"] == "", p + "nftables with iptables commands")
            need(image["backend"] == "nftables", p + f"backend {image['backend']} with nftables")
            nft = image["nftablesService"]
            need(nft is not None and f"{exe} setup" in nft["execStartPost"] and f"{exe} setup" in nft["execReload"], p + f"nftables.service does not set up the table: {nft}")
            need(nft is not None and nft["execStartPost"][-1] == f"{exe} setup" and nft["execReload"][-1] == f"{exe} setup", p + f"our setup is not last in nftables.service (a flush after it would drop it): {nft}")
        else:
            need(image["backend"] == "iptables", p + f"backend {image['backend']} with iptables")
            need(f"{exe} setup" in image["extraCommands"], p + f"extraCommands do not run setup: {image['extraCommands']}")
            need(f"{exe} teardown" in image["extraStopCommands"], p + f"extraStopCommands do not run teardown: {image['extraStopCommands']}")
        need(image["firewall"], p + "the firewall is off")
        # Every allowed unit is a real unit, allows itself at start and revokes at stop.
        allowed = image["allowedUnits"]
        need("gitlab-runner-vm" in allowed, p + f"the agent is not allowed: {allowed}")
        for name in image["expectUnits"]:
            need(name in allowed, p + f"{name} is not allowed: {allowed}")
        for name in allowed:
            unit = image["units"].get(name)
            if not need(unit is not None, p + f"allowed unit {name} is not in the facts"):
                continue
            need(unit["exists"], p + f"allowed unit {name} does not exist")
            sub = image["subgroups"].get(name)
            allow = f"+{exe} allow-self" + (f" {sub}" if sub else "")
            revoke = f"+{exe} revoke-self" + (f" {sub}" if sub else "")
            need(unit["execStartPre"][-1:] == [allow], p + f"{name}: ExecStartPre does not end with `{allow}`: {unit['execStartPre']}")
            need(revoke in unit["execStopPost"], p + f"{name}: no ExecStopPost `{revoke}`: {unit['execStopPost']}")
            if unit["type"] == "oneshot":
                need(revoke in unit["execStartPost"], p + f"{name} (oneshot): no ExecStartPost `{revoke}`: {unit['execStartPost']}")
        agent = image["units"].get("gitlab-runner-vm")
        if agent:
            need(image["subgroups"].get("gitlab-runner-vm") == "agent", p + f"the agent's allow names {image['subgroups'].get('gitlab-runner-vm')}, not its `agent` sub-cgroup")
            need(f"+{exe} mkdir-self runner" in agent["execStartPre"], p + f"the agent's unit does not make the `runner` sub-cgroup: {agent['execStartPre']}")
            need(not any(x.endswith("allow-self") for x in agent["execStartPre"]), p + "the agent's whole unit cgroup (jobs included) is allowed")
        # Units that reach the service but are not allowed would fail: the platform's own.
        for name in image["expectUnits"]:
            need(name in image["units"] and image["units"][name]["exists"], p + f"{name} should exist")
        need(set(image["addresses"]) >= {"169.254.169.254", "fd00:ec2::254"}, p + f"addresses {image['addresses']}")
        if image["platform"] == "gce":
            need("fd20:ce::254" in image["addresses"], p + "GCE's IPv6 metadata address is not guarded")
        # User-data at rest is removed once its readers have run.
        scrub = image["scrub"]
        if image["platform"] in ("aws", "digitalocean"):
            if need(scrub is not None, p + "no unit removes the user-data left at rest"):
                need("gitlab-runner-vm.service" in scrub["before"], p + f"the scrub does not run before the agent: {scrub}")
                need(set(image["userDataReaders"]) <= set(scrub["after"]), p + f"the scrub does not wait for {image['userDataReaders']}: {scrub['after']}")
                need(scrub["wantedBy"], p + "the scrub is not wanted by anything")
        else:
            need(scrub is None, p + f"a scrub unit where no user-data rests: {scrub}")
    # An allowed unit that does not exist is refused with a message that says which.
    bad = facts["typo"]
    need(any("no-such-unit" in m and "allowedUnits" in m for m in bad), f"an unknown allowed unit is not refused: {bad}")
    need(any("allowedUsers" in w and "allowedUnits" in w for w in facts["removedOption"]), f"allowedUsers is not removed with a pointer to allowedUnits: {facts['removedOption']}")


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
