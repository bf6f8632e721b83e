//! A restore process killed with SIGKILL at a random moment, then
//! `synthorg recover`: the live data is exactly the old state or exactly the
//! restored backup, never a mix, and no listed backup is incomplete.
//!
//! Iterations: `SYNTHORG_CRASH_ITERATIONS` (default 20).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Demo, stderr};
use synthorg_cli::demo::Rng;
use synthorg_cli::state::LiveState;

fn hidden_leftovers(demo: &Demo) -> Vec<String> {
    std::fs::read_dir(&demo.layout.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_killed_at_any_moment_leaves_old_or_new_state() {
    let iterations: u32 = std::env::var("SYNTHORG_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let demo = Demo::new(3_000_000).await;
    let state_a = LiveState::capture(&demo.layout).await.unwrap();
    let backup_a = demo.json(&["backup", "--trigger", "pre-migration"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&demo.layout.company_config, b"company:\n  name: State B\n").unwrap();
    std::fs::remove_dir_all(demo.layout.checkpoints_dir.join("task-0000")).unwrap();
    let mut conn = synthorg_cli::state::open(&demo.layout.database)
        .await
        .unwrap();
    sqlx::query("UPDATE tasks SET status = 'b'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let state_b = LiveState::capture(&demo.layout).await.unwrap();
    let backup_b = demo.json(&["backup", "--trigger", "pre-migration"])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // How long an uninterrupted restore takes, to spread the kills over it.
    let started = Instant::now();
    let out = demo.run(&["restore", &backup_a, "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let full = started.elapsed();
    assert_eq!(LiveState::capture(&demo.layout).await.unwrap(), state_a);

    let mut rng = Rng::new(99);
    let mut current = 'a';
    let (mut old_kept, mut new_reached, mut journal_recoveries) = (0, 0, 0);
    for i in 0..iterations {
        let (target, target_state, old_state) = if current == 'a' {
            (&backup_b, &state_b, &state_a)
        } else {
            (&backup_a, &state_a, &state_b)
        };
        // Half the kills anywhere in the restore, half near its end, where
        // the swap happens.
        let span = full.as_micros() as u64;
        let delay = Duration::from_micros(if i % 2 == 0 {
            rng.below(span * 6 / 5 + 1)
        } else {
            span * 4 / 5 + rng.below(span * 3 / 10 + 1)
        });
        let mut child = demo.command(&["restore", target, "--yes"]).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

        let out = demo.run(&["recover", "--json"]);
        assert!(
            out.status.success(),
            "iteration {i}: recover failed: {}",
            stderr(&out)
        );
        let actions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for a in actions["actions"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            if a.starts_with("rolled back") || a.starts_with("finished") {
                journal_recoveries += 1;
            }
        }
        let now = LiveState::capture(&demo.layout).await.unwrap();
        if &now == target_state {
            new_reached += 1;
            current = if current == 'a' { 'b' } else { 'a' };
        } else {
            assert_eq!(
                &now, old_state,
                "iteration {i} (kill after {delay:?}): neither old nor new state"
            );
            old_kept += 1;
        }
        assert!(
            hidden_leftovers(&demo).is_empty(),
            "iteration {i}: {:?}",
            hidden_leftovers(&demo)
        );
        let listed = demo.json(&["backup", "list"]);
        for item in listed.as_array().unwrap() {
            assert_eq!(item["status"], "complete", "iteration {i}: {item}");
        }
    }
    // Both pinned backups are intact after all of this.
    for id in [&backup_a, &backup_b] {
        assert_eq!(demo.json(&["backup", "verify", id])["ok"], true);
    }
    eprintln!(
        "{iterations} kills: {old_kept} left the old state, {new_reached} the restored one, \
         {journal_recoveries} inside the swap (full restore {full:?})"
    );
}
