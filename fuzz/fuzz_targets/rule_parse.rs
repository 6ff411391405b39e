#![no_main]

#[path = "../harness/rule_parse.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
