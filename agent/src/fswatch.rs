//! Waiting for file-system changes without polling: inotify on a directory, and the mount table
//! (a config disk mounted over an empty directory creates no inotify event, but makes
//! /proc/self/mountinfo signal a priority event).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// An inotify instance with the raw fd tokio's reactor needs (nix only offers `AsFd`).
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct DirWatch {
    inotify: AsyncFd<InotifyFd>,
}

impl DirWatch {
    pub fn new(dir: &Path, mask: AddWatchFlags) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(dir, mask)?;
        // SAFETY: the fd belongs to the Inotify, which the AsyncFd owns until it is dropped.
        let inotify =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
                .map_err(io::Error::from)?;
        Ok(DirWatch { inotify })
    }

    /// Waits for at least one event and drains all pending ones. Which event it was does not
    /// matter: callers re-read the state they care about.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.inotify.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => {
                    // Drain whatever else is queued so the next wait starts clean.
                    while let Ok(more) = guard.get_inner().0.read_events() {
                        if more.is_empty() {
                            break;
                        }
                    }
                    guard.clear_ready();
                    return Ok(());
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Wakes up when the mount table changes.
pub struct MountWatch {
    mountinfo: AsyncFd<File>,
}

impl MountWatch {
    pub fn new() -> io::Result<Self> {
        let file = File::open("/proc/self/mountinfo")?;
        // SAFETY: the File owns its fd for as long as the AsyncFd owns the File.
        let mountinfo = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
            .map_err(io::Error::from)?;
        Ok(MountWatch { mountinfo })
    }

    pub async fn changed(&self) -> io::Result<()> {
        let mut guard = self.mountinfo.ready(Interest::PRIORITY).await?;
        guard.clear_ready();
        Ok(())
    }
}

/// The watch's next change; never, without a watch.
async fn maybe_changed(
    watch: Option<impl std::future::Future<Output = io::Result<()>>>,
) -> Option<io::Result<()>> {
    match watch {
        Some(changed) => Some(changed.await),
        None => std::future::pending().await,
    }
}

/// The directory itself if it exists, else its nearest existing ancestor.
fn nearest_existing_dir(path: &Path) -> PathBuf {
    let mut dir = path.to_path_buf();
    while !dir.is_dir() {
        match dir.parent() {
            Some(parent) if parent != dir => dir = parent.to_path_buf(),
            _ => return PathBuf::from("/"),
        }
    }
    dir
}

/// Returns once `path` exists (whatever it is: reading it says what is wrong with a FIFO or a
/// directory). The caller bounds the wait with a timeout.
pub async fn wait_for_file(path: &Path) -> io::Result<()> {
    // Usually the file is there already: then no watch at all, because closing an inotify
    // instance that holds a watch waits for the kernel's SRCU grace period (5 to 18 ms measured
    // on one CPU), which start-up would pay before gitlab-runner is spawned.
    if path.exists() {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    loop {
        // Watch first, then look, so that a file created in between is not missed.
        let watched = nearest_existing_dir(parent);
        let dir = DirWatch::new(
            &watched,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_ATTRIB
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF,
        )?;
        // A link to a file still to come (on a disk mounted later, in another directory): its
        // target's directory changes, not the link's.
        let target_dir = crate::files::dangling_link(path).and_then(|target| {
            let dir = nearest_existing_dir(target.parent().unwrap_or(Path::new("/")));
            DirWatch::new(
                &dir,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ATTRIB,
            )
            .ok()
        });
        let mounts = MountWatch::new().ok();
        if path.exists() {
            return Ok(());
        }
        tracing::debug!(
            "waiting for {} (watching {})",
            path.display(),
            watched.display()
        );
        tokio::select! {
            r = dir.changed() => r?,
            Some(r) = maybe_changed(mounts.as_ref().map(MountWatch::changed)) => r?,
            Some(r) = maybe_changed(target_dir.as_ref().map(DirWatch::changed)) => r?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn returns_at_once_for_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runner.json");
        std::fs::write(&file, "{}").unwrap();
        tokio::time::timeout(Duration::from_secs(5), wait_for_file(&file))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn wakes_up_when_the_file_and_its_directories_appear() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/runner.json");
        let writer = {
            let file = file.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::fs::write(&file, "{}").unwrap();
            })
        };
        tokio::time::timeout(Duration::from_secs(10), wait_for_file(&file))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert!(file.is_file());
    }

    #[tokio::test]
    async fn keeps_waiting_while_nothing_happens() {
        let dir = tempfile::tempdir().unwrap();
        let result = tokio::time::timeout(
            Duration::from_millis(300),
            wait_for_file(&dir.path().join("x")),
        )
        .await;
        assert!(result.is_err());
    }
}
