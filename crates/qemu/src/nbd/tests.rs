//! The client against scripted server bytes: well-behaved and hostile.

use proptest::prelude::*;

use super::proto::*;
use super::reply::Coverage;
use super::*;
use crate::fuzzing::{self, ScriptedStream};

/// Builds what a server would send.
#[derive(Default)]
struct Server(Vec<u8>);

impl Server {
    fn greeting(mut self, flags: u16) -> Self {
        self.0.extend_from_slice(&NBDMAGIC.to_be_bytes());
        self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self
    }

    fn opt(mut self, option: u32, reply_type: u32, payload: &[u8]) -> Self {
        self.0.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&option.to_be_bytes());
        self.0.extend_from_slice(&reply_type.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }

    fn info_export(self, size: u64, flags: u16) -> Self {
        let mut p = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        self.opt(NBD_OPT_GO, NBD_REP_INFO, &p)
    }

    fn context(self, id: u32, name: &str) -> Self {
        let p = [&id.to_be_bytes()[..], name.as_bytes()].concat();
        self.opt(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, &p)
    }

    fn simple(mut self, error: u32, cookie: u64) -> Self {
        self.0.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&error.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self
    }

    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn chunk(mut self, done: bool, chunk_type: u16, cookie: u64, payload: &[u8]) -> Self {
        self.0
            .extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&u16::from(done).to_be_bytes());
        self.0.extend_from_slice(&chunk_type.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }

    fn data(self, cookie: u64, offset: u64, bytes: &[u8], done: bool) -> Self {
        let p = [&offset.to_be_bytes()[..], bytes].concat();
        self.chunk(done, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &p)
    }

    fn hole(self, cookie: u64, offset: u64, len: u32, done: bool) -> Self {
        let p = [&offset.to_be_bytes()[..], &len.to_be_bytes()].concat();
        self.chunk(done, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, &p)
    }

    fn none(self, cookie: u64) -> Self {
        self.chunk(true, NBD_REPLY_TYPE_NONE, cookie, &[])
    }

    fn status(self, cookie: u64, context: u32, descriptors: &[(u32, u32)], done: bool) -> Self {
        let mut p = context.to_be_bytes().to_vec();
        for (len, flags) in descriptors {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        self.chunk(done, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, &p)
    }

    fn error(
        self,
        cookie: u64,
        errno: u32,
        message: &str,
        offset: Option<u64>,
        done: bool,
    ) -> Self {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(message.len() as u16).to_be_bytes());
        p.extend_from_slice(message.as_bytes());
        let chunk_type = match offset {
            Some(o) => {
                p.extend_from_slice(&o.to_be_bytes());
                NBD_REPLY_TYPE_ERROR_OFFSET
            }
            None => NBD_REPLY_TYPE_ERROR,
        };
        self.chunk(done, chunk_type, cookie, &p)
    }
}

const FLAGS: u16 =
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
const STRUCTURED: u8 = 1;
const SMALL_MAX: u8 = 2;

fn handshake(server: &Server) -> Result<NbdClient<ScriptedStream<'_>>> {
    NbdClient::handshake(ScriptedStream::new(&server.0), &ConnectOptions::default())
}

fn good_handshake() -> Server {
    Server::default()
        .greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        .opt(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])
        .context(5, "base:allocation")
        .opt(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[])
        .info_export(1 << 30, FLAGS)
        .opt(NBD_OPT_GO, NBD_REP_ACK, &[])
}

fn protocol_message<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::Protocol(m)) => m,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// The requests the client wrote: (command, cookie, offset, length).
fn requests(written: &[u8]) -> Vec<(u16, u64, u64, u32)> {
    let mut out = Vec::new();
    let mut rest = written;
    while rest.len() >= REQUEST_LEN {
        assert_eq!(&rest[..4], &REQUEST_MAGIC.to_be_bytes());
        let command = u16::from_be_bytes([rest[6], rest[7]]);
        let cookie = u64::from_be_bytes(rest[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(rest[16..24].try_into().unwrap());
        let length = u32::from_be_bytes(rest[24..28].try_into().unwrap());
        out.push((command, cookie, offset, length));
        let payload = if command == NBD_CMD_WRITE {
            length as usize
        } else {
            0
        };
        rest = &rest[REQUEST_LEN + payload..];
    }
    out
}

#[test]
fn handshake_negotiates_everything() {
    let server = good_handshake();
    let client = handshake(&server).unwrap();
    assert_eq!(client.size(), 1 << 30);
    assert!(client.export().structured_replies);
    assert!(client.export().flags.can_flush());
    assert!(!client.export().flags.read_only());
    assert_eq!(client.context_id(BASE_ALLOCATION), Some(5));
    assert_eq!(client.max_io(), DEFAULT_MAX_IO);
    let written = &client.stream().written;
    assert_eq!(
        &written[..4],
        &(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes()
    );
}

#[test]
fn handshake_reports_an_unknown_export_with_the_servers_words() {
    let server = Server::default()
        .greeting(NBD_FLAG_FIXED_NEWSTYLE)
        .opt(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])
        .opt(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[])
        .opt(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"export 'x' not present");
    let err = handshake(&server).unwrap_err().to_string();
    assert_eq!(
        err,
        "NBD server refused NBD_OPT_GO for export '': NBD_REP_ERR_UNKNOWN (export not available): export 'x' not present"
    );
}

#[test]
fn handshake_without_structured_replies_skips_contexts() {
    let server = Server::default()
        .greeting(NBD_FLAG_FIXED_NEWSTYLE)
        .opt(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_UNSUP, &[])
        .info_export(4096, NBD_FLAG_HAS_FLAGS)
        .opt(NBD_OPT_GO, NBD_REP_ACK, &[]);
    let client = handshake(&server).unwrap();
    assert!(!client.export().structured_replies);
    assert!(client.meta_contexts().is_empty());
}

#[test]
fn handshake_falls_back_to_export_name() {
    let mut server = Server::default()
        .greeting(NBD_FLAG_FIXED_NEWSTYLE)
        .opt(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_UNSUP, &[])
        .opt(NBD_OPT_GO, NBD_REP_ERR_UNSUP, &[])
        .raw(&8192u64.to_be_bytes())
        .raw(&NBD_FLAG_HAS_FLAGS.to_be_bytes());
    server = server.raw(&[0; 124]);
    let client = handshake(&server).unwrap();
    assert_eq!(client.size(), 8192);
}

#[test]
fn handshake_rejects_broken_servers() {
    let no_export = Server::default()
        .greeting(NBD_FLAG_FIXED_NEWSTYLE)
        .opt(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])
        .opt(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[])
        .opt(NBD_OPT_GO, NBD_REP_ACK, &[]);
    assert!(protocol_message(handshake(&no_export)).contains("without NBD_INFO_EXPORT"));

    let duplicate_context = Server::default()
        .greeting(NBD_FLAG_FIXED_NEWSTYLE)
        .opt(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])
        .context(1, "base:allocation")
        .context(1, "qemu:dirty-bitmap:x");
    assert!(protocol_message(handshake(&duplicate_context)).contains("repeats"));

    let wrong_option =
        Server::default()
            .greeting(NBD_FLAG_FIXED_NEWSTYLE)
            .opt(NBD_OPT_LIST, NBD_REP_ACK, &[]);
    assert!(protocol_message(handshake(&wrong_option)).contains("NBD_OPT_LIST"));

    let ack_with_data = Server::default().greeting(NBD_FLAG_FIXED_NEWSTYLE).opt(
        NBD_OPT_STRUCTURED_REPLY,
        NBD_REP_ACK,
        &[1],
    );
    assert!(protocol_message(handshake(&ack_with_data)).contains("carries 1 bytes"));

    let cut = good_handshake();
    let truncated = Server(cut.0[..cut.0.len() - 3].to_vec());
    let err = handshake(&truncated).unwrap_err().to_string();
    assert!(err.contains("closed the connection"), "{err}");
}

#[test]
fn structured_read_assembles_data_and_holes_in_any_order() {
    let server = Server::default()
        .data(1, 3000, &[7; 1000], false)
        .hole(1, 1000, 2000, false)
        .data(1, 0, &[9; 1000], false)
        .none(1);
    let mut client = fuzzing::client(STRUCTURED, &server.0);
    let mut buf = vec![0xff; 4000];
    client.read_at(&mut buf, 0).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 9));
    assert!(buf[1000..3000].iter().all(|&b| b == 0));
    assert!(buf[3000..].iter().all(|&b| b == 7));
}

#[test]
fn simple_read_returns_data() {
    let server = Server::default().simple(0, 1).raw(&[5; 512]);
    let mut client = fuzzing::client(0, &server.0);
    let mut buf = [0; 512];
    client.read_at(&mut buf, 512).unwrap();
    assert_eq!(buf, [5; 512]);
    assert_eq!(
        requests(&client.stream().written),
        vec![(NBD_CMD_READ, 1, 512, 512)]
    );
}

#[test]
fn large_reads_are_split_at_the_maximum_block_size() {
    let server = Server::default()
        .data(1, 0, &[1; 65536], true)
        .data(2, 65536, &[2; 34464], true);
    let mut client = fuzzing::client(STRUCTURED | SMALL_MAX, &server.0);
    let mut buf = vec![0; 100_000];
    client.read_at(&mut buf, 0).unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 1) && buf[65536..].iter().all(|&b| b == 2));
    assert_eq!(
        requests(&client.stream().written),
        vec![(NBD_CMD_READ, 1, 0, 65536), (NBD_CMD_READ, 2, 65536, 34464)]
    );
}

#[test]
fn read_errors_carry_the_message_and_keep_the_connection() {
    let server = Server::default()
        .error(1, NBD_EIO, "sector 7 unreadable", Some(3584), false)
        .hole(1, 0, 512, true)
        .data(2, 0, &[1; 512], true);
    let mut client = fuzzing::client(STRUCTURED, &server.0);
    let mut buf = [0; 4096];
    let err = client.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "NBD NBD_CMD_READ failed: NBD_EIO (input/output error): sector 7 unreadable"
    );
    assert_eq!(std::io::Error::from(err).kind(), std::io::ErrorKind::Other);
    client.read_at(&mut buf[..512], 0).unwrap();
    assert_eq!(buf[..512], [1; 512]);
}

#[test]
fn hostile_read_replies_are_refused_and_poison_the_connection() {
    let cases: Vec<(&str, Server)> = vec![
        (
            "overlaps",
            Server::default()
                .data(1, 0, &[1; 600], false)
                .hole(1, 512, 512, true),
        ),
        (
            "outside the request",
            Server::default().data(1, 4000, &[1; 200], true),
        ),
        (
            "outside the request",
            Server::default().hole(1, u64::MAX - 10, 100, true),
        ),
        (
            "covered 512 of 4096",
            Server::default().data(1, 0, &[1; 512], true),
        ),
        ("cookie", Server::default().data(9, 0, &[1; 4096], true)),
        (
            "simple reply to NBD_CMD_READ",
            Server::default().simple(0, 1),
        ),
        (
            "unexpected NBD_REPLY_TYPE_BLOCK_STATUS",
            Server::default().status(1, 1, &[(512, 0)], true),
        ),
        (
            "chunk type 0x0077",
            Server::default().chunk(true, 0x77, 1, &[]),
        ),
        (
            "without NBD_REPLY_FLAG_DONE",
            Server::default().chunk(false, NBD_REPLY_TYPE_NONE, 1, &[]),
        ),
        (
            "invalid payload length 3",
            Server::default().chunk(true, NBD_REPLY_TYPE_OFFSET_DATA, 1, &[0; 3]),
        ),
        (
            "exceeds",
            Server::default()
                .raw(&STRUCTURED_REPLY_MAGIC.to_be_bytes())
                .raw(&[0, 1, 0x80, 1])
                .raw(&1u64.to_be_bytes())
                .raw(&u32::MAX.to_be_bytes()),
        ),
        (
            "error offset",
            Server::default().error(1, NBD_EIO, "", Some(5000), true),
        ),
        (
            "bad reply magic",
            Server::default().raw(b"HTTP/1.1 200 OK\r\n"),
        ),
    ];
    for (expected, server) in cases {
        let mut client = fuzzing::client(STRUCTURED, &server.0);
        let mut buf = vec![0; 4096];
        let m = protocol_message(client.read_at(&mut buf, 0));
        assert!(m.contains(expected), "expected {expected:?} in {m:?}");
        let again = protocol_message(client.read_at(&mut buf, 0));
        assert!(again.contains("abandoned"), "{again}");
    }
}

#[test]
fn truncated_data_is_an_io_error() {
    let server = Server::default().data(1, 0, &[1; 4096], true);
    let mut client = fuzzing::client(STRUCTURED, &server.0[..server.0.len() - 1]);
    let err = client.read_at(&mut [0; 4096], 0).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("closed the connection while sending read data"),
        "{err}"
    );
}

#[test]
fn requests_past_the_end_are_refused_before_sending() {
    let mut client = fuzzing::client(STRUCTURED, &[]);
    let err = client
        .read_at(&mut [0; 2], fuzzing::EXPORT_SIZE - 1)
        .unwrap_err();
    // Issue 11: the engine asked wrongly, a bug, not the user's mistake.
    assert!(matches!(err, Error::Internal(_)), "{err}");
    assert!(client.block_status(1, u64::MAX, 1).is_err());
    assert!(client.stream().written.is_empty());
}

#[test]
fn block_status_returns_the_wanted_context() {
    let server = Server::default()
        .status(1, 7, &[(1 << 20, 1)], false)
        .status(1, 1, &[(4096, 3), (8192, 0)], true);
    let mut client = fuzzing::client(STRUCTURED, &server.0);
    let extents = client.block_status(1, 4096, 65536).unwrap();
    assert_eq!(
        extents,
        vec![
            BlockStatusExtent {
                offset: 4096,
                length: 4096,
                flags: 3
            },
            BlockStatusExtent {
                offset: 8192,
                length: 8192,
                flags: 0
            },
        ]
    );
}

#[test]
fn block_status_range_loops_until_covered_and_clamps() {
    let server = Server::default()
        .status(1, 1, &[(4096, 3)], false)
        .status(1, 7, &[(4096, 0)], true)
        .status(2, 1, &[(4096, 3), (1 << 20, 0)], false)
        .status(2, 7, &[(4096, 0)], true);
    let mut client = fuzzing::client(STRUCTURED, &server.0);
    let extents = client.block_status_range(1, 0, 65536).unwrap();
    assert_eq!(
        extents,
        vec![
            BlockStatusExtent {
                offset: 0,
                length: 8192,
                flags: 3
            },
            BlockStatusExtent {
                offset: 8192,
                length: 65536 - 8192,
                flags: 0
            },
        ]
    );
    assert_eq!(
        requests(&client.stream().written),
        vec![
            (NBD_CMD_BLOCK_STATUS, 1, 0, 65536),
            (NBD_CMD_BLOCK_STATUS, 2, 4096, 61440)
        ]
    );
}

#[test]
fn hostile_block_status_replies_are_refused() {
    let cases: Vec<(&str, Server)> = vec![
        (
            "lacks context id 7",
            Server::default().status(1, 1, &[(512, 0)], true),
        ),
        (
            "not negotiated",
            Server::default().status(1, 99, &[(512, 0)], true),
        ),
        (
            "second block status chunk",
            Server::default()
                .status(1, 1, &[(512, 0)], false)
                .status(1, 1, &[(512, 0)], true),
        ),
        (
            "past the requested",
            Server::default().status(1, 1, &[(65536, 0), (1, 0)], true),
        ),
        ("simple success reply", Server::default().simple(0, 1)),
        (
            "unexpected NBD_REPLY_TYPE_OFFSET_DATA",
            Server::default().data(1, 0, &[0; 4], true),
        ),
    ];
    for (expected, server) in cases {
        let mut client = fuzzing::client(STRUCTURED, &server.0);
        let m = protocol_message(client.block_status(1, 0, 65536));
        assert!(m.contains(expected), "expected {expected:?} in {m:?}");
    }
}

#[test]
fn block_status_needs_structured_replies_and_a_known_context() {
    let mut plain = fuzzing::client(0, &[]);
    assert!(matches!(
        plain.block_status(1, 0, 512),
        Err(Error::Unsupported(_))
    ));
    let mut client = fuzzing::client(STRUCTURED, &[]);
    assert!(matches!(
        client.block_status(3, 0, 512),
        Err(Error::Internal(_))
    ));
}

#[test]
fn writes_flushes_trims_and_zeroes_send_the_right_requests() {
    let server = Server::default().simple(0, 1).none(2).simple(0, 3).none(4);
    let mut client = fuzzing::client(STRUCTURED, &server.0);
    client.write_at(&[0xab; 5000], 4096).unwrap();
    client.flush().unwrap();
    client.trim(0, 4096).unwrap();
    client.write_zeroes(8192, 4096, true).unwrap();
    let err = client.write_at(&[1; 10], 0);
    assert!(err.is_err(), "the script ran out");
    let sent = requests(&client.stream().written);
    assert_eq!(
        sent[..4],
        [
            (NBD_CMD_WRITE, 1, 4096, 5000),
            (NBD_CMD_FLUSH, 2, 0, 0),
            (NBD_CMD_TRIM, 3, 0, 4096),
            (NBD_CMD_WRITE_ZEROES, 4, 8192, 4096),
        ]
    );
    let zero_flags = &client.stream().written[28 + 5000 + 28 * 2 + 4..][..2];
    assert_eq!(zero_flags, &NBD_CMD_FLAG_NO_HOLE.to_be_bytes());
}

#[test]
fn write_errors_from_the_server_are_reported() {
    let server = Server::default().simple(NBD_ENOSPC, 1);
    let mut client = fuzzing::client(STRUCTURED, &server.0);
    let err = client.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "NBD NBD_CMD_WRITE failed: NBD_ENOSPC (no space left on device)"
    );
}

#[test]
fn closing_sends_disc_once_and_ends_the_connection() {
    let mut client = fuzzing::client(STRUCTURED, &[]);
    client.close().unwrap();
    client.close().unwrap();
    assert_eq!(
        requests(&client.stream().written),
        vec![(NBD_CMD_DISC, 1, 0, 0)]
    );
    let err = client.read_at(&mut [0; 512], 0).unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
}

#[test]
fn coverage_detects_overlaps() {
    let mut c = Coverage::default();
    assert!(c.insert(10, 20));
    assert!(c.insert(0, 10));
    assert!(c.insert(20, 30));
    assert!(!c.insert(5, 15));
    assert!(!c.insert(25, 26));
    assert!(!c.insert(0, 0));
    assert!(!c.insert(29, 40));
    assert_eq!(c.total(), 30);
}

proptest! {
    #[test]
    fn coverage_matches_a_bitmap(ranges in prop::collection::vec((0u64..200, 1u64..40), 0..40)) {
        let mut c = Coverage::default();
        let mut bits = [false; 240];
        for (start, len) in ranges {
            let end = start + len;
            let free = bits[start as usize..end as usize].iter().all(|b| !b);
            prop_assert_eq!(c.insert(start, end), free);
            if free {
                bits[start as usize..end as usize].fill(true);
            }
        }
        prop_assert_eq!(c.total(), bits.iter().filter(|b| **b).count() as u64);
    }

    #[test]
    fn transmission_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = fuzzing::transmission(&data);
    }

    #[test]
    fn handshake_never_panics(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = fuzzing::handshake(&data);
    }

    #[test]
    fn handshake_survives_corrupted_good_sessions(pos in 0usize..200, byte: u8) {
        let mut bytes = good_handshake().0;
        let at = pos % bytes.len();
        bytes[at] = byte;
        let _ = fuzzing::handshake(&bytes);
    }

    #[test]
    fn reads_survive_corrupted_good_replies(pos in 0usize..2200, byte: u8) {
        let mut bytes = Server::default()
            .data(1, 0, &[7; 1000], false)
            .hole(1, 1000, 3096, false)
            .error(1, NBD_EIO, "x", None, false)
            .none(1)
            .0;
        let at = pos % bytes.len();
        bytes[at] = byte;
        let mut client = fuzzing::client(STRUCTURED, &bytes);
        let _ = client.read_at(&mut [0; 4096], 0);
    }
}
