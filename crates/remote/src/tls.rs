//! How the client trusts the server's certificate: a pinned SHA-256
//! fingerprint (self-signed certificates), else the webpki roots. When the
//! roots do not vouch for the certificate, the refusal names its
//! fingerprint and how to pin it, as ssh does for an unknown host key.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use vbackup_protocol::fingerprint;

/// Checks the server certificate; remembers why it last refused one so
/// the transport error can be explained.
#[derive(Debug)]
pub(crate) struct Verifier {
    pin: Option<[u8; 32]>,
    roots: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    last_failure: Arc<Mutex<Option<String>>>,
}

impl Verifier {
    /// A verifier pinned to `pin`, or using the webpki roots without one.
    pub(crate) fn new(
        pin: Option<[u8; 32]>,
        provider: Arc<CryptoProvider>,
        last_failure: Arc<Mutex<Option<String>>>,
    ) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let roots = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| format!("cannot set up certificate verification: {e}"))?;
        Ok(Self {
            pin,
            roots,
            provider,
            last_failure,
        })
    }

    fn refuse(&self, message: String) -> rustls::Error {
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
        rustls::Error::General(message)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint(end_entity.as_ref());
        match self.pin {
            Some(pin) if hex::encode(pin) == seen => Ok(ServerCertVerified::assertion()),
            Some(pin) => Err(self.refuse(format!(
                "the server's certificate has SHA-256 fingerprint {seen}, not the pinned {}: this is not the server that was pinned, or it has a new certificate",
                hex::encode(pin)
            ))),
            None => self
                .roots
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    self.refuse(format!(
                        "the server's certificate is not trusted ({e}); its SHA-256 fingerprint is {seen}. If that is your server's fingerprint (`vbackup server` prints it when it starts), pin it with --server-fingerprint {seen} or VBACKUP_SERVER_FINGERPRINT={seen}"
                    ))
                }),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
