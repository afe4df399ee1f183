//! The operator's "keep this VM": while the keep file exists the VM stays up. The hold ends when
//! the file is removed, or at its deadline: `hold_extend` after the later of the hold's start and
//! the file's last modification (touching it extends the hold), but never later than `hold_max`
//! after the hold began, however often the file is touched. So no job (a background `touch`
//! loop) can park a VM for longer than the ceiling. Watched with inotify; the only timer is the
//! deadline itself.

use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::sys::inotify::AddWatchFlags;

use crate::fswatch::DirWatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    Released,
    Expired,
}

/// How long a hold lasts: `extend` after the hold's start or the keep file's last modification,
/// whichever is later, and at most `max` after the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    pub max: Duration,
    pub extend: Duration,
}

/// The pure part: given when the hold began and the keep file's modification time (None: it is
/// gone), is the hold over, and otherwise until when does it last?
pub fn hold_state(
    started: SystemTime,
    modified: Option<SystemTime>,
    limits: HoldLimits,
    now: SystemTime,
) -> Result<SystemTime, HoldEnd> {
    let Some(modified) = modified else {
        return Err(HoldEnd::Released);
    };
    // A time too late for the clock means "until the file is removed".
    let at = |base: SystemTime, span| base.checked_add(span).unwrap_or_else(forever);
    let ceiling = at(started, limits.max);
    let touched = at(modified.max(started), limits.extend);
    let deadline = touched.min(ceiling).min(forever());
    if now >= deadline {
        Err(HoldEnd::Expired)
    } else {
        Ok(deadline)
    }
}

/// The deadline of a hold that only the keep file's removal ends: 9999-12-31T23:59:59Z, beyond
/// any VM's life and still representable in status.json.
fn forever() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// The deadline of a hold that began at `started`, if the keep file exists and the hold has
/// not expired.
pub fn deadline(keep_file: &Path, limits: HoldLimits, started: SystemTime) -> Option<SystemTime> {
    hold_state(
        started,
        modified(keep_file).ok()?,
        limits,
        SystemTime::now(),
    )
    .ok()
}

pub fn keep_file_exists(keep_file: &Path) -> bool {
    keep_file.symlink_metadata().is_ok()
}

fn modified(keep_file: &Path) -> io::Result<Option<SystemTime>> {
    match keep_file.symlink_metadata() {
        Ok(meta) => Ok(Some(meta.modified()?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Returns once the keep file exists (an operator asked to keep the VM while it was about to
/// power off, e.g. during the failure delay). Watched with inotify, no polling.
pub async fn keep_file_created(keep_file: &Path) -> io::Result<()> {
    let dir = keep_file.parent().unwrap_or(Path::new("/"));
    // Watch first, then look, so that a file created in between is not missed. One watch for
    // the whole wait: closing one costs a kernel grace period (see fswatch::wait_for_file).
    let watch = DirWatch::new(
        dir,
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ATTRIB,
    )?;
    loop {
        if keep_file_exists(keep_file) {
            return Ok(());
        }
        watch.changed().await?;
    }
}

/// Holds until the keep file is removed or expires. `started`: when the hold began, which a
/// restarted agent keeps (each restart must not begin a new `max`). `on_deadline` is called
/// with each new deadline (for status.json).
pub async fn hold(
    keep_file: &Path,
    limits: HoldLimits,
    started: SystemTime,
    mut on_deadline: impl FnMut(SystemTime),
) -> io::Result<HoldEnd> {
    let dir = keep_file.parent().unwrap_or(Path::new("/"));
    let mut last_deadline = None;
    // One watch, made before the first look, for the whole hold.
    let watch = DirWatch::new(
        dir,
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MODIFY,
    )?;
    loop {
        let deadline = match hold_state(started, modified(keep_file)?, limits, SystemTime::now()) {
            Err(end) => return Ok(end),
            Ok(deadline) => deadline,
        };
        if last_deadline != Some(deadline) {
            on_deadline(deadline);
            last_deadline = Some(deadline);
        }
        let remaining = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            r = watch.changed() => r?,
            _ = tokio::time::sleep(remaining) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u64, extend: u64) -> HoldLimits {
        HoldLimits {
            max: Duration::from_secs(max),
            extend: Duration::from_secs(extend),
        }
    }

    #[test]
    fn hold_state_decisions() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let l = limits(100, 30);
        // The hold began at 10.
        assert_eq!(hold_state(t(10), None, l, t(15)), Err(HoldEnd::Released));
        // A file older than the hold: `extend` from the hold's start.
        assert_eq!(hold_state(t(10), Some(t(0)), l, t(15)), Ok(t(40)));
        assert_eq!(
            hold_state(t(10), Some(t(0)), l, t(40)),
            Err(HoldEnd::Expired)
        );
        // Touching the file moves the deadline...
        assert_eq!(hold_state(t(10), Some(t(35)), l, t(36)), Ok(t(65)));
        // ...but never past `max` after the hold's start, however recent the touch.
        assert_eq!(hold_state(t(10), Some(t(95)), l, t(96)), Ok(t(110)));
        assert_eq!(
            hold_state(t(10), Some(t(109)), l, t(110)),
            Err(HoldEnd::Expired)
        );
        // `extend` longer than `max`: the ceiling wins.
        assert_eq!(
            hold_state(t(10), Some(t(10)), limits(20, 30), t(11)),
            Ok(t(30))
        );
        // Spans beyond the clock's range hold until removal, they do not panic.
        assert_eq!(
            hold_state(
                t(0),
                Some(t(0)),
                HoldLimits {
                    max: Duration::MAX,
                    extend: Duration::MAX
                },
                t(100)
            ),
            Ok(forever())
        );
    }

    #[test]
    fn a_touch_loop_cannot_pass_the_ceiling() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let l = limits(14_400, 3_600);
        let mut now = 0;
        // The file touched every minute from the hold's start on.
        loop {
            match hold_state(t(0), Some(t(now)), l, t(now)) {
                Ok(deadline) => assert!(deadline <= t(14_400)),
                Err(end) => {
                    assert_eq!(end, HoldEnd::Expired);
                    break;
                }
            }
            now += 60;
        }
        assert_eq!(now, 14_400);
    }

    #[tokio::test]
    async fn removal_releases_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("keep-runner");
        std::fs::write(&keep, "").unwrap();
        let remover = {
            let keep = keep.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::fs::remove_file(keep).unwrap();
            })
        };
        let mut deadlines = Vec::new();
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            hold(&keep, limits(3600, 3600), SystemTime::now(), |d| {
                deadlines.push(d)
            }),
        )
        .await
        .unwrap()
        .unwrap();
        remover.await.unwrap();
        assert_eq!(end, HoldEnd::Released);
        assert_eq!(deadlines.len(), 1);
    }

    #[tokio::test]
    async fn keep_file_created_wakes_up_when_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("keep-runner");
        let waiting = tokio::time::timeout(Duration::from_millis(300), keep_file_created(&keep));
        assert!(waiting.await.is_err(), "no keep file yet");
        let creator = {
            let keep = keep.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::fs::write(keep, "").unwrap();
            })
        };
        tokio::time::timeout(Duration::from_secs(10), keep_file_created(&keep))
            .await
            .unwrap()
            .unwrap();
        creator.await.unwrap();
    }

    #[tokio::test]
    async fn an_old_keep_file_expires() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("keep-runner");
        std::fs::write(&keep, "").unwrap();
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            hold(
                &keep,
                HoldLimits {
                    max: Duration::from_secs(3600),
                    extend: Duration::from_millis(300),
                },
                SystemTime::now(),
                |_| {},
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(end, HoldEnd::Expired);
        assert!(keep.exists(), "the hold never deletes the operator's file");
    }
}
