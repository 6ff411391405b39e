#![no_main]

#[path = "../harness/proxy_header.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
