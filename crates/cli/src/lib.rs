//! Library part of the `synthorg` CLI: the demo data generator and the
//! content comparison, shared with the tests and the benchmarks.

pub mod demo;
pub mod state;
