//! What the outside world asks for by signal, and the one helper that lets any wait be cut
//! short by it.

use std::future::Future;

use anyhow::Context;
use tokio::sync::watch;

/// Only ever escalates: None < Drain < Stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Interrupt {
    None,
    /// SIGUSR1 (`gitlab-runner-vm drain`): finish the current job, take no new one.
    Drain,
    /// SIGTERM/SIGINT: the VM is being shut down from outside.
    Stop,
}

#[derive(Clone)]
pub struct Interrupts(watch::Receiver<Interrupt>);

impl Interrupts {
    /// Starts listening for SIGTERM, SIGINT and SIGUSR1.
    pub fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut usr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
        let (tx, rx) = watch::channel(Interrupt::None);
        tokio::spawn(async move {
            loop {
                let wanted = tokio::select! {
                    _ = term.recv() => Interrupt::Stop,
                    _ = int.recv() => Interrupt::Stop,
                    _ = usr1.recv() => Interrupt::Drain,
                };
                tx.send_if_modified(|current| {
                    let escalates = wanted > *current;
                    if escalates {
                        *current = wanted;
                    }
                    escalates
                });
            }
        });
        Ok(Interrupts(rx))
    }

    pub fn current(&self) -> Interrupt {
        *self.0.borrow()
    }

    /// Resolves once an interrupt of at least `level` was asked for.
    pub async fn reached(&self, level: Interrupt) {
        let mut rx = self.0.clone();
        if rx.wait_for(|i| *i >= level).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Runs `work` unless an interrupt of at least `level` comes first: `None` then, and `work`
    /// is dropped. A stop outranks work that is ready at the same moment.
    pub async fn unless<T>(&self, level: Interrupt, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.reached(level) => None,
            done = work => Some(done),
        }
    }
}
