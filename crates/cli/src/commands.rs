//! The commands: each loads what it needs, calls the service, renders.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use adapters_fs::ExportDir;
use anyhow::Context as _;
use backup_core::{
    BackupConfig, BackupId, BackupService, Component, CreateOptions, RestoreOptions, RunningApp,
    Trigger,
};
use synthorg_cli::demo::{self, DemoLayout, DemoSize};
use synthorg_cli::state::LiveState;

use crate::render::Output;
use crate::{Cli, CliTrigger, CreateArgs, Exit, RestoreArgs, config_file, exit};

/// The service built from the loaded config.
pub(crate) struct Context {
    pub(crate) service: BackupService,
    /// `backup.enabled`.
    pub(crate) enabled: bool,
    /// `backup.schedule_hours`.
    pub(crate) schedule_hours: u32,
}

impl Context {
    pub(crate) async fn load(cli: &Cli) -> anyhow::Result<Context> {
        let loaded = config_file::load(cli.config.as_deref())?;
        let app = running_app(&loaded.config).await?;
        let service = synthorg_api::build_service(&loaded.config, app, None)?;
        Ok(Context {
            service,
            enabled: loaded.config.enabled,
            schedule_hours: loaded.config.schedule_hours,
        })
    }
}

/// The app this CLI acts for: its own version, and as the newest supported
/// schema `$SYNTHORG_SCHEMA_VERSION`, else `backup.supported_schema`, else
/// the live database's `user_version` (what the installed app migrated it
/// to), else unknown (see `compat::check_unknown_schema`).
async fn running_app(config: &BackupConfig) -> anyhow::Result<RunningApp> {
    let version = semver::Version::parse(env!("CARGO_PKG_VERSION"))?;
    let supported_schema = match crate::env::var(crate::env::SCHEMA_VERSION) {
        Some(raw) => Some(raw.trim().parse().map_err(|_| Exit {
            code: exit::USAGE,
            message: format!("{}={raw:?} is not an integer", crate::env::SCHEMA_VERSION),
        })?),
        None => match (
            config.supported_schema,
            adapters_sqlite::PgDatabase::configured(&config.sources),
        ) {
            (Some(v), _) => Some(i64::from(v)),
            (None, Some(db)) => db.read_schema_version().await.ok(),
            (None, None) => adapters_sqlite::read_user_version(&config.sources.database)
                .await
                .ok(),
        },
    };
    Ok(RunningApp {
        version,
        supported_schema,
        engine: config.sources.engine(),
    })
}

fn parse_id(raw: &str) -> anyhow::Result<BackupId> {
    Ok(BackupId::parse(raw).map_err(backup_core::Error::InvalidId)?)
}

pub(crate) async fn create(out: &Output, ctx: &Context, args: &CreateArgs) -> anyhow::Result<()> {
    let trigger = match args.trigger {
        CliTrigger::Manual => Trigger::Manual,
        CliTrigger::PreMigration => Trigger::PreMigration,
    };
    let labels = parse_labels(&args.labels)?;
    let options = CreateOptions {
        labels,
        progress: out.progress(),
        ..CreateOptions::default()
    };
    let manifest = ctx.service.create_with(trigger, options).await;
    crate::render::note_recovered(ctx.service.take_recovered());
    out.created(&manifest?)
}

/// `KEY=VALUE` labels.
pub(crate) fn parse_labels(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for item in raw {
        let (k, v) = item.split_once('=').ok_or_else(|| Exit {
            code: exit::USAGE,
            message: format!("label {item:?} is not KEY=VALUE"),
        })?;
        labels.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(labels)
}

pub(crate) async fn list(out: &Output, ctx: &Context, limit: Option<usize>) -> anyhow::Result<()> {
    let mut listed = ctx.service.list().await?;
    if let Some(n) = limit {
        listed.truncate(n);
    }
    out.list(&listed)
}

pub(crate) async fn status(out: &Output, ctx: &Context) -> anyhow::Result<()> {
    let report = ctx
        .service
        .status(
            ctx.enabled,
            std::time::Duration::from_secs(u64::from(ctx.schedule_hours) * 3600),
        )
        .await?;
    out.status(&report)
}

pub(crate) async fn show(out: &Output, ctx: &Context, id: &str) -> anyhow::Result<()> {
    let manifest = ctx.service.show(&parse_id(id)?).await?;
    out.manifest(&manifest)
}

pub(crate) async fn verify(out: &Output, ctx: &Context, id: &str) -> anyhow::Result<()> {
    let report = ctx
        .service
        .with_progress(out.progress())
        .verify(&parse_id(id)?)
        .await?;
    out.verified(&report)?;
    if report.ok {
        Ok(())
    } else {
        Err(Exit {
            code: exit::REFUSED,
            message: format!(
                "backup {} is damaged: {}",
                report.id,
                report.problem.unwrap_or_default()
            ),
        }
        .into())
    }
}

pub(crate) async fn delete(
    out: &Output,
    ctx: &Context,
    id: &str,
    force: bool,
) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let deleted = ctx.service.delete(&id, force).await;
    crate::render::note_recovered(ctx.service.take_recovered());
    deleted?;
    out.deleted(&id)
}

pub(crate) async fn prune(out: &Output, ctx: &Context, dry_run: bool) -> anyhow::Result<()> {
    let plan = ctx.service.prune(dry_run).await;
    crate::render::note_recovered(ctx.service.take_recovered());
    out.pruned(&plan?, dry_run)
}

pub(crate) async fn recover(out: &Output, ctx: &Context) -> anyhow::Result<()> {
    let done = ctx.service.recover().await?;
    out.recovered(&done)
}

/// Where a command runs: here, or on a `synthorg serve` (`--server`).
/// How far a restore command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The plan only: compatibility and what would be replaced.
    Plan,
    /// The plan and every check of the content, touching nothing.
    DryRun,
    /// The restore.
    Restore,
}

pub(crate) enum Target {
    Local(Box<Context>),
    Remote(crate::remote::Remote),
}

pub(crate) async fn restore(
    out: &Output,
    target: &Target,
    args: &RestoreArgs,
) -> anyhow::Result<()> {
    let id = parse_id(&args.id)?;
    let components = (!args.only.is_empty()).then(|| {
        args.only
            .iter()
            .map(|c| Component::from(*c))
            .collect::<Vec<_>>()
    });
    // `Plan`: what would be replaced, shown before asking (the content
    // is read once, by the restore itself); `DryRun`: also every check.
    let run = |mode: Mode| {
        let components = components.clone();
        let id = id.clone();
        async move {
            let options = RestoreOptions {
                dry_run: mode != Mode::Restore,
                confirm: mode == Mode::Restore,
                components: components.clone(),
            };
            match target {
                Target::Local(ctx) => {
                    let service = ctx.service.with_progress(out.progress());
                    let restored = match mode {
                        Mode::Plan => service.restore_plan(&id, &options).await,
                        Mode::DryRun | Mode::Restore => service.restore(&id, options).await,
                    };
                    crate::render::note_recovered(ctx.service.take_recovered());
                    Ok(restored?)
                }
                Target::Remote(remote) => remote.restore(&id, components, mode).await,
            }
        }
    };
    if args.dry_run {
        return out.restore_report(&run(Mode::DryRun).await?);
    }
    // With `--yes` nothing is shown before the restore, which checks the
    // same: the plan (its manifest parsed, thousands of entries) is not
    // made only to be dropped.
    if !args.yes {
        confirm(out, &run(Mode::Plan).await?)?;
    }
    let report = run(Mode::Restore).await?;
    out.restore_report(&report)
}

/// Asks on a terminal; without one, `--yes` is required.
fn confirm(out: &Output, plan: &backup_core::RestoreReport) -> anyhow::Result<()> {
    let id = &plan.id;
    if !std::io::stdin().is_terminal() {
        return Err(backup_core::Error::NotConfirmed {
            operation: "restore (stdin is not a terminal: pass --yes)".into(),
            id: id.to_string(),
        }
        .into());
    }
    out.restore_plan(plan)?;
    eprint!("Replace the live data with backup {id}? A safety backup is taken first. [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES") {
        Ok(())
    } else {
        Err(backup_core::Error::NotConfirmed {
            operation: "restore".into(),
            id: id.to_string(),
        }
        .into())
    }
}

pub(crate) async fn export(
    out: &Output,
    ctx: &Context,
    id: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let mut sink = ExportDir::create(dir)?;
    match ctx
        .service
        .with_progress(out.progress())
        .export(&id, &mut sink)
        .await
    {
        Ok((manifest, report)) => {
            let path = sink.finish(&manifest).await?;
            out.exported(&report, &path)
        }
        Err(e) => {
            sink.abandon();
            Err(e.into())
        }
    }
}

/// `synthorg demo`: generate data, then backup, list, verify, change the
/// data, restore, and check that the data equals the backup again.
pub(crate) async fn demo(
    out: &Output,
    dir: &Path,
    size: u64,
    seed: u64,
    generate_only: bool,
) -> anyhow::Result<()> {
    let step = |n: u32, text: &str| out.step(n, text);
    step(
        1,
        &format!(
            "generating ~{} of SynthOrg data in {}",
            crate::render::bytes(size),
            dir.display()
        ),
    );
    let layout = demo::generate(dir, DemoSize::total(size), seed)
        .await
        .context("generating demo data")?;
    if generate_only {
        return out.note(&format!(
            "generated; config: {}",
            layout.config_file.display()
        ));
    }
    let text = std::fs::read_to_string(&layout.config_file)?;
    let config = BackupConfig::load(Some(&text), &layout.root)?;
    let app = running_app(&config).await?;
    let service = synthorg_api::build_service(&config, app, None)?;
    let original = LiveState::capture(&layout).await?;

    step(2, "backing up (manual trigger)");
    let manifest = service
        .create_with(
            Trigger::Manual,
            CreateOptions {
                progress: out.progress(),
                ..CreateOptions::default()
            },
        )
        .await?;
    out.created(&manifest)?;

    step(3, "listing backups");
    out.list(&service.list().await?)?;

    step(
        4,
        "verifying the backup (re-reading and re-hashing everything)",
    );
    let report = service.verify(&manifest.id).await?;
    out.verified(&report)?;
    if !report.ok {
        anyhow::bail!("verification of the fresh backup failed");
    }

    step(
        5,
        "changing the live data (tasks, memory, config, checkpoints)",
    );
    change(&layout).await?;
    let changed = LiveState::capture(&layout).await?;
    anyhow::ensure!(
        changed != original,
        "the demo change did not change anything"
    );

    step(6, &format!("restoring {}", manifest.id));
    let restored = service
        .restore(
            &manifest.id,
            RestoreOptions {
                confirm: true,
                ..RestoreOptions::default()
            },
        )
        .await?;
    out.restore_report(&restored)?;

    step(7, "comparing the live data with the backup");
    let now = LiveState::capture(&layout).await?;
    if now != original {
        anyhow::bail!("the restored data differs from the backed-up data");
    }
    out.note("restored data equals the backup: database content, memory, config and checkpoints")?;
    out.note(&format!(
        "try: synthorg --config {} backup list",
        layout.config_file.display()
    ))
}

/// The demo's change to every component.
async fn change(layout: &DemoLayout) -> anyhow::Result<()> {
    let mut conn = synthorg_cli::state::open(&layout.database).await?;
    sqlx::query("UPDATE tasks SET status = 'cancelled' WHERE id % 5 = 0")
        .execute(&mut conn)
        .await?;
    sqlx::query("DELETE FROM audit_log WHERE id % 7 = 0")
        .execute(&mut conn)
        .await?;
    drop(conn);
    std::fs::write(
        layout.memory_dir.join("agents/agent-1/forgotten.json"),
        b"{\"oops\":true}\n",
    )?;
    std::fs::write(&layout.company_config, b"company:\n  name: Renamed Corp\n")?;
    if let Some((first, _)) = synthorg_cli::state::files_under(&layout.checkpoints_dir)?.first() {
        std::fs::remove_file(layout.checkpoints_dir.join(first))?;
    }
    Ok(())
}

/// `synthorg serve`: recover, take the startup backup, then listen; on
/// SIGTERM/SIGINT stop accepting, take the shutdown backup, exit.
pub(crate) async fn serve(cli: &Cli, args: &crate::ServeArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use synthorg_api::{AdminState, BackupRuntime, RuntimeConfig};

    let loaded = config_file::load(cli.config.as_deref())?;
    let token = crate::env::var(crate::env::API_TOKEN)
        .map(backup_core::config::Secret::new)
        .or(loaded.api_token);
    if token.is_none() && !(args.insecure_no_auth && args.listen.ip().is_loopback()) {
        return Err(Exit {
            code: exit::USAGE,
            message: "no API token: set SYNTHORG_API_TOKEN or api.token in the config \
                      (--insecure-no-auth is allowed only on a loopback address)"
                .into(),
        }
        .into());
    }
    let config = loaded.config;
    let app = running_app(&config).await?;
    let service = synthorg_api::build_service(&config, app, None)?;
    let state = AdminState::new(service, token, config.enabled).with_schedule(
        args.schedule_secs.map_or_else(
            || std::time::Duration::from_secs(u64::from(config.schedule_hours) * 3600),
            |s| std::time::Duration::from_secs(s.max(1)),
        ),
    );
    let mut runtime_config = RuntimeConfig::from(&config);
    if let Some(secs) = args.schedule_secs {
        runtime_config.schedule = std::time::Duration::from_secs(secs.max(1));
    }
    // Recovery and the startup backup happen before the listener exists.
    let runtime = BackupRuntime::start(
        state.clone(),
        runtime_config,
        Arc::new(adapters_fs::SystemClock),
    )
    .await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, synthorg_api::app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    tracing::info!("shutting down: taking the shutdown backup");
    runtime.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `config check` of `backup.encryption`: an identity file that cannot be
/// used is an error naming the key (exit 2); recipients the identity
/// cannot decrypt are warned about.
pub(crate) fn check_keys(config: &BackupConfig) -> anyhow::Result<()> {
    let Some(enc) = &config.encryption else {
        return Ok(());
    };
    let identity = match &enc.identity_file {
        Some(file) => adapters_fs::load_identity(file),
        None => backup_core::crypt::IdentityState::None,
    };
    if let backup_core::crypt::IdentityState::Unavailable { file, reason } = &identity {
        return Err(Exit {
            code: exit::USAGE,
            message: format!(
                "invalid configuration: backup.encryption.identity_file: {file}: {reason}"
            ),
        }
        .into());
    }
    let recipients = enc.recipients().ok();
    for w in backup_core::crypt::key_warnings(&identity, recipients.as_ref()) {
        eprintln!("warning: {}", crate::render::printable(&w));
    }
    Ok(())
}
