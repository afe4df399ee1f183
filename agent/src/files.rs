//! Reading the files the agent is pointed at (runner.json, the files it names, the state files)
//! without trusting what they are: regular files only, never more than a cap, and no read that
//! can block. A FIFO would block the (single-threaded) runtime and with it SIGTERM; a device
//! such as /dev/zero would be read until memory runs out.

use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// runner.json.
pub const CONFIG_CAP: u64 = 1024 * 1024;
/// Files runner.json names: token files and `tls_ca_file` (a CA bundle can have a few hundred
/// certificates).
pub const NAMED_FILE_CAP: u64 = 1024 * 1024;
/// Files the agent wrote itself into the state directory (status.json, config.toml, the
/// system id).
pub const STATE_FILE_CAP: u64 = 1024 * 1024;

/// The whole content of the regular file at `path` (symbolic links are followed: Kubernetes
/// mounts Secrets as links), if it is at most `cap` bytes. Anything else is an error that says
/// what the path is instead ("is a FIFO, not a regular file") or how large it may be.
pub fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO without a writer, or a terminal line, returns at once instead
    // of waiting. O_NOCTTY: a terminal never becomes ours. std adds O_CLOEXEC.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
    {
        Ok(file) => file,
        Err(e) => {
            // Opening a socket fails with ENXIO; say what it is instead.
            return Err(match std::fs::metadata(path) {
                Ok(meta) if !meta.is_file() => not_regular(meta.file_type()),
                _ => e,
            });
        }
    };
    // fstat of what was opened: no window for the path to change in between.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    if meta.len() > cap {
        return Err(too_large(cap));
    }
    // Reads of regular files ignore O_NONBLOCK on Linux; clear it anyway, so that no file
    // system can answer EAGAIN.
    fcntl(&file, FcntlArg::F_SETFL(OFlag::empty()))?;
    read_at_most(file, cap)
}

/// `read_capped`, for a file that must be UTF-8 text.
pub fn read_text(path: &Path, cap: u64) -> io::Result<String> {
    String::from_utf8(read_capped(path, cap)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Where the symbolic link at `path` points (a relative target is taken from the link's
/// directory, as the kernel does), if `path` is a link and its target does not exist: what an
/// operator must be told instead of "exists" or "did not appear".
pub fn dangling_link(path: &Path) -> Option<std::path::PathBuf> {
    if !std::fs::symlink_metadata(path)
        .ok()?
        .file_type()
        .is_symlink()
    {
        return None;
    }
    if std::fs::metadata(path).is_ok() {
        return None;
    }
    let target = std::fs::read_link(path).ok()?;
    Some(path.parent().unwrap_or(Path::new("/")).join(target))
}

/// At most the first `len` bytes of the regular file at `path`, opened as `read_capped` opens
/// (never blocking); None when it is no regular file or cannot be read.
pub fn read_prefix(path: &Path, len: usize) -> Option<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    file.take(len as u64).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// Reads to the end, but never more than `cap` bytes: the size fstat gave may already be out
/// of date (a file still being written, or a /proc file that says 0).
fn read_at_most(file: File, cap: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.take(cap.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(too_large(cap));
    }
    Ok(buf)
}

fn not_regular(kind: FileType) -> io::Error {
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "a special file"
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file"),
    )
}

fn too_large(cap: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("is larger than {} KiB", cap.div_ceil(1024)),
    )
}

/// Writes `contents` to `path` whole or not at all: a file beside it (created with `mode`),
/// synced, then renamed over `path`, so a reader (or an agent restarted mid-write) never sees
/// half a file. A missing parent directory is created with `dir_mode` exactly (see
/// `create_dirs`); an existing one is left as it is.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32, dir_mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    create_dirs(dir, dir_mode)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    // Left behind by a write that was cut short; create_new must not follow a planted link.
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    // The umask may have narrowed the mode: 0644 must stay readable by sshd's users.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// Creates `dir` and whichever of its ancestors are missing, each with `mode` exactly: the
/// process umask (077 in a hardened unit) must not narrow it, or sshd, reading
/// `/run/ssh-keys/<user>` as that user, could not enter a 0700 directory. Directories that
/// exist are left as they are: someone made them so (a unit's `RuntimeDirectoryMode`, an
/// operator), and a chmod here could undo a deliberate choice.
pub fn create_dirs(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .collect();
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            // Made by this call: its mode is ours to set.
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?,
            // Made meanwhile by someone else: theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn message(r: io::Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn reads_a_regular_file_and_a_link_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "glrt-fake\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_text(&file, 100).unwrap(), "glrt-fake\n");
        assert_eq!(read_text(&link, 100).unwrap(), "glrt-fake\n");
        assert_eq!(read_capped(&file, 10).unwrap(), b"glrt-fake\n");
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = Instant::now();
        assert_eq!(
            message(read_text(&fifo, 100)),
            "is a FIFO, not a regular file"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn devices_directories_and_sockets_are_refused() {
        assert_eq!(
            message(read_capped(Path::new("/dev/zero"), 100)),
            "is a character device, not a regular file"
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            message(read_capped(dir.path(), 100)),
            "is a directory, not a regular file"
        );
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(
            message(read_capped(&socket, 100)),
            "is a socket, not a regular file"
        );
        let missing = read_capped(&dir.path().join("missing"), 100).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_over_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        std::fs::write(&file, vec![b'x'; 2049]).unwrap();
        assert_eq!(read_capped(&file, 2049).unwrap().len(), 2049);
        assert_eq!(message(read_capped(&file, 2048)), "is larger than 2 KiB");
        // A file that grows after fstat is still cut off at the cap.
        let f = File::open(&file).unwrap();
        assert_eq!(message(read_at_most(f, 1024)), "is larger than 1 KiB");
        let f = File::open(&file).unwrap();
        assert_eq!(read_at_most(f, 4096).unwrap().len(), 2049);
    }

    #[test]
    fn atomic_writes_replace_whole_files_with_the_mode_asked_for() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new/dir/runner.json");
        write_atomically(&file, b"{}", 0o600, 0o700).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        // A stale temporary file from a write cut short is replaced, not appended to.
        std::fs::write(dir.path().join("new/dir/.runner.json.tmp"), "stale").unwrap();
        write_atomically(&file, b"{\"a\": 1}", 0o644, 0o700).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"{\"a\": 1}");
        assert_eq!(mode(&file), 0o644);
        assert!(!dir.path().join("new/dir/.runner.json.tmp").exists());
    }

    #[test]
    fn a_link_to_nothing_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("runner.json");
        std::os::unix::fs::symlink("disk/runner.json", &link).unwrap();
        assert_eq!(
            dangling_link(&link),
            Some(dir.path().join("disk/runner.json"))
        );
        std::fs::create_dir(dir.path().join("disk")).unwrap();
        std::fs::write(dir.path().join("disk/runner.json"), "{}").unwrap();
        assert_eq!(dangling_link(&link), None);
        assert_eq!(dangling_link(&dir.path().join("disk/runner.json")), None);
        assert_eq!(dangling_link(&dir.path().join("missing")), None);
    }

    #[test]
    fn text_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bin");
        std::fs::write(&file, b"ok\xff").unwrap();
        assert_eq!(
            message(read_text(&file, 100)),
            "is not UTF-8 text (invalid byte at offset 2)"
        );
        assert_eq!(read_capped(&file, 100).unwrap(), b"ok\xff");
    }
}
