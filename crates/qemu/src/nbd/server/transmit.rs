//! The transmission phase: carrying out requests and encoding their replies.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use super::negotiate::BASE_ALLOCATION_ID;
use super::{lock, read_request, send, Export, Job, Jobs, WORKERS_PER_CONNECTION};
use crate::error::{Error, Result};
use crate::nbd::proto::*;

/// The longest disk error text sent to the client.
const MAX_ERROR_MESSAGE: usize = 1024;
/// The most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 16 * 1024;
/// The most hole and data chunks in one read reply; the rest is sent as data.
const MAX_READ_CHUNKS: usize = 256;
/// Zero extents shorter than this are sent as data in read replies.
const MIN_HOLE_CHUNK: u64 = 4096;
/// The most `ExportDisk::allocation` calls for one request.
const MAX_ALLOCATION_CALLS: usize = 4096;

/// One connection in transmission phase.
pub(super) struct Session {
    pub(super) export: Arc<Export>,
    pub(super) structured: bool,
    /// Whether `base:allocation` was selected for this export.
    pub(super) allocation: bool,
}

/// Why a request failed: its `NBD_E*` value and a message for the client.
struct Failure {
    errno: u32,
    message: String,
}

fn fail(errno: u32, message: impl Into<String>) -> Failure {
    Failure {
        errno,
        message: message.into(),
    }
}

fn disk_error(what: &str, e: &io::Error) -> Failure {
    let message = format!("{what}: {e}");
    fail(NBD_EIO, truncate_str(&message, MAX_ERROR_MESSAGE))
}

/// Carries out requests one at a time on one stream.
pub(super) fn sequential<S: Read + Write>(session: &Session, io: &mut S) -> Result<()> {
    while let Some((request, payload)) = read_request(io)? {
        let bytes = reply(session, &request, &payload);
        send(io, &bytes, "a reply")?;
    }
    Ok(())
}

/// Reads requests on this thread and carries them out on
/// [`WORKERS_PER_CONNECTION`] workers, which write whole replies under a
/// lock. Returns when the client disconnected (after the replies to every
/// request read), broke the protocol, or a reply could not be sent.
pub(super) fn concurrent<R: Read, W: Write + Send>(
    session: &Session,
    reader: &mut R,
    writer: W,
    broken: &AtomicBool,
) -> Result<()> {
    let writer = Mutex::new(writer);
    let write_error = Mutex::new(None);
    let (jobs, receiver) = mpsc::sync_channel::<Job>(WORKERS_PER_CONNECTION * 2);
    let receiver: Jobs = Mutex::new(receiver);
    let read_result = thread::scope(|scope| {
        for _ in 0..WORKERS_PER_CONNECTION {
            scope.spawn(|| worker(session, &receiver, &writer, broken, &write_error));
        }
        let result = loop {
            if broken.load(Ordering::SeqCst) {
                break Ok(());
            }
            match read_request(reader) {
                Ok(Some(job)) => {
                    if jobs.send(job).is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(jobs);
        result
    });
    let write_error = lock(&write_error).take();
    match write_error {
        Some(e) => Err(e),
        None => read_result,
    }
}

fn worker<W: Write>(
    session: &Session,
    jobs: &Jobs,
    writer: &Mutex<W>,
    broken: &AtomicBool,
    write_error: &Mutex<Option<Error>>,
) {
    loop {
        let job = lock(jobs).recv();
        let Ok((request, payload)) = job else {
            return;
        };
        let bytes = reply(session, &request, &payload);
        let sent = send(&mut *lock(writer), &bytes, "a reply");
        if let Err(e) = sent {
            broken.store(true, Ordering::SeqCst);
            lock(write_error).get_or_insert(e);
            return;
        }
    }
}

/// The whole reply to one request (never a panic, whatever the request).
pub(super) fn reply(session: &Session, request: &Request, payload: &[u8]) -> Vec<u8> {
    match execute(session, request, payload) {
        Ok(bytes) => bytes,
        Err(failure) => error_reply(session, request.cookie, &failure),
    }
}

fn error_reply(session: &Session, cookie: u64, failure: &Failure) -> Vec<u8> {
    if session.structured {
        let mut out = Vec::new();
        push_error_chunk(&mut out, cookie, failure.errno, &failure.message, true);
        out
    } else {
        encode_simple_reply(failure.errno, cookie).to_vec()
    }
}

fn success(request: &Request) -> Vec<u8> {
    encode_simple_reply(0, request.cookie).to_vec()
}

/// The flags each command accepts.
fn allowed_flags(session: &Session, command: u16) -> Option<u16> {
    let df = if session.structured {
        NBD_CMD_FLAG_DF
    } else {
        0
    };
    Some(match command {
        NBD_CMD_READ => NBD_CMD_FLAG_FUA | df,
        NBD_CMD_WRITE | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_FLUSH => 0,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

fn execute(session: &Session, request: &Request, payload: &[u8]) -> Result<Vec<u8>, Failure> {
    let name = command_name(request.command);
    let Some(allowed) = allowed_flags(session, request.command) else {
        return Err(fail(
            NBD_EINVAL,
            format!("unknown command {}", request.command),
        ));
    };
    if request.flags & !allowed != 0 {
        return Err(fail(
            NBD_EINVAL,
            format!("flags {:#x} are not valid for {name}", request.flags),
        ));
    }
    let disk = &*session.export.disk;
    match request.command {
        NBD_CMD_READ => read(session, request),
        NBD_CMD_BLOCK_STATUS => block_status(session, request),
        NBD_CMD_FLUSH => {
            disk.flush().map_err(|e| disk_error("flush", &e))?;
            Ok(success(request))
        }
        _ => modify(session, request, payload),
    }
}

/// Checks that a request's range lies inside the export.
fn check_range(session: &Session, request: &Request, errno: u32) -> Result<(), Failure> {
    let size = session.export.disk.size();
    match request.offset.checked_add(u64::from(request.length)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(fail(
            errno,
            format!(
                "{} of {} bytes at offset {} goes past the end of the {size}-byte export",
                command_name(request.command),
                request.length,
                request.offset
            ),
        )),
    }
}

/// WRITE, WRITE_ZEROES, TRIM: refused on a read-only export; FUA flushes.
fn modify(session: &Session, request: &Request, payload: &[u8]) -> Result<Vec<u8>, Failure> {
    let disk = &*session.export.disk;
    if !disk.writable() {
        return Err(fail(NBD_EPERM, "the export is read-only"));
    }
    let (offset, length) = (request.offset, u64::from(request.length));
    match request.command {
        NBD_CMD_WRITE => {
            check_range(session, request, NBD_ENOSPC)?;
            disk.write_at(offset, payload)
                .map_err(|e| disk_error("write", &e))?;
        }
        NBD_CMD_WRITE_ZEROES => {
            check_range(session, request, NBD_ENOSPC)?;
            // With or without NO_HOLE: the disk only promises zeroes.
            disk.write_zeroes(offset, length)
                .map_err(|e| disk_error("write zeroes", &e))?;
        }
        _ => {
            check_range(session, request, NBD_EINVAL)?;
            disk.trim(offset, length)
                .map_err(|e| disk_error("trim", &e))?;
        }
    }
    if request.flags & NBD_CMD_FLAG_FUA != 0 {
        disk.flush().map_err(|e| disk_error("flush", &e))?;
    }
    Ok(success(request))
}

/// Checks a READ or BLOCK_STATUS range: inside the export, not empty, and
/// (for reads) not larger than the maximum block size.
fn check_query(session: &Session, request: &Request) -> Result<(), Failure> {
    check_range(session, request, NBD_EINVAL)?;
    if request.length == 0 {
        return Err(fail(NBD_EINVAL, "request of length 0"));
    }
    if request.command == NBD_CMD_READ && request.length > DEFAULT_MAX_IO {
        let errno = if session.structured {
            NBD_EOVERFLOW
        } else {
            NBD_EINVAL
        };
        return Err(fail(
            errno,
            format!(
                "read of {} bytes exceeds the {DEFAULT_MAX_IO}-byte maximum",
                request.length
            ),
        ));
    }
    Ok(())
}

/// One piece of a read reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    length: u64,
    hole: bool,
}

fn read(session: &Session, request: &Request) -> Result<Vec<u8>, Failure> {
    check_query(session, request)?;
    let disk = &*session.export.disk;
    let length = u64::from(request.length);
    if !session.structured {
        let mut out = encode_simple_reply(0, request.cookie).to_vec();
        out.resize(16 + request.length as usize, 0);
        disk.read_at(request.offset, &mut out[16..])
            .map_err(|e| disk_error("read", &e))?;
        return Ok(out);
    }
    let whole = [Segment {
        offset: request.offset,
        length,
        hole: false,
    }];
    let segments = if request.flags & NBD_CMD_FLAG_DF != 0 {
        whole.to_vec()
    } else {
        read_segments(disk, request.offset, length).unwrap_or_else(|_| whole.to_vec())
    };
    let mut out = Vec::with_capacity(request.length as usize + 32 * segments.len());
    for (i, segment) in segments.iter().enumerate() {
        push_segment(
            disk,
            &mut out,
            request.cookie,
            segment,
            i + 1 == segments.len(),
        )?;
    }
    Ok(out)
}

fn push_segment(
    disk: &dyn super::ExportDisk,
    out: &mut Vec<u8>,
    cookie: u64,
    segment: &Segment,
    done: bool,
) -> Result<(), Failure> {
    // Segments lie within one request, whose length is a u32.
    let size = u32::try_from(segment.length).unwrap_or(u32::MAX);
    if segment.hole {
        push_hole_chunk(out, cookie, segment.offset, size, done);
        return Ok(());
    }
    push_data_chunk_header(out, cookie, segment.offset, size, done);
    let start = out.len();
    out.resize(start + size as usize, 0);
    disk.read_at(segment.offset, &mut out[start..])
        .map_err(|e| disk_error("read", &e))
}

/// Splits a read into data and zero-hole segments from the disk's
/// allocation: at most [`MAX_READ_CHUNKS`], small holes sent as data.
fn read_segments(
    disk: &dyn super::ExportDisk,
    offset: u64,
    length: u64,
) -> io::Result<Vec<Segment>> {
    let mut segments: Vec<Segment> = Vec::new();
    let end = offset + length;
    walk_allocation(disk, offset, length, |start, len, a| {
        let hole = a.zero && len >= MIN_HOLE_CHUNK;
        let full = segments.len() == MAX_READ_CHUNKS - 1;
        match segments.last_mut() {
            Some(last) if last.hole == hole => last.length += len,
            _ if full => return false,
            _ => segments.push(Segment {
                offset: start,
                length: len,
                hole,
            }),
        }
        true
    })?;
    let covered = segments.last().map_or(offset, |s| s.offset + s.length);
    if covered < end {
        match segments.last_mut() {
            Some(last) if !last.hole => last.length += end - covered,
            _ => segments.push(Segment {
                offset: covered,
                length: end - covered,
                hole: false,
            }),
        }
    }
    Ok(segments)
}

/// Calls `f(offset, length, allocation)` for the extents of
/// `[offset, offset + length)` in order, each clipped to the range, until
/// `f` returns false, the range is covered, or [`MAX_ALLOCATION_CALLS`]
/// calls were made (the range may then be covered only in part).
fn walk_allocation(
    disk: &dyn super::ExportDisk,
    offset: u64,
    length: u64,
    mut f: impl FnMut(u64, u64, super::Allocation) -> bool,
) -> io::Result<()> {
    let end = offset + length;
    let mut position = offset;
    for _ in 0..MAX_ALLOCATION_CALLS {
        if position >= end {
            break;
        }
        let extents = disk.allocation(position, end - position)?;
        if extents.is_empty() {
            return Err(io::Error::other("the export reported no allocation extent"));
        }
        for extent in extents {
            if extent.length == 0 {
                return Err(io::Error::other(
                    "the export reported an allocation extent of length 0",
                ));
            }
            let len = extent.length.min(end - position);
            if !f(position, len, extent) {
                return Ok(());
            }
            position += len;
            if position >= end {
                break;
            }
        }
    }
    Ok(())
}

fn block_status(session: &Session, request: &Request) -> Result<Vec<u8>, Failure> {
    if !session.allocation {
        return Err(fail(
            NBD_EINVAL,
            "no metadata context was selected for block status",
        ));
    }
    check_query(session, request)?;
    let max = if request.flags & NBD_CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    let disk = &*session.export.disk;
    let mut descriptors: Vec<Descriptor> = Vec::new();
    walk_allocation(
        disk,
        request.offset,
        u64::from(request.length),
        |_, len, a| {
            let flags = allocation_flags(a);
            // Clipped to the request, whose length is a u32.
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            let full = descriptors.len() == max;
            match descriptors.last_mut() {
                Some(last) if last.flags == flags => {
                    last.length = last.length.saturating_add(len);
                    true
                }
                _ if full => false,
                _ => {
                    descriptors.push(Descriptor { length: len, flags });
                    true
                }
            }
        },
    )
    .map_err(|e| disk_error("block status", &e))?;
    if descriptors.is_empty() {
        return Err(fail(NBD_EIO, "the export reported no allocation"));
    }
    let mut out = Vec::with_capacity(20 + 4 + 8 * descriptors.len());
    push_block_status_chunk(
        &mut out,
        request.cookie,
        BASE_ALLOCATION_ID,
        &descriptors,
        true,
    );
    Ok(out)
}

fn allocation_flags(a: super::Allocation) -> u32 {
    let mut flags = 0;
    if a.hole {
        flags |= NBD_STATE_HOLE;
    }
    if a.zero {
        flags |= NBD_STATE_ZERO;
    }
    flags
}
