//! Entry points that run the NBD client against arbitrary server bytes, for
//! the fuzz targets in `fuzz/` and the property tests. Not a stable API.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::Result;
use crate::nbd::proto::{self, BlockSizeConstraints};
use crate::nbd::wire::BufStream;
use crate::nbd::{
    Allocation, ConnectOptions, ExportDisk, ExportInfo, NbdClient, NbdServer, TransmissionFlags,
    BASE_ALLOCATION,
};

/// A fake connection: reads come from a script, writes are kept (or only
/// counted).
#[derive(Debug)]
pub struct ScriptedStream<'a> {
    input: &'a [u8],
    /// Bytes the other side sent (empty for a discarding stream).
    pub written: Vec<u8>,
    /// How many bytes were written.
    pub written_len: u64,
    keep: bool,
}

impl<'a> ScriptedStream<'a> {
    /// A stream whose other side says exactly `input`, then EOF.
    pub fn new(input: &'a [u8]) -> Self {
        ScriptedStream {
            input,
            written: Vec::new(),
            written_len: 0,
            keep: true,
        }
    }

    /// Like [`ScriptedStream::new`], but what is written is only counted
    /// (a server's read replies would pile up otherwise).
    pub fn discarding(input: &'a [u8]) -> Self {
        ScriptedStream {
            keep: false,
            ..Self::new(input)
        }
    }
}

impl Read for ScriptedStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for ScriptedStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.keep {
            self.written.extend_from_slice(buf);
        }
        self.written_len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs a full handshake (structured replies, two metadata contexts)
/// against `server` bytes.
pub fn handshake(server: &[u8]) -> Result<()> {
    let opts = ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:b0".into()],
        ..ConnectOptions::default()
    };
    NbdClient::handshake(ScriptedStream::new(server), &opts).map(drop)
}

/// The export size used by [`transmission`].
pub const EXPORT_SIZE: u64 = 1 << 20;

/// A client in transmission phase over `server` bytes. `config` bit 0
/// selects structured replies, bit 1 a 64 KiB maximum block size.
pub fn client(config: u8, server: &[u8]) -> NbdClient<ScriptedStream<'_>> {
    let structured = config & 1 != 0;
    let block_size = (config & 2 != 0).then_some(BlockSizeConstraints {
        minimum: 1,
        preferred: 4096,
        maximum: 64 * 1024,
    });
    let export = ExportInfo {
        name: String::new(),
        size: EXPORT_SIZE,
        flags: TransmissionFlags(0x1fd), // everything but read-only
        block_size,
        structured_replies: structured,
    };
    let mut contexts = BTreeMap::new();
    if structured {
        contexts.insert(BASE_ALLOCATION.to_owned(), 1);
        contexts.insert("qemu:dirty-bitmap:b0".to_owned(), 7);
    }
    NbdClient::from_parts(
        BufStream::new(ScriptedStream::new(server)),
        export,
        contexts,
    )
}

/// Runs a sequence of commands against `server` bytes: the first byte is
/// the [`client`] config, the next four pick commands, the rest is what the
/// server says. Stops at the first error.
pub fn transmission(data: &[u8]) -> Result<()> {
    let (head, server) = data.split_at(data.len().min(5));
    let config = head.first().copied().unwrap_or(0);
    let mut client = client(config, server);
    for &op in head.iter().skip(1) {
        run_op(&mut client, op)?;
    }
    Ok(())
}

fn run_op(client: &mut NbdClient<ScriptedStream<'_>>, op: u8) -> Result<()> {
    let offset = u64::from(op & 0x0f) * 4096;
    match op >> 4 {
        0..=3 => client.read_at(&mut vec![0u8; 8192 + usize::from(op)], offset),
        4 => client.read_at(&mut vec![0u8; 100 * 1024], offset),
        5 | 6 => client.block_status(1, offset, 65536).map(drop),
        7 => client
            .block_status_range(7, offset, EXPORT_SIZE - offset)
            .map(drop),
        8 => client.write_at(&[0xab; 5000], offset),
        9 => client.flush(),
        10 => client.trim(offset, 4096),
        11 => client.write_zeroes(offset, 8192, true),
        _ => client.read_at(&mut [0u8; 512], offset),
    }
}

/// The allocation granularity of [`MemoryDisk`]: blocks of zeroes are holes.
pub const MEMORY_BLOCK: u64 = 4096;

/// An in-memory [`ExportDisk`]: all-zero 4 KiB blocks are reported as
/// holes; an optional broken range fails every read that touches it.
#[derive(Debug)]
pub struct MemoryDisk {
    data: Mutex<Vec<u8>>,
    writable: bool,
    broken: Option<(u64, u64)>,
    flushes: AtomicU64,
}

impl MemoryDisk {
    /// A disk holding `data`.
    pub fn new(data: Vec<u8>, writable: bool) -> Self {
        MemoryDisk {
            data: Mutex::new(data),
            writable,
            broken: None,
            flushes: AtomicU64::new(0),
        }
    }

    /// Reads touching `[offset, offset + length)` fail with an I/O error.
    pub fn with_broken_range(mut self, offset: u64, length: u64) -> Self {
        self.broken = Some((offset, offset + length));
        self
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// How many flushes the disk saw.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn range(offset: u64, length: usize) -> std::ops::Range<usize> {
        // The server checked the range against the size, a usize.
        let start = offset as usize;
        start..start + length
    }
}

impl ExportDisk for MemoryDisk {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some((start, end)) = self.broken {
            if offset < end && offset + buf.len() as u64 > start {
                return Err(io::Error::other("sector on fire"));
            }
        }
        buf.copy_from_slice(&self.lock()[Self::range(offset, buf.len())]);
        Ok(())
    }

    fn allocation(&self, offset: u64, length: u64) -> io::Result<Vec<Allocation>> {
        let data = self.lock();
        let end = (offset + length).min(data.len() as u64);
        let mut out: Vec<Allocation> = Vec::new();
        let mut at = offset;
        // At most 64 extents per call: callers must cope with less.
        while at < end && out.len() < 64 {
            let block_end = ((at / MEMORY_BLOCK + 1) * MEMORY_BLOCK).min(end);
            let zero = data[at as usize..block_end as usize]
                .iter()
                .all(|&b| b == 0);
            let length = block_end - at;
            match out.last_mut() {
                Some(last) if last.zero == zero => last.length += length,
                _ => out.push(Allocation {
                    length,
                    hole: zero,
                    zero,
                }),
            }
            at = block_end;
        }
        Ok(out)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.lock()[Self::range(offset, data.len())].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.lock()[Self::range(offset, length as usize)].fill(0);
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.write_zeroes(offset, length)
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The size of the exports [`server`] serves.
pub const SERVER_EXPORT_SIZE: usize = 256 * 1024;

/// A server with a writable export "disk" (data with holes, a broken range
/// at 32 KiB) and a read-only one "ro".
pub fn test_server() -> NbdServer {
    let mut data = vec![0u8; SERVER_EXPORT_SIZE];
    for (i, b) in data.iter_mut().enumerate().take(64 * 1024) {
        *b = (i % 251) as u8 + 1;
    }
    data[128 * 1024..136 * 1024].fill(0xcd);
    let disk = MemoryDisk::new(data.clone(), true).with_broken_range(32 * 1024, 4096);
    let mut server = NbdServer::new();
    let exports: [(&str, Arc<dyn ExportDisk>); 2] = [
        ("disk", Arc::new(disk)),
        ("ro", Arc::new(MemoryDisk::new(data, false))),
    ];
    for (name, disk) in exports {
        // Fixed, valid names: cannot fail.
        let _ = server.add_export(name, "a test export", disk);
    }
    server
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    if let Ok(bytes) = proto::encode_option(option, data) {
        out.extend_from_slice(&bytes);
    }
}

/// What a client says before its first request: flags, then either
/// `NBD_OPT_EXPORT_NAME` (`structured` false) or structured replies,
/// `base:allocation` and `NBD_OPT_GO`, for `export`.
pub fn client_prelude(export: &str, structured: bool) -> Vec<u8> {
    let mut out = (proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if !structured {
        option(&mut out, proto::NBD_OPT_EXPORT_NAME, export.as_bytes());
        return out;
    }
    option(&mut out, proto::NBD_OPT_STRUCTURED_REPLY, &[]);
    let queries = [BASE_ALLOCATION.to_owned()];
    if let Ok(data) = proto::encode_meta_context_query(export, &queries) {
        option(&mut out, proto::NBD_OPT_SET_META_CONTEXT, &data);
    }
    if let Ok(data) = proto::encode_go(export) {
        option(&mut out, proto::NBD_OPT_GO, &data);
    }
    out
}

/// Feeds client bytes to [`test_server`]'s `serve_connection`. The first
/// byte picks a prelude: 0 none (the bytes are the handshake), 1 the
/// structured prelude for "disk", 2 the simple one, 3 the structured one
/// for "ro"; the rest follows it.
pub fn server(data: &[u8]) -> Result<()> {
    let Some((&selector, rest)) = data.split_first() else {
        return Ok(());
    };
    let mut input = match selector % 4 {
        0 => Vec::new(),
        1 => client_prelude("disk", true),
        2 => client_prelude("disk", false),
        _ => client_prelude("ro", true),
    };
    input.extend_from_slice(rest);
    test_server().serve_connection(ScriptedStream::discarding(&input))
}
