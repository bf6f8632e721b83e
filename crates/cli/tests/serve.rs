//! `synthorg serve` as a real process: the startup backup is done before
//! the listener accepts, the API answers over TCP, SIGTERM takes the
//! shutdown backup before exit, and no token means no start.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::{Demo, stderr};

fn http_get(addr: &str, path: &str, token: Option<&str>) -> String {
    http(addr, "GET", path, token)
}

fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn serve_backs_up_at_startup_answers_and_backs_up_on_sigterm() {
    let demo = Demo::new(300_000).await;
    let (child, addr) = start_serve(&demo, "serve-token");

    // Listening now: the startup backup already exists.
    let listed = demo.json(&["backup", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["trigger"] == "startup"),
        "{listed}"
    );
    let health = http_get(&addr, "/healthz", None);
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let denied = http_get(&addr, "/api/v1/admin/backups", None);
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let page = http_get(&addr, "/api/v1/admin/backups", Some("serve-token"));
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("startup"),
        "{page}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    let listed = demo.json(&["backup", "list"]);
    assert_eq!(listed[0]["trigger"], "shutdown", "{listed}");
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_token_unless_loopback_and_insecure() {
    let demo = Demo::new(100_000).await;
    let out = demo.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no API token"), "{}", stderr(&out));
    let out = demo.run(&["serve", "--listen", "0.0.0.0:0", "--insecure-no-auth"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// Starts `synthorg serve` on a random port; returns the child and address.
fn start_serve(demo: &Demo, token: &str) -> (std::process::Child, String) {
    start_serve_with(demo, token, &[])
}

/// As [`start_serve`], with environment variables set (`Some`) or
/// removed (`None`).
fn start_serve_with(
    demo: &Demo,
    token: &str,
    env: &[(&str, Option<&str>)],
) -> (std::process::Child, String) {
    let mut cmd = demo.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("SYNTHORG_API_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (name, value) in env {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (child, addr)
}

/// Runs the CLI in remote mode against `server` with `token`.
fn remote_cli(demo: &Demo, server: &str, token: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--server", server, "--token", token];
    all.extend_from_slice(args);
    Command::new(common::bin())
        .args(&all)
        .current_dir(demo.dir.path())
        .env_remove("SYNTHORG_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn remote_mode_drives_a_running_server() {
    let demo = Demo::new(300_000).await;
    let (mut child, addr) = start_serve(&demo, "remote-token");
    let server = format!("http://{addr}");
    let remote = |args: &[&str]| remote_cli(&demo, &server, "remote-token", args);
    let out = remote(&["backup", "--json", "--label", "why=remote"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["labels"]["why"], "remote");

    let out = remote(&["backup", "list", "--json"]);
    let items: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        items
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id.as_str())
    );
    // The same JSON locally and remotely (one ListItem type on both sides).
    assert_eq!(items, demo.json(&["backup", "list"]), "list --json parity");
    let table = String::from_utf8_lossy(&remote(&["backup", "list"]).stdout).into_owned();
    assert!(table.contains(&id) && table.contains("startup"), "{table}");
    let out = remote(&["backup", "show", &id, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The status: the same JSON remotely and locally on the same store.
    let out = remote(&["backup", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let remote_status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut local_status = demo.json(&["backup", "status"]);
    assert_eq!(remote_status["status"], "ok");
    // The schedule differs only if serve was started with another one.
    local_status["schedule_secs"] = remote_status["schedule_secs"].clone();
    local_status["next_scheduled"] = remote_status["next_scheduled"].clone();
    assert_eq!(remote_status, local_status);

    std::fs::write(&demo.layout.company_config, b"company: {name: changed}\n").unwrap();
    let out = remote(&["restore", &id, "--only", "config"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "no terminal, no --yes: {}",
        stderr(&out)
    );
    let out = remote(&["restore", &id, "--only", "config", "--yes", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["restart_required"], true);
    assert_ne!(
        std::fs::read(&demo.layout.company_config).unwrap(),
        b"company: {name: changed}\n"
    );

    // The database open in another process: refused, exit 3 as locally.
    let conn = synthorg_cli::state::open(&demo.layout.database)
        .await
        .unwrap();
    let out = remote(&["restore", &id, "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("in_use"), "{}", stderr(&out));
    sqlx::Connection::close(conn).await.unwrap();

    let out = remote(&["backup", "delete", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = remote(&["backup", "show", &id]);
    assert_eq!(out.status.code(), Some(1));
    let out = remote(&["backup", "verify", &id]);
    assert_eq!(out.status.code(), Some(2), "verify is local only");
    let out = remote(&["backup", "show", "../x"]);
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(common::bin())
        .args(["--server", &server, "--token", "wrong", "backup", "list"])
        .env_remove("SYNTHORG_API_TOKEN")
        .env_remove("SYNTHORG_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::test]
async fn the_cli_and_a_running_server_exclude_each_other() {
    // Big enough that a backup takes a while.
    let demo = Demo::new(20_000_000).await;
    let (mut server, addr) = start_serve(&demo, "cross-process-token");
    let token = Some("cross-process-token");

    // A CLI backup holds the lock: the server answers 409 naming it.
    let mut cli = demo
        .command(&["backup"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let lock_file = demo.backups_dir().join(".lock");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&lock_file)
        .is_ok_and(|h| h.contains(&format!("pid {} ", cli.id())))
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the CLI never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let busy = http(&addr, "POST", "/api/v1/admin/backup", token);
    assert!(busy.starts_with("HTTP/1.1 409"), "{busy}");
    assert!(
        busy.contains("busy") && busy.contains(&format!("pid {} ", cli.id())),
        "{busy}"
    );
    assert!(cli.wait().unwrap().success());

    // A server backup holds the lock: the CLI exits with the busy code.
    let accepted = http(&addr, "POST", "/api/v1/admin/backup", token);
    assert!(accepted.starts_with("HTTP/1.1 202"), "{accepted}");
    let out = demo.run(&["backup"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("busy"), "{}", stderr(&out));

    // Nothing lost: after both, every listed backup is complete and verifies.
    let started = std::time::Instant::now();
    loop {
        let listed = demo.json(&["backup", "list"]);
        let items = listed.as_array().unwrap();
        // startup backup + CLI backup + API backup
        if items.len() >= 3 && items.iter().all(|i| i["status"] == "complete") {
            for item in items {
                let id = item["id"].as_str().unwrap();
                assert_eq!(demo.json(&["backup", "verify", id])["ok"], true);
            }
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{listed}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test]
async fn secrets_never_reach_logs_errors_or_json() {
    const S3_SECRET: &str = "s3-secret-never-printed-9f8e7d";
    const TOKEN: &str = "api-token-never-printed-1a2b3c";
    let demo = Demo::new(300_000).await;
    let yaml = std::fs::read_to_string(demo.config()).unwrap();
    let with_s3 = demo.dir.path().join("s3.yaml");
    std::fs::write(
        &with_s3,
        format!(
            "{yaml}  s3:\n    bucket: secret-test\n    endpoint: http://127.0.0.1:9\n    access_key_id: AKIDEXAMPLE\n    secret_access_key: {S3_SECRET}\n    max_retries: 0\n"
        ),
    )
    .unwrap();
    // A PostgreSQL deployment with the password in its URL.
    const PG_SECRET: &str = "pg-password-never-printed-5d4c3b";
    let with_pg = demo.dir.path().join("pg.yaml");
    std::fs::write(
        &with_pg,
        yaml.replace(
            "    database: synthorg.db\n",
            &format!("    database_url: postgres://app:{PG_SECRET}@127.0.0.1:9/synthorg_app\n"),
        ),
    )
    .unwrap();
    let mut seen = String::new();
    // Every command that reads the config, at the most verbose log level,
    // with and without --json, against an unreachable S3 endpoint and an
    // unreachable PostgreSQL server.
    for (config, args) in [with_s3.clone(), with_pg.clone()]
        .into_iter()
        .flat_map(|c| {
            [
                &["config", "show"][..],
                &["config", "show", "--json"],
                &["config", "check"],
                &["backup"],
                &["backup", "--json"],
                &["backup", "list", "--json"],
                &["recover", "--json"],
            ]
            .map(|a| (c.clone(), a))
        })
    {
        let out = Command::new(common::bin())
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "trace")
            .env("SYNTHORG_API_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&stderr(&out));
    }
    assert!(seen.contains("127.0.0.1:9"), "the commands ran: {seen}");
    assert!(
        seen.contains("app:***@127.0.0.1:9"),
        "the URL is shown masked: {seen}"
    );
    assert!(
        seen.contains("cannot reach the PostgreSQL server"),
        "{seen}"
    );

    // The server at trace level, with good and bad tokens.
    let mut child = demo
        .command(&["serve", "--listen", "127.0.0.1:0"])
        .env("SYNTHORG_API_TOKEN", TOKEN)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    for token in [Some(TOKEN), Some("wrong-token"), None] {
        seen.push_str(&http_get(&addr, "/api/v1/admin/backups", token));
        seen.push_str(&http(&addr, "POST", "/api/v1/admin/backup", token));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    child.wait().unwrap();
    seen.push_str(&rest);
    assert!(seen.contains("401"), "the server answered: {seen}");
    for secret in [S3_SECRET, TOKEN, PG_SECRET] {
        assert!(!seen.contains(secret), "{secret} leaked");
    }
}

#[tokio::test]
async fn the_process_runs_with_a_fixed_malloc_mmap_threshold() {
    let demo = Demo::new(100_000).await;
    let environ = |child: &std::process::Child| {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/environ", child.id())).unwrap())
            .split('\0')
            .find_map(|kv| {
                kv.strip_prefix("MALLOC_MMAP_THRESHOLD_=")
                    .map(str::to_owned)
            })
    };
    let (mut child, _) = start_serve(&demo, "malloc-token");
    assert_eq!(
        environ(&child).as_deref(),
        Some("131072"),
        "re-executed with it"
    );
    let _ = child.kill();
    let _ = child.wait();
    // An explicit setting is kept.
    let (mut child, _) = start_serve_with(
        &demo,
        "malloc-token",
        &[("MALLOC_MMAP_THRESHOLD_", Some("65536"))],
    );
    assert_eq!(environ(&child).as_deref(), Some("65536"));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn the_process_leaves_one_cpu_to_the_app_unless_told_otherwise() {
    let demo = Demo::new(100_000).await;
    let cpus = |pid: u32| -> usize {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned();
        list.split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum()
    };
    let mine = cpus(std::process::id());
    for (setting, expected) in [
        (None, mine.saturating_sub(1).max(1)),
        (Some("0"), mine),
        (Some("1"), 1),
    ] {
        let (mut child, _) =
            start_serve_with(&demo, "cpu-token", &[("SYNTHORG_BACKUP_CPUS", setting)]);
        assert_eq!(cpus(child.id()), expected, "{setting:?} with {mine} CPUs");
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = demo
        .command(&["backup", "list"])
        .env("SYNTHORG_BACKUP_CPUS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("SYNTHORG_BACKUP_CPUS"),
        "{}",
        stderr(&out)
    );
}

/// Every `--json` command that runs both ways gives the same JSON locally
/// and against a running `synthorg serve` on the same store (one set of
/// wire types on both sides); errors give the same exit code.
#[tokio::test]
async fn every_json_command_is_the_same_locally_and_remotely() {
    let demo = Demo::new(200_000).await;
    let (mut child, addr) = start_serve(&demo, "parity-token");
    let server = format!("http://{addr}");
    let remote_run = |args: &[&str]| remote_cli(&demo, &server, "parity-token", args);
    let remote = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = remote_run(&all);
        assert!(out.status.success(), "remote {args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // create, each way; the other side shows the same manifest.
    let remote_made = remote(&["backup", "--label", "side=remote"]);
    let local_made = demo.json(&["backup", "--label", "side=local"]);
    let (r_id, l_id) = (
        remote_made["id"].as_str().unwrap().to_owned(),
        local_made["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(demo.json(&["backup", "show", &r_id]), remote_made);
    assert_eq!(remote(&["backup", "show", &l_id]), local_made);
    assert_eq!(remote(&["backup", "show", &r_id]), remote_made);

    // list (with and without a limit) and status.
    assert_eq!(remote(&["backup", "list"]), demo.json(&["backup", "list"]));
    assert_eq!(
        remote(&["backup", "list", "--limit", "1"]),
        demo.json(&["backup", "list", "--limit", "1"])
    );
    let remote_status = remote(&["backup", "status"]);
    let mut local_status = demo.json(&["backup", "status"]);
    // The next scheduled run is the server's own timer.
    local_status["next_scheduled"] = remote_status["next_scheduled"].clone();
    assert_eq!(remote_status, local_status);

    // restore --dry-run: the full staged check, the same report.
    assert_eq!(
        remote(&["restore", &l_id, "--dry-run"]),
        demo.json(&["restore", &l_id, "--dry-run"])
    );

    // delete: the same shape.
    let deleted_remote = remote(&["backup", "delete", &r_id]);
    let deleted_local = demo.json(&["backup", "delete", &l_id]);
    assert_eq!(deleted_remote, serde_json::json!({ "deleted": r_id }));
    assert_eq!(deleted_local, serde_json::json!({ "deleted": l_id }));

    // Errors exit alike: unknown id, malformed id, pinned without force.
    for args in [
        vec!["backup", "show", r_id.as_str()],
        vec!["backup", "show", "../x"],
        vec!["backup", "delete", r_id.as_str()],
        vec!["restore", r_id.as_str(), "--dry-run"],
    ] {
        let mut with_json = args.clone();
        with_json.push("--json");
        let (r, l) = (remote_run(&with_json), demo.run(&with_json));
        assert!(!l.status.success(), "{args:?}");
        assert_eq!(r.status.code(), l.status.code(), "{args:?}: {}", stderr(&r));
    }

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
