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
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn serve_backs_up_at_startup_answers_and_backs_up_on_sigterm() {
    let demo = Demo::new(300_000).await;
    let mut child = demo
        .command(&["serve", "--listen", "127.0.0.1:0"])
        .env("SYNTHORG_API_TOKEN", "serve-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();

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
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
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
