//! Google Compute Engine: what the agent knows of it. The metadata server (every request and
//! every answer carries `Metadata-Flavor: Google`), the instance's `user-data` attribute, the
//! SSH keys of the instance and the project as Google's guest agent reads them (OS Login,
//! `block-project-ssh-keys`, legacy `sshKeys`, `google-ssh` expiries), how DMI tells a GCE
//! VM, and its notices: `instance/preempted` (TRUE about 30 s before a Spot or preemptible VM is
//! stopped) and `instance/maintenance-event` (TERMINATE_ON_HOST_MAINTENANCE about 60 s ahead; a
//! live migration is logged, not acted on), each a long poll (`wait_for_change` from the last
//! ETag).

mod notices;
mod ssh;

use super::{Dmi, Provider};

#[cfg(test)]
pub use notices::{FLOOR, maintenance_event, preempted};
pub use ssh::ssh_keys;

pub const PROVIDER: Provider = Provider {
    // A custom metadata key named user-data, as cloud-init reads it; 404 when unset.
    user_data_path: "/computeMetadata/v1/instance/attributes/user-data",
    how_to_set_user_data: "gcloud compute instances create --metadata-from-file user-data=runner.json (or the instance template's metadata)",
    recognised,
    watch_notices: Some(notices::watch_notices),
};

/// Sent with every request (`Google`), and on every answer of the real metadata server.
pub const FLAVOR_HEADER: &str = "metadata-flavor";

const GCE_INSTANCE: &str = "/computeMetadata/v1/instance/attributes/";
const GCE_PROJECT: &str = "/computeMetadata/v1/project/attributes/";

fn recognised(dmi: &Dmi) -> bool {
    dmi.product_name == "Google Compute Engine"
        || dmi.sys_vendor == "Google"
        || dmi.product_serial.starts_with("GoogleCloud-")
}
