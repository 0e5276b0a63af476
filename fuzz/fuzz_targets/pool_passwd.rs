#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dbproxy::fuzzing::pool_passwd(data));
