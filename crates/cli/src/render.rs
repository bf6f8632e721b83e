//! Rendering results: human text or `--json` on stdout; progress on a
//! terminal only.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use backup_core::ports::Listed;
use backup_core::retention::{Action, Decision};
use backup_core::service::ProgressFn;
use backup_core::wire::{
    ConfigOk, Deleted, Exported, KeyGenerated, ListItem, Note, PruneItem, Pruned, Recovered,
};
use backup_core::{BackupConfig, BackupId, Manifest, RestoreReport, VerifyReport};

/// How to print.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
    /// `-q`: no informational lines on stderr.
    pub(crate) quiet: bool,
}

/// `1.5 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn age(ts: chrono::DateTime<chrono::Utc>) -> String {
    let now = chrono::Utc::now();
    if backup_core::service::is_future(ts, now) {
        return "in the future".to_owned();
    }
    let secs = now.signed_duration_since(ts).num_seconds().max(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// What the recovery before this command's operation did (logged at
/// WARN too); the command's `--json` object gets it as `recovered`.
static RECOVERED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records what recovery did, for the `--json` output.
pub(crate) fn note_recovered(done: Vec<String>) {
    RECOVERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .extend(done);
}

/// `text` with control characters and bidi overrides escaped, so that a
/// label can never drive the terminal (labels are checked on input; old
/// backups and other writers may still hold anything).
/// A public key shortened for a table: `age1qyqs…x7kz`.
fn short_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 16 {
        return key.to_owned();
    }
    let head: String = chars[..9].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if backup_core::manifest::is_unsafe_label_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints one wire value (`backup_core::wire` or a domain report) as
/// pretty JSON, with the recovery actions of this run added to an object.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let value = serde_json::to_value(value)?;
    let recovered = std::mem::take(
        &mut *RECOVERED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    match value {
        serde_json::Value::Object(mut map) if !recovered.is_empty() => {
            map.insert("recovered".into(), serde_json::to_value(recovered)?);
            println!("{}", serde_json::to_string_pretty(&map)?);
        }
        value => println!("{}", serde_json::to_string_pretty(&value)?),
    }
    Ok(())
}

impl Output {
    /// A progress receiver drawing on stderr, only on a terminal and never with `--json`.
    /// A progress bar on stderr (bytes, rate, ETA per component), only on
    /// a terminal and never with `--json`.
    pub(crate) fn progress(&self) -> Option<ProgressFn> {
        if self.json || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "  {msg:<12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .ok()?
        .progress_chars("=> ");
        bar.set_style(style);
        let phase = Arc::new(std::sync::Mutex::new(None));
        let f: ProgressFn = Arc::new(move |p| {
            let Ok(mut current) = phase.lock() else {
                return;
            };
            if *current != Some(p.phase) {
                *current = Some(p.phase);
                bar.reset();
                let name = match p.phase {
                    backup_core::service::Phase::Backup(c) => c.to_string(),
                    backup_core::service::Phase::Verify => "verify".into(),
                    backup_core::service::Phase::Restore => "restore".into(),
                    backup_core::service::Phase::Finish => "finishing".into(),
                };
                bar.set_message(name);
            }
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            if p.phase == backup_core::service::Phase::Finish {
                bar.finish_and_clear();
            }
        });
        Some(f)
    }

    pub(crate) fn step(&self, n: u32, text: &str) {
        if self.json {
            eprintln!("step {n}: {text}");
        } else {
            println!("\n== {n}. {text}");
        }
    }

    pub(crate) fn note(&self, text: &str) -> anyhow::Result<()> {
        if self.json {
            print_json(&Note {
                note: text.to_owned(),
            })
        } else {
            println!("{text}");
            Ok(())
        }
    }

    /// `key generate`: a new identity, written to `file` (0600, never
    /// replacing one) or, without a file, printed.
    pub(crate) fn key_generated(&self, file: Option<&Path>) -> anyhow::Result<()> {
        let (text, recipient) = backup_core::crypt::generate_identity();
        let Some(file) = file else {
            if self.json {
                return Err(crate::Exit {
                    code: crate::exit::USAGE,
                    message: "key generate --json needs --out FILE (the identity is not JSON)"
                        .into(),
                }
                .into());
            }
            print!("{text}");
            eprintln!("recipient: {recipient}");
            return Ok(());
        };
        adapters_fs::write_identity(file, &text).map_err(|e| crate::Exit {
            code: if e.kind() == std::io::ErrorKind::AlreadyExists {
                crate::exit::USAGE
            } else {
                crate::exit::FAILED
            },
            message: format!(
                "cannot write the identity to {}: {}",
                file.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    "the file exists (an identity is never replaced; move it away first)".to_owned()
                } else {
                    e.to_string()
                }
            ),
        })?;
        if self.json {
            return print_json(&KeyGenerated {
                recipient,
                identity_file: file.display().to_string(),
            });
        }
        println!("{recipient}");
        if !self.quiet {
            eprintln!(
                "identity written to {} (mode 0600); keep a copy somewhere safe: without it no backup encrypted to {recipient} can be restored",
                file.display()
            );
        }
        Ok(())
    }

    pub(crate) fn config_ok(&self, source: &str) -> anyhow::Result<()> {
        if self.json {
            print_json(&ConfigOk {
                ok: true,
                source: source.to_owned(),
            })
        } else {
            println!("configuration OK ({source})");
            Ok(())
        }
    }

    pub(crate) fn config(&self, config: &BackupConfig) -> anyhow::Result<()> {
        print_json(&std::collections::BTreeMap::from([("backup", config)]))
    }

    pub(crate) fn created(&self, m: &Manifest) -> anyhow::Result<()> {
        if self.json {
            return print_json(m);
        }
        println!("{}", m.id);
        if self.quiet {
            return Ok(());
        }
        eprintln!(
            "  {} of data in {} files, stored as {} ({})",
            bytes(m.size_bytes),
            m.files.len(),
            bytes(m.stored_bytes()),
            m.compression
        );
        Ok(())
    }

    pub(crate) fn list(&self, listed: &[Listed]) -> anyhow::Result<()> {
        self.list_items(&listed.iter().map(ListItem::from).collect::<Vec<_>>())
    }

    /// Renders list items (local or remote).
    pub(crate) fn list_items(&self, items: &[ListItem]) -> anyhow::Result<()> {
        if self.json {
            return print_json(&items);
        }
        if items.is_empty() {
            println!("no backups");
            return Ok(());
        }
        println!(
            "{:<34} {:<14} {:>9} {:>10}  {:<38} STATUS",
            "ID", "TRIGGER", "AGE", "SIZE", "COMPONENTS"
        );
        let names = |cs: &[backup_core::Component]| {
            cs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        for item in items {
            let size = item.stored_bytes.map_or_else(|| "-".to_owned(), bytes);
            let mut components = item
                .components
                .as_deref()
                .map_or_else(|| "-".to_owned(), names);
            if !item.absent.is_empty() {
                components.push_str(&format!(" (absent: {})", names(&item.absent)));
            }
            let mut status = match (item.status.as_str(), item.pinned) {
                ("complete", Some(true)) => "complete (pinned)".to_owned(),
                ("damaged", _) => format!("damaged: {}", item.reason.as_deref().unwrap_or("")),
                (s, _) => s.to_owned(),
            };
            if item.encrypted {
                let to: Vec<String> = item.recipients.iter().map(|r| short_key(r)).collect();
                status.push_str(&format!(", encrypted to {}", to.join(" ")));
            }
            println!(
                "{:<34} {:<14} {:>9} {:>10}  {:<38} {status}",
                item.id.to_string(),
                item.trigger.to_string(),
                age(item.timestamp),
                size,
                components
            );
        }
        Ok(())
    }

    pub(crate) fn manifest(&self, m: &Manifest) -> anyhow::Result<()> {
        if self.json {
            return print_json(m);
        }
        println!("id:               {}", m.id);
        println!(
            "trigger:          {}{}",
            m.trigger,
            if m.is_pinned() { " (pinned)" } else { "" }
        );
        println!("timestamp:        {}", m.timestamp.to_rfc3339());
        println!("synthorg_version: {}", m.synthorg_version);
        println!(
            "db_schema:        {}",
            m.db_schema_version
                .map_or("-".to_owned(), |v| v.to_string())
        );
        println!(
            "components:       {}",
            m.components
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !m.absent.is_empty() {
            println!(
                "absent:           {} (no source when taken; a restore leaves them alone)",
                m.absent
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!(
            "size:             {} in {} files",
            bytes(m.size_bytes),
            m.files.len()
        );
        println!("compression:      {}", m.compression);
        if m.encrypted {
            println!("encrypted to:     {}", m.recipients.join(", "));
        }
        if let Some(a) = &m.archive {
            println!(
                "archive:          {} sha256 {}",
                bytes(a.size_bytes),
                a.sha256
            );
        }
        println!("checksum:         {}", m.checksum);
        for (k, v) in &m.labels {
            println!("label:            {}={}", printable(k), printable(v));
        }
        Ok(())
    }

    pub(crate) fn verified(&self, r: &VerifyReport) -> anyhow::Result<()> {
        if self.json {
            return print_json(r);
        }
        if r.ok {
            println!(
                "{}: intact ({} files, {} checked)",
                r.id,
                r.files_checked,
                bytes(r.bytes_checked)
            );
        } else {
            println!(
                "{}: DAMAGED: {}",
                r.id,
                r.problem.as_deref().unwrap_or("unknown problem")
            );
        }
        Ok(())
    }

    pub(crate) fn deleted(&self, id: &BackupId) -> anyhow::Result<()> {
        if self.json {
            print_json(&Deleted {
                deleted: id.clone(),
            })
        } else {
            println!("deleted {id}");
            Ok(())
        }
    }

    pub(crate) fn pruned(&self, plan: &[Decision], dry_run: bool) -> anyhow::Result<()> {
        if self.json {
            return print_json(&Pruned {
                dry_run,
                decisions: plan.iter().map(PruneItem::from).collect(),
            });
        }
        for d in plan {
            let verb = match (d.action, dry_run) {
                (Action::Keep, _) => "keep      ",
                (Action::Prune, true) => "would prune",
                (Action::Prune, false) => "pruned    ",
            };
            println!("{verb} {}  {}", d.id, d.reason);
        }
        Ok(())
    }

    /// The status; exit 3 unless it is `ok` (so that a cron job or a
    /// monitoring check can act on it).
    pub(crate) fn status(&self, r: &backup_core::status::StatusReport) -> anyhow::Result<()> {
        use backup_core::status::Health;
        if self.json {
            print_json(r)?;
        } else {
            let word = match r.status {
                Health::Ok => "ok",
                Health::Failing => "failing: the last backup attempt failed",
                Health::Overdue => "overdue: no backup succeeded for twice the schedule",
                Health::Disabled => "disabled (backup.enabled is false)",
            };
            println!("status:            {word}");
            match &r.last_success {
                Some(s) => println!(
                    "last success:      {} ({}, {})",
                    s.id,
                    age(s.timestamp),
                    bytes(s.size_bytes)
                ),
                None => println!("last success:      none"),
            }
            if let Some(f) = &r.last_failure {
                println!(
                    "last failure:      {} {} ({}): {}",
                    f.timestamp.to_rfc3339(),
                    f.trigger,
                    age(f.timestamp),
                    printable(&f.error)
                );
            }
            if let Some(n) = r.next_scheduled {
                println!("next scheduled:    {}", n.to_rfc3339());
            }
            match &r.last_verification {
                Some(v) if v.ok => println!(
                    "last verification: {} ok ({})",
                    v.backup_id,
                    age(v.timestamp)
                ),
                Some(v) => println!(
                    "last verification: {} FAILED ({}): {}",
                    v.backup_id,
                    age(v.timestamp),
                    printable(v.problem.as_deref().unwrap_or(""))
                ),
                None => println!("last verification: none"),
            }
            for w in &r.warnings {
                println!("warning:           {}", printable(w));
            }
        }
        if r.status == Health::Ok && r.warnings.is_empty() {
            Ok(())
        } else if r.status == Health::Ok {
            Err(crate::Exit {
                code: crate::exit::REFUSED,
                message: format!("backup status has warnings: {}", r.warnings.join("; ")),
            }
            .into())
        } else {
            Err(crate::Exit {
                code: crate::exit::REFUSED,
                message: format!("backup status is {:?}", r.status).to_lowercase(),
            }
            .into())
        }
    }

    pub(crate) fn recovered(&self, done: &[String]) -> anyhow::Result<()> {
        if self.json {
            return print_json(&Recovered {
                actions: done.to_vec(),
            });
        }
        if done.is_empty() {
            println!("nothing to recover");
        }
        for d in done {
            println!("{d}");
        }
        Ok(())
    }

    pub(crate) fn restore_plan(&self, r: &RestoreReport) -> anyhow::Result<()> {
        eprintln!("Backup {} would replace:", r.id);
        for c in &r.components {
            eprintln!(
                "  {:<12} {}  ({} files, {})",
                c.component.to_string(),
                c.live_path,
                c.files,
                bytes(c.bytes)
            );
        }
        for w in &r.warnings {
            eprintln!("  warning: {w}");
        }
        Ok(())
    }

    pub(crate) fn restore_report(&self, r: &RestoreReport) -> anyhow::Result<()> {
        if self.json {
            return print_json(r);
        }
        if r.dry_run {
            println!(
                "dry run: restoring {} is compatible and would replace:",
                r.id
            );
        } else {
            println!("restored {}:", r.id);
        }
        for c in &r.components {
            println!(
                "  {:<12} {}  ({} files, {})",
                c.component.to_string(),
                c.live_path,
                c.files,
                bytes(c.bytes)
            );
        }
        for w in &r.warnings {
            println!("  warning: {w}");
        }
        match (&r.safety_backup_id, &r.safety_backup_path) {
            (Some(s), Some(path)) => {
                println!("safety backup of the previous state: {s} (its files at {path})");
            }
            (Some(s), None) => println!("safety backup of the previous state: {s}"),
            _ => {}
        }
        if r.restart_required {
            println!("restart SynthOrg now so that it opens the restored data");
        }
        Ok(())
    }

    pub(crate) fn exported(&self, r: &VerifyReport, path: &Path) -> anyhow::Result<()> {
        if self.json {
            return print_json(&Exported {
                id: r.id.clone(),
                path: path.to_path_buf(),
                files: r.files_checked,
                bytes: r.bytes_checked,
            });
        }
        println!(
            "exported {} to {} ({} files, {}, verified)",
            r.id,
            path.display(),
            r.files_checked,
            bytes(r.bytes_checked)
        );
        Ok(())
    }
}
