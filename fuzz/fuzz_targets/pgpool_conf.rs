#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dbproxy::fuzzing::pgpool_conf(data));
