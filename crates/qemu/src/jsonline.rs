//! Newline-delimited JSON over a unix socket, as QMP and the guest agent
//! speak it.
//!
//! Why our own reader: every read needs a deadline (a hung QEMU must not
//! hang a backup), lines must be bounded (the peer is not trusted), and a
//! line cut by a timeout must not be lost, so the next read goes on where
//! the last one stopped. `BufRead::read_line` gives none of these.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};

/// The longest line accepted. `query-qmp-schema` is about 120 KiB; block
/// node listings of large VMs stay far below this.
pub(crate) const MAX_LINE: usize = 32 << 20;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// A connected JSON-lines socket with a carry-over buffer.
#[derive(Debug)]
pub(crate) struct JsonLines {
    stream: UnixStream,
    path: PathBuf,
    /// Who is on the other side, for messages (`QEMU (QMP)`, ...).
    peer: &'static str,
    /// Bytes received and not yet returned.
    pending: Vec<u8>,
    /// Bytes of `pending` known to hold no newline.
    scanned: usize,
    /// Set once the stream cannot be trusted to be in sync.
    broken: Option<String>,
    /// The longest line accepted ([`MAX_LINE`] but in tests).
    max_line: usize,
}

impl JsonLines {
    /// Connects to the unix socket at `path`.
    pub(crate) fn connect(path: &Path, peer: &'static str) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connecting to {peer} at {}", path.display()), e))?;
        Ok(JsonLines {
            stream,
            path: path.to_owned(),
            peer,
            pending: Vec::new(),
            scanned: 0,
            broken: None,
            max_line: MAX_LINE,
        })
    }

    /// The socket path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Who is on the other side.
    pub(crate) fn peer(&self) -> &'static str {
        self.peer
    }

    /// An error that also makes every later call fail.
    pub(crate) fn poison(&mut self, reason: String) -> Error {
        self.broken = Some(reason.clone());
        Error::BadReply {
            peer: self.peer,
            reason,
        }
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(Error::BadReply {
                peer: self.peer,
                reason: format!("connection abandoned after an earlier error ({why})"),
            }),
        }
    }

    /// Sends one JSON message followed by a newline.
    pub(crate) fn send(&mut self, message: &Value, timeout: Duration) -> Result<()> {
        let mut bytes = serde_json::to_vec(message)
            .map_err(|e| Error::Internal(format!("cannot encode a message: {e}")))?;
        bytes.push(b'\n');
        self.send_raw(&bytes, timeout)
    }

    /// Sends raw bytes (the guest agent's 0xFF sync marker).
    pub(crate) fn send_raw(&mut self, bytes: &[u8], timeout: Duration) -> Result<()> {
        self.check_usable()?;
        let context = || format!("sending to {} at {}", self.peer, self.path.display());
        self.stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .and_then(|()| self.stream.write_all(bytes))
            .map_err(|e| Error::io(context(), e))
    }

    /// Reads one line (without its `\n`), waiting until `deadline`.
    /// `waiting_for` says what the line was expected to be, for the
    /// timeout message.
    pub(crate) fn read_line(&mut self, deadline: Instant, waiting_for: &str) -> Result<Vec<u8>> {
        self.check_usable()?;
        loop {
            if let Some(line) = self.take_line() {
                return Ok(line);
            }
            if self.pending.len() > self.max_line {
                let max = self.max_line;
                return Err(self.poison(format!("a line longer than {max} bytes")));
            }
            self.fill(deadline, waiting_for)?;
        }
    }

    /// Discards input up to and including the first `marker` byte, waiting
    /// until `deadline` (the guest agent's delimited sync).
    pub(crate) fn skip_through(
        &mut self,
        marker: u8,
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<()> {
        self.check_usable()?;
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == marker) {
                self.pending.drain(..=pos);
                self.scanned = 0;
                return Ok(());
            }
            self.pending.clear();
            self.scanned = 0;
            self.fill(deadline, waiting_for)?;
        }
    }

    fn take_line(&mut self) -> Option<Vec<u8>> {
        let found = self.pending[self.scanned..]
            .iter()
            .position(|&b| b == b'\n');
        match found {
            Some(pos) => {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.scanned = 0;
                Some(line)
            }
            None => {
                self.scanned = self.pending.len();
                None
            }
        }
    }

    /// Reads what is available, waiting at most until `deadline`.
    fn fill(&mut self, deadline: Instant, waiting_for: &str) -> Result<()> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(self.timed_out(waiting_for));
        }
        let mut chunk = [0u8; READ_CHUNK];
        let result = self
            .stream
            .set_read_timeout(Some(remaining))
            .and_then(|()| self.stream.read(&mut chunk));
        match result {
            Ok(0) => Err(self.closed(waiting_for)),
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.timed_out(waiting_for))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Error::io(
                format!("{} while waiting for {waiting_for}", self.where_()),
                e,
            )),
        }
    }

    fn where_(&self) -> String {
        format!("{} at {}", self.peer, self.path.display())
    }

    fn timed_out(&self, waiting_for: &str) -> Error {
        Error::io(
            format!("{} did not send {waiting_for} in time", self.where_()),
            io::ErrorKind::TimedOut.into(),
        )
    }

    fn closed(&mut self, waiting_for: &str) -> Error {
        let why = format!(
            "{} closed the connection while we waited for {waiting_for}",
            self.where_()
        );
        self.broken = Some(why.clone());
        Error::io(why, io::ErrorKind::UnexpectedEof.into())
    }
}

/// Cuts a peer-supplied string to a length fit for an error message.
pub(crate) fn bounded_text(text: &str) -> String {
    const MAX: usize = 4096;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut cut = MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} [...]", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn pair() -> (JsonLines, UnixStream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let client = JsonLines::connect(&path, "test peer").unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server, dir)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(200)
    }

    #[test]
    fn lines_split_across_reads_and_timeouts_are_kept() {
        let (mut c, mut s, _dir) = pair();
        s.write_all(b"{\"a\":").unwrap();
        let err = c.read_line(soon(), "a test line").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("did not send a test line"),
            "{err}"
        );
        s.write_all(b"1}\r\n{\"b\":2}\n").unwrap();
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"a\":1}");
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"b\":2}");
    }

    #[test]
    fn overlong_lines_are_refused_and_poison_the_connection() {
        let (mut c, mut s, _dir) = pair();
        c.max_line = 100;
        s.write_all(&[b'x'; 300]).unwrap();
        let err = c.read_line(soon(), "x").unwrap_err().to_string();
        assert!(err.contains("longer than 100 bytes"), "{err}");
        s.write_all(b"\n").unwrap();
        let err = c.read_line(soon(), "x").unwrap_err().to_string();
        assert!(err.contains("abandoned"), "{err}");
    }

    #[test]
    fn eof_is_an_error_that_sticks() {
        let (mut c, s, _dir) = pair();
        drop(s);
        let err = c.read_line(soon(), "the greeting").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(c.read_line(soon(), "x").is_err());
    }

    #[test]
    fn skip_through_marker() {
        let (mut c, mut s, _dir) = pair();
        s.write_all(b"garbage\n{\"x\"\xff{\"return\": 5}\n")
            .unwrap();
        c.skip_through(0xff, soon(), "sync").unwrap();
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"return\": 5}");
    }

    #[test]
    fn bounded_text_cuts_on_char_boundary() {
        let long = "é".repeat(5000);
        let cut = bounded_text(&long);
        assert!(cut.ends_with("[...]") && cut.len() < 4200);
        assert_eq!(bounded_text("short"), "short");
    }
}
