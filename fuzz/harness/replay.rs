//! Replays a fuzz target's corpus (`fuzz/corpus/<target>/`) and its crash regressions
//! (`fuzz/regressions/<target>/`) through the target's harness, for the main workspace's
//! `cargo test`: what the fuzzer found stays fixed without the fuzzer.

use std::path::{Path, PathBuf};

/// Runs `run` on every file of the target's corpus and regressions; panics naming the first
/// input that fails. Returns how many inputs ran.
pub fn replay(target: &str, run: fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs: Vec<PathBuf> = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        inputs.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    inputs.retain(|p| p.is_file());
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no corpus for {target} under {}",
        fuzz.display()
    );
    for path in &inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{} fails the {target} harness", path.display());
        }
    }
    inputs.len()
}
