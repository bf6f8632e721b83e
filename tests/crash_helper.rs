//! `synthorg-crash-helper CONFIG DATA_DIR OP [ID]`: runs one operation of
//! the library (`backup`, `restore ID`, `delete ID`, `prune`) with the real
//! adapters, for the crash suite to SIGKILL at a random moment. CONFIG is
//! a YAML file with a `backup:` block; relative paths are under DATA_DIR.
//! Prints `done` when the operation finished.
//!
//! With `SYNTHORG_CRASH_ABORT_AFTER_RENAME=N`, a restore aborts the process
//! right after the N-th rename (0-based) of its swap, as a kill would;
//! `=preserve` once the safety backup's links are made (before the swap),
//! `=commit` once the swap committed (before the safety backup is
//! published).

use backup_core::{BackupConfig, BackupId, RestoreOptions, Trigger};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, dir, op, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: synthorg-crash-helper CONFIG DATA_DIR OP [ID]");
    };
    let yaml = std::fs::read_to_string(config)?;
    let config = BackupConfig::load(Some(&yaml), std::path::Path::new(dir))?;
    let mut live = synthorg_api::live_data(&config);
    if let Ok(n) = std::env::var("SYNTHORG_CRASH_ABORT_AFTER_RENAME") {
        let fault = match n.as_str() {
            "preserve" => adapters_fs::SwapFault::AbortAfterPreserve,
            "commit" => adapters_fs::SwapFault::AbortAfterCommit,
            n => adapters_fs::SwapFault::AbortAfter(n.parse()?),
        };
        live = live.with_fault(fault);
    }
    let service = synthorg_api::build_service_with(
        &config,
        synthorg_tests::running_app_for(&config),
        None,
        live,
    )?;
    let id = || -> anyhow::Result<BackupId> {
        let id = rest
            .first()
            .ok_or_else(|| anyhow::anyhow!("{op} needs an id"))?;
        Ok(BackupId::parse(id)?)
    };
    match op.as_str() {
        "backup" => {
            service.create(Trigger::Manual).await?;
        }
        "restore" => {
            let options = RestoreOptions {
                confirm: true,
                ..RestoreOptions::default()
            };
            service.restore(&id()?, options).await?;
        }
        "delete" => service.delete(&id()?, false).await?,
        "prune" => {
            service.prune(false).await?;
        }
        other => anyhow::bail!("unknown operation {other}"),
    }
    println!("done");
    Ok(())
}
