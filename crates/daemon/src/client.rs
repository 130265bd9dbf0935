//! A client of the daemon's API on its unix socket, for `vbackup jobs`
//! and other local front ends.
//!
//! One HTTP/1.1 request per connection (`Connection: close`), so the
//! client needs no HTTP library: it writes the request, reads the answer
//! to its end (bounded), and decodes the JSON body. The daemon on the
//! socket is trusted (it runs as root and the socket is root's), but its
//! answer is still bounded and checked.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// The largest answer read (a history of 10,000 runs fits).
const MAX_ANSWER: u64 = 64 << 20;

/// A daemon's API at a socket path.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// `GET path`, decoded.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.request("GET", path, None::<&()>)
    }

    /// `POST path` with `body` as JSON, decoded.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.request("POST", path, Some(body))
    }

    fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let body = match body {
            Some(body) => serde_json::to_vec(body)
                .map_err(|e| Error::Invalid(format!("encoding the request: {e}")))?,
            None => Vec::new(),
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| Error::Io {
            context: format!(
                "cannot reach the daemon at {} (is `vbackup daemon` running, and may you open its socket?)",
                self.socket.display()
            ),
            source: e,
        })?;
        let io = |what: &str| Error::io(format!("{what} the daemon at {}", self.socket.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io("talking to"))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: vbackup\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .map_err(io("writing to"))?;
        stream.write_all(&body).map_err(io("writing to"))?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .map_err(io("reading from"))?;
        decode(&answer)
    }
}

/// Decodes an HTTP/1.1 answer: the status line, headers, then a JSON body
/// (chunked or not). A non-2xx answer becomes the error it carries.
fn decode<T: DeserializeOwned>(answer: &[u8]) -> Result<T> {
    let bad = |why: &str| Error::Invalid(format!("the daemon's answer is not valid: {why}"));
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = lines.any(|l| {
        let lower = l.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let raw = &answer[split + 4..];
    let body = match chunked {
        true => dechunk(raw).ok_or_else(|| bad("broken chunked body"))?,
        false => raw.to_vec(),
    };
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(Error::Invalid(message));
    }
    serde_json::from_slice(&body).map_err(|e| bad(&e.to_string()))
}

/// The body of a chunked transfer.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn answers_plain_and_chunked_decode_and_errors_carry_their_message() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n[1,2,3]";
        assert_eq!(decode::<Vec<u8>>(plain).unwrap(), [1, 2, 3]);
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(decode::<Vec<u8>>(chunked).unwrap(), [1, 2]);
        let error = b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"no job 'x'\"}";
        assert_eq!(
            decode::<Vec<u8>>(error).unwrap_err().to_string(),
            "no job 'x'"
        );
        for broken in [
            &b"garbage"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(decode::<Vec<u8>>(broken).is_err());
        }
    }
}
