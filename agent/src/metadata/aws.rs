//! Amazon EC2: what the agent knows of it. The instance metadata service (IMDSv2: a session
//! token first, then every request with it), the instance's user-data, the launch key pairs,
//! and how DMI tells an EC2 instance. Its preemption notices (Spot interruption, rebalance
//! recommendation) are read in `preemption`.

use tokio::time::Instant;

use super::ssh_keys::{Keys, text};
use super::{Dmi, MetadataClient, MetadataError, Provider};

pub const PROVIDER: Provider = Provider {
    // IMDSv2; 404 when the instance has none.
    user_data_path: "/latest/user-data",
    how_to_set_user_data: "aws ec2 run-instances --user-data file://runner.json (or the launch template's user data)",
    recognised,
};

/// IMDSv2's session token: PUT here with the TTL header, then sent with every request.
pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Six hours, the longest IMDSv2 allows: a boot needs one token.
pub const TOKEN_TTL_SECONDS: &str = "21600";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// The launch key pairs: lines `0=name`, then `<i>/openssh-key`.
const KEYS: &str = "/latest/meta-data/public-keys/";

/// Nitro instances name Amazon EC2 as vendor; Xen-based ones have the vendor Xen, and the UUID
/// and serial start with ec2.
fn recognised(dmi: &Dmi) -> bool {
    let starts_ec2 = |s: &str| s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ec2"));
    dmi.sys_vendor == "Amazon EC2"
        || dmi.bios_vendor == "Amazon EC2"
        || (starts_ec2(&dmi.product_uuid) && starts_ec2(&dmi.product_serial))
        || dmi.product_version.to_ascii_lowercase().contains("amazon")
}

/// The launch key pairs, for whichever user the image logs in.
pub async fn ssh_keys(
    client: &MetadataClient,
    deadline: Instant,
    keys: &mut Keys,
) -> Result<(), MetadataError> {
    let index = text(client.fetch(KEYS, deadline).await?);
    for entry in index.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // `0=my-key`: the number is the key's directory.
        let number = entry.split('=').next().unwrap_or("");
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            keys.skipped
                .push(format!("{KEYS}: an entry that is not <number>=<name>"));
            continue;
        }
        let path = format!("{KEYS}{number}/openssh-key");
        let key = text(client.fetch(&path, deadline).await?);
        for line in key.lines().filter(|l| !l.trim().is_empty()) {
            keys.offer(&path, line);
        }
    }
    Ok(())
}
