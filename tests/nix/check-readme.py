#!/usr/bin/env python3
"""The README's "Customise an image" section, evaluated (tests/nix/readme.nix).

Its example module (the ```nix block that starts with `{ pkgs, ... }:`) is added to the runner
image with extendModules and must take effect: binary caches, packages, SSH keys, an agent
flag, and a profile choice overridden without mkForce. Each row of its table must name
configurations, modules and build attributes that the flake has.
Exits 0 when all holds, 1 otherwise, 3 when this machine cannot evaluate the flake.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Customise an image"


def section():
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    body = text.split(SECTION, 1)[1]
    return body.split("\n## ", 1)[0]


def example_module(body):
    blocks = re.findall(r"```nix\n(.*?)```", body, re.S)
    modules = [b for b in blocks if b.startswith("{ pkgs, ... }:")]
    assert modules, "no ```nix block starting with `{ pkgs, ... }:` (the example module)"
    return modules[0]


def table_rows(body):
    rows = []
    lines = [l for l in body.splitlines() if l.startswith("|")]
    header = next((i for i, l in enumerate(lines) if "Build attribute" in l), None)
    assert header is not None, "no table with a `Build attribute` column"
    for line in lines[header + 2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 4:
            break
        names = lambda cell: re.findall(r"`([a-zA-Z0-9-]+)`", cell)
        rows.append({
            "image": cells[0],
            "configurations": names(cells[1]),
            "attributes": names(cells[2]),
            # Module names are the leading `name` entries, before any inline module `{ ... }`.
            "modules": names(cells[3].split("{")[0]),
        })
    assert rows, "the table of images has no rows"
    return rows


def main():
    body = section()
    module, rows = example_module(body), table_rows(body)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "my-runner.nix").write_text(module)
        (Path(tmp) / "eval.nix").write_text(
            "{ flake }: import (/. + %s) { inherit flake; module = ./my-runner.nix; rows = builtins.fromJSON %s; }\n"
            % (json.dumps(str(ROOT / "tests" / "nix" / "readme.nix")), json.dumps(json.dumps(rows)))
        )
        run = subprocess.run([str(ROOT / "tests" / "nix" / "eval-json"), str(Path(tmp) / "eval.nix")], capture_output=True, text=True)
    if run.returncode == 3:
        print(run.stderr.strip())
        return 3
    assert run.returncode == 0, f"evaluating the README's example failed:\n{run.stderr[-3000:]}"
    facts = json.loads(run.stdout)
    ex = facts["example"]
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    need("https://cache.example.com" in ex["substituters"], f"substituters {ex['substituters']}")
    need(any(k.startswith("cache.example.com-1:") for k in ex["trustedPublicKeys"]), f"trusted keys {ex['trustedPublicKeys']}")
    need(any(k.startswith("ssh-ed25519 ") for k in ex["authorizedKeys"]), f"the CI user's keys {ex['authorizedKeys']}")
    need({"opentofu", "ansible-core"} <= set(ex["systemPackages"]), "opentofu and ansible are not in the system profile")
    need("opentofu" in ex["agentPath"], f"opentofu is not on the agent's path {ex['agentPath']}")
    need(ex["environment"].get("GITLAB_RUNNER_VM_FAILURE_DELAY") == "120", f"the agent's environment {ex['environment']}")
    need(ex["podman"] is False, "podman is still enabled")
    need(not ex["failedAssertions"], f"failed assertions {ex['failedAssertions']}")
    need(not ex["warnings"], f"warnings {ex['warnings']}")
    for row in facts["rows"]:
        for key in ("missingConfigurations", "missingModules", "missingAttributes"):
            need(not row[key], f"table row {row['configurations']}: {key} {row[key]}")
        need(row["configurations"] and row["attributes"] and row["modules"], f"table row incomplete: {row}")
    assert not problems, "\n".join(problems)
    print(f"the example module takes effect; {len(facts['rows'])} table rows name what the flake has")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(e)
        sys.exit(1)
