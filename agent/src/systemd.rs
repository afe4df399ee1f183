//! systemd integration: readiness, status text, stopping, and the watchdog. Every call is a
//! no-op when the agent does not run under systemd (NOTIFY_SOCKET unset).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// gitlab-runner runs after a successful registration (or the agent holds the VM for a person).
pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// The agent is shutting down; only sent for bounded teardown steps, because systemd starts
/// TimeoutStopSec when it receives it.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its period when WatchdogSec= is set; otherwise does nothing, so
/// the agent has no periodic wake-ups of its own.
pub fn spawn_watchdog() {
    if let Some(period) = sd_notify::watchdog_enabled() {
        let interval = period / 2;
        tokio::spawn(async move {
            loop {
                send(&[NotifyState::Watchdog]);
                tokio::time::sleep(interval).await;
            }
        });
    }
}
