//! Library part of the `synthorg` CLI: the demo data generator shared with
//! the tests and the benchmarks.

pub mod demo;
