//! Powering the VM off: the configured command (default `systemctl poweroff`, so that systemd
//! stops every service cleanly), run with `/bin/sh -c`.

use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

pub async fn power_off(command: &str) -> anyhow::Result<()> {
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run the power-off command `{command}`"))?;
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        tracing::info!("power-off command: {line}");
    }
    if !output.status.success() {
        bail!(
            "the power-off command `{command}` failed ({}); check --poweroff-command",
            output.status
        );
    }
    Ok(())
}
