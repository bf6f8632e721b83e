//! Identity files on disk: loading the configured one (with a warning
//! when others may read it) and writing a new one.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use backup_core::crypt::{Identities, IdentityState};

use crate::fsio;

/// Largest identity file read (age's own limit is 16 MiB; real ones are
/// a few hundred bytes).
const MAX_IDENTITY_FILE: usize = 1024 * 1024;

/// Loads the identity file `path`. A file that cannot be read or parsed
/// gives [`IdentityState::Unavailable`] with the reason (backups need no
/// identity and go on; decrypting fails naming the file); a file that
/// group or others may read is used, with a warning.
pub fn load_identity(path: &Path) -> IdentityState {
    let file = path.display().to_string();
    match read_identity(path) {
        Ok(ids) => IdentityState::Loaded(Arc::new(ids)),
        Err(reason) => {
            tracing::error!(identity_file = %file, reason = %reason, "the encryption identity cannot be used");
            IdentityState::Unavailable { file, reason }
        }
    }
}

fn read_identity(path: &Path) -> Result<Identities, String> {
    let file = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| fsio::describe(&e))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(identity_file = %file, mode = format!("{:o}", meta.mode() & 0o777),
            "the identity file may be read by other users; chmod 600 it");
    }
    let bytes = std::fs::File::open(path)
        .and_then(|f| {
            use std::io::Read;
            let mut buf = Vec::new();
            f.take(MAX_IDENTITY_FILE as u64 + 1).read_to_end(&mut buf)?;
            Ok(buf)
        })
        .map_err(|e| fsio::describe(&e))?;
    if bytes.len() > MAX_IDENTITY_FILE {
        return Err("larger than 1 MiB: not an identity file".into());
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    Identities::parse(&text, &file)
}

/// Writes a new identity file `path` (mode 0600, durable), refusing to
/// replace an existing file.
///
/// # Errors
/// The file exists, or cannot be written.
pub fn write_identity(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fsio::fsync_dir(dir),
        _ => fsio::fsync_dir(Path::new(".")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identities_load_and_bad_files_are_unavailable_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        let (text, public) = backup_core::crypt::generate_identity();
        write_identity(&path, &text).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            write_identity(&path, &text).is_err(),
            "never replaces a key"
        );
        match load_identity(&path) {
            IdentityState::Loaded(ids) => assert_eq!(ids.publics(), [public]),
            other => panic!("{other:?}"),
        }
        let missing = load_identity(&dir.path().join("nope.txt"));
        assert!(
            matches!(&missing, IdentityState::Unavailable { reason, .. } if reason == "not found"),
            "{missing:?}"
        );
        std::fs::write(dir.path().join("bad.txt"), "hello\n").unwrap();
        let bad = load_identity(&dir.path().join("bad.txt"));
        assert!(
            matches!(&bad, IdentityState::Unavailable { reason, .. } if reason.contains("line 1")),
            "{bad:?}"
        );
    }
}
