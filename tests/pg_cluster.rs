//! A throwaway PostgreSQL cluster for the tests: `initdb` into a temp
//! directory, `pg_ctl start` on a free port (password authentication, a
//! socket in the same directory), `pg_ctl stop` on drop. As root, the
//! server runs as the `postgres` user (it refuses root). With
//! `SYNTHORG_TEST_PG_URL` (a superuser URL) an existing server is used
//! instead. Without either, [`PgCluster::start`] says so loudly and returns
//! `None`, and the tests skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// The superuser's password in throwaway clusters.
pub const PASSWORD: &str = "synthorg-pg-test-password";

/// A running cluster.
pub struct PgCluster {
    host: String,
    port: u16,
    user: String,
    password: String,
    /// Data directory and `pg_ctl` of a cluster we started.
    owned: Option<Owned>,
}

struct Owned {
    _temp: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgCluster {
    /// The cluster of `SYNTHORG_TEST_PG_URL`, else a new one; `None`
    /// (after a loud message) when neither is possible.
    pub fn start() -> Option<PgCluster> {
        if let Ok(url) = std::env::var("SYNTHORG_TEST_PG_URL") {
            let opts = PgConnectOptions::from_str(&url).expect("SYNTHORG_TEST_PG_URL is a URL");
            return Some(PgCluster {
                host: opts.get_host().to_owned(),
                port: opts.get_port(),
                user: opts.get_username().to_owned(),
                password: url
                    .split_once("://")
                    .and_then(|(_, r)| r.split_once('@'))
                    .and_then(|(ui, _)| ui.split_once(':'))
                    .map(|(_, p)| p.to_owned())
                    .unwrap_or_default(),
                owned: None,
            });
        }
        let Some(bin) = bin_dir() else {
            eprintln!(
                "SKIPPED: no PostgreSQL server here (no /usr/lib/postgresql/*/bin/initdb and no SYNTHORG_TEST_PG_URL); scripts/test.sh installs it"
            );
            return None;
        };
        let temp = tempfile::tempdir().expect("tempdir");
        let root = temp.path();
        let as_postgres = is_root();
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("pwfile");
        std::fs::set_permissions(&pwfile, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let data = root.join("data");
        let port = free_port();
        let run = |tool: &str, args: &[&str]| {
            let mut cmd = if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
                c
            } else {
                Command::new(bin.join(tool))
            };
            let out = cmd.args(args).output().expect("run a PostgreSQL tool");
            assert!(
                out.status.success(),
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        run(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-l",
                &root.join("server.log").display().to_string(),
                "-o",
                &format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
                    root.display()
                ),
                "-w",
                "start",
            ],
        );
        Some(PgCluster {
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            password: PASSWORD.into(),
            owned: Some(Owned {
                _temp: temp,
                data,
                bin,
                as_postgres,
            }),
        })
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        self.url_as(&self.user, &self.password, db)
    }

    /// The URL of database `db` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}:{}/{db}",
            self.host, self.port
        )
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection to `db` as the superuser.
    pub async fn connect(&self, db: &str) -> PgConnection {
        PgConnectOptions::from_str(&self.url(db))
            .expect("url")
            .connect()
            .await
            .expect("connect to the test cluster")
    }

    /// Runs `sql` on `db`.
    pub async fn exec(&self, db: &str, sql: &str) {
        let mut c = self.connect(db).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = c.close().await;
    }

    /// A fresh database `db` (dropped first if it exists, with every
    /// database whose name starts with `db__`).
    pub async fn fresh_database(&self, db: &str) {
        let mut c = self.connect("postgres").await;
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname = $1 OR starts_with(datname, $1 || '__')",
        )
        .bind(db)
        .fetch_all(&mut c)
        .await
        .expect("list databases");
        for n in names {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE \"{n}\" WITH (FORCE)"
            )))
            .execute(&mut c)
            .await
            .expect("drop");
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{db}\"")))
            .execute(&mut c)
            .await
            .expect("create");
        let _ = c.close().await;
    }

    /// Names of the databases that start with `prefix`.
    pub async fn databases(&self, prefix: &str) -> Vec<String> {
        let mut c = self.connect("postgres").await;
        let mut names: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)",
        )
        .bind(prefix)
        .fetch_all(&mut c)
        .await
        .expect("list databases");
        let _ = c.close().await;
        names.sort();
        names
    }

    /// Stops the server at once (a crash), when we started it.
    pub fn stop_now(&self) {
        if let Some(o) = &self.owned {
            self.pg_ctl(o, &["-m", "immediate", "-w", "stop"]);
        }
    }

    fn pg_ctl(&self, o: &Owned, args: &[&str]) {
        let mut cmd = if o.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(o.bin.join("pg_ctl"));
            c
        } else {
            Command::new(o.bin.join("pg_ctl"))
        };
        let _ = cmd
            .arg("-D")
            .arg(&o.data)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// The data directory of a cluster we started.
    pub fn data_dir(&self) -> Option<&Path> {
        self.owned.as_ref().map(|o| o.data.as_path())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_now();
    }
}
