#!/usr/bin/env python3
"""Stand-ins for iptables, ip6tables and nft that keep their rules in a JSON file.

Used by check-firewall.py against nixos-modules/metadata-firewall.sh. Each call is logged
(argv, and stdin for `nft -f -`) to $FAKE_NETFILTER_DIR/log.jsonl; the rules are kept in
$FAKE_NETFILTER_DIR/state.json. They fail as the real tools do where the script depends on
it: -N of an existing chain, -D/-C of a missing rule, -X of a chain that is not empty or is
referenced, and, like the kernel when a rule is inserted, a cgroup path that does not exist
under $METADATA_FIREWALL_CGROUP (xt_cgroup and nft resolve it then). The program's name
(argv[0]) says which tool it is.
"""
import json
import os
import re
import shlex
import sys

DIR = os.environ["FAKE_NETFILTER_DIR"]
CGROUP = os.environ["METADATA_FIREWALL_CGROUP"]
STATE = os.path.join(DIR, "state.json")


def load():
    try:
        with open(STATE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"iptables": {}, "nft": {}}


def save(state):
    with open(STATE, "w") as f:
        json.dump(state, f, indent=1)


def fail(message, code=1):
    print(message, file=sys.stderr)
    sys.exit(code)


def cgroup_exists(path):
    return os.path.isdir(os.path.join(CGROUP, path.lstrip("/")))


BUILTIN = {"filter": ["INPUT", "FORWARD", "OUTPUT"], "raw": ["PREROUTING", "OUTPUT"]}


def iptables(tool, args, state):
    args = [a for a in args if a != "-w"]
    table = "filter"
    if args[:1] == ["-t"]:
        table, args = args[1], args[2:]
    chains = state["iptables"].setdefault(f"{tool} {table}", {c: [] for c in BUILTIN[table]})
    if len(args) < 2:
        fail(f"{tool}: bad arguments {args}", 2)
    op, chain, rule = args[0], args[1], args[2:]
    if op == "-N":
        if chain in chains:
            fail(f"{tool}: Chain already exists.")
        chains[chain] = []
        return
    if chain not in chains:
        fail(f"{tool}: No chain/target/match by that name.")
    rules = chains[chain]
    if op == "-F":
        rules.clear()
    elif op == "-X":
        if rules or any(r[-2:] == ["-j", chain] for c in chains.values() for r in c):
            fail(f"{tool}: Directory not empty / Too many links.")
        del chains[chain]
    elif op in ("-A", "-I"):
        if "-j" in rule and rule[rule.index("-j") + 1] not in chains and not rule[rule.index("-j") + 1].isupper():
            fail(f"{tool}: Couldn't load target `{rule[rule.index('-j') + 1]}'")
        if "--path" in rule and not cgroup_exists(rule[rule.index("--path") + 1]):
            fail(f"{tool}: cgroup {rule[rule.index('--path') + 1]}: No such file or directory")
        if op == "-A":
            rules.append(rule)
        else:
            rules.insert(0, rule)
    elif op in ("-D", "-C"):
        if rule not in rules:
            fail(f"{tool}: Bad rule (does a matching rule exist in that chain?).")
        if op == "-D":
            rules.remove(rule)
    elif op == "-S":
        print(f"-N {chain}")
        for r in rules:
            print(shlex.join(["-A", chain] + r))
    else:
        fail(f"{tool}: unsupported {op}", 2)


def nft_command(words, state):
    """One nft command, as words; changes state or raises ValueError."""
    tables = state["nft"]
    text = " ".join(words)
    m = re.fullmatch(r"(add|delete) table inet (\S+)", text)
    if m:
        if m[1] == "add":
            tables.setdefault(m[2], {"chains": {}, "handle": 0})
        elif tables.pop(m[2], None) is None:
            raise ValueError(f"no table {m[2]}")
        return
    m = re.fullmatch(r"(add|delete|flush) chain inet (\S+) (\S+)( \{ (.*) \})?", text)
    if m:
        table = tables.get(m[2])
        if table is None:
            raise ValueError(f"no table {m[2]}")
        chains = table["chains"]
        if m[1] == "add":
            spec = (m[5] or "").strip()
            if m[3] in chains and spec and chains[m[3]]["spec"] != spec:
                raise ValueError(f"chain {m[3]} exists with another hook")
            chains.setdefault(m[3], {"spec": spec, "rules": []})
        elif m[3] not in chains:
            raise ValueError(f"no chain {m[3]}")
        elif m[1] == "flush":
            chains[m[3]]["rules"] = []
        else:
            # The kernel deletes a chain's rules with it, but not a chain that is jumped to.
            if any(re.search(rf"\b(jump|goto) {re.escape(m[3])}$", r["rule"]) for c in chains.values() for r in c["rules"]):
                raise ValueError(f"chain {m[3]} is in use")
            del chains[m[3]]
        return
    m = re.fullmatch(r"add rule inet (\S+) (\S+) (.+)", text)
    if m:
        table = tables.get(m[1])
        if table is None or m[2] not in table["chains"]:
            raise ValueError(f"no chain {m[2]} in {m[1]}")
        rule = m[3]
        jump = re.search(r"\bjump (\S+)", rule)
        if jump and jump[1] not in table["chains"]:
            raise ValueError(f"no chain {jump[1]} to jump to")
        cg = re.search(r'socket cgroupv2 level (\d+) "([^"]+)"', rule)
        if cg:
            if not cgroup_exists(cg[2]):
                raise ValueError(f"cgroupv2 path fails: {cg[2]}: No such file or directory")
            if int(cg[1]) != len(cg[2].strip("/").split("/")):
                raise ValueError(f"level {cg[1]} is not the depth of {cg[2]}")
        table["handle"] += 1
        table["chains"][m[2]]["rules"].append({"rule": rule, "handle": table["handle"]})
        return
    m = re.fullmatch(r"delete rule inet (\S+) (\S+) handle (\d+)", text)
    if m:
        rules = tables.get(m[1], {}).get("chains", {}).get(m[2], {}).get("rules")
        keep = [r for r in rules or [] if r["handle"] != int(m[3])]
        if rules is None or len(keep) == len(rules):
            raise ValueError(f"no rule with handle {m[3]}")
        tables[m[1]]["chains"][m[2]]["rules"] = keep
        return
    raise ValueError(f"unsupported: {text}")


def nft(args, state, stdin):
    handles = False
    if args[:1] == ["-a"]:
        handles, args = True, args[1:]
    if args == ["-f", "-"]:
        try:
            for line in stdin.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    nft_command(shlex.split(line, posix=False), state)
        except ValueError as e:
            fail(f"nft: {e}")  # nothing is saved: -f is one transaction
        return
    m = re.fullmatch(r"list chain inet (\S+) (\S+)", " ".join(args))
    if m:
        chain = state["nft"].get(m[1], {}).get("chains", {}).get(m[2])
        if chain is None:
            fail("nft: No such file or directory")
        print(f"table inet {m[1]} {{\n\tchain {m[2]} {{")
        for r in chain["rules"]:
            print("\t\t" + r["rule"] + (f" # handle {r['handle']}" if handles else ""))
        print("\t}\n}")
        return
    try:
        nft_command(args, state)
    except ValueError as e:
        fail(f"nft: {e}")


def main():
    tool = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    stdin = sys.stdin.read() if tool == "nft" and args[-2:] == ["-f", "-"] else None
    with open(os.path.join(DIR, "log.jsonl"), "a") as f:
        f.write(json.dumps({"argv": [tool] + args, "stdin": stdin}) + "\n")
    state = load()
    if tool in ("iptables", "ip6tables"):
        iptables(tool, args, state)
    elif tool == "nft":
        nft(args, state, stdin)
    else:
        fail(f"fake_netfilter: unknown tool {tool}", 2)
    save(state)


if __name__ == "__main__":
    main()
