#![no_main]

#[path = "../harness/packet_framing.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
