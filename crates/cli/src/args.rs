//! The command line (clap): commands, their arguments and value types.

use std::path::PathBuf;

use backup_core::Component;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Backup and restore for SynthOrg.
#[derive(Debug, Parser)]
#[command(name = "synthorg", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Config file (default: $SYNTHORG_CONFIG, else ./synthorg.yaml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub(crate) verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// Send backup create/list/show/delete/restore to a running `synthorg serve`, e.g. http://127.0.0.1:8080.
    #[arg(long, global = true, env = "SYNTHORG_SERVER", value_name = "URL")]
    pub(crate) server: Option<String>,
    /// Bearer token for --server (default: $SYNTHORG_TOKEN, else $SYNTHORG_API_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub(crate) token: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// Whether this runs a local restore (not a dry run), which needs the
    /// app stopped.
    pub(crate) fn restores(&self) -> bool {
        let args = match &self.command {
            Command::Restore(args) => args,
            Command::Backup(BackupArgs {
                command: Some(BackupCommand::Restore(args)),
                ..
            }) => args,
            _ => return false,
        };
        self.server.is_none() && !args.dry_run
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// Encryption keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BackupArgs {
    #[command(subcommand)]
    pub(crate) command: Option<BackupCommand>,
    #[command(flatten)]
    pub(crate) create: CreateArgs,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Why the backup is taken.
    #[arg(long, value_enum, default_value_t = CliTrigger::Manual)]
    pub(crate) trigger: CliTrigger,
    /// A label stored in the manifest, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub(crate) labels: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum CliTrigger {
    Manual,
    PreMigration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
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
pub(crate) struct RestoreArgs {
    /// Backup id.
    pub(crate) id: String,
    /// Only check compatibility and show what would be replaced.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
    /// Restore only these components.
    #[arg(long, value_enum, num_args = 1.., value_name = "COMPONENT")]
    pub(crate) only: Vec<CliComponent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CliComponent {
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
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: std::net::SocketAddr,
    /// Serve without a bearer token (only on a loopback address).
    #[arg(long)]
    pub(crate) insecure_no_auth: bool,
    /// Seconds between scheduled backups, overriding backup.schedule_hours (testing).
    #[arg(long, hide = true)]
    pub(crate) schedule_secs: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Where to create the demo data (must not hold a SynthOrg database yet).
    #[arg(long, default_value = "synthorg-demo")]
    pub(crate) dir: PathBuf,
    /// Approximate size of the generated data, e.g. 20MB, 600MB, 2GiB.
    #[arg(long, default_value = "20MB", value_parser = synthorg_cli::demo::parse_size)]
    pub(crate) size: u64,
    /// Only generate the data directory (for benchmarks), then stop.
    #[arg(long)]
    pub(crate) generate_only: bool,
    /// Seed of the generated content: another seed gives entirely
    /// different data of the same shape (benchmarks restore over it).
    #[arg(long, default_value_t = 2026)]
    pub(crate) seed: u64,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Generate an age identity for `backup.encryption`: written to FILE
    /// (mode 0600, never replacing a file) and its recipient printed; without
    /// --out the identity goes to stdout and the recipient to stderr.
    Generate {
        /// Where to write the identity.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Load and validate the configuration; exit 2 naming the bad key if invalid.
    Check,
    /// Print the effective configuration (file, then env overrides; secrets hidden).
    Show,
}
