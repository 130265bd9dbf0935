//! The server's certificate: given as PEM files, or self-signed at first
//! start and kept in `DIR/tls/` so its fingerprint stays the same across
//! restarts (clients pin it).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// A certificate chain with its key and the leaf's SHA-256 fingerprint.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate, hex.
    pub fingerprint: String,
    /// True when it was made just now.
    pub created: bool,
}

/// Loads `cert` and `key` (PEM), or `DIR/tls/{cert,key}.pem`, making a
/// self-signed pair there when none exists yet.
pub fn load_or_create(
    data: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Identity, Error> {
    match (cert, key) {
        (Some(cert), Some(key)) => load(cert, key, false),
        (None, None) => {
            let dir = data.join("tls");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            if cert.exists() && key.exists() {
                return load(&cert, &key, false);
            }
            create(&dir)?;
            load(&cert, &key, true)
        }
        _ => Err(Error::Usage(
            "--cert and --key go together (or give neither for a self-signed certificate)".into(),
        )),
    }
}

fn load(cert: &Path, key: &Path, created: bool) -> Result<Identity, Error> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        Error::Other(format!("cannot read {}: {e}", what.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let Some(leaf) = chain.first() else {
        return Err(bad(cert, &"no certificate in the file"));
    };
    let fingerprint = vbackup_protocol::fingerprint(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    Ok(Identity {
        chain,
        key,
        fingerprint,
        created,
    })
}

fn create(dir: &Path) -> Result<(), Error> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_string());
        }
    }
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::Other(format!("cannot make a certificate: {e}")))?;
    crate::create_private_dir(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    write_new(
        &dir.join("key.pem"),
        made.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join("cert.pem"), made.cert.pem().as_bytes(), 0o644)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_self_signed_certificate_is_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), None, None).unwrap();
        assert!(first.created);
        let again = load_or_create(dir.path(), None, None).unwrap();
        assert!(!again.created);
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint.len(), 64);
        assert!(load_or_create(dir.path(), Some(Path::new("/x")), None).is_err());
    }
}
