//! The VM's side and the broker's together, through both real binaries: the broker between the
//! fake Kubernetes API and the fake GitLab of `common`, and the agent (`gitlab-runner-vm run
//! --config-source broker`) with the pod's token in a file, as KubeVirt's serviceAccount disk
//! holds it, and a fake gitlab-runner. A test of this package gets only its own binary from
//! cargo: the agent's is found beside it (`agent_bin`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use common::*;

/// The agent's binary, next to the broker's in the same target directory. `cargo test
/// --workspace` (tests/run, the Nix build) builds it with the agent's own tests; run alone, this
/// test builds it when it is missing or older than the agent's sources.
fn agent_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bin = Path::new(BIN).with_file_name("gitlab-runner-vm");
            if !is_current(&bin) {
                let release = bin.parent().and_then(Path::file_name) == Some("release".as_ref());
                let mut cargo = std::process::Command::new(env!("CARGO"));
                cargo
                    .args(["build", "--locked", "-p", "gitlab-runner-vm", "--bin", "gitlab-runner-vm"])
                    .current_dir(env!("CARGO_MANIFEST_DIR"));
                if release {
                    cargo.arg("--release");
                }
                let out = cargo.output().expect("cargo runs");
                assert!(
                    out.status.success(),
                    "cargo build -p gitlab-runner-vm failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                is_current(&bin),
                "{} is missing or older than agent/src: build it with cargo build -p gitlab-runner-vm (cargo test --workspace does)",
                bin.display()
            );
            bin
        })
        .clone()
}

/// The binary exists and is newer than every file of the agent's sources.
fn is_current(bin: &Path) -> bool {
    fn modified(path: &Path) -> std::time::SystemTime {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
    }
    fn newest(dir: &Path) -> std::time::SystemTime {
        let mut latest = modified(dir);
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let at = if path.is_dir() {
                newest(&path)
            } else {
                modified(&path)
            };
            latest = latest.max(at);
        }
        latest
    }
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent");
    let sources = newest(&agent.join("src")).max(modified(&agent.join("Cargo.toml")));
    bin.exists() && modified(bin) >= sources
}

/// One boot of a VM: its own directory (state, runner.json, console, power-off record).
struct Boot {
    dir: PathBuf,
}

impl Boot {
    fn new(h: &Harness, name: &str, pod_token: &str) -> Boot {
        let dir = h.path(name);
        std::fs::create_dir_all(dir.join("identity")).unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(dir.join("identity/token"), pod_token).unwrap();
        // The fake gitlab-runner: records how it was started and the token config.toml holds.
        let script = format!(
            "#!/bin/sh\necho \"$*\" >> {d}/runner-invocations\ngrep '^ *token' \"$3\" >> {d}/runner-tokens\necho 'fake gitlab-runner: job done'\n",
            d = dir.display()
        );
        std::fs::write(dir.join("gitlab-runner"), script).unwrap();
        std::fs::set_permissions(
            dir.join("gitlab-runner"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        Boot { dir }
    }

    async fn run(&self, broker_url: &str) -> std::process::ExitStatus {
        let d = &self.dir;
        let mut cmd = tokio::process::Command::new(agent_bin());
        cmd.arg("run")
            .arg("--config-source")
            .arg("broker")
            .arg("--broker-url")
            .arg(broker_url)
            .arg("--broker-token-file")
            .arg(d.join("identity/token"))
            .arg("--config")
            .arg(d.join("runner-info/runner.json"))
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--keep-file")
            .arg(d.join("keep-runner"))
            .arg("--gitlab-runner")
            .arg(d.join("gitlab-runner"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GITLAB_RUNNER_VM_FAILURE_DELAY", "1")
            .env("GITLAB_RUNNER_VM_CONFIG_WAIT", "20")
            .env("GITLAB_RUNNER_VM_REGISTER_TIMEOUT", "20")
            .env("GITLAB_RUNNER_VM_DEREGISTER_TIMEOUT", "5")
            .env("GITLAB_RUNNER_VM_CONSOLE", d.join("console"))
            .env(
                "GITLAB_RUNNER_VM_POWEROFF_COMMAND",
                format!("echo poweroff >> {}", d.join("poweroff").display()),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("agent.log")).unwrap())
            .stderr(std::fs::File::create(d.join("agent.err")).unwrap())
            .kill_on_drop(true);
        if nix::unistd::Uid::current().is_root() {
            // Shell jobs never run as root (the agent refuses): the image's job user.
            cmd.env("GITLAB_RUNNER_VM_JOB_USER", "nobody");
        }
        std::fs::write(d.join("console"), "").unwrap();
        let mut child = cmd.spawn().unwrap();
        match tokio::time::timeout(PATIENCE, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("the agent did not exit:\n{}", self.log()),
        }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn log(&self) -> String {
        self.read("agent.log") + &self.read("agent.err")
    }

    fn everything(&self) -> String {
        self.log() + &self.read("console") + &self.read("state/status.json")
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.read("state/status.json")).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_gets_its_runner_runs_its_job_deletes_it_and_a_reboot_gets_none() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let (pod_token, pod) = h.vm("pool-vm-1");

    // First boot: token file -> broker -> runner created -> job -> runner deleted.
    let first = Boot::new(&h, "boot-1", &format!("{pod_token}\n"));
    let status = first.run(&h.url).await;
    assert!(status.success(), "{status:?}\n{}", first.log());
    let minted = {
        let g = h.gitlab.0.lock().unwrap();
        assert_eq!(g.creates, 1, "one runner for the boot");
        assert_eq!(g.minted.len(), 1);
        assert_eq!(
            g.verified, g.minted,
            "the agent ran with the broker's runner"
        );
        assert_eq!(g.deleted_by_token.len(), 1, "the agent deleted it");
        assert_eq!(g.manager_deletes, 0, "the runner, not only its manager");
        assert!(g.runners.is_empty(), "nothing left in GitLab");
        g.minted[0].clone()
    };
    let grant = h.cluster.grant(&pod).expect("the pod records its grant");
    assert_eq!(grant["state"], "granted");
    assert_eq!(first.read("runner-invocations").lines().count(), 1);
    assert!(
        first.read("runner-tokens").contains(&minted),
        "gitlab-runner's config.toml holds the broker's token"
    );
    assert!(first.read("poweroff").contains("poweroff"));

    // The same pod boots again (a guest reboot keeps the pod and its token): refused, no
    // gitlab-runner, powered off.
    let second = Boot::new(&h, "boot-2", &pod_token);
    second.run(&h.url).await;
    assert!(
        second.read("runner-invocations").is_empty(),
        "{}",
        second.log()
    );
    assert!(second.read("poweroff").contains("poweroff"));
    let st = second.status();
    assert_eq!(st["phase"], "powering-off");
    let error = st["last_error"].as_str().unwrap();
    assert!(error.contains("answered 409"), "{error}");
    assert!(error.contains("already got its runner"), "{error}");
    {
        let g = h.gitlab.0.lock().unwrap();
        assert_eq!(g.creates, 1, "no second runner for the pod");
        assert!(g.verified.len() == 1 && g.runners.is_empty());
    }

    // No token whole in what either VM or the broker said.
    for boot in [&first, &second] {
        let all = boot.everything();
        assert!(!all.contains(&pod_token), "the pod's token leaked:\n{all}");
        assert!(!all.contains(&minted), "the runner token leaked:\n{all}");
    }
    h.assert_no_secrets_logged();
}
