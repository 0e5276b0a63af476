//! The fuzz targets of `fuzz/` without libFuzzer: each replays its committed corpus (seeds and
//! the inputs that once broke a parser) and a few thousand pseudo-random inputs derived from it,
//! so a regression in any parser of client, upstream or file input fails the ordinary test run.

use lb::fuzzing;
use testkit::fuzz::replay;

const ROUNDS: usize = 4000;

#[test]
fn http_request_head() {
    replay("http_request_head", ROUNDS, fuzzing::request_head);
}

#[test]
fn http_response_head() {
    replay("http_response_head", ROUNDS, fuzzing::response_head);
}

#[test]
fn http_chunked() {
    replay("http_chunked", ROUNDS, fuzzing::chunked);
}

#[test]
fn nginx_conf() {
    replay("nginx_conf", ROUNDS, fuzzing::nginx_conf);
}
