//! Compression of the archive stream on every core, and decompression.
//!
//! The tar stream is cut into content-defined pieces ([`PIECE_CUTS`]); each
//! piece becomes an independent gzip member (or zstd frame), compressed (or
//! copied from an earlier archive, [`Reuse`]) on the blocking pool in jobs
//! of about [`BLOCK_SIZE`], up to [`parallelism`] jobs at a time, and
//! emitted in order. Concatenated members are still one valid `.tar.gz`
//! (RFC 1952) / `.tar.zst`, which plain `tar xzf` and `zstd -d` read.
//! Memory stays bounded: at most `parallelism + 1` jobs in flight, whatever
//! the data size.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use crate::buffers::BufferPool;
use crate::cdc::{Cuts, Scanner};
use crate::config::Compression;
use crate::digest::Blake3Digest;
use crate::manifest::{ArchiveInfo, PieceDigest};
use crate::ports::{ByteStream, ReadAt};

/// Uncompressed bytes of pieces per compression job (members were blocks
/// of this size before they were cut by content). Small jobs keep memory
/// low (bench/run: peak RSS fell from 90 to ~55 MiB going from 4 MiB to
/// 1 MiB blocks).
pub const BLOCK_SIZE: usize = 1024 * 1024;

/// Default gzip level. Members are compressed whole with libdeflate (the
/// output is plain gzip); level 1, measured with full backups of the
/// 681 MB demo (two alternating pairs, default settings): 8.7-10.1 s
/// against 12.1-13.4 s at level 3, stored 216.0 MiB against 208.2 (+3.7 %);
/// compression was 61 % of a level-3 backup's CPU time (perf). A restore
/// of a level-1 archive costs ~5 % more CPU (3.5 against 3.2 user-s).
/// Scheduled, startup and shutdown backups are many, restores few.
pub const DEFAULT_GZIP_LEVEL: u32 = 1;
/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: u32 = 3;
/// The fastest level of gzip and zstd alike (libdeflate level 1: 342 MB/s
/// per core at ratio 0.226 on the demo data, level 3: 195 MB/s at 0.209).
pub const FASTEST_LEVEL: u32 = 1;

/// Members compressed at once: one per core (the next block is gathered
/// meanwhile, so cores do not wait).
pub fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn compress_block(block: &[u8], compression: Compression, level: u32) -> io::Result<Vec<u8>> {
    match compression {
        Compression::Gzip => DEFLATERS.with(|cell| {
            let mut cached = cell.borrow_mut();
            let at = match cached.iter().position(|(l, _)| *l == level) {
                Some(at) => at,
                None => {
                    let lvl = i32::try_from(level)
                        .ok()
                        .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidInput,
                                format!("gzip level {level}"),
                            )
                        })?;
                    cached.push((level, libdeflater::Compressor::new(lvl)));
                    cached.len() - 1
                }
            };
            let compressor = &mut cached[at].1;
            // Into a scratch buffer of the worst-case size, kept per thread,
            // then copied out at its exact size: a member held downstream
            // (an S3 part being gathered) does not pin the worst case.
            SCRATCH.with(|scratch| {
                let mut out = scratch.borrow_mut();
                let bound = compressor.gzip_compress_bound(block.len());
                if out.len() < bound {
                    out.resize(bound, 0);
                }
                let n = compressor
                    .gzip_compress(block, &mut out)
                    .map_err(|e| io::Error::other(format!("gzip: {e}")))?;
                Ok(out[..n].to_vec())
            })
        }),
        Compression::Zstd => {
            zstd::bulk::compress(block, i32::try_from(level).unwrap_or(3)).map(|mut frame| {
                frame.shrink_to_fit();
                frame
            })
        }
        Compression::None => Ok(block.to_vec()),
    }
}

/// How the tar stream is cut into members: content-defined pieces
/// averaging 32 KiB (8-128 KiB), so that an unchanged stretch of data
/// becomes the same members in the next backup even where bytes were
/// inserted or removed before it (see [`crate::cdc`] and ARCHITECTURE,
/// "Member reuse").
pub const PIECE_CUTS: Cuts = Cuts::averaging(32 * 1024);

/// Bytes of pieces handed to one compression job on the blocking pool.
const JOB_BYTES: usize = BLOCK_SIZE;

/// Bytes of a chunk added at a time to a piece that spans chunks.
const SPAN_STEP: usize = 16 * 1024;

/// Cuts pieces out of a stream of chunks. A piece that lies within one
/// chunk is a slice of it (no copy: most of a large file's data); only a
/// piece that spans chunks is gathered, [`SPAN_STEP`] bytes at a time.
struct Cutter {
    scanner: Scanner,
    /// The start of a piece that spans chunks.
    partial: BytesMut,
}

impl Cutter {
    fn new(cuts: Cuts) -> Cutter {
        Cutter {
            scanner: Scanner::new(cuts),
            partial: BytesMut::new(),
        }
    }

    /// Cuts what `chunk` completes; the rest waits for more.
    fn feed(&mut self, mut chunk: Bytes, out: &mut std::collections::VecDeque<Bytes>) {
        while !chunk.is_empty() {
            if self.partial.is_empty() {
                match self.scanner.next_cut(&chunk) {
                    Some(n) => out.push_back(chunk.split_to(n)),
                    None => {
                        self.partial.extend_from_slice(&chunk);
                        return;
                    }
                }
                continue;
            }
            let old = self.partial.len();
            let take = chunk.len().min(SPAN_STEP);
            self.partial.extend_from_slice(&chunk[..take]);
            match self.scanner.next_cut(&self.partial) {
                // The scanner cuts only in bytes it has not seen: n > old.
                Some(n) => {
                    self.partial.truncate(n);
                    out.push_back(self.partial.split().freeze());
                    chunk.advance(n - old);
                }
                None => chunk.advance(take),
            }
        }
    }

    /// The last piece, at the end of the stream.
    fn finish(&mut self, out: &mut std::collections::VecDeque<Bytes>) {
        if !self.partial.is_empty() {
            out.push_back(self.partial.split().freeze());
        }
    }
}

/// Cuts a stream at `cuts` and gathers the pieces into jobs of about
/// `job_bytes` (the last one shorter). Cuts depend only on the content,
/// never on how the input is chunked.
fn piece_jobs(
    input: ByteStream,
    cuts: Cuts,
    job_bytes: usize,
) -> impl futures::Stream<Item = io::Result<Vec<Bytes>>> + Send {
    struct State {
        input: ByteStream,
        cutter: Cutter,
        ready: std::collections::VecDeque<Bytes>,
        ended: bool,
    }
    let start = State {
        input,
        cutter: Cutter::new(cuts),
        ready: std::collections::VecDeque::new(),
        ended: false,
    };
    futures::stream::unfold(Some(start), move |state| async move {
        let mut st = state?;
        let mut job = Vec::new();
        let mut size = 0;
        loop {
            while size < job_bytes {
                let Some(piece) = st.ready.pop_front() else {
                    break;
                };
                size += piece.len();
                job.push(piece);
            }
            if size >= job_bytes || st.ended {
                break;
            }
            match st.input.next().await {
                Some(Ok(chunk)) => st.cutter.feed(chunk, &mut st.ready),
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    st.ended = true;
                    st.cutter.finish(&mut st.ready);
                }
            }
        }
        if job.is_empty() {
            return None;
        }
        Some((Ok(job), Some(st)))
    })
}

/// The members of an earlier archive that a new archive may copy instead
/// of compressing the same content again: found by the digest of their
/// content, read at their offset, and used only when the bytes read match
/// the digest recorded when they were written. A member that does not is
/// logged (ERROR) and its content compressed afresh: damage in the earlier
/// archive never passes into the new one.
#[derive(Debug)]
pub struct Reuse {
    /// The earlier backup, for messages.
    from: String,
    /// Content digest -> offset, length and digest of the member.
    members: HashMap<Blake3Digest, (u64, usize, Blake3Digest)>,
    source: Box<dyn ReadAt>,
    reused: AtomicU64,
    reused_bytes: AtomicU64,
    damaged: AtomicU64,
}

/// What a [`Reuse`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReuseStats {
    /// Members copied.
    pub members: u64,
    /// Stored bytes copied.
    pub bytes: u64,
    /// Members that did not match their recorded digest (or could not be
    /// read), compressed afresh instead.
    pub damaged: u64,
}

impl Reuse {
    /// Reuse from the archive `info` describes, whose members have the
    /// digests `pieces`, read through `source`; `None` when the pieces do
    /// not describe it (another count, an encrypted archive, or members
    /// that cannot describe it).
    pub fn new(
        from: String,
        info: &ArchiveInfo,
        pieces: &[PieceDigest],
        source: Box<dyn ReadAt>,
    ) -> Option<Reuse> {
        if pieces.is_empty() || info.inner_size_bytes.is_some() {
            return None;
        }
        let lengths = member_lengths(&info.members, info.size_bytes)?;
        if lengths.len() != pieces.len() {
            return None;
        }
        let members = pieces
            .iter()
            .zip(info.members.iter().zip(lengths))
            .map(|(piece, (offset, len))| (piece.raw, (*offset, len, piece.packed)))
            .collect();
        Some(Reuse {
            from,
            members,
            source,
            reused: AtomicU64::new(0),
            reused_bytes: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
        })
    }

    /// The earlier member holding content `raw`, checked against its
    /// recorded digest; `None` when there is none or it does not match.
    fn take(&self, raw: &Blake3Digest) -> Option<(Bytes, Blake3Digest)> {
        let &(offset, len, packed) = self.members.get(raw)?;
        let mut buf = vec![0u8; len];
        let problem = match self.source.read_at(offset, &mut buf) {
            Err(e) => format!("cannot be read ({e})"),
            Ok(()) if Blake3Digest::of(&buf) != packed => {
                "does not match the digest recorded when it was written".to_owned()
            }
            Ok(()) => {
                self.reused.fetch_add(1, Ordering::Relaxed);
                self.reused_bytes.fetch_add(len as u64, Ordering::Relaxed);
                return Some((Bytes::from(buf), packed));
            }
        };
        if self.damaged.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!(earlier_backup = %self.from, offset, length = len,
                "the earlier backup's archive is damaged: its member {problem}; compressing that content afresh (the earlier backup fails verify)");
        }
        None
    }

    /// What was reused so far.
    pub fn stats(&self) -> ReuseStats {
        ReuseStats {
            members: self.reused.load(Ordering::Relaxed),
            bytes: self.reused_bytes.load(Ordering::Relaxed),
            damaged: self.damaged.load(Ordering::Relaxed),
        }
    }
}

/// libdeflate's level 0: deflate's stored blocks, the bytes as they are.
const STORED_LEVEL: u32 = 0;

/// Pieces of a job stored without compression after one that compression
/// barely shrank, before the next is tried again.
const STORE_RUN: usize = 8;

/// Which level the pieces of one gzip job get: after a member that saved
/// less than a share of its piece (1/8 at the fastest level, the default;
/// 1/32 at the others), the next [`STORE_RUN`] - 1 pieces are stored, then
/// one is compressed again to see whether the data changed. Deflate spends
/// as long on data it barely shrinks (float vectors of the memory store,
/// compressed or encrypted files) as on text; stored, such a piece costs a
/// copy. A first backup of the 681 MB demo (its 75 MB of vectors shrink
/// ~8 %; three alternating pairs by hand): 4.13-4.39 -> 3.59-3.88 user-s,
/// stored 230.9 -> 237.4 MB (+2.8 %). Who wants the bytes back sets a
/// level above 1, where only what shrinks by less than 1/32 is stored.
#[derive(Debug)]
struct LevelChoice {
    level: u32,
    /// A member must save at least `raw >> shift` bytes.
    shift: u32,
    /// Pieces still to store; `None`: never store (zstd, or level 0).
    stored_left: Option<usize>,
}

impl LevelChoice {
    fn new(compression: Compression, level: u32) -> LevelChoice {
        LevelChoice {
            level,
            shift: if level == FASTEST_LEVEL { 3 } else { 5 },
            stored_left: (compression == Compression::Gzip && level != STORED_LEVEL).then_some(0),
        }
    }

    /// The level for the next piece.
    fn next(&self) -> u32 {
        match self.stored_left {
            Some(left) if left > 0 => STORED_LEVEL,
            _ => self.level,
        }
    }

    /// Records how the last piece (`raw` bytes) came out (`member` bytes).
    fn record(&mut self, raw: usize, member: usize) {
        match &mut self.stored_left {
            Some(0) if member + (raw >> self.shift) > raw => {
                self.stored_left = Some(STORE_RUN - 1);
            }
            Some(left) if *left > 0 => *left -= 1,
            _ => {}
        }
    }
}

/// Compresses (or copies from `reuse`) the pieces of one job, each its own
/// member, with the digests of each when `digests`.
fn compress_job(
    pieces: &[Bytes],
    compression: Compression,
    level: u32,
    reuse: Option<&Reuse>,
    digests: bool,
) -> io::Result<Vec<(Bytes, Option<PieceDigest>)>> {
    let mut choice = LevelChoice::new(compression, level);
    let mut compress = |piece: &Bytes| -> io::Result<Vec<u8>> {
        let member = compress_block(piece, compression, choice.next())?;
        choice.record(piece.len(), member.len());
        Ok(member)
    };
    pieces
        .iter()
        .map(|piece| {
            if !digests {
                return Ok((Bytes::from(compress(piece)?), None));
            }
            let raw = Blake3Digest::of(piece);
            let (member, packed) = match reuse.and_then(|r| r.take(&raw)) {
                Some(found) => found,
                None => {
                    let member = compress(piece)?;
                    let packed = Blake3Digest::of(&member);
                    (Bytes::from(member), packed)
                }
            };
            Ok((member, Some(PieceDigest { raw, packed })))
        })
        .collect()
}

/// Compresses a stream as independent members on the blocking pool, one
/// per content-defined piece ([`PIECE_CUTS`]). Each output item is one
/// whole member, so its offset is a member boundary. With `digests`, the
/// [`PieceDigest`] of each member is appended there in order, and members
/// whose content `reuse` holds are copied from the earlier archive.
pub fn compress(
    input: ByteStream,
    compression: Compression,
    level: Option<u32>,
    reuse: Option<Arc<Reuse>>,
    digests: Option<Arc<Mutex<Vec<PieceDigest>>>>,
) -> ByteStream {
    if compression == Compression::None {
        return input;
    }
    let level = level.unwrap_or(match compression {
        Compression::Zstd => DEFAULT_ZSTD_LEVEL,
        _ => DEFAULT_GZIP_LEVEL,
    });
    let record = digests.is_some();
    piece_jobs(input, PIECE_CUTS, JOB_BYTES)
        .map(move |job| {
            let reuse = reuse.clone();
            async move {
                let job = job?;
                tokio::task::spawn_blocking(move || {
                    compress_job(&job, compression, level, reuse.as_deref(), record)
                })
                .await
                .map_err(io::Error::other)?
            }
        })
        .buffered(parallelism())
        .map_ok(move |members| {
            if let Some(Ok(mut list)) = digests.as_ref().map(|l| l.lock()) {
                list.extend(members.iter().filter_map(|(_, d)| *d));
            }
            futures::stream::iter(members.into_iter().map(|(m, _)| Ok(m)))
        })
        .try_flatten()
        .boxed()
}

/// A reader of the decompressed content of a stored archive stream.
pub fn decompress(
    input: ByteStream,
    compression: Compression,
) -> Box<dyn AsyncRead + Send + Unpin> {
    let reader = StreamReader::new(input);
    match compression {
        Compression::Gzip => {
            let mut dec = async_compression::tokio::bufread::GzipDecoder::new(reader);
            dec.multiple_members(true);
            Box::new(dec)
        }
        Compression::Zstd => {
            let mut dec = async_compression::tokio::bufread::ZstdDecoder::new(reader);
            dec.multiple_members(true);
            Box::new(dec)
        }
        Compression::None => Box::new(reader),
    }
}

/// Largest member accepted when decompressing by members, compressed or
/// not (members are [`BLOCK_SIZE`] of input; older backups used 4 MiB):
/// bounds the memory a damaged or hostile manifest can make us allocate.
pub const MAX_MEMBER: usize = 64 * 1024 * 1024;

/// The byte ranges of the members of an archive of `total` bytes whose
/// members start at `offsets` (the manifest's `members`); `None` when the
/// offsets cannot describe it (not starting at 0, not increasing, past
/// the end, or a member over [`MAX_MEMBER`]).
pub fn member_lengths(offsets: &[u64], total: u64) -> Option<Vec<usize>> {
    if offsets.first() != Some(&0) {
        return None;
    }
    let ends = offsets
        .iter()
        .skip(1)
        .copied()
        .chain(std::iter::once(total));
    offsets
        .iter()
        .zip(ends)
        .map(|(start, end)| {
            let len = end.checked_sub(*start)?;
            (len > 0 && len <= MAX_MEMBER as u64).then_some(len as usize)
        })
        .collect()
}

/// Cuts a stream into pieces of the given lengths (one allocation each);
/// an error when it ends early or has more.
fn pieces(
    input: ByteStream,
    lengths: Vec<usize>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    futures::stream::unfold(
        (input, Bytes::new(), lengths.into_iter(), false),
        |(mut input, mut carry, mut lengths, done)| async move {
            if done {
                return None;
            }
            let Some(len) = lengths.next() else {
                // Every member taken: nothing may follow.
                let rest = if carry.is_empty() {
                    input.next().await
                } else {
                    Some(Ok(carry))
                };
                return match rest {
                    None => None,
                    Some(Ok(_)) => Some((
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "data after the last member",
                        )),
                        (input, Bytes::new(), lengths, true),
                    )),
                    Some(Err(e)) => Some((Err(e), (input, Bytes::new(), lengths, true))),
                };
            };
            let mut piece = MEMBERS.take(len);
            while piece.len() < len {
                if carry.is_empty() {
                    match input.next().await {
                        Some(Ok(chunk)) => carry = chunk,
                        Some(Err(e)) => {
                            return Some((Err(e), (input, Bytes::new(), lengths, true)));
                        }
                        None => {
                            let e = io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "archive ends inside a member",
                            );
                            return Some((Err(e), (input, Bytes::new(), lengths, true)));
                        }
                    }
                }
                let take = carry.len().min(len - piece.len());
                piece.extend_from_slice(&carry.split_to(take));
            }
            let len = piece.len();
            Some((
                Ok(MEMBERS.bytes(piece, len)),
                (input, carry, lengths, false),
            ))
        },
    )
}

/// Member buffers kept for reuse: the members in flight, read and
/// decompressed (see [`crate::buffers`]).
static MEMBERS: BufferPool = BufferPool::new(8, 4 * BLOCK_SIZE);

thread_local! {
    /// The libdeflate compressors of a blocking thread, one per level it
    /// used (the configured one and [`STORED_LEVEL`]).
    static DEFLATERS: std::cell::RefCell<Vec<(u32, libdeflater::Compressor)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The output buffer of [`compress_block`], per blocking thread.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One libdeflate decompressor per blocking thread (it holds tables).
    static INFLATER: std::cell::RefCell<libdeflater::Decompressor> =
        std::cell::RefCell::new(libdeflater::Decompressor::new());
}

fn bad_member(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// The decompressed size a gzip member's trailer states (at most
/// [`MAX_MEMBER`]).
fn gzip_size(member: &[u8]) -> io::Result<usize> {
    let isize = member
        .len()
        .checked_sub(4)
        .and_then(|at| member.get(at..))
        .and_then(|t| <[u8; 4]>::try_from(t).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad_member("gzip member shorter than its trailer".into()))?
        as usize;
    if isize > MAX_MEMBER {
        return Err(bad_member(format!(
            "gzip member of {isize} bytes, more than {MAX_MEMBER}"
        )));
    }
    Ok(isize)
}

/// Decompresses a gzip member into `out`, which it must fill exactly (its
/// CRC is checked).
fn inflate_into(member: &[u8], out: &mut [u8]) -> io::Result<()> {
    let n = INFLATER
        .with(|d| d.borrow_mut().gzip_decompress(member, out))
        .map_err(|e| bad_member(format!("gzip member: {e}")))?;
    if n != out.len() {
        return Err(bad_member(format!(
            "gzip member gave {n} bytes, its trailer says {}",
            out.len()
        )));
    }
    Ok(())
}

/// Decompresses one whole member: a gzip member with libdeflate (its
/// trailer gives the size, its CRC is checked), a zstd frame with the size
/// from its header.
fn decompress_member(member: &[u8], compression: Compression) -> io::Result<Bytes> {
    match compression {
        Compression::Gzip => {
            let isize = gzip_size(member)?;
            let mut out = MEMBERS.take_filled(isize);
            inflate_into(member, &mut out)?;
            Ok(MEMBERS.bytes(out, isize))
        }
        Compression::Zstd => {
            let size = match zstd::zstd_safe::get_frame_content_size(member) {
                Ok(Some(n)) if n <= MAX_MEMBER as u64 => n as usize,
                Ok(Some(n)) => {
                    return Err(bad_member(format!(
                        "zstd frame of {n} bytes, more than {MAX_MEMBER}"
                    )));
                }
                _ => MAX_MEMBER,
            };
            zstd::bulk::decompress(member, size)
                .map(Bytes::from)
                .map_err(|e| bad_member(format!("zstd frame: {e}")))
        }
        Compression::None => Ok(Bytes::copy_from_slice(member)),
    }
}

/// Members decompressed in one job: consecutive members up to this many
/// stored bytes (a member larger than that is a job of its own) ...
const GROUP_BYTES: usize = 256 * 1024;
/// ... and at most this many (so that a job of highly compressible members
/// stays small decompressed: [`PIECE_CUTS`] bounds each).
const GROUP_MEMBERS: usize = 64;

/// Gathers member lengths into jobs (see [`GROUP_BYTES`]).
fn group_members(lengths: Vec<usize>) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut total = 0;
    for len in lengths {
        match groups.last_mut() {
            Some(g) if g.len() < GROUP_MEMBERS && total + len <= GROUP_BYTES => {
                g.push(len);
                total += len;
            }
            _ => {
                groups.push(vec![len]);
                total = len;
            }
        }
    }
    groups
}

/// Decompresses consecutive members (`lengths` of `stored`): gzip members
/// into one buffer sized from their trailers when that fits
/// [`MAX_MEMBER`], else member by member.
fn decompress_group(
    stored: &[u8],
    lengths: &[usize],
    compression: Compression,
) -> io::Result<Vec<Bytes>> {
    let mut members = Vec::with_capacity(lengths.len());
    let mut at = 0;
    for len in lengths {
        let member = stored
            .get(at..at + len)
            .ok_or_else(|| bad_member("member past the end of its group".into()))?;
        members.push(member);
        at += len;
    }
    if compression == Compression::Gzip && members.len() > 1 {
        let sizes: Vec<usize> = members
            .iter()
            .map(|m| gzip_size(m))
            .collect::<io::Result<_>>()?;
        let total: usize = sizes.iter().sum();
        if total <= MAX_MEMBER {
            let mut out = MEMBERS.take_filled(total);
            let mut at = 0;
            for (member, size) in members.iter().zip(sizes) {
                let slot = out
                    .get_mut(at..at + size)
                    .ok_or_else(|| bad_member("gzip member sizes overflow".into()))?;
                inflate_into(member, slot)?;
                at += size;
            }
            return Ok(vec![MEMBERS.bytes(out, total)]);
        }
    }
    members
        .into_iter()
        .map(|m| decompress_member(m, compression))
        .collect()
}

/// The decompressed content of an archive of independent members, cut at
/// the given `lengths` (see [`member_lengths`]): consecutive members are
/// decompressed as one job on the blocking pool ([`GROUP_BYTES`]), up to
/// [`parallelism`] jobs at once, and emitted in order. Memory stays bounded
/// by `parallelism + 1` jobs.
pub fn decompress_members(
    input: ByteStream,
    compression: Compression,
    lengths: Vec<usize>,
) -> ByteStream {
    let groups = group_members(lengths);
    let totals = groups.iter().map(|g| g.iter().sum()).collect();
    // Paired with `None` past the last group, so that the error `pieces`
    // gives for data after the last member still comes through.
    let groups = groups.into_iter().map(Some).chain(std::iter::repeat(None));
    pieces(input, totals)
        .zip(futures::stream::iter(groups))
        .map(move |(stored, lengths)| async move {
            let stored = stored?;
            let lengths = lengths.ok_or_else(|| bad_member("data after the last member".into()))?;
            tokio::task::spawn_blocking(move || decompress_group(&stored, &lengths, compression))
                .await
                .map_err(io::Error::other)?
        })
        .buffered(parallelism())
        .map_ok(|parts| futures::stream::iter(parts.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Sha256Digest;
    use tokio::io::AsyncReadExt;

    fn stream_of(data: Vec<u8>, chunk: usize) -> ByteStream {
        let chunks: Vec<io::Result<Bytes>> = data
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks).boxed()
    }

    /// The offset of each member, and their total length.
    fn offsets_of(members: &[Bytes]) -> (Vec<u64>, u64) {
        let mut offsets = Vec::new();
        let mut total = 0u64;
        for m in members {
            offsets.push(total);
            total += m.len() as u64;
        }
        (offsets, total)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[tokio::test]
    async fn multi_member_gzip_and_zstd_round_trip() {
        let data = sample(BLOCK_SIZE * 2 + 12_345);
        for c in [Compression::Gzip, Compression::Zstd] {
            let members: Vec<Bytes> =
                compress(stream_of(data.clone(), 65_536), c, None, None, None)
                    .map(|b| b.unwrap())
                    .collect()
                    .await;
            assert!(members.len() >= data.len() / PIECE_CUTS.max, "{c}");
            let joined = members.concat();
            let mut out = Vec::new();
            decompress(stream_of(joined.clone(), 10_000), c)
                .read_to_end(&mut out)
                .await
                .unwrap();
            assert!(out == data, "{c} round trip");
            if c == Compression::Gzip {
                // A standard single-stream decoder reads all members too.
                let mut std_out = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::MultiGzDecoder::new(&joined[..]),
                    &mut std_out,
                )
                .unwrap();
                assert!(std_out == data);
            }
        }
    }

    /// Bytes that deflate shrinks by ~4 % (random, of 200 values: 7.64
    /// bits each), as it does float vectors.
    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 32) % 200) as u8
            })
            .collect()
    }

    /// Whether a gzip member is deflate's stored blocks: its first block
    /// header (the byte after libdeflate's 10-byte gzip header) says type 00.
    fn stored(member: &[u8]) -> bool {
        member[10] & 0b110 == 0
    }

    #[tokio::test]
    async fn data_compression_barely_shrinks_is_stored_and_data_after_it_compressed_again() {
        // Random, then text-like rows, then random again: one stream.
        let mut data = random(3 * BLOCK_SIZE / 2, 5);
        let text_at = data.len();
        data.extend(rows(40_000, 9));
        let text_end = data.len();
        data.extend(random(BLOCK_SIZE / 2, 6));
        let (bytes, info, pieces) = archive_of(&data, None).await;
        assert_eq!(content_of(&bytes, &info).await, data, "round trip");
        let mut std_out = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
            &mut std_out,
        )
        .unwrap();
        assert!(std_out == data, "plain gzip reads stored members too");
        // Each member: where its content lies, whether it was stored.
        let lengths = member_lengths(&info.members, info.size_bytes).unwrap();
        let mut raw_at = 0usize;
        let (mut text_stored, mut text_total) = (0, 0);
        let (mut random_stored, mut random_total) = (0, 0);
        for (i, (&offset, &len)) in info.members.iter().zip(&lengths).enumerate() {
            let member = &bytes[offset as usize..offset as usize + len];
            let raw = gzip_size(member).unwrap();
            if raw_at >= text_at && raw_at + raw <= text_end {
                text_total += 1;
                text_stored += usize::from(stored(member));
            } else if raw_at + raw <= text_at || raw_at >= text_end {
                random_total += 1;
                random_stored += usize::from(stored(member));
            }
            assert_eq!(Blake3Digest::of(member), pieces[i].packed);
            raw_at += raw;
        }
        assert_eq!(raw_at, data.len());
        // All but the pieces tried (a job's first, then one in STORE_RUN),
        // which deflate did shrink a little.
        assert!(
            random_stored < random_total && random_stored * 4 >= random_total * 3,
            "{random_stored} of {random_total} random members stored"
        );
        // Text is compressed again within STORE_RUN pieces of its start.
        assert!(
            text_stored < STORE_RUN && text_total > 3 * STORE_RUN,
            "{text_stored} of {text_total} text members stored"
        );
        assert!(bytes.len() < data.len(), "the text still shrinks");
    }

    #[test]
    fn a_run_is_stored_after_a_piece_that_barely_shrank_and_only_in_gzip() {
        let run = |choice: &mut LevelChoice, member: usize| -> Vec<u32> {
            (0..STORE_RUN)
                .map(|_| {
                    let level = choice.next();
                    choice.record(32_768, member);
                    level
                })
                .collect()
        };
        let mut stored_then_tried = vec![STORED_LEVEL; STORE_RUN - 1];
        stored_then_tried.push(FASTEST_LEVEL);
        // The fastest level wants 1/8 saved: 3,268 bytes of 32,768 is not.
        let mut fastest = LevelChoice::new(Compression::Gzip, FASTEST_LEVEL);
        fastest.record(32_768, 28_000);
        assert_eq!(fastest.next(), FASTEST_LEVEL, "more than 1/8 saved");
        fastest.record(32_768, 29_500);
        assert_eq!(run(&mut fastest, 29_500), stored_then_tried);
        // Other levels want 1/32.
        let mut six = LevelChoice::new(Compression::Gzip, 6);
        six.record(32_768, 29_500);
        assert_eq!(six.next(), 6, "more than 1/32 saved");
        six.record(32_768, 32_000);
        assert_eq!(six.next(), STORED_LEVEL);
        // zstd notices incompressible data by itself.
        let mut zstd = LevelChoice::new(Compression::Zstd, FASTEST_LEVEL);
        zstd.record(32_768, 40_000);
        assert_eq!(zstd.next(), FASTEST_LEVEL);
    }

    #[tokio::test]
    async fn truncated_gzip_is_an_error() {
        let data = sample(100_000);
        let members: Vec<Bytes> = compress(
            stream_of(data, 4096),
            Compression::Gzip,
            Some(1),
            None,
            None,
        )
        .map(|b| b.unwrap())
        .collect()
        .await;
        let joined = members.concat();
        let cut = joined[..joined.len() - 10].to_vec();
        let mut out = Vec::new();
        let res = decompress(stream_of(cut, 1000), Compression::Gzip)
            .read_to_end(&mut out)
            .await;
        assert!(res.is_err());
    }

    #[tokio::test]
    async fn members_decompress_in_parallel_to_the_same_content() {
        let data = sample(5 * BLOCK_SIZE + 123);
        for compression in [Compression::Gzip, Compression::Zstd] {
            let members: Vec<Bytes> = compress(
                stream_of(data.clone(), 64 * 1024),
                compression,
                None,
                None,
                None,
            )
            .map(|m| m.unwrap())
            .collect()
            .await;
            let (offsets, total) = offsets_of(&members);
            let joined: Vec<u8> = members.concat();
            let lengths = member_lengths(&offsets, total).unwrap();
            let mut out = Vec::new();
            let mut s = decompress_members(
                stream_of(joined.clone(), 100_000),
                compression,
                lengths.clone(),
            );
            while let Some(chunk) = s.next().await {
                out.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(out, data, "{compression}");

            // Cut short, or with bytes after the last member: errors.
            let short = joined[..joined.len() - 7].to_vec();
            let mut s = decompress_members(stream_of(short, 100_000), compression, lengths.clone());
            let mut failed = false;
            while let Some(chunk) = s.next().await {
                failed |= chunk.is_err();
            }
            assert!(failed, "{compression}: truncated");
            let mut long = joined.clone();
            long.extend_from_slice(b"junk");
            let mut s = decompress_members(stream_of(long, 100_000), compression, lengths);
            let mut failed = false;
            while let Some(chunk) = s.next().await {
                failed |= chunk.is_err();
            }
            assert!(failed, "{compression}: trailing data");
        }
    }

    /// Text-like rows: compressible, and cut by content.
    fn rows(count: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::new();
        for i in 0..count {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(format!("row {i} agent-{} {:x}\n", state % 50, state).as_bytes());
        }
        out
    }

    /// An archive in memory, read by ranges.
    #[derive(Debug)]
    struct InMemory(Mutex<Vec<u8>>);

    impl ReadAt for InMemory {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let data = self.0.lock().unwrap();
            let at = offset as usize;
            let src = data
                .get(at..at + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// Compresses `data` as a backup would: members, their digests, and
    /// the archive info a manifest records.
    async fn archive_of(
        data: &[u8],
        reuse: Option<Arc<Reuse>>,
    ) -> (Vec<u8>, ArchiveInfo, Vec<PieceDigest>) {
        let digests = Arc::new(Mutex::new(Vec::new()));
        let members: Vec<Bytes> = compress(
            stream_of(data.to_vec(), 10_000),
            Compression::Gzip,
            None,
            reuse,
            Some(Arc::clone(&digests)),
        )
        .map(|m| m.unwrap())
        .collect()
        .await;
        let (offsets, total) = offsets_of(&members);
        let bytes = members.concat();
        let info = ArchiveInfo {
            sha256: Sha256Digest::of(&bytes),
            size_bytes: total,
            members: offsets,
            inner_size_bytes: None,
            pieces: None,
        };
        let pieces = digests.lock().unwrap().clone();
        (bytes, info, pieces)
    }

    async fn content_of(bytes: &[u8], info: &ArchiveInfo) -> Vec<u8> {
        let lengths = member_lengths(&info.members, info.size_bytes).unwrap();
        let mut out = Vec::new();
        let mut s = decompress_members(
            stream_of(bytes.to_vec(), 77_777),
            Compression::Gzip,
            lengths,
        );
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn members_copied_from_an_earlier_archive_equal_fresh_ones_and_damage_is_never_copied() {
        let before = rows(60_000, 7);
        // A small change: rows inserted near the start, one edited later.
        let mut after = before.clone();
        after.splice(20_000..20_000, rows(40, 99));
        let at = after.len() * 2 / 3;
        after[at] = b'#';

        let (earlier, earlier_info, earlier_pieces) = archive_of(&before, None).await;
        assert_eq!(earlier_pieces.len(), earlier_info.members.len());
        let (fresh, fresh_info, fresh_pieces) = archive_of(&after, None).await;
        let source = Box::new(InMemory(Mutex::new(earlier.clone())));
        let reuse =
            Arc::new(Reuse::new("earlier".into(), &earlier_info, &earlier_pieces, source).unwrap());
        let (reused, reused_info, reused_pieces) =
            archive_of(&after, Some(Arc::clone(&reuse))).await;

        // Byte for byte what compressing everything gives, digests and all.
        assert!(reused == fresh);
        assert_eq!(reused_info, fresh_info);
        assert_eq!(reused_pieces, fresh_pieces);
        assert_eq!(content_of(&reused, &reused_info).await, after);
        let used = reuse.stats();
        assert!(
            used.members * 10 >= fresh_info.members.len() as u64 * 8,
            "{used:?} of {} members",
            fresh_info.members.len()
        );
        assert_eq!(used.damaged, 0);

        // A flipped byte in an earlier member that the new archive needs:
        // found, compressed afresh, never copied.
        let victim = earlier_pieces
            .iter()
            .rposition(|p| reused_pieces.contains(p))
            .unwrap();
        let mut damaged = earlier.clone();
        let spot = earlier_info.members[victim] as usize + 20;
        damaged[spot] ^= 0x40;
        let source = Box::new(InMemory(Mutex::new(damaged)));
        let reuse =
            Arc::new(Reuse::new("earlier".into(), &earlier_info, &earlier_pieces, source).unwrap());
        let (again, again_info, again_pieces) = archive_of(&after, Some(Arc::clone(&reuse))).await;
        assert_eq!(reuse.stats().damaged, 1);
        assert!(again == fresh, "the damaged member was copied");
        assert_eq!(again_info, fresh_info);
        assert_eq!(again_pieces, fresh_pieces);
        assert_eq!(content_of(&again, &again_info).await, after);
    }

    #[tokio::test]
    async fn pieces_are_cut_by_content_whatever_the_chunks() {
        let data = rows(40_000, 3);
        let mut whole = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = PIECE_CUTS.first_cut(rest).unwrap_or(rest.len());
            whole.push(n);
            rest = &rest[n..];
        }
        assert!(whole.len() > 10);
        for chunk in [7, 4096, 20_000, 65_536, 300_000] {
            let jobs: Vec<Vec<Bytes>> =
                piece_jobs(stream_of(data.clone(), chunk), PIECE_CUTS, 100_000)
                    .map(|j| j.unwrap())
                    .collect()
                    .await;
            let lens: Vec<usize> = jobs.iter().flatten().map(Bytes::len).collect();
            assert_eq!(lens, whole, "chunks of {chunk}");
            assert!(jobs.concat().concat() == data, "chunks of {chunk}");
            let (last, rest) = jobs.split_last().unwrap();
            assert!(!last.is_empty());
            for job in rest {
                let size: usize = job.iter().map(Bytes::len).sum();
                assert!((100_000..100_000 + PIECE_CUTS.max).contains(&size));
            }
        }
    }

    #[test]
    fn reuse_needs_digests_for_every_member() {
        let info = ArchiveInfo {
            sha256: Sha256Digest::of(b""),
            size_bytes: 30,
            members: vec![0, 10],
            inner_size_bytes: None,
            pieces: None,
        };
        let pieces = |n: usize| {
            vec![
                PieceDigest {
                    raw: Blake3Digest::of(b"a"),
                    packed: Blake3Digest::of(b"b"),
                };
                n
            ]
        };
        let source = || Box::new(InMemory(Mutex::new(vec![0; 30]))) as Box<dyn ReadAt>;
        assert!(Reuse::new("x".into(), &info, &pieces(2), source()).is_some());
        assert!(Reuse::new("x".into(), &info, &pieces(0), source()).is_none());
        assert!(Reuse::new("x".into(), &info, &pieces(1), source()).is_none());
        let mut sealed = info.clone();
        sealed.inner_size_bytes = Some(30);
        assert!(Reuse::new("x".into(), &sealed, &pieces(2), source()).is_none());
    }

    #[test]
    fn member_offsets_that_cannot_describe_the_archive_are_refused() {
        assert_eq!(member_lengths(&[0, 10, 25], 30), Some(vec![10, 15, 5]));
        assert_eq!(member_lengths(&[], 30), None);
        assert_eq!(member_lengths(&[1, 10], 30), None);
        assert_eq!(member_lengths(&[0, 10, 10], 30), None);
        assert_eq!(member_lengths(&[0, 40], 30), None);
        assert_eq!(member_lengths(&[0], MAX_MEMBER as u64 + 1), None);
    }

    #[test]
    fn a_corrupt_gzip_member_is_an_error_not_garbage() {
        let mut member = compress_block(&sample(1000), Compression::Gzip, 3).unwrap();
        let mid = member.len() / 2;
        member[mid] ^= 0xff;
        assert!(decompress_member(&member, Compression::Gzip).is_err());
        assert!(decompress_member(&[1, 2], Compression::Gzip).is_err());
    }
}
