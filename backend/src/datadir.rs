//! One `companion serve` per data directory: an exclusive lock on `<data_dir>/companion.lock`
//! held for the life of the server. Two servers on one directory would both write its SQLite
//! database, TLS material and secrets, and both answer for the same devices; the second one
//! refuses to start instead. The operating system releases the lock when the process ends,
//! however it ends (`kill -9` included), so a crash never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "companion.lock";

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data directory {dir} is in use by another companion server ({holder}); two servers \
         on one data directory would corrupt its state: stop the other one, or give this one \
         its own data_dir"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("locking the data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while the server runs; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Locks `dir` (creating it if needed) and records this process's id in the lock file.
pub fn lock(dir: &Path) -> Result<DataDirLock, LockError> {
    let io = |source| LockError::Io {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "process id unknown".to_owned(),
                pid => format!("process {pid}"),
            };
            return Err(LockError::InUse {
                dir: dir.to_owned(),
                holder,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = lock(&data).expect("the first lock");
        let err = lock(&data).expect_err("a second lock is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("in use by another companion server")
                && msg.contains(&format!("process {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        lock(&data).expect("free again once the first is dropped");
    }
}
