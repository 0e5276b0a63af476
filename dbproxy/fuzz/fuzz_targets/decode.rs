//! Fuzzes dbproxy's codec: arbitrary bytes through the startup decoder, the frame decoder and the
//! per-message field parsers must never panic nor buffer more than the limit.
#![no_main]

use bytes::BytesMut;
use dbproxy::protocol::{self, auth, error, extended, simple, status};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut startup = BytesMut::from(data);
    let _ = protocol::decode_startup(&mut startup);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = protocol::decode(&mut buf, MAX) {
        assert!(f.raw().len() <= MAX);
        let b = f.body();
        let _ = protocol::FrontendMessage::parse(&f);
        let _ = protocol::BackendMessage::parse(&f);
        let _ = simple::query_text(b);
        let _ = extended::parse(b);
        let _ = extended::bind_statement(b);
        let _ = extended::bind_params(b);
        let _ = extended::parse_param_types(b);
        let _ = extended::parameter_description(b);
        let _ = extended::target(b, "Close");
        let _ = status::ready_status(b);
        let _ = status::backend_key(b);
        let _ = status::parameter_status(b);
        let _ = auth::request(b).map(|(_, d)| auth::sasl_mechanisms(d));
        let _ = auth::password(b);
        let _ = auth::sasl_initial(b);
        let _ = error::sqlstate(b);
    }
});
