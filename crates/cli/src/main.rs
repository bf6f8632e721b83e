//! `synthorg`: the command-line tool of synthorg-backup.
//!
//! Thin over the library: parse arguments, load the config, call the
//! service, render the result. Results go to stdout (`--json` for
//! machines), logs to stderr. Errors are one line on stderr with their
//! context chain and map to documented exit codes: 0 ok, 1 failed,
//! 2 usage/config/invalid input, 3 refused, 4 busy.

mod args;
mod commands;
mod config_file;
mod env;
mod process;
mod remote;
mod render;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

pub(crate) use args::*;

/// Documented exit codes.
mod exit {
    pub(crate) const FAILED: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const REFUSED: u8 = 3;
    pub(crate) const BUSY: u8 = 4;

    /// The documented exit code of an error kind.
    pub(crate) fn of_kind(kind: backup_core::ErrorKind) -> u8 {
        use backup_core::ErrorKind;
        match kind {
            ErrorKind::Invalid => USAGE,
            ErrorKind::Refused => REFUSED,
            ErrorKind::Busy => BUSY,
            ErrorKind::NotFound | ErrorKind::Failed => FAILED,
        }
    }
}

/// An error that already carries its exit code (e.g. verify found damage).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Exit {
    pub(crate) code: u8,
    pub(crate) message: String,
}

fn main() -> ExitCode {
    process::fix_malloc_threshold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Before the runtime starts its threads: they inherit the affinity.
    if let Err(e) = process::limit_cpus(cli.restores()) {
        eprintln!("error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    init_logging(cli.verbose, cli.quiet);
    // Few blocking threads: each would get its own malloc arena, and file
    // I/O and compression need no more than a handful.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            if cli.verbose > 1 {
                eprintln!("{e:?}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error and its causes, each once: most of ours already name their
/// cause in their message (which `{:#}` would then print twice).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Maps the domain's error kinds (anywhere in the chain) to exit codes.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(exit) = e.chain().find_map(|c| c.downcast_ref::<Exit>()) {
        return exit.code;
    }
    if let Some(core) = e
        .chain()
        .find_map(|c| c.downcast_ref::<backup_core::Error>())
    {
        return exit::of_kind(core.kind());
    }
    if e.chain().any(|c| {
        c.is::<backup_core::ConfigError>()
            || c.is::<config_file::FileError>()
            || c.is::<backup_core::IdError>()
    }) {
        return exit::USAGE;
    }
    exit::FAILED
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let out = render::Output {
        json: cli.json,
        quiet: cli.quiet,
    };
    match &cli.command {
        Command::Config(cmd) => {
            let loaded = config_file::load(cli.config.as_deref())?;
            match cmd {
                ConfigCommand::Check => {
                    commands::check_keys(&loaded.config)?;
                    out.config_ok(&loaded.source)
                }
                ConfigCommand::Show => out.config(&loaded.config),
            }
        }
        Command::Key(KeyCommand::Generate { out: file }) => out.key_generated(file.as_deref()),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "synthorg",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Demo(args) => {
            commands::demo(&out, &args.dir, args.size, args.seed, args.generate_only).await
        }
        Command::Serve(args) => commands::serve(cli, args).await,
        Command::Recover => commands::recover(&out, &commands::Context::load(cli).await?).await,
        _ if cli.server.is_some() => remote(cli, &out).await,
        Command::Restore(args) => {
            let target = commands::Target::Local(Box::new(commands::Context::load(cli).await?));
            commands::restore(&out, &target, args).await
        }
        Command::Backup(args) => {
            let ctx = commands::Context::load(cli).await?;
            match &args.command {
                None => commands::create(&out, &ctx, &args.create).await,
                Some(BackupCommand::Create(create)) => commands::create(&out, &ctx, create).await,
                Some(BackupCommand::List { limit }) => commands::list(&out, &ctx, *limit).await,
                Some(BackupCommand::Status) => commands::status(&out, &ctx).await,
                Some(BackupCommand::Show { id }) => commands::show(&out, &ctx, id).await,
                Some(BackupCommand::Verify { id }) => commands::verify(&out, &ctx, id).await,
                Some(BackupCommand::Delete { id, force }) => {
                    commands::delete(&out, &ctx, id, *force).await
                }
                Some(BackupCommand::Prune { dry_run }) => {
                    commands::prune(&out, &ctx, *dry_run).await
                }
                Some(BackupCommand::Restore(r)) => {
                    commands::restore(&out, &commands::Target::Local(Box::new(ctx)), r).await
                }
                Some(BackupCommand::Export { id, dir }) => {
                    commands::export(&out, &ctx, id, dir).await
                }
            }
        }
    }
}

/// Remote mode: the commands that make sense against a server.
async fn remote(cli: &Cli, out: &render::Output) -> anyhow::Result<()> {
    let server = cli.server.as_deref().unwrap_or_default();
    let token = cli
        .token
        .clone()
        .or_else(|| env::var(env::TOKEN))
        .or_else(|| env::var(env::API_TOKEN));
    let remote = remote::Remote::new(server, token)?;
    let id = |raw: &str| backup_core::BackupId::parse(raw).map_err(backup_core::Error::InvalidId);
    let create = |args: &CreateArgs| {
        let trigger = match args.trigger {
            CliTrigger::Manual => "manual",
            CliTrigger::PreMigration => "pre-migration",
        };
        (trigger, commands::parse_labels(&args.labels))
    };
    match &cli.command {
        Command::Restore(args) => {
            commands::restore(out, &commands::Target::Remote(remote), args).await
        }
        Command::Backup(args) => match &args.command {
            None | Some(BackupCommand::Create(_)) => {
                let c = match &args.command {
                    Some(BackupCommand::Create(c)) => c,
                    _ => &args.create,
                };
                let (trigger, labels) = create(c);
                remote.create(out, trigger, &labels?).await
            }
            Some(BackupCommand::List { limit }) => remote.list(out, *limit).await,
            Some(BackupCommand::Status) => remote.status(out).await,
            Some(BackupCommand::Show { id: raw }) => remote.show(out, &id(raw)?).await,
            Some(BackupCommand::Delete { id: raw, force }) => {
                remote.delete(out, &id(raw)?, *force).await
            }
            Some(BackupCommand::Restore(r)) => {
                commands::restore(out, &commands::Target::Remote(remote), r).await
            }
            Some(
                BackupCommand::Verify { .. }
                | BackupCommand::Prune { .. }
                | BackupCommand::Export { .. },
            ) => Err(not_remote()),
        },
        _ => Err(not_remote()),
    }
}

fn not_remote() -> anyhow::Error {
    Exit {
        code: exit::USAGE,
        message:
            "with --server only backup create/list/show/delete/restore and restore are available; \
                  run the others on the server's host"
                .into(),
    }
    .into()
}
