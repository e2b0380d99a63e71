//! Atomic, durable file writes: what every writer of the project (bundles, reports, the
//! capture store, the MQTT outbox) uses, so a power cut leaves the old file or the new one,
//! never a torn one.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably: a uniquely named temporary file in the
/// same directory, fsynced, renamed over `path`, then the directory fsynced so the rename
/// itself survives a power cut. A failed write leaves `path` as it was and no temporary.
/// Hand-written: `tempfile`'s persist does not sync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{unique}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_atomic_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        // An immutable directory (the drill for a store that refuses writes): nothing changes.
        let chattr = |flag: &str| {
            let ok = std::process::Command::new("chattr").arg(flag).arg(dir.path()).status().unwrap().success();
            assert!(ok, "chattr {flag} (tests run as root on ext4)");
        };
        chattr("+i");
        let result = write_atomic(&path, b"newer");
        chattr("-i");
        assert!(result.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left behind");
    }
}
