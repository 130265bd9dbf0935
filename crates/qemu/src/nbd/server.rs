//! A synchronous NBD server: named exports of [`ExportDisk`]s, many
//! connections, several requests in flight per connection.
//!
//! Each connection gets its own thread for the handshake and for reading
//! requests, and a small pool of workers ([`WORKERS_PER_CONNECTION`]) that
//! carry requests out and write each reply whole under a lock, so replies
//! may leave out of order, as the protocol allows (QEMU keeps many requests
//! in flight).
//!
//! The client is untrusted, above all when the export listens on TCP:
//! every header, option and length it sends is checked before use; option
//! payloads are bounded by [`proto::MAX_OPTION_DATA`] and write payloads by
//! [`proto::DEFAULT_MAX_IO`] (a longer one ends the connection, since its
//! bytes cannot be skipped safely); ranges are checked against the export
//! size before the disk sees them; no client bytes can make the server
//! panic. Anyone who can reach the socket can read (and, on a writable
//! export, write) the disk: there is no TLS and no authentication, so bind
//! TCP listeners to trusted networks only.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use super::proto::{self, Request, MAX_STRING, NBD_CMD_DISC, NBD_CMD_WRITE, REQUEST_LEN};
use super::wire::BufStream;
use crate::error::{Error, Result};

mod negotiate;
#[cfg(test)]
mod tests;
mod transmit;

/// How many requests one connection carries out at once.
pub const WORKERS_PER_CONNECTION: usize = 4;
/// How often blocked accepts and reads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// One extent of allocation state, answered for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Length in bytes (must not be zero).
    pub length: u64,
    /// The extent is not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The extent reads as zeroes (`NBD_STATE_ZERO`); such extents are sent
    /// as holes in read replies.
    pub zero: bool,
}

/// A random-access disk an NBD export serves. Implementations are shared by
/// all connections and worker threads.
pub trait ExportDisk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (the range is already checked
    /// to be inside the disk).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Allocation of the range starting at `offset`, at most `length` bytes
    /// (in order, contiguous from `offset`, at least one extent, may cover
    /// less than `length`).
    fn allocation(&self, offset: u64, length: u64) -> io::Result<Vec<Allocation>>;
    /// Whether writes are accepted (false: export is read-only,
    /// `NBD_FLAG_READ_ONLY`).
    fn writable(&self) -> bool {
        false
    }
    /// Writes `data` at `offset` (the range is already checked).
    fn write_at(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    /// Makes the range read as zeroes (the range is already checked).
    fn write_zeroes(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    /// Discard: may be a no-op.
    fn trim(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
    /// Makes written data durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One named export.
struct Export {
    name: String,
    description: String,
    disk: Arc<dyn ExportDisk>,
}

/// An NBD server: named exports, many connections.
///
/// Cheap to clone; clones share the exports.
#[derive(Clone, Default)]
pub struct NbdServer {
    exports: Arc<BTreeMap<String, Arc<Export>>>,
    /// The first export, also served under the empty name.
    default: Option<Arc<Export>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl NbdServer {
    /// A server without exports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export. The first export added is also served under the
    /// empty name "" (qemu-nbd's default export).
    ///
    /// Fails if the name is taken, or if the name or description is longer
    /// than the protocol's 4096 bytes or contains NUL.
    pub fn add_export(
        &mut self,
        name: &str,
        description: &str,
        disk: Arc<dyn ExportDisk>,
    ) -> Result<()> {
        for (what, text) in [("export name", name), ("export description", description)] {
            if text.len() > MAX_STRING || text.contains('\0') {
                return Err(Error::InvalidRequest(format!(
                    "{what} {:?} must be at most {MAX_STRING} bytes without NUL",
                    proto::truncate_str(text, 64)
                )));
            }
        }
        if self.lookup(name).is_some() {
            return Err(Error::InvalidRequest(format!(
                "NBD export {name:?} is already defined"
            )));
        }
        let export = Arc::new(Export {
            name: name.to_owned(),
            description: description.to_owned(),
            disk,
        });
        self.default.get_or_insert_with(|| export.clone());
        Arc::make_mut(&mut self.exports).insert(name.to_owned(), export);
        Ok(())
    }

    /// The export served under `name`.
    fn lookup(&self, name: &str) -> Option<&Arc<Export>> {
        match self.exports.get(name) {
            Some(export) => Some(export),
            None if name.is_empty() => self.default.as_ref(),
            None => None,
        }
    }

    /// Serves connections on `listener` until `stop` is set (looked at
    /// every 50 ms), one thread per connection. Returns after all
    /// connections ended: on stop, each finishes the requests it has read
    /// and closes. Errors of single connections (a client breaking the
    /// protocol) end only that connection; an error is returned only when
    /// accepting fails.
    pub fn serve_unix(&self, listener: UnixListener, stop: &AtomicBool) -> Result<()> {
        self.serve_listener(&listener, stop)
    }

    /// [`NbdServer::serve_unix`] for TCP (Nagle is disabled on every
    /// connection). Read the module documentation on trust first.
    pub fn serve_tcp(&self, listener: TcpListener, stop: &AtomicBool) -> Result<()> {
        self.serve_listener(&listener, stop)
    }

    /// Serves one already-accepted connection over any stream (for tests and
    /// the fuzz target), one request at a time. Returns `Ok` when the client
    /// disconnects cleanly, an error when it breaks the protocol or the
    /// stream fails.
    pub fn serve_connection<S: Read + Write>(&self, stream: S) -> Result<()> {
        let mut io = BufStream::new(stream);
        match negotiate::negotiate(self, &mut io)? {
            Some(session) => transmit::sequential(&session, &mut io),
            None => Ok(()),
        }
    }

    fn serve_listener<L: Listener>(&self, listener: &L, stop: &AtomicBool) -> Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("setting up the NBD listener", e))?;
        let halt = AtomicBool::new(false);
        thread::scope(|scope| {
            let result = loop {
                if stop.load(Ordering::SeqCst) {
                    break Ok(());
                }
                match listener.accept_socket() {
                    Ok(socket) => {
                        let halt = &halt;
                        scope.spawn(move || {
                            // A failed connection ends alone; there is no
                            // one to report to but the client, who is gone.
                            let _ = self.serve_socket(socket, halt);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(e) if transient_accept_error(&e) => thread::sleep(POLL),
                    Err(e) => break Err(Error::io("accepting an NBD connection", e)),
                }
            };
            halt.store(true, Ordering::SeqCst);
            result
        })
    }

    /// Serves one socket with concurrent workers until the client leaves,
    /// breaks the protocol, or `halt` is set.
    fn serve_socket<T: Socket>(&self, socket: T, halt: &AtomicBool) -> Result<()> {
        let setup = |e| Error::io("setting up an NBD connection", e);
        socket.prepare().map_err(setup)?;
        let writer = socket.try_clone_socket().map_err(setup)?;
        let broken = AtomicBool::new(false);
        let reader = StopRead {
            inner: socket,
            halt,
            broken: &broken,
        };
        let mut io = Joined {
            reader: BufReader::with_capacity(64 * 1024, reader),
            writer,
        };
        let result = match negotiate::negotiate(self, &mut io) {
            Ok(Some(session)) => {
                let Joined { mut reader, writer } = io;
                let result = transmit::concurrent(&session, &mut reader, writer, &broken);
                reader.get_ref().inner.shutdown_socket();
                return result;
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        io.reader.get_ref().inner.shutdown_socket();
        result
    }
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A listening socket the server can accept from.
trait Listener: Sync {
    type Socket: Socket;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    fn accept_socket(&self) -> io::Result<Self::Socket>;
}

impl Listener for UnixListener {
    type Socket = UnixStream;
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, on)
    }
    fn accept_socket(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Socket = TcpStream;
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
    fn accept_socket(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

/// A connected socket: a reading half, a writing clone, a shutdown.
trait Socket: Read + Write + Send + Sized {
    /// Blocking mode with a read timeout of [`POLL`] (and no Nagle).
    fn prepare(&self) -> io::Result<()>;
    fn try_clone_socket(&self) -> io::Result<Self>;
    fn shutdown_socket(&self);
}

impl Socket for UnixStream {
    fn prepare(&self) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(POLL))
    }
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_socket(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Socket for TcpStream {
    fn prepare(&self) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(POLL))
    }
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_socket(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// A socket reader whose read timeouts are retried until the server halts
/// or a worker found the connection broken; partial messages survive a
/// timeout because the retry is below `read_exact`.
struct StopRead<'a, T> {
    inner: T,
    halt: &'a AtomicBool,
    broken: &'a AtomicBool,
}

impl<T: Read> Read for StopRead<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.halt.load(Ordering::SeqCst) || self.broken.load(Ordering::SeqCst) {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "NBD connection is ending",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// A reader and a writer used as one stream during the handshake.
struct Joined<R, W> {
    reader: R,
    writer: W,
}

impl<R: Read, W> Read for Joined<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl<R, W: Write> Write for Joined<R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// Fills `buf` from the client; `Ok(false)` if the stream ended before the
/// first byte (a clean end between messages).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(Error::io(
                    format!("NBD client closed the connection while sending {what}"),
                    io::ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {what} from NBD client"), e)),
        }
    }
    Ok(true)
}

/// Fills `buf` from the client; the end of the stream is an error.
fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    if read_full(r, buf, what)? || buf.is_empty() {
        Ok(())
    } else {
        Err(Error::io(
            format!("NBD client closed the connection before sending {what}"),
            io::ErrorKind::UnexpectedEof.into(),
        ))
    }
}

/// Sends bytes to the client.
fn send<W: Write>(w: &mut W, bytes: &[u8], what: &str) -> Result<()> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(|e| Error::io(format!("sending {what} to NBD client"), e))
}

/// Reads the next request and its write payload; `None` when the client
/// disconnects (`NBD_CMD_DISC` or the end of the stream between requests).
fn read_request<R: Read>(r: &mut R) -> Result<Option<(Request, Vec<u8>)>> {
    let mut header = [0u8; REQUEST_LEN];
    if !read_full(r, &mut header, "a request header")? {
        return Ok(None);
    }
    let request = proto::parse_request(&header)?;
    if request.command == NBD_CMD_DISC {
        return Ok(None);
    }
    if request.command != NBD_CMD_WRITE {
        return Ok(Some((request, Vec::new())));
    }
    if request.length > proto::DEFAULT_MAX_IO {
        return Err(Error::protocol(format!(
            "client sent a write of {} bytes, more than the {}-byte maximum",
            request.length,
            proto::DEFAULT_MAX_IO
        )));
    }
    let mut payload = vec![0u8; request.length as usize];
    read_exact(r, &mut payload, "write data")?;
    Ok(Some((request, payload)))
}

/// Locks a mutex, ignoring poisoning (a panicking worker leaves the data
/// consistent: whole replies, a receiver).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request read by the connection thread, for a worker.
type Job = (Request, Vec<u8>);

/// A channel of jobs shared by the workers of one connection.
type Jobs = Mutex<mpsc::Receiver<Job>>;
