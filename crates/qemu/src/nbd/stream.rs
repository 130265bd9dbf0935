//! The byte stream an NBD connection runs over.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

/// A connected socket: a local unix socket (how we reach our own `qemu-nbd`)
/// or TCP (for remote servers).
#[derive(Debug)]
pub enum Stream {
    /// A unix domain socket.
    Unix(UnixStream),
    /// A TCP connection (Nagle disabled, as the protocol recommends).
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to a unix socket.
    pub fn unix(path: &Path) -> Result<Self> {
        UnixStream::connect(path)
            .map(Stream::Unix)
            .map_err(|e| Error::io(format!("connecting to NBD socket {}", path.display()), e))
    }

    /// Connects to `host:port` over TCP.
    pub fn tcp(address: &str) -> Result<Self> {
        let context = || format!("connecting to NBD server {address}");
        let stream = TcpStream::connect(address).map_err(|e| Error::io(context(), e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io(context(), e))?;
        Ok(Stream::Tcp(stream))
    }

    /// Sets (or clears) the read and write timeouts.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        let result = match self {
            Stream::Unix(s) => s
                .set_read_timeout(timeout)
                .and_then(|()| s.set_write_timeout(timeout)),
            Stream::Tcp(s) => s
                .set_read_timeout(timeout)
                .and_then(|()| s.set_write_timeout(timeout)),
        };
        result.map_err(|e| Error::io("setting NBD socket timeout", e))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}
