//! The broker's settings: flags, each with an environment variable for the Deployment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gitlab-runner-vm-broker",
    version,
    about = "Mints one GitLab runner per KubeVirt VM boot (the VM proves itself with its virt-launcher pod's service-account token) and deletes the runners of VMs that are gone"
)]
pub struct Settings {
    /// Address the HTTP server listens on (plain HTTP: see docs/broker.md for TLS).
    #[arg(long, env = "BROKER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// The namespace of the VMs; tokens of pods elsewhere are refused.
    #[arg(long, env = "BROKER_NAMESPACE")]
    pub namespace: String,

    /// Labels the virt-launcher pod must carry besides `kubevirt.io=virt-launcher`: a label
    /// selector of `key=value`, `key!=value` and `key` terms joined by commas (a pool's
    /// `virtualMachineTemplate.spec.template.metadata.labels` reach the pod).
    #[arg(long, env = "BROKER_VM_SELECTOR", default_value = "")]
    pub vm_selector: String,

    /// The ServiceAccount the VMs' pods run as (KubeVirt's `serviceAccount` volume); when set,
    /// tokens of any other account are refused.
    #[arg(long, env = "BROKER_VM_SERVICE_ACCOUNT")]
    pub vm_service_account: Option<String>,

    /// The Kubernetes API; in a pod, from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
    #[arg(long, env = "BROKER_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// The broker's own service-account token, read again for every request (kubelet rotates it).
    #[arg(
        long,
        env = "BROKER_KUBE_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kube_token_file: PathBuf,

    /// CA bundle of the Kubernetes API (PEM); used when the file exists.
    #[arg(
        long,
        env = "BROKER_KUBE_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kube_ca_file: PathBuf,

    /// GitLab's URL, also handed to the VM.
    #[arg(long, env = "BROKER_GITLAB_URL")]
    pub gitlab_url: String,

    /// File holding the GitLab access token (scopes `create_runner`, `manage_runner` and `read_api`,
    /// or `api`): a mounted Secret. Read once at start.
    #[arg(long, env = "BROKER_ACCESS_TOKEN_FILE")]
    pub access_token_file: PathBuf,

    #[arg(long, env = "BROKER_RUNNER_TYPE", value_enum)]
    pub runner_type: RunnerType,

    /// Required with `--runner-type group_type`.
    #[arg(long, env = "BROKER_GROUP_ID")]
    pub group_id: Option<u64>,

    /// Required with `--runner-type project_type`.
    #[arg(long, env = "BROKER_PROJECT_ID")]
    pub project_id: Option<u64>,

    /// Tags of every runner, comma-separated.
    #[arg(long, env = "BROKER_TAG_LIST", default_value = "")]
    pub tag_list: String,

    #[arg(long, env = "BROKER_RUN_UNTAGGED", action = ArgAction::Set, default_value_t = true)]
    pub run_untagged: bool,

    /// A locked runner cannot be enabled for other projects.
    #[arg(long, env = "BROKER_LOCKED", action = ArgAction::Set, default_value_t = true)]
    pub locked: bool,

    #[arg(
        long,
        env = "BROKER_ACCESS_LEVEL",
        value_enum,
        default_value = "not_protected"
    )]
    pub access_level: AccessLevel,

    /// Seconds; GitLab wants at least 600.
    #[arg(long, env = "BROKER_MAXIMUM_TIMEOUT")]
    pub maximum_timeout: Option<u64>,

    /// When set, each runner token expires this long after its creation (`token_expires_at`,
    /// GitLab EE; 5 minutes to 15 days), e.g. `1d`.
    #[arg(long, env = "BROKER_TOKEN_LIFETIME", value_parser = humantime::parse_duration)]
    pub token_lifetime: Option<Duration>,

    /// Timeout of one GitLab or Kubernetes request.
    #[arg(long, env = "BROKER_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub request_timeout: Duration,

    /// How long the broker keeps trying to create a runner for one request (429s, 5xx, lost
    /// answers) before it gives up and releases the pod.
    #[arg(long, env = "BROKER_MINT_DEADLINE", value_parser = humantime::parse_duration, default_value = "60s")]
    pub mint_deadline: Duration,

    /// A claim on a pod older than this, never turned into a grant (a broker killed mid-way),
    /// may be taken over by a new request. Must exceed `--mint-deadline` plus one request timeout.
    #[arg(long, env = "BROKER_CLAIM_STALE_AFTER", value_parser = humantime::parse_duration, default_value = "120s")]
    pub claim_stale_after: Duration,

    /// How often the reaper compares GitLab's runners with the cluster's pods.
    #[arg(long, env = "BROKER_REAP_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub reap_interval: Duration,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
#[value(rename_all = "snake_case")]
pub enum RunnerType {
    InstanceType,
    GroupType,
    ProjectType,
}

impl RunnerType {
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerType::InstanceType => "instance_type",
            RunnerType::GroupType => "group_type",
            RunnerType::ProjectType => "project_type",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum AccessLevel {
    NotProtected,
    RefProtected,
}

impl AccessLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLevel::NotProtected => "not_protected",
            AccessLevel::RefProtected => "ref_protected",
        }
    }
}

impl Settings {
    /// Checks that flags agree with each other; the error names the flag to fix.
    pub fn validate(&self) -> Result<(), String> {
        match self.runner_type {
            RunnerType::GroupType if self.group_id.is_none() => {
                return Err("--runner-type group_type needs --group-id".into());
            }
            RunnerType::ProjectType if self.project_id.is_none() => {
                return Err("--runner-type project_type needs --project-id".into());
            }
            _ => {}
        }
        if self.tags().is_empty() && !self.run_untagged {
            return Err(
                "--run-untagged false with an empty --tag-list makes a runner that takes no job; give tags or run untagged".into(),
            );
        }
        if let Some(t) = self.maximum_timeout
            && t < 600
        {
            return Err(format!(
                "--maximum-timeout {t} is below GitLab's minimum of 600 seconds"
            ));
        }
        if self.claim_stale_after <= self.mint_deadline + self.request_timeout {
            return Err(
                "--claim-stale-after must exceed --mint-deadline plus --request-timeout, or a slow request could be taken over while it still creates a runner".into(),
            );
        }
        crate::selector::Selector::parse(&self.vm_selector)
            .map_err(|e| format!("--vm-selector: {e}"))?;
        Ok(())
    }

    pub fn tags(&self) -> Vec<String> {
        self.tag_list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect()
    }

    /// The Kubernetes API's URL, from the flag or the in-cluster environment.
    pub fn kube_api_url(&self) -> Result<String, String> {
        if let Some(url) = &self.kube_api_url {
            return Ok(url.trim_end_matches('/').to_string());
        }
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "no --kube-api-url and no KUBERNETES_SERVICE_HOST: run in a pod or pass --kube-api-url"
                .to_string()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(format!("https://{host}:{port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::Settings;
    use clap::CommandFactory;

    /// docs/broker.md's settings table names every flag, and its env variable follows the rule
    /// it states (`BROKER_` and the flag's name).
    #[test]
    fn every_flag_is_documented_with_its_variable() {
        let doc = include_str!("../../docs/broker.md");
        for arg in Settings::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            assert!(
                doc.contains(&format!("`--{long}`")),
                "docs/broker.md lacks --{long}"
            );
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert_eq!(
                env,
                format!("BROKER_{}", long.to_uppercase().replace('-', "_"))
            );
        }
    }
}
