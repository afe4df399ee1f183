//! What the outside world asks for by signal (or, for a drain, by a preemption notice), and the
//! one helper that lets any wait be cut short by it.

use std::future::Future;

use anyhow::Context;
use tokio::sync::watch;

pub use crate::lifecycle::Interrupt;
use crate::preemption::Notice;

#[derive(Clone)]
pub struct Interrupts(
    watch::Receiver<Interrupt>,
    Option<watch::Receiver<Option<Notice>>>,
);

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
        Ok(Interrupts(rx, None))
    }

    /// A notice that the VM goes away is `Interrupt::Preempted` (its deadline, for the abort
    /// and the deregistration's budget, is read from `notice()`). A notice without a deadline
    /// (AWS's rebalance recommendation) is no interrupt here: it drains only once the VM took
    /// a job (`preemption::drains_now`, which the running step applies), so that a VM booted
    /// into an at-risk pool still does its first job instead of powering off at once.
    pub fn with_notices(mut self, notices: watch::Receiver<Option<Notice>>) -> Self {
        self.1 = Some(notices);
        self
    }

    pub fn current(&self) -> Interrupt {
        let signalled = *self.0.borrow();
        match self.notice() {
            Some(notice) if notice.vm_goes_away() => signalled.max(Interrupt::Preempted),
            _ => signalled,
        }
    }

    /// What cut a wait short (registration, a daemon reload, a hold), for the journal.
    pub fn describe(&self) -> String {
        match (self.current(), self.notice()) {
            (Interrupt::Stop, _) => "stop requested (SIGTERM)".into(),
            (Interrupt::Preempted, Some(notice)) => notice.describe(std::time::SystemTime::now()),
            _ => "drain requested (SIGUSR1)".into(),
        }
    }

    /// The most urgent preemption notice so far.
    pub fn notice(&self) -> Option<Notice> {
        self.1.as_ref().and_then(|rx| rx.borrow().clone())
    }

    /// Resolves once an interrupt of at least `level` was asked for.
    pub async fn reached(&self, level: Interrupt) {
        let mut rx = self.0.clone();
        let signalled = async {
            if rx.wait_for(|i| *i >= level).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = signalled => {}
            _ = self.vm_goes_away(), if level <= Interrupt::Preempted => {}
        }
    }

    /// Resolves once a notice says that the VM goes away (one with a deadline).
    async fn vm_goes_away(&self) {
        loop {
            let seen = self.notice();
            if seen.as_ref().is_some_and(Notice::vm_goes_away) {
                return;
            }
            self.notice_other_than(seen.as_ref()).await;
        }
    }

    /// Resolves once the notice differs from `seen` (never without a watcher).
    pub async fn notice_other_than(&self, seen: Option<&Notice>) {
        let Some(rx) = &self.1 else {
            return std::future::pending().await;
        };
        let mut rx = rx.clone();
        if rx.wait_for(|n| n.as_ref() != seen).await.is_err() {
            // The watcher ended: the notice it left is all there will be.
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
