//! Keys, keyed chunk digests and authenticated encryption.
//!
//! One 32-byte master secret, random at `init`, is the root of everything.
//! From it, BLAKE3's key derivation makes two independent keys: one names
//! chunks (a keyed digest, so identical plaintext dedups while the names leak
//! nothing to someone without the key), one encrypts objects. Each object is
//! sealed under its own key, derived from the encryption key and a fresh
//! random 192-bit salt stored in the object; the AEAD nonce is therefore
//! never reused with a key, whatever the number of objects or writers.

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::ChunkId;

/// Length of the per-object salt from which the object key is derived.
pub const SALT_LEN: usize = 24;
/// Length of the AEAD authentication tag.
pub const TAG_LEN: usize = 16;

/// The authenticated cipher objects are sealed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CipherKind {
    /// No encryption; objects carry an unkeyed BLAKE3 checksum instead.
    None,
    /// AES-256 in Galois/counter mode (fast where the CPU has AES-NI).
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast in software, for CPUs without AES).
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl CipherKind {
    /// The default for this CPU: AES-256-GCM with hardware AES, else ChaCha20.
    pub fn default_for_cpu() -> Self {
        if cpu_has_aes() {
            CipherKind::Aes256Gcm
        } else {
            CipherKind::ChaCha20Poly1305
        }
    }

    /// The byte identifying this cipher in object headers.
    pub fn code(self) -> u8 {
        match self {
            CipherKind::None => 0,
            CipherKind::Aes256Gcm => 1,
            CipherKind::ChaCha20Poly1305 => 2,
        }
    }

    /// The cipher for a header byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(CipherKind::None),
            1 => Some(CipherKind::Aes256Gcm),
            2 => Some(CipherKind::ChaCha20Poly1305),
            _ => None,
        }
    }
}

impl std::fmt::Display for CipherKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CipherKind::None => "none (not encrypted)",
            CipherKind::Aes256Gcm => "AES-256-GCM",
            CipherKind::ChaCha20Poly1305 => "ChaCha20-Poly1305",
        })
    }
}

impl std::fmt::Display for DigestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DigestKind::Blake3Keyed => "keyed BLAKE3",
            DigestKind::HmacSha256 => "HMAC-SHA-256",
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_aes() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn cpu_has_aes() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_has_aes() -> bool {
    false
}

/// The keyed digest that names chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestKind {
    /// BLAKE3 in keyed mode (the default: several times faster than SHA-256).
    Blake3Keyed,
    /// HMAC-SHA-256.
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

/// The repository's 32-byte master secret.
#[derive(Clone)]
pub struct MasterSecret(pub(crate) [u8; 32]);

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

impl MasterSecret {
    /// A secret from known bytes (tests, fuzzing, recovery tools).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random secret.
    pub fn generate() -> Result<Self> {
        Ok(Self(random_bytes::<32>()?))
    }
}

/// Fills an array from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        Error::internal(format!("the operating system's random source failed: {e}"))
    })?;
    Ok(bytes)
}

/// Digest and seal operations of an opened repository.
#[derive(Clone)]
pub struct Crypto {
    cipher: CipherKind,
    digest: DigestKind,
    digest_key: [u8; 32],
    encryption_key: [u8; 32],
    mac_key: [u8; 32],
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto")
            .field("cipher", &self.cipher)
            .field("digest", &self.digest)
            .finish()
    }
}

/// The key of repositories without encryption: digests are still keyed, with
/// a published constant, so both kinds of repository share one code path.
const UNENCRYPTED_SECRET: [u8; 32] = [0u8; 32];

impl Crypto {
    /// Derives the working keys from the master secret (`None` for a
    /// repository without encryption).
    pub fn new(cipher: CipherKind, digest: DigestKind, secret: Option<&MasterSecret>) -> Self {
        let master = secret.map_or(&UNENCRYPTED_SECRET, |s| &s.0);
        Self {
            cipher,
            digest,
            digest_key: blake3::derive_key("vbackup 2026-11 chunk digest key", master),
            encryption_key: blake3::derive_key("vbackup 2026-11 object encryption key", master),
            mac_key: blake3::derive_key("vbackup 2026-11 config authentication key", master),
        }
    }

    /// The cipher objects are sealed with.
    pub fn cipher(&self) -> CipherKind {
        self.cipher
    }

    /// The keyed digest of a chunk's plaintext: its name in the repository.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        match self.digest {
            DigestKind::Blake3Keyed => {
                ChunkId(*blake3::keyed_hash(&self.digest_key, data).as_bytes())
            }
            DigestKind::HmacSha256 => ChunkId(hmac_sha256(&self.digest_key, data)),
        }
    }

    /// A keyed digest of metadata (index objects, the config).
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.mac_key, data).as_bytes()
    }

    /// Encrypts `plaintext`; the result is `salt || ciphertext || tag`.
    /// `aad` is authenticated but not stored. With no cipher, the result is
    /// `plaintext || BLAKE3(aad || plaintext)`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(SALT_LEN + plaintext.len() + TAG_LEN);
        self.seal_append(&mut out, aad, plaintext)?;
        Ok(out)
    }

    /// [`Crypto::seal`], appending to `out` (saves a copy when the caller
    /// has already written a header there).
    pub fn seal_append(&self, out: &mut Vec<u8>, aad: &[u8], plaintext: &[u8]) -> Result<()> {
        if self.cipher == CipherKind::None {
            out.extend_from_slice(plaintext);
            out.extend_from_slice(&checksum(aad, plaintext));
            return Ok(());
        }
        let salt = random_bytes::<SALT_LEN>()?;
        out.reserve(SALT_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&salt);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .object_key(&salt)
            .and_then(|k| {
                let nonce = Nonce::assume_unique_for_key([0u8; 12]);
                k.seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[start..])
                    .ok()
            })
            .ok_or_else(|| Error::internal("encryption failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Reverses [`Crypto::seal`]; fails when anything was changed. `key`
    /// names the object in the error.
    pub fn open(&self, key: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        let mut buffer = sealed.to_vec();
        let plain = self.open_in_place(key, aad, &mut buffer)?.len();
        let start = if self.cipher == CipherKind::None {
            0
        } else {
            SALT_LEN
        };
        buffer.truncate(start + plain);
        buffer.drain(..start);
        Ok(buffer)
    }

    /// [`Crypto::open`] without copying: decrypts inside `sealed` and
    /// returns the plaintext part of it.
    pub fn open_in_place<'a>(
        &self,
        key: &str,
        aad: &[u8],
        sealed: &'a mut [u8],
    ) -> Result<&'a [u8]> {
        if self.cipher == CipherKind::None {
            let body_len = sealed
                .len()
                .checked_sub(32)
                .ok_or_else(|| Error::corrupt(key, "too short"))?;
            let (body, sum) = sealed.split_at(body_len);
            if checksum(aad, body) != sum {
                return Err(Error::corrupt(key, "checksum mismatch"));
            }
            return Ok(body);
        }
        if sealed.len() < SALT_LEN + TAG_LEN {
            return Err(Error::corrupt(
                key,
                "too short to hold an encrypted payload",
            ));
        }
        let (salt, body) = sealed.split_at_mut(SALT_LEN);
        let cipher = self.object_key(salt);
        let nonce = Nonce::assume_unique_for_key([0u8; 12]);
        match cipher.map(|k| k.open_in_place(nonce, Aad::from(aad), body)) {
            Some(Ok(plain)) => Ok(plain),
            _ => Err(Error::corrupt(
                key,
                "authentication failed (modified, truncated or not from this repository)",
            )),
        }
    }

    /// The key sealing the one object with this salt.
    fn object_key(&self, salt: &[u8]) -> Option<LessSafeKey> {
        let mut material = [0u8; 32 + SALT_LEN];
        material[..32].copy_from_slice(&self.encryption_key);
        material[32..].copy_from_slice(salt);
        let object_key = blake3::derive_key("vbackup 2026-11 per-object key", &material);
        let algorithm = match self.cipher {
            CipherKind::Aes256Gcm => &AES_256_GCM,
            CipherKind::ChaCha20Poly1305 => &CHACHA20_POLY1305,
            CipherKind::None => return None,
        };
        UnboundKey::new(algorithm, &object_key)
            .ok()
            .map(LessSafeKey::new)
    }
}

fn checksum(aad: &[u8], data: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(aad);
    hasher.update(data);
    *hasher.finalize().as_bytes()
}

fn hmac_sha256(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return [0u8; 32];
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Passphrase-based key wrapping with Argon2id.
pub mod kdf {
    use serde::{Deserialize, Serialize};

    use crate::error::{Error, Result};

    /// Argon2id cost parameters, stored in each key object.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct KdfParams {
        /// Memory in KiB.
        pub memory_kib: u32,
        /// Passes over memory.
        pub iterations: u32,
        /// Lanes.
        pub parallelism: u32,
    }

    impl Default for KdfParams {
        fn default() -> Self {
            Self {
                memory_kib: 64 * 1024,
                iterations: 3,
                parallelism: 4,
            }
        }
    }

    /// Derives a 32-byte key-encryption key from a passphrase.
    pub fn derive(passphrase: &[u8], salt: &[u8], params: KdfParams) -> Result<[u8; 32]> {
        let argon_params = argon2::Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            Some(32),
        )
        .map_err(|e| Error::internal(format!("invalid Argon2id parameters {params:?}: {e}")))?;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon_params,
        );
        let mut out = [0u8; 32];
        argon
            .hash_password_into(passphrase, salt, &mut out)
            .map_err(|e| Error::internal(format!("Argon2id key derivation failed: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Keys wrapped by earlier versions must still open: the derivation is
    /// pinned to values computed with the argon2 crate 0.5 (single-threaded)
    /// for both one lane and four (now computed in parallel).
    #[test]
    fn key_derivation_matches_earlier_releases() {
        let salt = b"vbackup-kdf-salt-0123456789abcdef";
        let pass = b"correct horse battery staple";
        for (memory_kib, parallelism, expected) in [
            (
                1024,
                1,
                "bf2c9dd8bee0916655cd386e19caca953cae5414b78d243513ec93df88d241cc",
            ),
            (
                1024,
                4,
                "f27a95062fcdc6cad8086ad2494bd8fc5456d15f2f27696f2c2d2f7013d59c30",
            ),
            (
                65536,
                1,
                "398895b8a912cc4abd1256904f7692035e5075d8ddd5c5a4d28dfd3b3ab34c8c",
            ),
        ] {
            let params = kdf::KdfParams {
                memory_kib,
                iterations: 3,
                parallelism,
            };
            let key = kdf::derive(pass, salt, params).unwrap();
            assert_eq!(hex::encode(key), expected, "{params:?}");
        }
    }

    fn crypto(cipher: CipherKind) -> Crypto {
        Crypto::new(
            cipher,
            DigestKind::Blake3Keyed,
            Some(&MasterSecret([7u8; 32])),
        )
    }

    #[test]
    fn digests_depend_on_the_key() {
        let a = Crypto::new(
            CipherKind::Aes256Gcm,
            DigestKind::Blake3Keyed,
            Some(&MasterSecret([1; 32])),
        );
        let b = Crypto::new(
            CipherKind::Aes256Gcm,
            DigestKind::Blake3Keyed,
            Some(&MasterSecret([2; 32])),
        );
        assert_ne!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_eq!(a.chunk_id(b"data"), a.chunk_id(b"data"));
        let h = Crypto::new(
            CipherKind::Aes256Gcm,
            DigestKind::HmacSha256,
            Some(&MasterSecret([1; 32])),
        );
        assert_ne!(a.chunk_id(b"data"), h.chunk_id(b"data"));
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let c = crypto(CipherKind::Aes256Gcm);
        assert_ne!(c.seal(b"", b"same").unwrap(), c.seal(b"", b"same").unwrap());
    }

    #[test]
    fn wrong_aad_or_key_is_rejected() {
        let c = crypto(CipherKind::ChaCha20Poly1305);
        let sealed = c.seal(b"chunks/aa", b"secret").unwrap();
        assert!(c.open("x", b"chunks/bb", &sealed).is_err());
        let other = Crypto::new(
            CipherKind::ChaCha20Poly1305,
            DigestKind::Blake3Keyed,
            Some(&MasterSecret([8; 32])),
        );
        assert!(other.open("x", b"chunks/aa", &sealed).is_err());
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(any::<u8>(), 0..2048), aad in proptest::collection::vec(any::<u8>(), 0..64), which in 0u8..3) {
            let c = crypto(CipherKind::from_code(which).unwrap());
            let sealed = c.seal(&aad, &data).unwrap();
            prop_assert_eq!(c.open("x", &aad, &sealed).unwrap(), data);
        }

        #[test]
        fn any_flipped_bit_is_detected(data in proptest::collection::vec(any::<u8>(), 1..512), bit in any::<usize>(), which in 0u8..3) {
            let c = crypto(CipherKind::from_code(which).unwrap());
            let mut sealed = c.seal(b"aad", &data).unwrap();
            let bit = bit % (sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(c.open("x", b"aad", &sealed).is_err());
        }
    }
}
