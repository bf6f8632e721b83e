#!/usr/bin/env bash
# All tests: installs the system tools the end-to-end tests call when they
# are missing (GNU tar, gzip and zstd to open archives, sqlite3, the `age`
# CLI to open encrypted backups by hand, strace to inject I/O errors into
# a restore, util-linux's fincore to see what a file has in the page
# cache, PostgreSQL: the tests start a
# throwaway cluster with its initdb/pg_ctl and use pg_dump/pg_restore),
# then runs the workspace's tests.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v tar >/dev/null || need+=(tar)
command -v gzip >/dev/null || need+=(gzip)
command -v sqlite3 >/dev/null || need+=(sqlite3)
command -v zstd >/dev/null || need+=(zstd)
command -v strace >/dev/null || need+=(strace)
command -v fincore >/dev/null || need+=(util-linux)
command -v age >/dev/null && command -v age-keygen >/dev/null || need+=(age)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v pg_dump >/dev/null; then
  need+=(postgresql postgresql-client)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}"
fi

exec cargo test --workspace --locked "$@"
