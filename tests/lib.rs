//! Cross-crate end-to-end suites (real binary, real adapters, crash and
//! hostile-input tests) live here once the engine lands; none yet.
