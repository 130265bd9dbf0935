//! Turning OpenDAL errors into [`StorageError`]s of the right kind.
//!
//! Classification lives here and retries live in
//! [`vbackup_storage::RetryBackend`], so one place decides what is worth
//! repeating: throttling, 5xx replies, timeouts, refused or reset
//! connections and cut-off bodies are [`ErrorKind::Transient`]; a missing
//! object is [`ErrorKind::NotFound`]; refused credentials are
//! [`ErrorKind::PermissionDenied`]; a missing bucket and everything else
//! are permanent.

use std::error::Error as _;

use opendal::ErrorKind as DalKind;
use vbackup_storage::{ErrorKind, StorageError};

/// What the failing request was doing, for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Put,
    Get,
    Stat,
    List,
    Delete,
    Check,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Put => "uploading",
            Op::Get => "downloading",
            Op::Stat => "looking up",
            Op::List => "listing",
            Op::Delete => "deleting",
            Op::Check => "opening the bucket of",
        }
    }
}

/// Where errors happen: the repository's name and bucket, for messages.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) location: String,
    pub(crate) endpoint: String,
    pub(crate) bucket: String,
}

impl Place {
    /// Classifies `err`, raised while doing `op` on `key`.
    pub(crate) fn error(&self, op: Op, key: &str, err: &opendal::Error) -> StorageError {
        let (kind, hint) = self.classify(err);
        let message = format!(
            "S3 error while {} {}: {hint} [{}]",
            op.verb(),
            self.location,
            detail(err)
        );
        StorageError::new(kind, key, message)
    }

    fn classify(&self, err: &opendal::Error) -> (ErrorKind, String) {
        let text = err.to_string();
        if text.contains("NoSuchBucket") {
            return (
                ErrorKind::Other,
                format!(
                    "the bucket '{}' does not exist at {}",
                    self.bucket, self.endpoint
                ),
            );
        }
        if let Some(hint) = connection_problem(err) {
            return (
                ErrorKind::Transient,
                format!("could not connect to {}: {hint}", self.endpoint),
            );
        }
        match err.kind() {
            DalKind::NotFound => (ErrorKind::NotFound, "no such object".into()),
            DalKind::PermissionDenied => (ErrorKind::PermissionDenied, self.denied(&text)),
            DalKind::RateLimited => (ErrorKind::Transient, "the server asks to slow down".into()),
            DalKind::ConfigInvalid => (ErrorKind::Other, "invalid S3 configuration".into()),
            // OpenDAL retries replies it cannot parse, as a proxy may have
            // garbled them; so do we, with the right words.
            _ if text.contains("deserialize") => (
                kind_of(err),
                "the server's reply is not valid S3 XML (is this an S3 endpoint?)".into(),
            ),
            _ if text.contains("timeout reached") => (
                ErrorKind::Transient,
                "the server did not answer in time (VBACKUP_S3_TIMEOUT, default 60 s)".into(),
            ),
            _ if err.is_temporary() => (
                ErrorKind::Transient,
                "temporary failure (server error, timeout or broken connection)".into(),
            ),
            _ => (ErrorKind::Other, "unexpected reply".into()),
        }
    }

    fn denied(&self, text: &str) -> String {
        let credentials = [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
        ];
        let what = if credentials.iter().any(|c| text.contains(c)) {
            "the server refused the credentials"
        } else {
            "access denied"
        };
        format!(
            "{what}: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the AWS \
             credentials file / AWS_PROFILE) and that the key may read and write \
             the bucket '{}'",
            self.bucket
        )
    }
}

fn kind_of(err: &opendal::Error) -> ErrorKind {
    if err.is_temporary() {
        ErrorKind::Transient
    } else {
        ErrorKind::Other
    }
}

/// A short description when `err` comes from failing to reach the server.
fn connection_problem(err: &opendal::Error) -> Option<&'static str> {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(r) = e.downcast_ref::<reqwest::Error>() {
            if r.is_connect() {
                return Some(connect_detail(err));
            }
            if r.is_timeout() {
                return Some("the connection timed out");
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Some("connection refused");
            }
        }
        source = e.source();
    }
    None
}

fn connect_detail(err: &opendal::Error) -> &'static str {
    let chain = one_line(err).to_ascii_lowercase();
    if chain.contains("refused") {
        "connection refused"
    } else if chain.contains("certificate") {
        "the server's TLS certificate was not accepted"
    } else if chain.contains("corrupt message") || chain.contains("invalidcontenttype") {
        "the TLS handshake failed (does the server speak https on this port?)"
    } else if chain.contains("dns") || chain.contains("resolve") {
        "the host name does not resolve"
    } else {
        "the connection failed"
    }
}

/// The useful part of `err` for a message: its kind and the server's or
/// the transport's words, without the request's headers.
fn detail(err: &opendal::Error) -> String {
    let text = one_line(err);
    match text.split_once(" => ") {
        Some((_, words)) => format!("{}: {words}", err.kind()),
        None => text,
    }
}

/// `err` with its whole cause chain on one line.
fn one_line(err: &opendal::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Place {
        Place {
            location: "s3:http://127.0.0.1:3900/b/r".into(),
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "b".into(),
        }
    }

    fn classify(kind: DalKind, message: &str, temporary: bool) -> StorageError {
        let mut err = opendal::Error::new(kind, message);
        if temporary {
            err = err.set_temporary();
        }
        place().error(Op::Get, "chunks/ab/ab12", &err)
    }

    #[test]
    fn server_replies_map_to_storage_kinds() {
        let cases = [
            (
                DalKind::NotFound,
                "S3Error { code: \"NoSuchKey\" }",
                false,
                ErrorKind::NotFound,
            ),
            (
                DalKind::PermissionDenied,
                "code: \"SignatureDoesNotMatch\"",
                false,
                ErrorKind::PermissionDenied,
            ),
            (
                DalKind::ConfigInvalid,
                "code: \"NoSuchBucket\"",
                false,
                ErrorKind::Other,
            ),
            (
                DalKind::RateLimited,
                "code: \"SlowDown\"",
                true,
                ErrorKind::Transient,
            ),
            (
                DalKind::Unexpected,
                "code: \"InternalError\"",
                true,
                ErrorKind::Transient,
            ),
            (
                DalKind::Unexpected,
                "io operation timeout reached",
                true,
                ErrorKind::Transient,
            ),
            (DalKind::Unexpected, "status 400", false, ErrorKind::Other),
        ];
        for (kind, message, temporary, expected) in cases {
            let err = classify(kind, message, temporary);
            assert_eq!(err.kind(), expected, "{message}: {err}");
            assert_eq!(err.key(), "chunks/ab/ab12");
        }
    }

    #[test]
    fn messages_say_what_to_fix() {
        let err = classify(
            DalKind::PermissionDenied,
            "code: \"InvalidAccessKeyId\"",
            false,
        );
        let text = err.to_string();
        assert!(text.contains("refused the credentials"), "{text}");
        assert!(text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
        let err = classify(DalKind::ConfigInvalid, "code: \"NoSuchBucket\"", false);
        assert!(
            err.to_string().contains("the bucket 'b' does not exist"),
            "{err}"
        );
    }
}
