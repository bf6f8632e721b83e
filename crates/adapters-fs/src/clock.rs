//! [`SystemClock`]: the real clock, for hosts.

use std::time::Duration;

use async_trait::async_trait;
use backup_core::ports::Clock;
use chrono::{DateTime, Utc};

/// Wall-clock time and tokio timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}
