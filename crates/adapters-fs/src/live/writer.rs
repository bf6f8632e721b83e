//! [`StageWriter`]: the file system work of staging on a thread of its own.
//!
//! The reader (tar parsing, hashing) and the writes then overlap instead of
//! taking turns, and a restore of thousands of small files pays no runtime
//! hand-off per open, write, chmod and utime: jobs run in order on one
//! thread, fed through a bounded queue (at most [`QUEUE`] jobs, each at most
//! one read chunk of data, in memory). A failed job stops the thread; the
//! next job sent, or [`finish`](StageWriter::finish), returns its error.

use super::*;

/// Jobs queued at most.
const QUEUE: usize = 32;

/// What the jobs share: the file being written.
#[derive(Default)]
pub(super) struct Open {
    pub(super) file: Option<(std::fs::File, PathBuf, Component)>,
}

/// One piece of staging work.
pub(super) type Job = Box<dyn FnOnce(&mut Open) -> Result<()> + Send>;

/// The staging thread and its queue.
pub(super) struct StageWriter {
    tx: Option<tokio::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl StageWriter {
    pub(super) fn start() -> Result<StageWriter> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("synthorg-stage".into())
            .spawn(move || {
                let mut open = Open::default();
                while let Some(job) = rx.blocking_recv() {
                    job(&mut open)?;
                }
                Ok(())
            })
            .map_err(|e| Error::Internal(format!("cannot start the staging thread: {e}")))?;
        Ok(StageWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `job`; the error of an earlier job if the thread stopped.
    pub(super) async fn run(&mut self, job: Job) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(job).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        self.finish().await?;
        Err(Error::Internal("the staging thread stopped".into()))
    }

    /// Waits for every queued job; the first error. Idempotent.
    pub(super) async fn finish(&mut self) -> Result<()> {
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| Error::Internal(format!("staging thread: {e}")))?
            .map_err(|_| Error::Internal("the staging thread panicked".into()))?
    }
}

/// Bytes of staged files finished between two nudges of the [`Flusher`].
pub(super) const FLUSH_EVERY: u64 = 32 * 1024 * 1024;

/// Writeback of the staged files while staging goes on: nudged every
/// [`FLUSH_EVERY`] bytes finished, a thread of its own `syncfs`es the
/// staging's filesystems, so that the writeback the swap must wait for is
/// only what was written since the last one, not the whole staging (the
/// thousands of small files written last).
///
/// The filesystems are opened when staging starts: a `syncfs` reports a
/// writeback error that happened since its descriptor was opened, so one
/// in the kernel's own writeback during staging is not missed.
pub(super) struct Flusher {
    nudge: Option<std::sync::mpsc::SyncSender<()>>,
    thread: std::thread::JoinHandle<Result<()>>,
    since: u64,
    /// Writebacks done (the thread logs them).
    #[cfg(test)]
    rounds: Arc<std::sync::atomic::AtomicU64>,
    /// Set when the staging is dropped: no last writeback.
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

impl Flusher {
    /// Starts the thread for the filesystems holding `dirs` (one directory
    /// per filesystem: `layout::staging_filesystems`).
    pub(super) fn start(dirs: &[(Component, PathBuf)]) -> Result<Flusher> {
        let mut opened = Vec::with_capacity(dirs.len());
        for (c, dir) in dirs {
            let file = std::fs::File::open(dir).map_err(|e| source_err(*c, dir, e))?;
            opened.push((*c, dir.clone(), file));
        }
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = Arc::clone(&rounds);
        let sync_all = move || -> Result<()> {
            for (c, dir, file) in &opened {
                rustix::fs::syncfs(file).map_err(|e| source_err(*c, dir, io::Error::from(e)))?;
            }
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        };
        let rounds_done = Arc::clone(&rounds);
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = Arc::clone(&abandoned);
        // One nudge waits at most: a writeback running covers the next.
        let (nudge, nudged) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("synthorg-flush".into())
            .spawn(move || {
                while nudged.recv().is_ok() {
                    sync_all()?;
                }
                if dropped.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                // Staging is written: the last writeback.
                sync_all()?;
                tracing::debug!(
                    rounds = rounds_done.load(std::sync::atomic::Ordering::Relaxed),
                    "staging written back"
                );
                Ok(())
            })
            .map_err(|e| Error::Internal(format!("cannot start the writeback thread: {e}")))?;
        Ok(Flusher {
            nudge: Some(nudge),
            thread,
            since: 0,
            #[cfg(test)]
            rounds,
            abandoned,
        })
    }

    /// Counts `bytes` of a finished file; nudges the thread past
    /// [`FLUSH_EVERY`] (never waits for it).
    pub(super) fn finished(&mut self, bytes: u64) {
        self.since += bytes;
        if self.since >= FLUSH_EVERY {
            self.since = 0;
            if let Some(nudge) = &self.nudge {
                let _ = nudge.try_send(());
            }
        }
    }

    /// The staging is dropped: waits for a writeback running, starts no
    /// other.
    pub(super) async fn abandon(self) {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.finish().await;
    }

    /// Everything staged is written: the last writeback, then the first
    /// error of any.
    pub(super) fn finish(mut self) -> tokio::task::JoinHandle<Result<()>> {
        self.nudge = None;
        let thread = self.thread;
        tokio::task::spawn_blocking(move || {
            thread
                .join()
                .map_err(|_| Error::Internal("the writeback thread panicked".into()))?
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn the_flusher_writes_back_as_files_finish_and_once_more_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut flusher = Flusher::start(&[(Component::Memory, dir.path().to_path_buf())]).unwrap();
        let rounds = Arc::clone(&flusher.rounds);
        std::fs::write(dir.path().join("small"), b"x").unwrap();
        flusher.finished(FLUSH_EVERY - 2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            rounds.load(Ordering::Relaxed),
            0,
            "not nudged below FLUSH_EVERY"
        );
        std::fs::write(dir.path().join("big"), vec![7u8; 1 << 20]).unwrap();
        flusher.finished(2);
        let started = std::time::Instant::now();
        while rounds.load(Ordering::Relaxed) == 0 {
            assert!(
                started.elapsed().as_secs() < 30,
                "no writeback after a nudge"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let before = rounds.load(Ordering::Relaxed);
        flusher.finish().await.unwrap().unwrap();
        assert_eq!(
            rounds.load(Ordering::Relaxed),
            before + 1,
            "the last writeback"
        );

        let flusher = Flusher::start(&[(Component::Memory, dir.path().to_path_buf())]).unwrap();
        let rounds = Arc::clone(&flusher.rounds);
        flusher.abandon().await;
        assert_eq!(
            rounds.load(Ordering::Relaxed),
            0,
            "no writeback of a dropped staging"
        );
    }

    #[test]
    fn a_flusher_for_a_missing_directory_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone-dir");
        let err = Flusher::start(&[(Component::Checkpoints, gone)])
            .err()
            .unwrap();
        assert!(err.to_string().contains("gone-dir"), "{err}");
    }
}
