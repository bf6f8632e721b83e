//! [`BufferPool`]: buffers of one size class kept for reuse.
//!
//! `synthorg` fixes glibc's mmap threshold at 128 KiB (see the CLI's
//! `process.rs`), so every larger buffer is a fresh mapping whose pages the
//! kernel faults in and zeroes one by one, then unmaps. The pipeline's
//! large buffers (1 MiB members, 256 KiB file reads) come from a pool
//! instead: perf put fresh member buffers at 8 % of a restore's CPU, and
//! the archive's 256 KiB reads at most of its remaining 62,000 page faults.

use std::io;
use std::sync::Mutex;

use bytes::Bytes;
use futures::StreamExt;

use crate::ports::ByteStream;

/// Buffers kept for reuse: at most `keep`, each of at most `largest` bytes
/// of capacity (an odd larger one is freed, not kept).
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
    largest: usize,
}

impl BufferPool {
    /// A pool keeping at most `keep` buffers of at most `largest` bytes.
    pub const fn new(keep: usize, largest: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
            largest,
        }
    }

    /// An empty buffer with room for `len` bytes, reused when one is kept.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pop();
        buf.clear();
        buf.reserve(len);
        buf
    }

    /// A buffer of exactly `len` bytes to be overwritten whole: its
    /// contents are what an earlier use left (zeroed only where it grows),
    /// so a reused buffer is not zeroed again for each use.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pop();
        buf.resize(len, 0);
        buf
    }

    fn pop(&self) -> Vec<u8> {
        self.free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_default()
    }

    /// The first `len` bytes of `buf` (all of it when shorter) as `Bytes`;
    /// `buf` comes back to the pool, whole, when the last clone is dropped.
    /// Passing the length instead of truncating keeps the rest of the
    /// buffer initialised, so [`take_filled`](Self::take_filled) does not
    /// zero it again: a buffer is zeroed once in its life, not on each use.
    pub fn bytes(&'static self, buf: Vec<u8>, len: usize) -> Bytes {
        let len = len.min(buf.len());
        Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self,
        })
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() <= self.largest
            && let Ok(mut free) = self.free.lock()
            && free.len() < self.keep
        {
            free.push(buf);
        }
    }
}

/// Size of the chunks a file is read in.
pub const CHUNK: usize = 256 * 1024;

/// Read buffers kept for reuse: the chunks in flight between a file being
/// read and its consumer.
static CHUNKS: BufferPool = BufferPool::new(16, CHUNK);

/// Streams at most `limit` bytes of `reader` in [`CHUNK`]-sized pieces,
/// each read into a pooled buffer by plain `read` calls on the blocking
/// pool. The stream ends at `limit` or at the reader's end, whichever comes
/// first (the caller checks the count); a piece shorter than [`CHUNK`]
/// ends it, so no further read is spent learning of the end.
///
/// Not `tokio::fs::File`: it reads into a buffer of its own and copies
/// out, and a fresh 256 KiB buffer per chunk is a fresh mapping faulted in
/// page by page (perf of a first backup of the 681 MB demo: page faults in
/// that copy were 6 % of its CPU time, unmapping 1 %).
pub fn read_chunks<R>(reader: R, limit: u64) -> ByteStream
where
    R: std::io::Read + Send + 'static,
{
    futures::stream::try_unfold(Some((reader, limit)), |state| async move {
        let Some((mut reader, left)) = state else {
            return Ok(None);
        };
        let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        if want == 0 {
            return Ok(None);
        }
        let (reader, buf, filled) = tokio::task::spawn_blocking(move || {
            let mut buf = CHUNKS.take_filled(want);
            let mut filled = 0;
            while filled < want {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((reader, buf, filled))
        })
        .await
        .map_err(io::Error::other)??;
        if filled == 0 {
            return Ok(None);
        }
        let next = (filled == want).then(|| (reader, left - filled as u64));
        Ok(Some((CHUNKS.bytes(buf, filled), next)))
    })
    .boxed()
}

/// The first `len` bytes of a pooled buffer, which goes back to its pool
/// when dropped.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_once_its_last_clone_is_dropped_and_odd_ones_are_not_kept() {
        static POOL: BufferPool = BufferPool::new(1, 1024);
        let mut buf = POOL.take(100);
        buf.extend_from_slice(b"hello");
        let ptr = buf.as_ptr();
        let len = buf.len();
        let bytes = POOL.bytes(buf, len);
        let clone = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(&clone[..], b"el", "still alive through the clone");
        assert!(POOL.free.lock().unwrap().is_empty());
        drop(clone);
        let again = POOL.take(10);
        assert_eq!(again.as_ptr(), ptr, "the same allocation, reused");
        assert!(again.is_empty());
        // Larger than the pool's size class: freed, not kept.
        drop(POOL.bytes(vec![0u8; 4096], 4096));
        assert!(POOL.free.lock().unwrap().is_empty());
        // At most `keep` kept.
        drop(POOL.bytes(again, 0));
        drop(POOL.bytes(Vec::with_capacity(8), 0));
        assert_eq!(POOL.free.lock().unwrap().len(), 1);
    }

    /// A reader handing out at most `step` bytes a call, failing at `fail_at`.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        fail_at: Option<usize>,
    }

    impl std::io::Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_at.is_some_and(|f| self.at >= f) {
                return Err(io::Error::other("disk gone"));
            }
            let n = buf.len().min(self.step).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    async fn collect(stream: ByteStream) -> io::Result<Vec<Bytes>> {
        futures::TryStreamExt::try_collect(stream).await
    }

    #[tokio::test]
    async fn read_chunks_fills_whole_chunks_and_stops_at_the_limit_or_the_end() {
        let data: Vec<u8> = (0..(2 * CHUNK + 1000)).map(|i| (i % 251) as u8).collect();
        let trickle = |fail_at| Trickle {
            data: data.clone(),
            at: 0,
            step: 10_000,
            fail_at,
        };
        let chunks = collect(read_chunks(trickle(None), u64::MAX)).await.unwrap();
        let lens: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(lens, [CHUNK, CHUNK, 1000], "short reads are gathered");
        assert_eq!(chunks.concat(), data);
        let limited = collect(read_chunks(trickle(None), CHUNK as u64 + 5))
            .await
            .unwrap();
        assert_eq!(limited.concat(), data[..CHUNK + 5]);
        assert!(
            collect(read_chunks(trickle(None), 0))
                .await
                .unwrap()
                .is_empty()
        );
        let err = collect(read_chunks(trickle(Some(CHUNK + 10)), u64::MAX))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
    }

    #[test]
    fn take_filled_gives_exactly_len_bytes_zeroing_only_what_grows() {
        static POOL: BufferPool = BufferPool::new(1, 1024);
        assert_eq!(POOL.take_filled(5), vec![0; 5]);
        drop(POOL.bytes(b"abcdef".to_vec(), 6));
        assert_eq!(POOL.take_filled(3), b"abc", "left over, not zeroed");
        drop(POOL.bytes(b"ab".to_vec(), 2));
        assert_eq!(POOL.take_filled(4), b"ab\0\0");
        // Bytes of a part of a buffer: the whole buffer comes back.
        let part = POOL.bytes(b"wxyz".to_vec(), 1);
        assert_eq!(&part[..], b"w");
        drop(part);
        assert_eq!(POOL.take_filled(4), b"wxyz", "not truncated to the part");
    }
}
