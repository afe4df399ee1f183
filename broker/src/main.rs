//! gitlab-runner-vm-broker: one GitLab runner per KubeVirt VM boot, minted outside the VM, and
//! a reaper for the runners of VMs that are gone. See docs/broker.md.

mod admission;
mod gitlab;
mod grant;
mod kube;
mod mint;
mod reaper;
// The agent's masking rule, the one file both binaries compile (one rule, nothing to drift).
#[path = "../../agent/src/secret.rs"]
mod secret;
mod selector;
mod server;
mod settings;
mod time;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info};

use crate::settings::Settings;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    let settings = Settings::parse();
    if let Err(e) = settings.validate() {
        eprintln!("gitlab-runner-vm-broker: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", secret::scrub(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let token_text = std::fs::read_to_string(&settings.access_token_file).map_err(|e| {
        anyhow::anyhow!(
            "reading the GitLab access token {}: {e} (mount the Secret there or fix --access-token-file)",
            settings.access_token_file.display()
        )
    })?;
    let token = secret::Secret::new(token_text.trim());
    if token.expose().is_empty() {
        anyhow::bail!(
            "the GitLab access token file {} is empty",
            settings.access_token_file.display()
        );
    }
    let kube_url = settings.kube_api_url().map_err(|e| anyhow::anyhow!(e))?;
    let ca = settings
        .kube_ca_file
        .exists()
        .then(|| settings.kube_ca_file.clone());
    let broker = Arc::new(mint::Broker {
        kube: kube::Kube::new(
            kube_url,
            settings.kube_token_file.clone(),
            ca,
            settings.request_timeout,
        )?,
        gitlab: gitlab::GitLab::new(&settings.gitlab_url, token, settings.request_timeout)?,
        gitlab_url: settings.gitlab_url.trim_end_matches('/').to_string(),
        policy: admission::Policy {
            namespace: settings.namespace.clone(),
            selector: selector::Selector::parse(&settings.vm_selector)
                .map_err(|e| anyhow::anyhow!(e))?,
            service_account: settings.vm_service_account.clone(),
            claim_stale_after_secs: settings.claim_stale_after.as_secs(),
        },
        spec: gitlab::RunnerSpec::from_settings(&settings),
        mint_deadline: settings.mint_deadline,
    });
    // Before the broker says it listens: a SIGTERM from then on stops it cleanly (installed
    // later, one that came between would kill it by the signal's default action).
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", settings.listen))?;
    info!(
        "listening on {} for VMs of namespace {}",
        listener.local_addr()?,
        settings.namespace
    );
    tokio::spawn(reaper::run(broker.clone(), settings.reap_interval));
    tokio::select! {
        served = server::serve(listener, broker) => served?,
        _ = term.recv() => info!("SIGTERM: stopping (the reaper of any replica cleans what a request in flight leaves)"),
        _ = int.recv() => {}
    }
    Ok(())
}
