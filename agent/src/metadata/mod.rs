//! The cloud platform the VM runs on, and where runner.json comes from. A platform is told
//! (`--config-source aws|gce|digitalocean`) or recognised from DMI/SMBIOS (`auto`), the way
//! cloud-init's ds-identify does it: from files the firmware wrote, without probing a network
//! the VM may not be on.
//!
//! - `aws`, `gce`, `digitalocean`: what the agent knows of each platform (its `Provider`: where
//!   user-data is and how an operator sets it, how DMI tells it, its notices; its request
//!   headers and token; its SSH keys), one module each;
//! - `notices`: which platform's preemption notices are watched, and the start of its watch;
//! - `client`: `MetadataClient`, one GET with the platform's headers (and AWS's IMDSv2 session
//!   token), 404 as None, no redirects, capped bodies; `fetch` retries it within a deadline;
//! - `error`: `MetadataError`, which failures are retried, the fix each names;
//! - `user_data`: runner.json as user-data, per platform, and what user-data is when it is not;
//! - `ssh_keys`: what every platform's SSH keys are checked against (the `ssh-keys` command,
//!   which writes them for sshd, is `crate::ssh_keys_command`).

mod aws;
mod client;
mod digitalocean;
mod error;
mod gce;
mod notices;
pub mod ssh_keys;
mod user_data;

#[cfg(test)]
mod mock_tests;

use std::path::Path;

use tokio::time::Instant;

// `Answer` (with its ETag) is for the notice watches' long poll (`gce`).
use client::Answer;
pub use client::MetadataClient;
pub use error::MetadataError;
pub use notices::{watch_notices, watched_platform};
pub use user_data::{NotRunnerJson, fetch_runner_json};

/// Where DMI/SMBIOS strings are read (`--dmi-dir` points tests at a fixture directory).
pub const DEFAULT_DMI_DIR: &str = "/sys/class/dmi/id";
/// Every platform serves its metadata here (link-local; GCE's metadata.google.internal is it too).
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

/// A platform with a metadata service the agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    Aws,
    Gce,
    #[value(name = "digitalocean")]
    DigitalOcean,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Aws => "aws",
            Platform::Gce => "gce",
            Platform::DigitalOcean => "digitalocean",
        }
    }
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        let value = self.to_possible_value().map(|v| v.get_name().to_string());
        f.write_str(value.as_deref().unwrap_or("?"))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--config-source`: where runner.json comes from (for `ssh-keys`, which platform's keys:
/// `file` and `broker` have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigSource {
    /// The file at `--config` (a config disk: KubeVirt, Proxmox, QEMU)
    File,
    /// EC2 user-data over IMDSv2
    Aws,
    /// GCE's `user-data` instance attribute
    Gce,
    /// DigitalOcean's user-data
    #[value(name = "digitalocean")]
    DigitalOcean,
    /// The platform recognised from DMI/SMBIOS; the file when none is
    Auto,
    /// The broker (KubeVirt): a runner of its own for this boot, for the pod's token
    /// (`--broker-url`, `--broker-token-file`; docs/broker.md)
    Broker,
}

impl ConfigSource {
    /// The name on the command line (`file`, `aws`, ..., `auto`).
    pub fn name(self) -> &'static str {
        match self {
            ConfigSource::File => "file",
            ConfigSource::Aws => "aws",
            ConfigSource::Gce => "gce",
            ConfigSource::DigitalOcean => "digitalocean",
            ConfigSource::Auto => "auto",
            ConfigSource::Broker => "broker",
        }
    }

    /// The platform whose metadata service serves runner.json; None: the file.
    pub fn platform(self, dmi_dir: &Path) -> Option<Platform> {
        match self {
            ConfigSource::File | ConfigSource::Broker => None,
            ConfigSource::Aws => Some(Platform::Aws),
            ConfigSource::Gce => Some(Platform::Gce),
            ConfigSource::DigitalOcean => Some(Platform::DigitalOcean),
            ConfigSource::Auto => detect(&Dmi::read(dmi_dir)),
        }
    }
}

/// The DMI strings that tell platforms apart (absent or unreadable ones are empty).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dmi {
    pub sys_vendor: String,
    pub product_name: String,
    pub product_version: String,
    pub product_serial: String,
    pub product_uuid: String,
    pub bios_vendor: String,
    pub chassis_asset_tag: String,
}

impl Dmi {
    pub fn read(dir: &Path) -> Dmi {
        // Small sysfs files; a fixture that is not one (a FIFO, a huge file) reads as empty.
        let field = |name: &str| {
            crate::files::read_text(&dir.join(name), 4096)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Dmi {
            sys_vendor: field("sys_vendor"),
            product_name: field("product_name"),
            product_version: field("product_version"),
            product_serial: field("product_serial"),
            product_uuid: field("product_uuid"),
            bios_vendor: field("bios_vendor"),
            chassis_asset_tag: field("chassis_asset_tag"),
        }
    }
}

/// What the agent knows of one platform, written in the platform's own module.
pub struct Provider {
    /// Where the metadata service serves the instance's user-data.
    pub user_data_path: &'static str,
    /// How an operator gives an instance runner.json as its user-data.
    pub how_to_set_user_data: &'static str,
    /// Whether these DMI strings describe the platform.
    pub recognised: fn(&Dmi) -> bool,
    /// The watch of the platform's preemption and maintenance notices; None: it gives none.
    pub watch_notices: Option<notices::NoticeWatch>,
}

impl Platform {
    pub fn provider(self) -> &'static Provider {
        match self {
            Platform::Aws => &aws::PROVIDER,
            Platform::Gce => &gce::PROVIDER,
            Platform::DigitalOcean => &digitalocean::PROVIDER,
        }
    }
}

/// The SSH keys the platform gives `user`, fetched within `deadline`: each platform's module
/// knows where they are and which count.
pub async fn fetch_ssh_keys(
    client: &MetadataClient,
    user: &str,
    deadline: Instant,
) -> Result<ssh_keys::Keys, MetadataError> {
    let mut keys = ssh_keys::Keys::default();
    match client.platform() {
        Platform::Aws => aws::ssh_keys(client, deadline, &mut keys).await?,
        Platform::Gce => gce::ssh_keys(client, user, deadline, &mut keys).await?,
        Platform::DigitalOcean => digitalocean::ssh_keys(client, deadline, &mut keys).await?,
    }
    Ok(keys)
}

/// The platform these DMI strings describe, if it is one the agent knows (in the enum's
/// order: the first that recognises them).
pub fn detect(dmi: &Dmi) -> Option<Platform> {
    use clap::ValueEnum;
    Platform::value_variants()
        .iter()
        .copied()
        .find(|p| (p.provider().recognised)(dmi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dmi(sys_vendor: &str, product_name: &str) -> Dmi {
        Dmi {
            sys_vendor: sys_vendor.into(),
            product_name: product_name.into(),
            ..Dmi::default()
        }
    }

    #[test]
    fn nitro_graviton_and_xen_instances_are_aws() {
        assert_eq!(detect(&dmi("Amazon EC2", "m7g.large")), Some(Platform::Aws));
        let xen = Dmi {
            sys_vendor: "Xen".into(),
            product_name: "HVM domU".into(),
            product_version: "4.11.amazon".into(),
            product_uuid: "EC2E1916-9099-7CAF-FD21-012345678901".into(),
            product_serial: "ec2e1916-9099-7caf-fd21-012345678901".into(),
            ..Dmi::default()
        };
        assert_eq!(detect(&xen), Some(Platform::Aws));
    }

    #[test]
    fn gce_and_digitalocean_are_recognised() {
        assert_eq!(
            detect(&dmi("Google", "Google Compute Engine")),
            Some(Platform::Gce)
        );
        assert_eq!(
            detect(&dmi("DigitalOcean", "Droplet")),
            Some(Platform::DigitalOcean)
        );
    }

    #[test]
    fn kubevirt_qemu_and_proxmox_are_no_platform() {
        assert_eq!(detect(&dmi("KubeVirt", "None")), None);
        assert_eq!(detect(&dmi("QEMU", "Standard PC (Q35 + ICH9, 2009)")), None);
        assert_eq!(detect(&Dmi::default()), None);
        // A plain Xen host whose UUID merely starts with "ec2" by chance is not EC2.
        let xen = Dmi {
            sys_vendor: "Xen".into(),
            product_uuid: "ec2a0000-0000-0000-0000-000000000000".into(),
            product_serial: "0000".into(),
            ..Dmi::default()
        };
        assert_eq!(detect(&xen), None);
    }

    #[test]
    fn each_source_is_named_as_on_the_command_line() {
        use clap::ValueEnum;
        for source in ConfigSource::value_variants() {
            let value = source.to_possible_value().unwrap();
            assert_eq!(source.name(), value.get_name());
        }
    }

    #[test]
    fn auto_reads_the_dmi_directory_and_a_told_source_does_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ConfigSource::Auto.platform(dir.path()), None);
        std::fs::write(dir.path().join("sys_vendor"), "DigitalOcean\n").unwrap();
        assert_eq!(
            ConfigSource::Auto.platform(dir.path()),
            Some(Platform::DigitalOcean)
        );
        assert_eq!(ConfigSource::Gce.platform(dir.path()), Some(Platform::Gce));
        assert_eq!(ConfigSource::File.platform(dir.path()), None);
        assert_eq!(ConfigSource::Broker.platform(dir.path()), None);
    }
}
