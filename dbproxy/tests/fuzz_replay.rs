//! The fuzz targets of `fuzz/` without libFuzzer: each replays its committed corpus (seeds and
//! the inputs that once broke a parser) and a few thousand pseudo-random inputs derived from it,
//! so a regression in any parser of network or file input fails the ordinary test run.

use dbproxy::fuzzing;
use testkit::fuzz::replay;

const ROUNDS: usize = 4000;

#[test]
fn pg_frontend() {
    replay("pg_frontend", ROUNDS, fuzzing::frontend);
}

#[test]
fn pg_backend() {
    replay("pg_backend", ROUNDS, fuzzing::backend);
}

#[test]
fn pg_startup() {
    replay("pg_startup", ROUNDS, fuzzing::startup);
}

#[test]
fn classify() {
    replay("classify", ROUNDS, fuzzing::classify);
}

#[test]
fn pgpool_conf() {
    replay("pgpool_conf", ROUNDS, fuzzing::pgpool_conf);
}

#[test]
fn pool_passwd() {
    replay("pool_passwd", ROUNDS, fuzzing::pool_passwd);
}

#[test]
fn pool_hba() {
    replay("pool_hba", ROUNDS, fuzzing::pool_hba);
}

#[test]
fn pcp() {
    replay("pcp", ROUNDS, fuzzing::pcp);
}
