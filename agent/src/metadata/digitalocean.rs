//! DigitalOcean: what the agent knows of it. The droplet metadata service (no token, no
//! header), the droplet's user-data, its SSH keys, and how DMI tells a droplet. No notices:
//! DigitalOcean announces no preemption or maintenance to the droplet (it does not preempt
//! droplets, and its maintenance live-migrates them), so nothing is watched here.

use tokio::time::Instant;

use super::ssh_keys::{Keys, text};
use super::{Dmi, MetadataClient, MetadataError, Provider};

pub const PROVIDER: Provider = Provider {
    // 404 or empty when the droplet has none.
    user_data_path: "/metadata/v1/user-data",
    how_to_set_user_data: "doctl compute droplet create --user-data-file runner.json",
    recognised,
    // DigitalOcean announces nothing before a droplet goes away (see above).
    watch_notices: None,
};

/// One key per line.
const KEYS: &str = "/metadata/v1/public-keys";

fn recognised(dmi: &Dmi) -> bool {
    dmi.sys_vendor == "DigitalOcean"
}

/// The droplet's SSH keys, for whichever user the image logs in.
pub async fn ssh_keys(
    client: &MetadataClient,
    deadline: Instant,
    keys: &mut Keys,
) -> Result<(), MetadataError> {
    let all = text(client.fetch(KEYS, deadline).await?);
    for line in all.lines().filter(|l| !l.trim().is_empty()) {
        keys.offer(KEYS, line);
    }
    Ok(())
}
