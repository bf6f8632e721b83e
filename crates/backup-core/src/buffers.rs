//! [`BufferPool`]: buffers of one size class kept for reuse.
//!
//! `synthorg` fixes glibc's mmap threshold at 128 KiB (see the CLI's
//! `process.rs`), so every larger buffer is a fresh mapping whose pages the
//! kernel faults in and zeroes one by one, then unmaps. The pipeline's
//! large buffers (1 MiB members, 256 KiB file reads) come from a pool
//! instead: perf put fresh member buffers at 8 % of a restore's CPU, and
//! the archive's 256 KiB reads at most of its remaining 62,000 page faults.

use std::sync::Mutex;

use bytes::Bytes;

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
