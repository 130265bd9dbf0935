//! Raw TLS to a `vbackup server` whose certificate is pinned by its
//! SHA-256 fingerprint, for the attack tests: they write what the real
//! client never would (paths with `..` or percent-encoded separators,
//! which URL parsers normalise away; slow or cut bodies; floods).
//!
//! Why here and not in vbackup-remote: it is a test's tool, not API for a
//! front end. The pinned verifier is rebuilt with rustls directly (and
//! checks no more than the pin, like the client's for a pinned server),
//! so the client crate exposes nothing for it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use vbackup_protocol::{fingerprint, parse_fingerprint};

/// A client TLS stream over TCP.
pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Sends `request` byte for byte over TLS to `address` (a server whose
/// certificate has fingerprint `pin`) and returns the whole reply.
pub fn raw_exchange(address: &str, pin: &str, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = raw_connect(address, pin)?;
    stream.write_all(request)?;
    stream.flush()?;
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => Ok(reply),
        // Servers may close without a TLS close_notify.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !reply.is_empty() => Ok(reply),
        Err(e) => Err(e),
    }
}

/// A TLS connection to `address` (a server whose certificate has
/// fingerprint `pin`), on which a test writes requests at the pace it
/// chooses.
pub fn raw_connect(address: &str, pin: &str) -> io::Result<Tls> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
    let pin = parse_fingerprint(pin).map_err(invalid)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned {
        pin: hex(&pin),
        provider: provider.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").map_err(|e| invalid(e.to_string()))?;
    let connection =
        ClientConnection::new(Arc::new(config), name).map_err(|e| invalid(e.to_string()))?;
    let tcp = TcpStream::connect(address)?;
    Ok(StreamOwned::new(connection, tcp))
}

/// Lower-case hex, as [`fingerprint`] prints it.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Trusts exactly the certificate whose fingerprint is `pin`; the
/// handshake signatures are still checked with the provider's algorithms.
#[derive(Debug)]
struct Pinned {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint(end_entity.as_ref());
        if seen == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {seen}, not the pinned {}",
                self.pin
            )))
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
