//! Entry points that run the NBD client against arbitrary server bytes, for
//! the fuzz targets in `fuzz/` and the property tests. Not a stable API.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use crate::error::Result;
use crate::nbd::proto::BlockSizeConstraints;
use crate::nbd::wire::BufStream;
use crate::nbd::{ConnectOptions, ExportInfo, NbdClient, TransmissionFlags, BASE_ALLOCATION};

/// A fake server connection: reads come from a script, writes are kept.
#[derive(Debug)]
pub struct ScriptedStream<'a> {
    input: &'a [u8],
    /// Bytes the client sent.
    pub written: Vec<u8>,
}

impl<'a> ScriptedStream<'a> {
    /// A stream whose server side says exactly `input`, then EOF.
    pub fn new(input: &'a [u8]) -> Self {
        ScriptedStream {
            input,
            written: Vec::new(),
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
        self.written.extend_from_slice(buf);
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
