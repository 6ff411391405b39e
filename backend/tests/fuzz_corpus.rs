//! The `rule_parse` fuzz target's corpus and regressions, replayed through its harness
//! (fuzz/README.md): every input the fuzzer kept or crashed on still passes.

#[path = "../../fuzz/harness/replay.rs"]
mod replay;
#[path = "../../fuzz/harness/rule_parse.rs"]
mod rule_parse;

#[test]
fn every_rule_parse_corpus_input_passes_the_harness() {
    let n = replay::replay("rule_parse", rule_parse::run);
    println!("{n} inputs");
}
