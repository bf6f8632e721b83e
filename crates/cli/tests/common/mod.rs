//! Helpers for driving the real `synthorg` binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use synthorg_cli::demo::{self, DemoLayout, DemoSize};

pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_synthorg")
}

/// A demo data directory with its config file.
pub(crate) struct Demo {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) layout: DemoLayout,
}

impl Demo {
    pub(crate) async fn new(bytes: u64) -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let layout = demo::generate(&dir.path().join("data"), DemoSize::total(bytes), 7)
            .await
            .unwrap();
        Demo { dir, layout }
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.layout.config_file.clone()
    }

    /// Runs `synthorg --config <demo config> args...` with no stdin.
    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .env_remove("SYNTHORG_CONFIG")
            .env_remove("RUST_LOG");
        cmd
    }

    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&out)))
    }

    pub(crate) fn backups_dir(&self) -> &Path {
        &self.layout.backups_dir
    }
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
