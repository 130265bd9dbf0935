//! Reading and writing whole messages, with errors that say which message.

use std::io::{self, Read, Write};

use crate::error::{Error, Result};

/// Fills `buf` from the server; running out of bytes is a clear error.
pub(crate) fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::io(
            format!("NBD server closed the connection while sending {what}"),
            e,
        ),
        _ => Error::io(format!("reading {what} from NBD server"), e),
    })
}

/// Reads a fixed-size message.
pub(crate) fn read_array<R: Read, const N: usize>(r: &mut R, what: &str) -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    read_exact(r, &mut buf, what)?;
    Ok(buf)
}

/// Reads a payload whose length the caller has already bounded.
pub(crate) fn read_vec<R: Read>(r: &mut R, len: u32, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    read_exact(r, &mut buf, what)?;
    Ok(buf)
}

/// Discards `len` bytes without buffering them.
pub(crate) fn skip<R: Read>(r: &mut R, len: u64, what: &str) -> Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())
        .map_err(|e| Error::io(format!("reading {what} from NBD server"), e))?;
    if copied == len {
        Ok(())
    } else {
        Err(Error::io(
            format!("NBD server closed the connection while sending {what}"),
            io::ErrorKind::UnexpectedEof.into(),
        ))
    }
}

/// Sends bytes to the server.
pub(crate) fn write_all<W: Write>(w: &mut W, bytes: &[u8], what: &str) -> Result<()> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(|e| Error::io(format!("sending {what} to NBD server"), e))
}

/// A stream with buffered reads (reply headers are small) and direct writes.
///
/// Large reads (data payloads) bypass the buffer, so data is copied once,
/// straight into the caller's buffer.
#[derive(Debug)]
pub(crate) struct BufStream<S: Read> {
    inner: io::BufReader<S>,
}

impl<S: Read> BufStream<S> {
    /// Wraps a stream.
    pub(crate) fn new(stream: S) -> Self {
        BufStream {
            inner: io::BufReader::with_capacity(64 * 1024, stream),
        }
    }

    /// The underlying stream.
    pub(crate) fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }
}

impl<S: Read> Read for BufStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Read + Write> Write for BufStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.get_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.get_mut().flush()
    }
}
