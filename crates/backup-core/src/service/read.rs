//! Reading a stored backup back and checking it against its manifest, for
//! verify and restore.
//!
//! Every entry is checked before its data is passed on: the path must parse
//! as an [`ArchivePath`] inside a component, be listed in the manifest
//! exactly once, have the listed kind and size (so a tar bomb stops at the
//! header), and its content must hash to the listed sha256. The archive's
//! own sha256 and size are checked at the end, and nothing may follow the
//! end-of-archive marker but a little zero padding.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::archive::{ChunkRead, ChunkReader, TarError, TarKind, TarReader};
use crate::compress::{decompress, decompress_members, member_lengths};
use crate::crypt::Identities;
use crate::digest::{BackgroundHash, Sha256Hasher};
use crate::error::{Error, Result};
use crate::id::Component;
use crate::manifest::{FileEntry, MAX_MANIFEST_BYTES, Manifest};
use crate::path::{ArchivePath, MANIFEST_FILE};
use crate::ports::{BackupStore, ByteStream, EntrySink, ObjectName};

/// Largest chunk of entry data passed on at once (a hashing thread's and a
/// sink's queues hold 16 and 32 of them).
const READ_CHUNK: usize = 64 * 1024;
/// Files from this size on are hashed on a thread of their own.
const BACKGROUND_HASH_FROM: u64 = 8 * 1024 * 1024;

/// Where a file's content is hashed.
enum FileHash {
    Here(Sha256Hasher),
    Background(BackgroundHash),
}
/// Zero padding allowed after the end-of-archive marker (GNU tar pads to
/// 10 KiB records).
const MAX_TRAILING: u64 = 64 * 1024;

/// What a read covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReadStats {
    /// Files checked.
    pub(crate) files: u64,
    /// File bytes checked.
    pub(crate) bytes: u64,
}

/// What the manifest lists for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    File(usize),
    Dir(usize),
    Symlink(usize),
}

fn integrity(m: &Manifest, path: &str, reason: impl Into<String>) -> Error {
    Error::Integrity {
        id: m.id.to_string(),
        path: path.chars().take(300).collect(),
        reason: reason.into(),
    }
}

/// Reads the whole backup, passing entries of `wanted` components (all when
/// `None`) to `sink`. Everything is verified, wanted or not.
///
/// An encrypted backup is decrypted with `identities` (the service's, which
/// opened its manifest) after its stored bytes are hashed.
pub(crate) async fn read_backup(
    store: &dyn BackupStore,
    manifest: &Manifest,
    identities: Option<Arc<Identities>>,
    wanted: Option<&[Component]>,
    sink: &mut dyn EntrySink,
) -> Result<ReadStats> {
    let wants = |c: Option<Component>| c.is_some_and(|c| wanted.is_none_or(|w| w.contains(&c)));
    if !manifest.is_archive() {
        return read_directory(store, manifest, &wants, sink).await;
    }
    let info = manifest
        .require_archive_info()
        .map_err(|source| Error::Manifest {
            id: manifest.id.to_string(),
            source,
        })?;
    let raw = store
        .get(
            &manifest.id,
            &ObjectName::archive(manifest.compression, manifest.encrypted),
        )
        .await?;
    // The stored bytes are hashed on a thread of their own, as they come.
    let archive_hash = BackgroundHash::start()
        .map_err(|e| Error::Internal(format!("cannot start the hashing thread: {e}")))?;
    let feed = archive_hash.sender();
    // Whether the store failed while it delivered the archive.
    let store_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let tapped = Arc::clone(&store_failure);
    let stream: ByteStream = raw
        .then(move |item| {
            let (feed, tapped) = (feed.clone(), Arc::clone(&tapped));
            async move {
                match &item {
                    Ok(chunk) => {
                        let _ = feed.send(chunk.clone()).await;
                    }
                    Err(e) => {
                        if let Ok(mut failed) = tapped.lock() {
                            *failed = Some(e.to_string());
                        }
                    }
                }
                item
            }
        })
        .boxed();
    let stream = if manifest.encrypted {
        let identities = identities.ok_or_else(|| Error::Key {
            id: manifest.id.to_string(),
            reason: "no identity to decrypt its archive with".into(),
        })?;
        match crate::crypt::decrypt(stream, identities).await {
            Ok(plain) => plain,
            Err(e) => {
                if let Some(reason) = store_failure.lock().ok().and_then(|f| f.clone()) {
                    return Err(store_failed(store, manifest, &reason));
                }
                return Err(integrity(
                    manifest,
                    "<archive>",
                    format!(
                        "the encrypted archive does not open with the identity that opens its manifest ({e}): damaged or replaced"
                    ),
                ));
            }
        }
    } else {
        stream
    };
    // Independent members at known offsets: decompressed whole, in
    // parallel (libdeflate for gzip); else one streaming decoder.
    // Entry data is passed on as slices of the decompressed chunks.
    let content = match member_lengths(
        &info.members,
        info.inner_size_bytes.unwrap_or(info.size_bytes),
    ) {
        Some(lengths) => decompress_members(stream, manifest.compression, lengths),
        None => tokio_util::io::ReaderStream::with_capacity(
            decompress(stream, manifest.compression),
            READ_CHUNK,
        )
        .boxed(),
    };
    let mut tar = TarReader::new(ChunkReader::new(content));
    let result = read_entries(&mut tar, manifest, &wants, sink).await;
    let store_error = store_failure.lock().ok().and_then(|f| f.clone());
    if let Some(reason) = store_error {
        return Err(store_failed(store, manifest, &reason));
    }
    let stats = result?;
    // Drain the decompressed stream: only zero padding may follow, and the
    // whole stored archive must be consumed to check its hash.
    let mut rest = tar.into_inner();
    let mut trailing = Vec::new();
    (&mut rest)
        .take(MAX_TRAILING + 1)
        .read_to_end(&mut trailing)
        .await
        .map_err(|e| integrity(manifest, "<archive>", format!("after the end marker: {e}")))?;
    if trailing.len() as u64 > MAX_TRAILING || trailing.iter().any(|b| *b != 0) {
        return Err(integrity(
            manifest,
            "<archive>",
            "unexpected data after the end of the archive",
        ));
    }
    // Every sender (the stream's) gone, the thread ends with the digest.
    drop(rest);
    let (digest, size) = archive_hash
        .finish()
        .await
        .map_err(|e| Error::Internal(format!("hashing the archive: {e}")))?;
    if size != info.size_bytes {
        return Err(integrity(
            manifest,
            "<archive>",
            format!(
                "archive is {size} bytes, the manifest says {}",
                info.size_bytes
            ),
        ));
    }
    if digest != info.sha256 {
        return Err(integrity(
            manifest,
            "<archive>",
            format!(
                "archive sha256 {digest} does not match the manifest's {}",
                info.sha256
            ),
        ));
    }
    Ok(stats)
}

fn store_failed(store: &dyn BackupStore, manifest: &Manifest, reason: &str) -> Error {
    Error::Store {
        location: store.location(),
        key: manifest.id.to_string(),
        reason: format!("reading the archive failed: {reason}"),
        source: None,
    }
}

fn expected_entries(manifest: &Manifest) -> BTreeMap<&str, Expected> {
    let mut map = BTreeMap::new();
    for (i, f) in manifest.files.iter().enumerate() {
        map.insert(f.path.as_str(), Expected::File(i));
    }
    for (i, d) in manifest.dirs.iter().enumerate() {
        map.insert(d.path.as_str(), Expected::Dir(i));
    }
    for (i, s) in manifest.symlinks.iter().enumerate() {
        map.insert(s.path.as_str(), Expected::Symlink(i));
    }
    map
}

async fn read_entries<R: ChunkRead>(
    tar: &mut TarReader<R>,
    manifest: &Manifest,
    wants: &(dyn Fn(Option<Component>) -> bool + Sync),
    sink: &mut dyn EntrySink,
) -> Result<ReadStats> {
    let tar_err = |e: TarError| integrity(manifest, "<archive>", e.to_string());
    let expected = expected_entries(manifest);
    let max_entries = manifest.entry_count() + 1;
    // Entries met so far, one flag per manifest entry (files, then
    // directories, then symlinks), not a copy of each of thousands of paths.
    let slot = |listed: &Expected| match listed {
        Expected::File(i) => *i,
        Expected::Dir(i) => manifest.files.len() + i,
        Expected::Symlink(i) => manifest.files.len() + manifest.dirs.len() + i,
    };
    let mut seen =
        vec![false; manifest.files.len() + manifest.dirs.len() + manifest.symlinks.len()];
    let mut inner_manifest = false;
    let mut stats = ReadStats::default();
    let mut count = 0usize;
    let mut buf = vec![0u8; READ_CHUNK];
    while let Some(entry) = tar.next_entry().await.map_err(tar_err)? {
        count += 1;
        if count > max_entries {
            return Err(integrity(
                manifest,
                &entry.path,
                "more entries than the manifest lists",
            ));
        }
        if entry.path == MANIFEST_FILE && entry.kind == TarKind::File {
            if inner_manifest {
                return Err(integrity(manifest, &entry.path, "duplicate entry"));
            }
            inner_manifest = true;
            read_inner_manifest(tar, manifest, entry.size, &mut buf).await?;
            continue;
        }
        let (path, component) = ArchivePath::parse_in_component(&entry.path)
            .map_err(|e| integrity(manifest, &entry.path, format!("refused entry: {e}")))?;
        let Some(listed) = expected.get(path.as_str()) else {
            return Err(integrity(
                manifest,
                path.as_str(),
                "entry is not in the manifest",
            ));
        };
        if std::mem::replace(&mut seen[slot(listed)], true) {
            return Err(integrity(manifest, path.as_str(), "duplicate entry"));
        }
        let wanted = wants(Some(component));
        match (listed, &entry.kind) {
            (Expected::Dir(i), TarKind::Dir) => {
                if wanted {
                    sink.dir(&manifest.dirs[*i]).await?;
                }
            }
            (Expected::Symlink(i), TarKind::Symlink(target)) => {
                let link = &manifest.symlinks[*i];
                if &link.target != target {
                    return Err(integrity(
                        manifest,
                        path.as_str(),
                        "symlink target differs from the manifest",
                    ));
                }
                if wanted {
                    sink.symlink(link).await?;
                }
            }
            (Expected::File(i), TarKind::File) => {
                let file = &manifest.files[*i];
                read_file(
                    tar,
                    manifest,
                    file,
                    entry.size,
                    wanted.then_some(&mut *sink),
                )
                .await?;
                stats.files += 1;
                stats.bytes += file.size;
            }
            _ => {
                return Err(integrity(
                    manifest,
                    path.as_str(),
                    "entry kind differs from the manifest",
                ));
            }
        }
    }
    if let Some(missing) = expected
        .iter()
        .find_map(|(p, listed)| (!seen[slot(listed)]).then_some(*p))
    {
        return Err(integrity(
            manifest,
            missing,
            "listed in the manifest but missing from the archive",
        ));
    }
    if !inner_manifest {
        return Err(integrity(
            manifest,
            MANIFEST_FILE,
            "missing from the archive",
        ));
    }
    Ok(stats)
}

/// The next piece of the current entry's data; 0 at its end.
async fn read_chunk<R: tokio::io::AsyncRead + Unpin>(
    tar: &mut TarReader<R>,
    manifest: &Manifest,
    buf: &mut [u8],
) -> Result<usize> {
    tar.read_data(buf)
        .await
        .map_err(|e| integrity(manifest, "<archive>", e.to_string()))
}

/// Reads the embedded `manifest.json` (capped) and checks it against the
/// sidecar.
async fn read_inner_manifest<R: tokio::io::AsyncRead + Unpin>(
    tar: &mut TarReader<R>,
    manifest: &Manifest,
    size: u64,
    buf: &mut [u8],
) -> Result<()> {
    if size > MAX_MANIFEST_BYTES as u64 {
        return Err(integrity(
            manifest,
            MANIFEST_FILE,
            "embedded manifest is too large",
        ));
    }
    let mut json = Vec::with_capacity(size as usize);
    while let n @ 1.. = read_chunk(tar, manifest, buf).await? {
        json.extend_from_slice(&buf[..n]);
    }
    check_inner_manifest(manifest, &json)
}

/// Reads one file entry of `size` bytes (the tar header's), checking size
/// and sha256 against the manifest's `file`, and passes it to `sink` if
/// given.
async fn read_file<'d, R: ChunkRead>(
    tar: &mut TarReader<R>,
    manifest: &Manifest,
    file: &FileEntry,
    size: u64,
    mut sink: Option<&mut (dyn EntrySink + 'd)>,
) -> Result<()> {
    let path = file.path.as_str();
    if size != file.size {
        return Err(integrity(
            manifest,
            path,
            format!("size {size} in the archive, {} in the manifest", file.size),
        ));
    }
    if let Some(sink) = sink.as_deref_mut() {
        sink.file_start(file).await?;
    }
    // A large file (the database) is hashed on a thread of its own while
    // this one passes its data on; small ones here, without a hand-off.
    let mut hasher = if size >= BACKGROUND_HASH_FROM {
        FileHash::Background(
            BackgroundHash::start()
                .map_err(|e| Error::Internal(format!("cannot start the hashing thread: {e}")))?,
        )
    } else {
        FileHash::Here(Sha256Hasher::new())
    };
    let mut left = size;
    while left > 0 {
        // A slice of the decompressed member, shared by the hashing thread
        // and the sink without a copy. Only what is left of the entry is
        // asked for: no read is spent learning that the entry ended.
        let want = usize::try_from(left).map_or(READ_CHUNK, |l| l.min(READ_CHUNK));
        let chunk = tar
            .read_data_bytes(want)
            .await
            .map_err(|e| integrity(manifest, "<archive>", e.to_string()))?;
        if chunk.is_empty() {
            break; // cannot happen (the reader fails on truncation); checked below
        }
        left -= chunk.len() as u64;
        match &mut hasher {
            FileHash::Here(h) => h.update(&chunk),
            FileHash::Background(h) => h.update(chunk.clone()).await,
        }
        if let Some(sink) = sink.as_deref_mut() {
            sink.file_bytes(chunk).await?;
        }
    }
    let digest = match hasher {
        FileHash::Here(h) => h.finish(),
        FileHash::Background(h) => {
            h.finish()
                .await
                .map_err(|e| Error::Internal(format!("hashing {path}: {e}")))?
                .0
        }
    };
    if digest != file.sha256 {
        return Err(integrity(
            manifest,
            path,
            format!(
                "sha256 {digest} does not match the manifest's {}",
                file.sha256
            ),
        ));
    }
    if let Some(sink) = sink {
        sink.file_end(file).await?;
    }
    Ok(())
}

fn check_inner_manifest(manifest: &Manifest, json: &[u8]) -> Result<()> {
    /// What the comparison needs: the sidecar was parsed and checked in
    /// full already, and a second copy of its thousands of entries would
    /// only add to the restore's peak memory.
    #[derive(serde::Deserialize)]
    struct Names {
        id: crate::id::BackupId,
        checksum: crate::digest::Checksum,
    }
    let inner: Names = serde_json::from_slice(json)
        .map_err(|e| integrity(manifest, MANIFEST_FILE, format!("embedded manifest: {e}")))?;
    if inner.id != manifest.id || inner.checksum != manifest.checksum {
        return Err(integrity(
            manifest,
            MANIFEST_FILE,
            "embedded manifest does not match the sidecar (id or checksum)",
        ));
    }
    Ok(())
}

async fn read_directory(
    store: &dyn BackupStore,
    manifest: &Manifest,
    wants: &(dyn Fn(Option<Component>) -> bool + Sync),
    sink: &mut dyn EntrySink,
) -> Result<ReadStats> {
    let missing = |e: Error, path: &str| match e {
        Error::NotFound { .. } => integrity(manifest, path, "missing from the backup directory"),
        other => other,
    };
    let mut inner = Vec::new();
    let mut stream = store
        .get(&manifest.id, &ObjectName::InnerManifest)
        .await
        .map_err(|e| missing(e, MANIFEST_FILE))?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| store_read(store, manifest, MANIFEST_FILE, &e))?;
        inner.extend_from_slice(&chunk);
        if inner.len() > MAX_MANIFEST_BYTES {
            return Err(integrity(
                manifest,
                MANIFEST_FILE,
                "embedded manifest is too large",
            ));
        }
    }
    check_inner_manifest(manifest, &inner)?;
    // Directories first, so that a sink can create files inside them.
    for dir in &manifest.dirs {
        if wants(dir.path.component()) {
            sink.dir(dir).await?;
        }
    }
    let mut stats = ReadStats::default();
    for file in &manifest.files {
        let wanted = wants(file.path.component());
        let mut stream = store
            .get(&manifest.id, &ObjectName::File(file.path.clone()))
            .await
            .map_err(|e| missing(e, file.path.as_str()))?;
        if wanted {
            sink.file_start(file).await?;
        }
        let mut hasher = Sha256Hasher::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| store_read(store, manifest, file.path.as_str(), &e))?;
            size += chunk.len() as u64;
            if size > file.size {
                return Err(integrity(
                    manifest,
                    file.path.as_str(),
                    format!("larger than the manifest's {} bytes", file.size),
                ));
            }
            hasher.update(&chunk);
            if wanted {
                sink.file_bytes(chunk).await?;
            }
        }
        let digest = hasher.finish();
        if size != file.size || digest != file.sha256 {
            return Err(integrity(
                manifest,
                file.path.as_str(),
                format!(
                    "{size} bytes with sha256 {digest}; the manifest says {} bytes, {}",
                    file.size, file.sha256
                ),
            ));
        }
        if wanted {
            sink.file_end(file).await?;
        }
        stats.files += 1;
        stats.bytes += size;
    }
    for link in &manifest.symlinks {
        if wants(link.path.component()) {
            sink.symlink(link).await?;
        }
    }
    Ok(stats)
}

fn store_read(store: &dyn BackupStore, manifest: &Manifest, path: &str, e: &io::Error) -> Error {
    Error::Store {
        location: store.location(),
        key: format!("{}/{path}", manifest.id),
        reason: format!("read failed: {e}"),
        source: None,
    }
}
