#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb::fuzzing::chunked(data));
