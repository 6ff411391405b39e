//! The `packet_framing` and `proxy_header` fuzz targets' corpora and regressions, replayed
//! through their harnesses (fuzz/README.md): every input the fuzzer kept or crashed on still
//! passes.

#[path = "../../fuzz/harness/packet_framing.rs"]
mod packet_framing;
#[path = "../../fuzz/harness/proxy_header.rs"]
mod proxy_header;
#[path = "../../fuzz/harness/replay.rs"]
mod replay;

#[test]
fn every_packet_framing_corpus_input_passes_the_harness() {
    let n = replay::replay("packet_framing", packet_framing::run);
    println!("{n} inputs");
}

#[test]
fn every_proxy_header_corpus_input_passes_the_harness() {
    let n = replay::replay("proxy_header", proxy_header::run);
    println!("{n} inputs");
}
