//! The server against our own client, raw client bytes, and random bytes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;

use proptest::prelude::*;

use super::*;
use crate::fuzzing::{self, client_prelude, MemoryDisk, ScriptedStream};
use crate::nbd::proto::*;
use crate::nbd::{ConnectOptions, NbdClient, BASE_ALLOCATION};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 253) as u8 ^ seed | 1)
        .collect::<Vec<_>>()
}

/// 1 MiB: data, a 256 KiB hole, data, a hole to the end.
fn sample() -> Vec<u8> {
    let mut data = vec![0u8; 1 << 20];
    data[..256 * 1024].copy_from_slice(&pattern(256 * 1024, 7));
    data[512 * 1024..520 * 1024].copy_from_slice(&pattern(8 * 1024, 9));
    data
}

fn server_with(disk: Arc<MemoryDisk>, name: &str) -> NbdServer {
    let mut server = NbdServer::new();
    server.add_export(name, "sample disk", disk).unwrap();
    server
}

fn opts(name: &str) -> ConnectOptions {
    ConnectOptions {
        export_name: name.into(),
        ..ConnectOptions::default()
    }
}

/// Runs `f` with a client connected over a socket pair to `serve_connection`.
fn with_client<T>(
    server: &NbdServer,
    options: &ConnectOptions,
    f: impl FnOnce(crate::Result<NbdClient<UnixStream>>) -> T,
) -> T {
    let (ours, theirs) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        let served = s.spawn(|| server.serve_connection(theirs));
        let out = f(NbdClient::handshake(ours, options));
        let _ = served.join().unwrap();
        out
    })
}

#[test]
fn reads_whole_and_across_holes_with_and_without_structured_replies() {
    let data = sample();
    let server = server_with(Arc::new(MemoryDisk::new(data.clone(), false)), "d");
    for structured in [true, false] {
        let options = ConnectOptions {
            structured_replies: structured,
            meta_contexts: vec![],
            ..opts("d")
        };
        with_client(&server, &options, |client| {
            let mut client = client.unwrap();
            assert_eq!(client.size(), data.len() as u64);
            assert!(client.export().flags.read_only());
            assert!(client.export().flags.can_multi_conn());
            assert_eq!(client.export().structured_replies, structured);
            let mut all = vec![0u8; data.len()];
            client.read_at(&mut all, 0).unwrap();
            assert_eq!(all, data);
            let mut piece = vec![0u8; 300 * 1024];
            client.read_at(&mut piece, 200 * 1024 + 3).unwrap();
            assert_eq!(piece[..], data[200 * 1024 + 3..500 * 1024 + 3]);
            client.disconnect().unwrap();
        });
    }
}

#[test]
fn default_export_is_the_first_one() {
    let data = sample();
    let mut server = server_with(Arc::new(MemoryDisk::new(data.clone(), false)), "first");
    let other = Arc::new(MemoryDisk::new(vec![1; 4096], false));
    server.add_export("second", "", other.clone()).unwrap();
    assert!(server.add_export("second", "", other.clone()).is_err());
    assert!(server.add_export("", "", other.clone()).is_err());
    assert!(server.add_export("a\0b", "", other.clone()).is_err());
    assert!(server.add_export(&"x".repeat(5000), "", other).is_err());
    with_client(&server, &opts(""), |client| {
        assert_eq!(client.unwrap().size(), data.len() as u64);
    });
    with_client(&server, &opts("second"), |client| {
        assert_eq!(client.unwrap().size(), 4096);
    });
}

#[test]
fn block_status_reports_holes_and_data() {
    let server = server_with(Arc::new(MemoryDisk::new(sample(), false)), "d");
    with_client(&server, &opts("d"), |client| {
        let mut client = client.unwrap();
        let id = client.context_id(BASE_ALLOCATION).unwrap();
        let extents = client.block_status_range(id, 0, 1 << 20).unwrap();
        let summary: Vec<_> = extents
            .iter()
            .map(|e| (e.offset / 1024, e.length / 1024, e.flags))
            .collect();
        let hole = NBD_STATE_HOLE | NBD_STATE_ZERO;
        assert_eq!(
            summary,
            [(0, 256, 0), (256, 256, hole), (512, 8, 0), (520, 504, hole)]
        );
        let one = client.block_status(id, 250 * 1024, 100 * 1024).unwrap();
        assert_eq!(one[0].offset, 250 * 1024);
        assert_eq!(one[0].flags, 0);
    });
}

#[test]
fn writes_zeroes_trim_and_flush_land_in_the_disk() {
    let disk = Arc::new(MemoryDisk::new(vec![0u8; 1 << 20], true));
    let server = server_with(disk.clone(), "w");
    let data = pattern(100_000, 3);
    with_client(&server, &opts("w"), |client| {
        let mut client = client.unwrap();
        assert!(!client.export().flags.read_only());
        client.write_at(&data, 4096).unwrap();
        client.write_at(&[0xee; 10_000], 300_000).unwrap();
        client.write_zeroes(302_000, 1000, true).unwrap();
        client.trim(309_000, 500).unwrap();
        client.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        client.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        client.disconnect().unwrap();
    });
    let contents = disk.contents();
    assert_eq!(contents[4096..4096 + data.len()], data[..]);
    assert!(contents[300_000..302_000].iter().all(|&b| b == 0xee));
    assert!(contents[302_000..303_000].iter().all(|&b| b == 0));
    assert!(contents[303_000..309_000].iter().all(|&b| b == 0xee));
    assert!(contents[309_000..309_500].iter().all(|&b| b == 0));
    assert!(disk.flushes() >= 1);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let server = server_with(Arc::new(MemoryDisk::new(sample(), false)), "ro");
    let mut raw = Raw::connect(&server, "ro", true);
    for command in [NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM] {
        let payload = if command == NBD_CMD_WRITE {
            vec![1; 512]
        } else {
            vec![]
        };
        let (errno, message) = raw.request(command, 0, 0, 512, &payload);
        assert_eq!(errno, NBD_EPERM, "{message}");
        assert!(message.contains("read-only"), "{message}");
    }
    assert_eq!(raw.request(NBD_CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    raw.finish();
}

#[test]
fn unknown_export_is_refused_with_a_message() {
    let server = server_with(Arc::new(MemoryDisk::new(sample(), false)), "d");
    with_client(&server, &opts("nope"), |client| match client {
        Err(crate::Error::OptionRejected { reply, message, .. }) => {
            assert!(reply.contains("NBD_REP_ERR_UNKNOWN"), "{reply}");
            assert!(message.contains("nope"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(drop)),
    });
}

#[test]
fn list_names_every_export_with_its_description() {
    let mut server = server_with(Arc::new(MemoryDisk::new(sample(), false)), "alpha");
    let disk = Arc::new(MemoryDisk::new(vec![0; 512], true));
    server.add_export("beta", "the second", disk).unwrap();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        s.spawn(|| server.serve_connection(theirs));
        let mut greeting = [0u8; GREETING_LEN];
        ours.read_exact(&mut greeting).unwrap();
        assert_eq!(parse_greeting(&greeting).unwrap(), SERVER_HANDSHAKE_FLAGS);
        ours.write_all(&3u32.to_be_bytes()).unwrap();
        ours.write_all(&encode_option(NBD_OPT_LIST, &[]).unwrap())
            .unwrap();
        let mut entries = Vec::new();
        loop {
            let (header, payload) = read_option_reply(&mut ours, NBD_OPT_LIST);
            if header.reply_type == NBD_REP_ACK {
                break;
            }
            assert_eq!(header.reply_type, NBD_REP_SERVER);
            let len = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
            let name = String::from_utf8(payload[4..4 + len].to_vec()).unwrap();
            let description = String::from_utf8(payload[4 + len..].to_vec()).unwrap();
            entries.push((name, description));
        }
        assert_eq!(
            entries,
            [
                ("alpha".to_owned(), "sample disk".to_owned()),
                ("beta".to_owned(), "the second".to_owned())
            ]
        );
        // An unknown option is refused, the handshake goes on.
        ours.write_all(&encode_option(99, b"xyz").unwrap()).unwrap();
        let (header, _) = read_option_reply(&mut ours, 99);
        assert_eq!(header.reply_type, NBD_REP_ERR_UNSUP);
        ours.write_all(&encode_option(NBD_OPT_STARTTLS, &[]).unwrap())
            .unwrap();
        let (header, _) = read_option_reply(&mut ours, NBD_OPT_STARTTLS);
        assert_eq!(header.reply_type, NBD_REP_ERR_UNSUP);
        // Listing metadata contexts with the "base:" query.
        let q = encode_meta_context_query("beta", &["base:".to_owned()]).unwrap();
        ours.write_all(&encode_option(NBD_OPT_LIST_META_CONTEXT, &q).unwrap())
            .unwrap();
        let (header, payload) = read_option_reply(&mut ours, NBD_OPT_LIST_META_CONTEXT);
        assert_eq!(header.reply_type, NBD_REP_META_CONTEXT);
        assert_eq!(parse_meta_context(&payload).unwrap().1, BASE_ALLOCATION);
        let (header, _) = read_option_reply(&mut ours, NBD_OPT_LIST_META_CONTEXT);
        assert_eq!(header.reply_type, NBD_REP_ACK);
        ours.write_all(&encode_option(NBD_OPT_ABORT, &[]).unwrap())
            .unwrap();
        let (header, _) = read_option_reply(&mut ours, NBD_OPT_ABORT);
        assert_eq!(header.reply_type, NBD_REP_ACK);
    });
}

fn read_option_reply(s: &mut UnixStream, option: u32) -> (OptionReplyHeader, Vec<u8>) {
    let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut header).unwrap();
    let header = parse_option_reply_header(&header, option).unwrap();
    let mut payload = vec![0u8; header.length as usize];
    s.read_exact(&mut payload).unwrap();
    (header, payload)
}

/// A hand-driven client in transmission phase, for requests our client
/// never sends.
struct Raw {
    stream: UnixStream,
    structured: bool,
    cookie: u64,
    served: thread::JoinHandle<crate::Result<()>>,
}

impl Raw {
    fn connect(server: &NbdServer, name: &str, structured: bool) -> Raw {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let server = server.clone();
        let handle = thread::spawn(move || server.serve_connection(theirs));
        // Greeting, then the prelude's replies, are read and checked lightly.
        ours.write_all(&client_prelude(name, structured)).unwrap();
        let mut greeting = [0u8; GREETING_LEN];
        ours.read_exact(&mut greeting).unwrap();
        if structured {
            for option in [
                NBD_OPT_STRUCTURED_REPLY,
                NBD_OPT_SET_META_CONTEXT,
                NBD_OPT_SET_META_CONTEXT,
            ] {
                read_option_reply(&mut ours, option);
            }
            loop {
                let (header, _) = read_option_reply(&mut ours, NBD_OPT_GO);
                if header.reply_type == NBD_REP_ACK {
                    break;
                }
                assert_eq!(header.reply_type, NBD_REP_INFO);
            }
        } else {
            let mut reply = [0u8; 10];
            ours.read_exact(&mut reply).unwrap();
        }
        Raw {
            stream: ours,
            structured,
            cookie: 0,
            served: handle,
        }
    }

    /// Sends one request; returns its error value and message (data is
    /// skipped).
    fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> (u32, String) {
        self.cookie += 1;
        let request = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        self.stream.write_all(&encode_request(&request)).unwrap();
        self.stream.write_all(payload).unwrap();
        if self.structured {
            self.structured_reply()
        } else {
            let mut reply = [0u8; 16];
            self.stream.read_exact(&mut reply).unwrap();
            let simple = parse_simple_reply(&reply[4..]).unwrap();
            assert_eq!(simple.cookie, self.cookie);
            if simple.error == 0 && command == NBD_CMD_READ {
                let mut data = vec![0u8; length as usize];
                self.stream.read_exact(&mut data).unwrap();
            }
            (simple.error, String::new())
        }
    }

    fn structured_reply(&mut self) -> (u32, String) {
        let mut result = (0, String::new());
        loop {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic).unwrap();
            let chunk = match parse_reply_magic(magic).unwrap() {
                ReplyKind::Simple => {
                    let mut rest = [0u8; SIMPLE_REPLY_REST_LEN];
                    self.stream.read_exact(&mut rest).unwrap();
                    let simple = parse_simple_reply(&rest).unwrap();
                    assert_eq!(simple.cookie, self.cookie);
                    return (simple.error, String::new());
                }
                ReplyKind::Structured => {
                    let mut rest = [0u8; CHUNK_HEADER_REST_LEN];
                    self.stream.read_exact(&mut rest).unwrap();
                    parse_chunk_header(&rest).unwrap()
                }
            };
            assert_eq!(chunk.cookie, self.cookie);
            let mut payload = vec![0u8; chunk.length as usize];
            self.stream.read_exact(&mut payload).unwrap();
            if chunk.chunk_type & NBD_REPLY_TYPE_ERROR_BIT != 0 {
                let e = parse_error_chunk(chunk.chunk_type, &payload).unwrap();
                result = (e.errno, e.message);
            }
            if chunk.done() {
                return result;
            }
        }
    }

    /// Disconnects and waits for the server's end of the connection.
    fn finish(mut self) {
        let disc = Request {
            flags: 0,
            command: NBD_CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        self.stream.write_all(&encode_request(&disc)).unwrap();
        self.served.join().unwrap().unwrap();
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

#[test]
fn bad_ranges_and_sizes_get_errors_and_the_connection_goes_on() {
    let disk = Arc::new(MemoryDisk::new(sample(), true).with_broken_range(100 * 1024, 512));
    let server = server_with(disk, "d");
    let end = 1u64 << 20;
    let mut raw = Raw::connect(&server, "d", true);
    assert_eq!(
        raw.request(NBD_CMD_READ, 0, end - 10, 20, &[]).0,
        NBD_EINVAL
    );
    assert_eq!(raw.request(NBD_CMD_READ, 0, u64::MAX, 2, &[]).0, NBD_EINVAL);
    assert_eq!(raw.request(NBD_CMD_READ, 0, 0, 0, &[]).0, NBD_EINVAL);
    assert_eq!(
        raw.request(NBD_CMD_WRITE, 0, end - 1, 2, &[1, 2]).0,
        NBD_ENOSPC
    );
    assert_eq!(
        raw.request(NBD_CMD_WRITE_ZEROES, 0, end, 1, &[]).0,
        NBD_ENOSPC
    );
    assert_eq!(
        raw.request(NBD_CMD_BLOCK_STATUS, 0, end, 1, &[]).0,
        NBD_EINVAL
    );
    assert_eq!(
        raw.request(NBD_CMD_WRITE_ZEROES, 1 << 4, 0, 1, &[]).0,
        NBD_EINVAL
    );
    assert_eq!(raw.request(42, 0, 0, 1, &[]).0, NBD_EINVAL);
    let (errno, message) = raw.request(NBD_CMD_READ, 0, 99 * 1024, 4096, &[]);
    assert_eq!(errno, NBD_EIO);
    assert!(message.contains("sector on fire"), "{message}");
    // DF: one data chunk, even across holes.
    assert_eq!(
        raw.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 200 * 1024, 600_000, &[])
            .0,
        0
    );
    assert_eq!(
        raw.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 8, 2, &[5, 6])
            .0,
        0
    );
    raw.finish();

    let mut simple = Raw::connect(&server, "d", false);
    assert_eq!(simple.request(NBD_CMD_READ, 0, end, 1, &[]).0, NBD_EINVAL);
    assert_eq!(
        simple
            .request(NBD_CMD_READ, 0, 0, DEFAULT_MAX_IO + 1, &[])
            .0,
        NBD_EINVAL
    );
    assert_eq!(
        simple.request(NBD_CMD_BLOCK_STATUS, 0, 0, 512, &[]).0,
        NBD_EINVAL
    );
    assert_eq!(simple.request(NBD_CMD_READ, 0, 0, 4096, &[]).0, 0);
    simple.finish();
}

#[test]
fn a_write_too_long_to_read_closes_the_connection() {
    let server = server_with(Arc::new(MemoryDisk::new(sample(), true)), "d");
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        let served = s.spawn(|| server.serve_connection(theirs));
        ours.write_all(&client_prelude("d", false)).unwrap();
        let request = Request {
            flags: 0,
            command: NBD_CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: u32::MAX,
        };
        ours.write_all(&encode_request(&request)).unwrap();
        let err = served.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("write of"), "{err}");
    });
}

#[test]
fn many_connections_at_once_on_a_unix_socket_and_stop_ends_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let disk = Arc::new(MemoryDisk::new(vec![0u8; 1 << 20], true));
    let server = server_with(disk.clone(), "d");
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let serving = s.spawn(|| server.serve_unix(listener, &stop));
        let clients: Vec<_> = (0..6u8)
            .map(|i| {
                let path = path.clone();
                s.spawn(move || {
                    let mut client = NbdClient::connect_unix(&path, &opts("d")).unwrap();
                    let data = pattern(128 * 1024, i);
                    let at = u64::from(i) * 128 * 1024;
                    client.write_at(&data, at).unwrap();
                    client.flush().unwrap();
                    let mut back = vec![0u8; data.len()];
                    client.read_at(&mut back, at).unwrap();
                    assert_eq!(back, data);
                    client.disconnect().unwrap();
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        // One client stays connected, idle: stop must still end serving.
        let _idle = NbdClient::connect_unix(&path, &opts("d")).unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        serving.join().unwrap().unwrap();
    });
    let contents = disk.contents();
    for i in 0..6u8 {
        let at = usize::from(i) * 128 * 1024;
        assert_eq!(contents[at..at + 128 * 1024], pattern(128 * 1024, i)[..]);
    }
}

#[test]
fn scripted_preludes_reach_transmission() {
    // A read of 4 KiB after each prelude gets a reply.
    for selector in 1..=3u8 {
        let mut input = vec![selector];
        let read = Request {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 5,
            offset: 0,
            length: 4096,
        };
        input.extend_from_slice(&encode_request(&read));
        assert!(fuzzing::server(&input).is_ok(), "selector {selector}");
    }
    let mut stream = ScriptedStream::new(&[0, 0, 0, 3]);
    let _ = fuzzing::test_server().serve_connection(&mut stream);
    assert_eq!(parse_greeting(&stream.written[..GREETING_LEN]).unwrap(), 3);
}

/// Requests built from a few shapes, so random cases reach the commands.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    let request = (
        0u16..16,
        0u16..32,
        0u64..300 * 1024,
        0u32..70_000,
        any::<bool>(),
    )
        .prop_map(|(flags, command, offset, length, with_payload)| {
            let command = command % 9;
            let r = Request {
                flags,
                command,
                cookie: offset,
                offset,
                length,
            };
            let mut out = encode_request(&r).to_vec();
            if command == NBD_CMD_WRITE && with_payload {
                out.resize(out.len() + length as usize, 0xa5);
            }
            out
        });
    proptest::collection::vec(request, 0..6).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_client_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = fuzzing::server(&data);
    }

    #[test]
    fn arbitrary_requests_never_panic(selector in 1u8..4, requests in request_bytes(), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut data = vec![selector];
        data.extend_from_slice(&requests);
        data.extend_from_slice(&tail);
        let _ = fuzzing::server(&data);
    }
}

#[test]
fn serves_tcp_too() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let data = sample();
    let server = server_with(Arc::new(MemoryDisk::new(data.clone(), false)), "d");
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let serving = s.spawn(|| server.serve_tcp(listener, &stop));
        let mut client = NbdClient::connect_tcp(&address, &opts("d")).unwrap();
        let mut back = vec![0u8; data.len()];
        client.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        client.disconnect().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        serving.join().unwrap().unwrap();
    });
}
