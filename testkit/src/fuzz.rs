//! Replays fuzz inputs in ordinary tests: a target's committed corpus (`fuzz/corpus/<target>/`)
//! and, from a fixed seed, pseudo-random inputs, mutations and splices of it. What libFuzzer
//! found once stays covered in every `cargo test`, without libFuzzer.

use std::path::{Path, PathBuf};

/// The committed corpus of `target`, in name order (empty when there is none).
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// A small deterministic generator (xorshift64*), so a failure reproduces run after run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Runs `f` on every corpus input of `target`, then on `rounds` inputs derived from a fixed
/// seed: random bytes, and corpus inputs with bytes flipped, inserted, cut, or spliced with
/// another input. Panics (with the input) when `target` has no corpus.
pub fn replay(target: &str, rounds: usize, f: impl Fn(&[u8])) {
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} holds no input");
    for input in &corpus {
        f(input);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for _ in 0..rounds {
        let mut data = corpus[rng.below(corpus.len())].clone();
        match rng.below(5) {
            0 => {
                let n = rng.below(256);
                data = (0..n).map(|_| rng.next() as u8).collect();
            }
            1 => {
                for _ in 0..=rng.below(8) {
                    if !data.is_empty() {
                        let i = rng.below(data.len());
                        data[i] = rng.next() as u8;
                    }
                }
            }
            2 => {
                let i = rng.below(data.len() + 1);
                let special: &[u8] = [
                    &b"\0"[..],
                    b"\r\n",
                    b"'",
                    b"$$",
                    b";",
                    b"\xff\xff\xff\xff",
                    b"--",
                    b"/*",
                    b"{",
                    b"}",
                ][rng.below(10)];
                data.splice(i..i, special.iter().copied());
            }
            3 => {
                let i = rng.below(data.len() + 1);
                data.truncate(i);
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                let i = rng.below(data.len() + 1);
                let j = rng.below(other.len() + 1);
                data.truncate(i);
                data.extend_from_slice(&other[j..]);
            }
        }
        f(&data);
    }
}
