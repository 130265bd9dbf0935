//! Throughput of the digests, ciphers and compression levels on this
//! machine, so users (and `docs/benchmarks.md`) can see why the defaults are
//! what they are: `vbackup speed`.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::crypto::{CipherKind, Crypto, DigestKind, MasterSecret};

/// One measured throughput.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Speed {
    /// What was measured.
    pub name: String,
    /// Single-thread throughput in MiB/s.
    pub mib_per_sec: f64,
}

/// Sample data: half text-like, half random-like, like a typical disk chunk.
fn sample_chunk(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|i| {
            if i < len / 2 {
                b"the quick brown fox jumps over the lazy dog 0123456789\n"[i % 55]
            } else {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }
        })
        .collect()
}

/// Runs `op` on `data` repeatedly for about `budget`; returns MiB/s.
fn throughput(data: &[u8], budget: Duration, mut op: impl FnMut(&[u8])) -> f64 {
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < budget {
        op(data);
        bytes += data.len() as u64;
    }
    bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64()
}

/// Measures each primitive for about `budget` on a 4 MiB chunk.
pub fn measure(budget: Duration) -> Vec<Speed> {
    let data = sample_chunk(4 << 20);
    let secret = MasterSecret([5u8; 32]);
    let mut results = Vec::new();
    let mut record = |name: &str, mib_per_sec: f64| {
        results.push(Speed {
            name: name.to_string(),
            mib_per_sec,
        })
    };
    for (name, digest) in [
        ("digest keyed BLAKE3", DigestKind::Blake3Keyed),
        ("digest HMAC-SHA-256", DigestKind::HmacSha256),
    ] {
        let crypto = Crypto::new(CipherKind::None, digest, Some(&secret));
        record(
            name,
            throughput(&data, budget, |d| {
                std::hint::black_box(crypto.chunk_id(d));
            }),
        );
    }
    for (name, cipher) in [
        ("seal AES-256-GCM", CipherKind::Aes256Gcm),
        ("seal ChaCha20-Poly1305", CipherKind::ChaCha20Poly1305),
    ] {
        let crypto = Crypto::new(cipher, DigestKind::Blake3Keyed, Some(&secret));
        record(
            name,
            throughput(&data, budget, |d| drop(crypto.seal(b"aad", d))),
        );
    }
    for level in [1, 3, 6] {
        record(
            &format!("compress zstd level {level}"),
            throughput(&data, budget, |d| drop(crate::compress::compress(d, level))),
        );
    }
    results
}
