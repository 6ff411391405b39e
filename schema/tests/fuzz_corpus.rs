//! The `schema_decode` fuzz target's corpus and regressions, replayed through its harness
//! (fuzz/README.md): every input the fuzzer kept or crashed on still passes.

#[path = "../../fuzz/harness/replay.rs"]
mod replay;
#[path = "../../fuzz/harness/schema_decode.rs"]
mod schema_decode;

#[test]
fn every_schema_decode_corpus_input_passes_the_harness() {
    let n = replay::replay("schema_decode", schema_decode::run);
    println!("{n} inputs");
}
