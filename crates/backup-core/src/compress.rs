//! Compression of the archive stream on every core, and decompression.
//!
//! The tar stream is cut into blocks of [`BLOCK_SIZE`]; each block becomes an
//! independent gzip member (or zstd frame), compressed on the blocking pool,
//! up to [`parallelism`] at a time, and emitted in order. Concatenated
//! members are still one valid `.tar.gz` (RFC 1952) / `.tar.zst`, which
//! plain `tar xzf` and `zstd -d` read. Memory stays bounded: at most
//! `parallelism + 1` blocks in flight, whatever the data size.

use std::io;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use crate::buffers::BufferPool;
use crate::config::Compression;
use crate::ports::ByteStream;

/// Uncompressed bytes per member. Deflate's window is 32 KiB, so small
/// members cost gzip almost no ratio; they keep memory low (bench/run:
/// peak RSS fell from 90 to ~55 MiB going from 4 MiB to 1 MiB pieces).
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

/// Cuts a stream into blocks of exactly `size` bytes (the last one shorter).
/// Each block is its own allocation of exactly `size`, so a block in flight
/// never pins a larger buffer.
pub fn blocks(
    input: ByteStream,
    size: usize,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    futures::stream::unfold(
        (input, Bytes::new(), false),
        move |(mut input, mut carry, mut ended)| async move {
            let mut block = BytesMut::with_capacity(size);
            loop {
                if !carry.is_empty() {
                    let take = carry.len().min(size - block.len());
                    block.extend_from_slice(&carry.split_to(take));
                }
                if block.len() == size || ended {
                    break;
                }
                match input.next().await {
                    Some(Ok(chunk)) => carry = chunk,
                    Some(Err(e)) => return Some((Err(e), (input, Bytes::new(), true))),
                    None => ended = true,
                }
            }
            if block.is_empty() {
                return None;
            }
            Some((Ok(block.freeze()), (input, carry, ended)))
        },
    )
}

fn compress_block(block: &[u8], compression: Compression, level: u32) -> io::Result<Vec<u8>> {
    match compression {
        Compression::Gzip => DEFLATER.with(|cell| {
            let mut cached = cell.borrow_mut();
            let compressor = match &mut *cached {
                Some((l, c)) if *l == level => c,
                slot => {
                    let lvl = i32::try_from(level)
                        .ok()
                        .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidInput,
                                format!("gzip level {level}"),
                            )
                        })?;
                    &mut slot.insert((level, libdeflater::Compressor::new(lvl))).1
                }
            };
            let mut out = vec![0u8; compressor.gzip_compress_bound(block.len())];
            let n = compressor
                .gzip_compress(block, &mut out)
                .map_err(|e| io::Error::other(format!("gzip: {e}")))?;
            out.truncate(n);
            Ok(out)
        }),
        Compression::Zstd => zstd::bulk::compress(block, i32::try_from(level).unwrap_or(3)),
        Compression::None => Ok(block.to_vec()),
    }
}

/// Compresses a stream as independent members on the blocking pool. Each
/// output item is one whole member, so its offset is a member boundary.
pub fn compress(input: ByteStream, compression: Compression, level: Option<u32>) -> ByteStream {
    if compression == Compression::None {
        return input;
    }
    let level = level.unwrap_or(match compression {
        Compression::Zstd => DEFAULT_ZSTD_LEVEL,
        _ => DEFAULT_GZIP_LEVEL,
    });
    blocks(input, BLOCK_SIZE)
        .map(move |block| async move {
            let block = block?;
            tokio::task::spawn_blocking(move || compress_block(&block, compression, level))
                .await
                .map_err(io::Error::other)?
                .map(Bytes::from)
        })
        .buffered(parallelism())
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
    /// One libdeflate compressor per blocking thread, for its last level.
    static DEFLATER: std::cell::RefCell<Option<(u32, libdeflater::Compressor)>> =
        const { std::cell::RefCell::new(None) };
    /// One libdeflate decompressor per blocking thread (it holds tables).
    static INFLATER: std::cell::RefCell<libdeflater::Decompressor> =
        std::cell::RefCell::new(libdeflater::Decompressor::new());
}

fn bad_member(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// Decompresses one whole member: a gzip member with libdeflate (its
/// trailer gives the size, its CRC is checked), a zstd frame with the size
/// from its header.
fn decompress_member(member: &[u8], compression: Compression) -> io::Result<Bytes> {
    match compression {
        Compression::Gzip => {
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
            let mut out = MEMBERS.take_filled(isize);
            let n = INFLATER
                .with(|d| d.borrow_mut().gzip_decompress(member, &mut out))
                .map_err(|e| bad_member(format!("gzip member: {e}")))?;
            if n != isize {
                return Err(bad_member(format!(
                    "gzip member gave {n} bytes, its trailer says {isize}"
                )));
            }
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

/// The decompressed content of an archive of independent members, cut at
/// the given `lengths` (see [`member_lengths`]): each member is
/// decompressed whole on the blocking pool, up to [`parallelism`] at once,
/// and emitted in order. Memory stays bounded by `parallelism + 1` members.
pub fn decompress_members(
    input: ByteStream,
    compression: Compression,
    lengths: Vec<usize>,
) -> ByteStream {
    pieces(input, lengths)
        .map(move |member| async move {
            let member = member?;
            tokio::task::spawn_blocking(move || decompress_member(&member, compression))
                .await
                .map_err(io::Error::other)?
        })
        .buffered(parallelism())
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn stream_of(data: Vec<u8>, chunk: usize) -> ByteStream {
        let chunks: Vec<io::Result<Bytes>> = data
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks).boxed()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[tokio::test]
    async fn blocks_are_exact_and_complete() {
        let data = sample(10_000);
        let out: Vec<Bytes> = blocks(stream_of(data.clone(), 333), 4096)
            .map(|b| b.unwrap())
            .collect()
            .await;
        assert_eq!(
            out.iter().map(Bytes::len).collect::<Vec<_>>(),
            vec![4096, 4096, 1808]
        );
        assert_eq!(out.concat(), data);
    }

    #[tokio::test]
    async fn multi_member_gzip_and_zstd_round_trip() {
        let data = sample(BLOCK_SIZE * 2 + 12_345);
        for c in [Compression::Gzip, Compression::Zstd] {
            let members: Vec<Bytes> = compress(stream_of(data.clone(), 65_536), c, None)
                .map(|b| b.unwrap())
                .collect()
                .await;
            assert_eq!(members.len(), 3, "{c}");
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

    #[tokio::test]
    async fn truncated_gzip_is_an_error() {
        let data = sample(100_000);
        let members: Vec<Bytes> = compress(stream_of(data, 4096), Compression::Gzip, Some(1))
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
            let members: Vec<Bytes> =
                compress(stream_of(data.clone(), 64 * 1024), compression, None)
                    .map(|m| m.unwrap())
                    .collect()
                    .await;
            let mut offsets = Vec::new();
            let mut total = 0u64;
            for m in &members {
                offsets.push(total);
                total += m.len() as u64;
            }
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
