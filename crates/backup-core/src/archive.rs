//! The tar format, both ways, as byte streams.
//!
//! Writing: [`entry_header`] gives the 512-byte header(s) of an entry (GNU
//! format, with `././@LongLink` records for names or link targets over 100
//! bytes, as GNU tar writes them), [`padding`] the zero fill after its data,
//! and [`END_OF_ARCHIVE`] the two zero blocks. Plain `tar xf` reads it.
//!
//! Reading: [`TarReader`] parses a stream defensively, for archives that may
//! be hostile: it accepts only regular files, directories, symlinks and GNU
//! long-name records, validates header checksums, caps long names, and
//! leaves path validation and size limits to the caller through
//! [`RawEntry`]. Over a [`ChunkReader`] it hands an entry's data out as
//! slices of the chunks that come in ([`TarReader::read_data_bytes`]): no
//! copy of the (decompressed) stream into buffers of its own.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use tar::{EntryType, Header};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::ports::ByteStream;

use crate::path::MAX_PATH_LEN;

/// Size of a tar block.
pub const BLOCK: usize = 512;
/// Two zero blocks end an archive.
pub const END_OF_ARCHIVE: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

/// Kind of an entry, as written and as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link to the target.
    Symlink(String),
}

/// The header block(s) of one entry.
///
/// # Errors
/// `InvalidInput` when a field does not fit the format (e.g. a negative
/// size cannot happen; a name over [`MAX_PATH_LEN`] is refused).
pub fn entry_header(
    path: &str,
    kind: &TarKind,
    size: u64,
    mode: u32,
    mtime: i64,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(3 * BLOCK);
    let name = match kind {
        TarKind::Dir => format!("{path}/"),
        _ => path.to_owned(),
    };
    if name.len() > MAX_PATH_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "path too long"));
    }
    let mut header = Header::new_gnu();
    if name.len() > 100 {
        long_record(&mut out, EntryType::GNULongName, name.as_bytes())?;
    }
    let short = &name.as_bytes()[..name.len().min(100)];
    header.as_old_mut().name[..short.len()].copy_from_slice(short);
    match kind {
        TarKind::File => {
            header.set_entry_type(EntryType::Regular);
            header.set_size(size);
        }
        TarKind::Dir => {
            header.set_entry_type(EntryType::Directory);
            header.set_size(0);
        }
        TarKind::Symlink(target) => {
            header.set_entry_type(EntryType::Symlink);
            header.set_size(0);
            if target.len() > 100 {
                long_record(&mut out, EntryType::GNULongLink, target.as_bytes())?;
            }
            let short = &target.as_bytes()[..target.len().min(100)];
            header.as_old_mut().linkname[..short.len()].copy_from_slice(short);
        }
    }
    header.set_mode(mode & 0o7777);
    header.set_mtime(u64::try_from(mtime).unwrap_or(0));
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    Ok(out)
}

/// A GNU `././@LongLink` record carrying a long name or link target.
fn long_record(out: &mut Vec<u8>, kind: EntryType, value: &[u8]) -> io::Result<()> {
    let mut header = Header::new_gnu();
    let marker = b"././@LongLink";
    header.as_old_mut().name[..marker.len()].copy_from_slice(marker);
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(value.len() as u64 + 1);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(value);
    out.push(0);
    out.extend_from_slice(padding(value.len() as u64 + 1));
    Ok(())
}

/// Zero bytes that pad `size` bytes of data to a whole block.
pub fn padding(size: u64) -> &'static [u8] {
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 { &[] } else { &ZEROS[..BLOCK - rem] }
}

/// One entry's header as read, before the caller validates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// Path as stored (a directory's trailing `/` removed).
    pub path: String,
    /// Kind.
    pub kind: TarKind,
    /// Data size in bytes (0 for directories and links).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, Unix seconds.
    pub mtime: i64,
}

/// Why an archive stream is not a tar this reader accepts.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The underlying stream failed or ended early (truncated archive).
    #[error("archive read failed: {0}")]
    Io(#[from] io::Error),
    /// A header that is not valid tar, or an entry type we never write.
    #[error("malformed archive: {0}")]
    Malformed(String),
}

/// A defensive streaming tar reader.
#[derive(Debug)]
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: u64,
    done: bool,
}

impl<R: AsyncRead + Unpin> TarReader<R> {
    /// Reads tar from `inner`.
    pub fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            remaining: 0,
            pad: 0,
            done: false,
        }
    }

    /// The next entry's header, or `None` at the end-of-archive marker.
    /// Skips any unread data of the previous entry.
    ///
    /// # Errors
    /// [`TarError`] for truncated input, bad checksums, unsupported entry
    /// types (hard links, devices, FIFOs, PAX), or over-long names.
    pub async fn next_entry(&mut self) -> Result<Option<RawEntry>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_rest().await?;
        let mut long_name: Option<String> = None;
        let mut long_link: Option<String> = None;
        loop {
            let mut block = [0u8; BLOCK];
            self.inner.read_exact(&mut block).await?;
            if block.iter().all(|b| *b == 0) {
                // End of archive: a second zero block must follow.
                self.inner.read_exact(&mut block).await?;
                if block.iter().any(|b| *b != 0) {
                    return Err(TarError::Malformed(
                        "single zero block inside the archive".into(),
                    ));
                }
                self.done = true;
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block);
            let stored = header
                .cksum()
                .map_err(|e| TarError::Malformed(format!("bad header checksum field: {e}")))?;
            let computed: u32 = block
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if (148..156).contains(&i) {
                        u32::from(b' ')
                    } else {
                        u32::from(*b)
                    }
                })
                .sum();
            if stored != computed {
                return Err(TarError::Malformed("header checksum mismatch".into()));
            }
            let size = header
                .entry_size()
                .map_err(|e| TarError::Malformed(format!("bad size field: {e}")))?;
            let kind = header.entry_type();
            match kind {
                EntryType::GNULongName | EntryType::GNULongLink => {
                    if size == 0 || size > MAX_PATH_LEN as u64 + 1 {
                        return Err(TarError::Malformed(format!(
                            "long name record of {size} bytes"
                        )));
                    }
                    let mut buf = vec![0u8; size as usize];
                    self.inner.read_exact(&mut buf).await?;
                    self.skip_exact(padding(size).len() as u64).await?;
                    while buf.last() == Some(&0) {
                        buf.pop();
                    }
                    let text = String::from_utf8(buf)
                        .map_err(|_| TarError::Malformed("long name is not UTF-8".into()))?;
                    if kind == EntryType::GNULongName {
                        long_name = Some(text);
                    } else {
                        long_link = Some(text);
                    }
                    continue;
                }
                EntryType::Regular
                | EntryType::Continuous
                | EntryType::Directory
                | EntryType::Symlink => {}
                other => {
                    return Err(TarError::Malformed(format!(
                        "unsupported entry type {:?} (only files, directories and symlinks are allowed)",
                        other
                    )));
                }
            }
            let raw_path = match long_name.take() {
                Some(p) => p,
                None => String::from_utf8(header.path_bytes().into_owned())
                    .map_err(|_| TarError::Malformed("path is not UTF-8".into()))?,
            };
            let mode = header.mode().unwrap_or(0o600);
            let mtime = header
                .mtime()
                .map(|m| i64::try_from(m).unwrap_or(0))
                .unwrap_or(0);
            let (kind, path, size) = match kind {
                EntryType::Directory => (
                    TarKind::Dir,
                    raw_path.strip_suffix('/').unwrap_or(&raw_path).to_owned(),
                    0,
                ),
                EntryType::Symlink => {
                    let target = match long_link.take() {
                        Some(t) => t,
                        None => header
                            .link_name_bytes()
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default(),
                    };
                    (TarKind::Symlink(target), raw_path, 0)
                }
                _ => (TarKind::File, raw_path, size),
            };
            if kind != TarKind::File && size != 0 {
                return Err(TarError::Malformed(format!(
                    "{path}: non-file entry with data"
                )));
            }
            self.remaining = size;
            self.pad = padding(size).len() as u64;
            return Ok(Some(RawEntry {
                path,
                kind,
                size,
                mode,
                mtime,
            }));
        }
    }

    /// Reads up to `buf.len()` bytes of the current entry's data; 0 at its end.
    ///
    /// # Errors
    /// `Io` when the stream fails or ends inside the entry (truncated).
    pub async fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(TarError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside an entry (truncated)",
            )));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Up to `max` bytes of the current entry's data as a slice of the
    /// chunk the stream delivered (shared, not copied); empty at its end.
    ///
    /// # Errors
    /// `Io` when the stream fails or ends inside the entry (truncated).
    pub async fn read_data_bytes(&mut self, max: usize) -> Result<Bytes, TarError>
    where
        R: ChunkRead,
    {
        if self.remaining == 0 || max == 0 {
            return Ok(Bytes::new());
        }
        let want = max.min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let data = self.inner.read_bytes(want).await?;
        if data.is_empty() {
            return Err(TarError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside an entry (truncated)",
            )));
        }
        self.remaining -= data.len() as u64;
        Ok(data)
    }

    /// Reads any bytes after the end-of-archive marker and reports whether
    /// there were any besides zero padding.
    ///
    /// # Errors
    /// `Io` when the stream fails.
    pub async fn trailing_garbage(&mut self) -> Result<bool, TarError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.inner.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Ok(true);
            }
        }
    }

    /// Consumes the reader, returning the inner stream.
    pub fn into_inner(self) -> R {
        self.inner
    }

    async fn skip_rest(&mut self) -> Result<(), TarError> {
        let n = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.skip_exact(n).await
    }

    async fn skip_exact(&mut self, n: u64) -> Result<(), TarError> {
        let copied =
            tokio::io::copy(&mut (&mut self.inner).take(n), &mut tokio::io::sink()).await?;
        if copied != n {
            return Err(TarError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside an entry (truncated)",
            )));
        }
        Ok(())
    }
}

/// A reader that can hand out what it reads as shared slices.
pub trait ChunkRead: AsyncRead + Unpin {
    /// Up to `max` bytes (at least one unless the stream ended), shared
    /// with the chunk they came in.
    fn read_bytes(&mut self, max: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
}

/// [`AsyncRead`] over a stream of chunks, which can also hand out slices
/// of those chunks without copying them ([`ChunkRead`]).
pub struct ChunkReader {
    stream: ByteStream,
    /// What is left of the current chunk.
    current: Bytes,
}

impl ChunkReader {
    /// Reads `stream`.
    pub fn new(stream: ByteStream) -> ChunkReader {
        ChunkReader {
            stream,
            current: Bytes::new(),
        }
    }

    /// The next non-empty chunk into `current`; false at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.current.is_empty() {
            match std::task::ready!(self.stream.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(false)),
            }
        }
        Poll::Ready(Ok(true))
    }
}

impl ChunkRead for ChunkReader {
    async fn read_bytes(&mut self, max: usize) -> io::Result<Bytes> {
        if !std::future::poll_fn(|cx| self.poll_fill(cx)).await? {
            return Ok(Bytes::new());
        }
        let n = max.min(self.current.len());
        Ok(self.current.split_to(n))
    }
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if buf.remaining() == 0 || !std::task::ready!(me.poll_fill(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = buf.remaining().min(me.current.len());
        buf.put_slice(&me.current.split_to(n));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(entries: &[(&str, TarKind, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data) in entries {
            out.extend(entry_header(path, kind, data.len() as u64, 0o640, 1_700_000_000).unwrap());
            out.extend_from_slice(data);
            out.extend_from_slice(padding(data.len() as u64));
        }
        out.extend_from_slice(&END_OF_ARCHIVE);
        out
    }

    async fn read_all(bytes: &[u8]) -> Result<Vec<(RawEntry, Vec<u8>)>, TarError> {
        let mut r = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry().await? {
            let mut data = Vec::new();
            let mut buf = [0u8; 7];
            loop {
                let n = r.read_data(&mut buf).await?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((e, data));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn round_trips_files_dirs_links_and_long_names() {
        let long = format!("memory/{}/file.bin", "d".repeat(150));
        let long_target = "t".repeat(120);
        let bytes = build(&[
            ("memory", TarKind::Dir, b""),
            ("memory/a.txt", TarKind::File, b"hello"),
            (&long, TarKind::File, &[7u8; 1000]),
            ("memory/l", TarKind::Symlink(long_target.clone()), b""),
        ]);
        let got = read_all(&bytes).await.unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].0.kind, TarKind::Dir);
        assert_eq!(got[0].0.path, "memory");
        assert_eq!(got[1].1, b"hello");
        assert_eq!(got[1].0.mode, 0o640);
        assert_eq!(got[2].0.path, long);
        assert_eq!(got[2].1, vec![7u8; 1000]);
        assert_eq!(got[3].0.kind, TarKind::Symlink(long_target));
    }

    /// `bytes` as a stream of chunks of the given sizes, in turn.
    fn chunked(bytes: &[u8], sizes: &[usize]) -> ByteStream {
        let mut chunks = Vec::new();
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + size).min(bytes.len());
            chunks.push(Ok(Bytes::copy_from_slice(&bytes[at..end])));
            at = end;
        }
        futures::stream::iter(chunks).boxed()
    }

    #[tokio::test]
    async fn entry_data_comes_as_slices_of_chunks_of_any_size() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let bytes = build(&[
            ("memory", TarKind::Dir, b""),
            ("memory/a.txt", TarKind::File, b"hello"),
            ("memory/big.bin", TarKind::File, &big),
            ("memory/empty", TarKind::File, b""),
        ]);
        let expected = read_all(&bytes).await.unwrap();
        for sizes in [&[1usize][..], &[7, 513, 4096], &[65_536], &[bytes.len()]] {
            let mut r = TarReader::new(ChunkReader::new(chunked(&bytes, sizes)));
            let mut got = Vec::new();
            while let Some(e) = r.next_entry().await.unwrap() {
                let mut data = Vec::new();
                loop {
                    let piece = r.read_data_bytes(1000).await.unwrap();
                    if piece.is_empty() {
                        break;
                    }
                    assert!(piece.len() <= 1000);
                    data.extend_from_slice(&piece);
                }
                got.push((e, data));
            }
            assert_eq!(got.len(), expected.len(), "{sizes:?}");
            for ((e, data), (x, xdata)) in got.iter().zip(&expected) {
                assert_eq!((&e.path, data), (&x.path, xdata), "{sizes:?}");
            }
        }
        // Truncated inside an entry, and a failing stream: errors.
        let cut = &bytes[..512 + 512 + 512 + 30_000];
        let mut r = TarReader::new(ChunkReader::new(chunked(cut, &[4096])));
        let mut failed = None;
        while let Some(_e) = r.next_entry().await.unwrap() {
            loop {
                match r.read_data_bytes(1 << 20).await {
                    Ok(piece) if piece.is_empty() => break,
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if failed.is_some() {
                break;
            }
        }
        assert!(failed.unwrap().to_string().contains("truncated"));
        // The stream fails 100 bytes into big.bin's data (after the
        // directory, a.txt with its padding, and big.bin's header).
        let failing = futures::stream::iter(vec![
            Ok(Bytes::copy_from_slice(&bytes[..2048 + 100])),
            Err(io::Error::other("store went away")),
        ])
        .boxed();
        let mut r = TarReader::new(ChunkReader::new(failing));
        for _ in 0..3 {
            r.next_entry().await.unwrap();
        }
        assert_eq!(r.read_data_bytes(1000).await.unwrap(), &big[..100]);
        let err = r.read_data_bytes(1000).await.unwrap_err();
        assert!(err.to_string().contains("store went away"), "{err}");
    }

    #[tokio::test]
    async fn the_tar_crate_reads_what_we_write() {
        let long = format!("checkpoints/{}", "x".repeat(200));
        let bytes = build(&[
            ("synthorg.db", TarKind::File, b"db"),
            (&long, TarKind::File, b"cp"),
        ]);
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["synthorg.db".to_owned(), long]);
    }

    #[tokio::test]
    async fn rejects_truncation_bad_checksums_and_foreign_types() {
        let good = build(&[("memory/a", TarKind::File, &[1u8; 600])]);
        let truncated = &good[..700];
        assert!(matches!(read_all(truncated).await, Err(TarError::Io(_))));

        let mut flipped = good.clone();
        flipped[10] ^= 1; // inside the name
        assert!(matches!(
            read_all(&flipped).await,
            Err(TarError::Malformed(_))
        ));

        let mut h = Header::new_gnu();
        h.set_path("memory/dev").unwrap();
        h.set_entry_type(EntryType::Char);
        h.set_size(0);
        h.set_cksum();
        let mut dev = h.as_bytes().to_vec();
        dev.extend_from_slice(&END_OF_ARCHIVE);
        let err = read_all(&dev).await.unwrap_err().to_string();
        assert!(err.contains("unsupported entry type"), "{err}");

        let mut h = Header::new_gnu();
        h.set_path("memory/hard").unwrap();
        h.set_entry_type(EntryType::Link);
        h.set_size(0);
        h.set_cksum();
        let mut hard = h.as_bytes().to_vec();
        hard.extend_from_slice(&END_OF_ARCHIVE);
        assert!(read_all(&hard).await.is_err());
    }

    /// Reads everything, returning how many data bytes came out; with a
    /// runtime of its own for proptest.
    fn read_total(bytes: &[u8]) -> Result<u64, TarError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = TarReader::new(bytes);
            let mut total = 0u64;
            let mut buf = [0u8; 4096];
            while r.next_entry().await?.is_some() {
                loop {
                    let n = r.read_data(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
            }
            Ok(total)
        })
    }

    fn sample() -> Vec<u8> {
        let long = format!("memory/{}/seg.bin", "d".repeat(150));
        build(&[
            ("memory", TarKind::Dir, b""),
            ("memory/a.json", TarKind::File, b"{\"a\": 1}"),
            (&long, TarKind::File, &[7u8; 1500]),
            ("memory/link", TarKind::Symlink("a.json".into()), b""),
        ])
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Arbitrary bytes: an error or entries, never a panic, and never
        /// more data than the input holds (nothing is invented or buffered
        /// beyond it).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8192)) {
            if let Ok(total) = read_total(&bytes) {
                proptest::prop_assert!(total <= bytes.len() as u64);
            }
        }

        /// A valid archive with bytes overwritten or cut short: an error or
        /// entries, never a panic.
        #[test]
        fn damaged_archives_never_panic(
            edits in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..4096),
        ) {
            let mut bytes = sample();
            for (at, value) in edits {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % bytes.len());
            }
            if let Ok(total) = read_total(&bytes) {
                proptest::prop_assert!(total <= bytes.len() as u64);
            }
        }
    }
}
