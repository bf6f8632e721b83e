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
