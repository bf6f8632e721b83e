//! `synthorg`: the command-line tool of synthorg-backup.
//!
//! Thin over the library: parse arguments, load the config, call the
//! service, render the result. Results go to stdout (`--json` for
//! machines), logs to stderr. Errors are one line on stderr with their
//! context chain and map to documented exit codes: 0 ok, 1 failed,
//! 2 usage/config/invalid input, 3 refused, 4 busy.

mod commands;
mod config_file;
mod remote;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use backup_core::Component;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// Backup and restore for SynthOrg.
#[derive(Debug, Parser)]
#[command(name = "synthorg", version, about, propagate_version = true)]
struct Cli {
    /// Config file (default: $SYNTHORG_CONFIG, else ./synthorg.yaml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Send backup create/list/show/delete/restore to a running `synthorg serve`, e.g. http://127.0.0.1:8080.
    #[arg(long, global = true, env = "SYNTHORG_SERVER", value_name = "URL")]
    server: Option<String>,
    /// Bearer token for --server (default: $SYNTHORG_TOKEN, else $SYNTHORG_API_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, inspect, verify, delete, prune, restore and export backups.
    Backup(BackupArgs),
    /// Restore a backup (alias of `backup restore`).
    Restore(RestoreArgs),
    /// Roll back or finish an interrupted restore and remove leftovers of interrupted backups.
    Recover,
    /// Run the admin REST API with the backup lifecycle (startup, scheduled and shutdown backups).
    Serve(ServeArgs),
    /// Create a demo data directory and run backup, list, verify, change, restore and compare on it.
    Demo(DemoArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BackupArgs {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    #[command(flatten)]
    create: CreateArgs,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Why the backup is taken.
    #[arg(long, value_enum, default_value_t = CliTrigger::Manual)]
    trigger: CliTrigger,
    /// A label stored in the manifest, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CliTrigger {
    Manual,
    PreMigration,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Create a backup and print its id (the default).
    Create(CreateArgs),
    /// List backups, newest first.
    List {
        /// Show at most N backups.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Backup health: ok, failing, overdue or disabled, with the last
    /// success, failure and verification (exit 0 only when ok).
    Status,
    /// Show a backup's manifest.
    Show {
        /// Backup id.
        id: String,
    },
    /// Re-read a backup completely and check every hash; exit 0 only if intact.
    Verify {
        /// Backup id.
        id: String,
    },
    /// Delete a backup.
    Delete {
        /// Backup id.
        id: String,
        /// Also delete a pinned pre-migration backup.
        #[arg(long)]
        force: bool,
    },
    /// Apply the retention policy now.
    Prune {
        /// Only show what would be pruned.
        #[arg(long)]
        dry_run: bool,
    },
    /// Restore a backup into the live data (stop SynthOrg first).
    Restore(RestoreArgs),
    /// Verify a backup and extract it into a new directory, without touching live data.
    Export {
        /// Backup id.
        id: String,
        /// Destination directory (must not exist or be empty).
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// Backup id.
    id: String,
    /// Only check compatibility and show what would be replaced.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Restore only these components.
    #[arg(long, value_enum, num_args = 1.., value_name = "COMPONENT")]
    only: Vec<CliComponent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CliComponent {
    Persistence,
    Memory,
    Config,
    Checkpoints,
}

impl From<CliComponent> for Component {
    fn from(c: CliComponent) -> Component {
        match c {
            CliComponent::Persistence => Component::Persistence,
            CliComponent::Memory => Component::Memory,
            CliComponent::Config => Component::Config,
            CliComponent::Checkpoints => Component::Checkpoints,
        }
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Serve without a bearer token (only on a loopback address).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Seconds between scheduled backups, overriding backup.schedule_hours (testing).
    #[arg(long, hide = true)]
    schedule_secs: Option<u64>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Where to create the demo data (must not hold a SynthOrg database yet).
    #[arg(long, default_value = "synthorg-demo")]
    dir: PathBuf,
    /// Approximate size of the generated data, e.g. 20MB, 600MB, 2GiB.
    #[arg(long, default_value = "20MB", value_parser = synthorg_cli::demo::parse_size)]
    size: u64,
    /// Only generate the data directory (for benchmarks), then stop.
    #[arg(long)]
    generate_only: bool,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration; exit 2 naming the bad key if invalid.
    Check,
    /// Print the effective configuration (file, then env overrides; secrets hidden).
    Show,
}

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

/// glibc's malloc raises its mmap threshold to the size of each large
/// block freed; after that the pipeline's 1 MiB members and 8 MiB upload
/// parts come from arenas that fragment (bench/run, same data: peak RSS of
/// a gzip backup 55 -> 25 MiB, of an S3 upload 112 -> 50 MiB with a fixed
/// threshold). The threshold is fixed only through the environment, read
/// when the process starts, so the process re-executes itself once with it
/// set (no unsafe `mallopt`; mimalloc was measured too and used more).
/// An explicit setting is kept; if exec fails, it runs on as it is.
fn fix_malloc_threshold() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // Only returns on failure.
    let _ = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(VAR, "131072")
        .exec();
}

/// The variable that sets how many CPUs `synthorg` uses (0: all).
const CPUS_VAR: &str = "SYNTHORG_BACKUP_CPUS";

/// Keeps the process (and every thread it starts later) on all the CPUs it
/// may use but one, so that a backup never takes the CPU from the app's
/// writers: with both cores busy a committing writer waited up to a
/// scheduler tick (perf sched), p99 0.2 -> 2.2-3.3 ms, and neither `nice`
/// nor SCHED_IDLE helped; on one core of two, p99 stayed at 0.16 ms and the
/// backup took 8 % longer (bench/run). `SYNTHORG_BACKUP_CPUS=N` uses N
/// (0: all).
fn limit_cpus() -> Result<(), String> {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
    let wanted =
        match std::env::var(CPUS_VAR) {
            Ok(v) => Some(v.trim().parse::<usize>().map_err(|_| {
                format!("{CPUS_VAR}: expected a number of CPUs (0 = all), got {v:?}")
            })?),
            Err(_) => None,
        };
    let Ok(allowed) = sched_getaffinity(None) else {
        return Ok(());
    };
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    let use_cpus = wanted.unwrap_or_else(|| cpus.len().saturating_sub(1).max(1));
    if use_cpus == 0 || use_cpus >= cpus.len() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    // The highest-numbered ones: CPU 0 usually takes the most interrupts.
    for &cpu in cpus.iter().rev().take(use_cpus) {
        set.set(cpu);
    }
    // Best effort: a refused affinity (some sandboxes) leaves all CPUs.
    let _ = sched_setaffinity(None, &set);
    Ok(())
}

fn main() -> ExitCode {
    fix_malloc_threshold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Before the runtime starts its threads: they inherit the affinity.
    if let Err(e) = limit_cpus() {
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
            eprintln!("error: {e:#}");
            if cli.verbose > 1 {
                eprintln!("{e:?}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
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
                ConfigCommand::Check => out.config_ok(&loaded.source),
                ConfigCommand::Show => out.config(&loaded.config),
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "synthorg",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Demo(args) => commands::demo(&out, &args.dir, args.size, args.generate_only).await,
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
        .or_else(|| std::env::var("SYNTHORG_TOKEN").ok())
        .or_else(|| std::env::var("SYNTHORG_API_TOKEN").ok());
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
