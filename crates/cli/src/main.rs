//! `synthorg`: the command-line tool of synthorg-backup.
//!
//! Thin over the library: parse arguments, load the config, call the
//! service, render the result. Errors are one line on stderr (with their
//! context chain) and map to documented exit codes: 0 ok, 1 failed,
//! 2 usage/config/invalid input, 3 refused, 4 busy.

mod config_file;

use std::path::PathBuf;
use std::process::ExitCode;

use backup_core::{BackupConfig, ErrorKind};
use clap::{Parser, Subcommand};

/// Backup and restore for SynthOrg.
#[derive(Debug, Parser)]
#[command(name = "synthorg", version, about)]
struct Cli {
    /// Config file (default: $SYNTHORG_CONFIG, else ./synthorg.yaml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// More detail in logs and errors (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
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
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain; `-v` adds the debug form.
            eprintln!("error: {e:#}");
            if cli.verbose > 1 {
                eprintln!("{e:?}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
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
    if let Some(core) = e
        .chain()
        .find_map(|c| c.downcast_ref::<backup_core::Error>())
    {
        return match core.kind() {
            ErrorKind::Invalid => exit::USAGE,
            ErrorKind::Refused => exit::REFUSED,
            ErrorKind::Busy => exit::BUSY,
            ErrorKind::NotFound | ErrorKind::Failed => exit::FAILED,
        };
    }
    if e.chain()
        .any(|c| c.is::<backup_core::ConfigError>() || c.is::<config_file::FileError>())
    {
        return exit::USAGE;
    }
    exit::FAILED
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Config(cmd) => {
            let loaded = config_file::load(cli.config.as_deref())?;
            match cmd {
                ConfigCommand::Check => {
                    if cli.json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": true, "source": loaded.source})
                        );
                    } else {
                        println!("configuration OK ({})", loaded.source);
                    }
                }
                ConfigCommand::Show => print_config(&loaded.config, cli.json)?,
            }
            Ok(())
        }
    }
}

fn print_config(config: &BackupConfig, json: bool) -> anyhow::Result<()> {
    let value = serde_json::json!({ "backup": config });
    if json {
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}
