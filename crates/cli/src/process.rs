//! What the `synthorg` process sets up for itself before its runtime
//! starts: a fixed malloc mmap threshold (by re-executing itself once) and
//! the CPUs it may use.

/// glibc's malloc raises its mmap threshold to the size of each large
/// block freed; after that the pipeline's 1 MiB members and 8 MiB upload
/// parts come from arenas that fragment (bench/run, same data: peak RSS of
/// a gzip backup 55 -> 25 MiB, of an S3 upload 112 -> 50 MiB with a fixed
/// threshold). The threshold is fixed only through the environment, read
/// when the process starts, so the process re-executes itself once with it
/// set (no unsafe `mallopt`; mimalloc was measured too and used more).
/// An explicit setting is kept; if exec fails, it runs on as it is.
pub(crate) fn fix_malloc_threshold() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = crate::env::MALLOC_MMAP_THRESHOLD;
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
const CPUS_VAR: &str = crate::env::BACKUP_CPUS;

/// Keeps the process (and every thread it starts later) on all the CPUs it
/// may use but one, so that a backup never takes the CPU from the app's
/// writers: with both cores busy a committing writer waited up to a
/// scheduler tick (perf sched), p99 0.2 -> 2.2-3.3 ms, and neither `nice`
/// nor SCHED_IDLE helped; on one core of two, p99 stayed at 0.16 ms and the
/// backup took 8 % longer (bench/run). `SYNTHORG_BACKUP_CPUS=N` uses N
/// (0: all). A restore (not a dry run) uses every CPU by default: it runs
/// only while the app is stopped (it refuses otherwise), and the faster it
/// ends the sooner the app is back.
pub(crate) fn limit_cpus(app_stopped: bool) -> Result<(), String> {
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
    let default = if app_stopped {
        cpus.len()
    } else {
        cpus.len().saturating_sub(1).max(1)
    };
    let use_cpus = wanted.unwrap_or(default);
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
