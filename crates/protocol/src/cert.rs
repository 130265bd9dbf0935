//! Certificate fingerprints: how the server prints its certificate and how
//! a client pins it (self-signed certificates, as ssh does host keys).

use sha2::{Digest, Sha256};

/// The SHA-256 fingerprint of a DER certificate, as lowercase hex (what
/// `vbackup server` prints and clients pin).
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses a fingerprint given by a user: 64 hex digits, optionally
/// separated by `:` (as `openssl x509 -fingerprint` prints them).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| {
        format!("'{text}' is not a SHA-256 fingerprint (64 hex digits, ':' separators allowed)")
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_printed_fingerprint_parses_back_to_the_certificate_digest() {
        let der = b"not really a certificate";
        let printed = fingerprint(der);
        assert_eq!(printed.len(), 64);
        assert_eq!(
            parse_fingerprint(&printed).unwrap().as_slice(),
            Sha256::digest(der).as_slice()
        );
    }
}
