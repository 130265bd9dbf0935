use proptest::prelude::*;

use super::*;

fn greeting(second_magic: u64, flags: u16) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&second_magic.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn option_reply(option: u32, reply_type: u32, length: u32) -> Vec<u8> {
    let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

fn error_payload(errno: u32, message: &[u8], offset: Option<u64>) -> Vec<u8> {
    let mut v = errno.to_be_bytes().to_vec();
    v.extend_from_slice(&(message.len() as u16).to_be_bytes());
    v.extend_from_slice(message);
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

fn status_payload(context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut v = context.to_be_bytes().to_vec();
    for (len, flags) in descriptors {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

fn protocol_message(r: Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Protocol(m)) => m,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn greeting_accepts_fixed_newstyle() {
    let flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
    assert_eq!(parse_greeting(&greeting(IHAVEOPT, flags)).unwrap(), flags);
    assert_eq!(
        client_flags(flags),
        NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    );
    assert_eq!(
        client_flags(NBD_FLAG_FIXED_NEWSTYLE),
        NBD_FLAG_C_FIXED_NEWSTYLE
    );
}

#[test]
fn greeting_rejects_oldstyle_plain_newstyle_and_strangers() {
    let m = protocol_message(parse_greeting(&greeting(CLISERV_MAGIC, 0)));
    assert!(m.contains("oldstyle"), "{m}");
    let m = protocol_message(parse_greeting(&greeting(IHAVEOPT, 0)));
    assert!(m.contains("fixed newstyle"), "{m}");
    let m = protocol_message(parse_greeting(b"SSH-2.0-OpenSSH_9.6\r\n"));
    assert!(m.contains("not an NBD server"), "{m}");
    let m = protocol_message(parse_greeting(&greeting(IHAVEOPT, 1)[..17]));
    assert!(m.contains("too short"), "{m}");
}

#[test]
fn option_reply_header_checks_option_and_length() {
    let h =
        parse_option_reply_header(&option_reply(NBD_OPT_GO, NBD_REP_ACK, 0), NBD_OPT_GO).unwrap();
    assert_eq!(h.reply_type, NBD_REP_ACK);
    let m = protocol_message(parse_option_reply_header(
        &option_reply(NBD_OPT_LIST, NBD_REP_ACK, 0),
        NBD_OPT_GO,
    ));
    assert!(
        m.contains("NBD_OPT_LIST") && m.contains("NBD_OPT_GO"),
        "{m}"
    );
    let m = protocol_message(parse_option_reply_header(
        &option_reply(NBD_OPT_GO, NBD_REP_INFO, u32::MAX),
        NBD_OPT_GO,
    ));
    assert!(m.contains("exceeds"), "{m}");
    let mut bad_magic = option_reply(NBD_OPT_GO, NBD_REP_ACK, 0);
    bad_magic[0] ^= 1;
    assert!(parse_option_reply_header(&bad_magic, NBD_OPT_GO).is_err());
}

#[test]
fn info_export_and_block_size_are_checked() {
    let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&(1u64 << 30).to_be_bytes());
    export.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
    assert_eq!(
        parse_info(&export).unwrap(),
        Info::Export {
            size: 1 << 30,
            flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        }
    );
    assert!(parse_info(&export[..11]).is_err(), "short export info");
    let mut long = export.clone();
    long.push(0);
    assert!(parse_info(&long).is_err(), "long export info");
    let mut no_flags = export.clone();
    no_flags[11] = 0;
    assert!(parse_info(&no_flags).is_err(), "HAS_FLAGS missing");

    let block = |min: u32, pref: u32, max: u32| {
        let mut v = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for x in [min, pref, max] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        parse_info(&v)
    };
    assert!(block(1, 4096, 32 << 20).is_ok());
    assert!(block(512, 4096, u32::MAX).is_ok());
    assert!(block(0, 4096, 4096).is_err(), "minimum 0");
    assert!(block(3, 4096, 4096).is_err(), "minimum not a power of two");
    assert!(
        block(1 << 17, 1 << 17, 1 << 20).is_err(),
        "minimum above 64 KiB"
    );
    assert!(
        block(4096, 512, 1 << 20).is_err(),
        "preferred below minimum"
    );
    assert!(
        block(512, 4096, 1000).is_err(),
        "maximum not a multiple of minimum"
    );
    assert_eq!(parse_info(&[0, 9, 1, 2, 3]).unwrap(), Info::Other(9));
}

#[test]
fn meta_context_names_are_checked() {
    let ok = [&7u32.to_be_bytes()[..], b"base:allocation"].concat();
    assert_eq!(
        parse_meta_context(&ok).unwrap(),
        (7, "base:allocation".to_owned())
    );
    assert!(
        parse_meta_context(&7u32.to_be_bytes()).is_err(),
        "empty name"
    );
    assert!(
        parse_meta_context(&[0, 0, 0, 1, b'x']).is_err(),
        "no namespace"
    );
    assert!(
        parse_meta_context(&[0, 0, 0, 1, b'a', b':', 0xff]).is_err(),
        "not UTF-8"
    );
    assert!(parse_meta_context(&[0, 0]).is_err(), "short");
    let huge = [&1u32.to_be_bytes()[..], &[b'a'; MAX_STRING + 1]].concat();
    assert!(parse_meta_context(&huge).is_err(), "too long");
}

#[test]
fn requests_encode_as_the_spec_says() {
    let req = Request {
        flags: NBD_CMD_FLAG_FUA,
        command: NBD_CMD_WRITE,
        cookie: 0x0102030405060708,
        offset: 4096,
        length: 512,
    };
    let bytes = encode_request(&req);
    assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&bytes[4..6], &[0, 1]);
    assert_eq!(&bytes[6..8], &[0, 1]);
    assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&bytes[16..24], &4096u64.to_be_bytes());
    assert_eq!(&bytes[24..28], &512u32.to_be_bytes());
}

#[test]
fn option_data_encodes_strings_with_lengths() {
    assert_eq!(encode_go("ab").unwrap(), vec![0, 0, 0, 2, b'a', b'b', 0, 0]);
    let q = encode_meta_context_query("", &["base:allocation".into()]).unwrap();
    assert_eq!(&q[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&q[8..12], &15u32.to_be_bytes());
    assert!(encode_go(&"x".repeat(MAX_STRING + 1)).is_err());
    assert!(encode_go("a\0b").is_err());
    let opt = encode_option(NBD_OPT_GO, &[9, 9]).unwrap();
    assert_eq!(&opt[..8], &IHAVEOPT.to_be_bytes());
    assert_eq!(&opt[8..16], &[0, 0, 0, 7, 0, 0, 0, 2]);
}

#[test]
fn reply_magics_are_recognised() {
    assert_eq!(
        parse_reply_magic(SIMPLE_REPLY_MAGIC.to_be_bytes()).unwrap(),
        ReplyKind::Simple
    );
    assert_eq!(
        parse_reply_magic(STRUCTURED_REPLY_MAGIC.to_be_bytes()).unwrap(),
        ReplyKind::Structured
    );
    assert!(parse_reply_magic(EXTENDED_REPLY_MAGIC.to_be_bytes()).is_err());
    assert!(parse_reply_magic(*b"HTTP").is_err());
}

#[test]
fn error_chunks_parse_and_reject_bad_lengths() {
    let e = parse_error_chunk(
        NBD_REPLY_TYPE_ERROR,
        &error_payload(NBD_EIO, b"bad sector", None),
    )
    .unwrap();
    assert_eq!(
        e,
        ErrorChunk {
            errno: NBD_EIO,
            message: "bad sector".into(),
            offset: None
        }
    );
    let e = parse_error_chunk(
        NBD_REPLY_TYPE_ERROR_OFFSET,
        &error_payload(5, b"", Some(77)),
    )
    .unwrap();
    assert_eq!(e.offset, Some(77));
    assert!(
        parse_error_chunk(NBD_REPLY_TYPE_ERROR, &error_payload(0, b"x", None)).is_err(),
        "errno 0"
    );
    let mut lying = error_payload(5, b"abc", None);
    lying[5] = 200;
    assert!(
        parse_error_chunk(NBD_REPLY_TYPE_ERROR, &lying).is_err(),
        "message past payload"
    );
    let trailing = [error_payload(5, b"abc", None), vec![1]].concat();
    assert!(
        parse_error_chunk(NBD_REPLY_TYPE_ERROR, &trailing).is_err(),
        "trailing bytes"
    );
    assert!(
        parse_error_chunk(NBD_REPLY_TYPE_ERROR_OFFSET, &error_payload(5, b"", None)).is_err(),
        "no offset"
    );
    // Unknown error types may carry more fields after the message.
    let unknown = [error_payload(5, b"m", None), vec![1, 2, 3]].concat();
    assert_eq!(parse_error_chunk(0x8009, &unknown).unwrap().message, "m");
}

#[test]
fn server_messages_are_made_printable() {
    assert_eq!(sanitize(b"ok\x1b[31mred\xff"), "ok\u{fffd}[31mred\u{fffd}");
}

#[test]
fn hole_chunks_need_twelve_bytes_and_a_size() {
    let mut p = 4096u64.to_be_bytes().to_vec();
    p.extend_from_slice(&512u32.to_be_bytes());
    assert_eq!(parse_hole_chunk(&p).unwrap(), (4096, 512));
    assert!(parse_hole_chunk(&p[..11]).is_err());
    p[8..12].copy_from_slice(&0u32.to_be_bytes());
    assert!(parse_hole_chunk(&p).is_err(), "size 0");
}

#[test]
fn block_status_chunks_are_checked_against_the_request() {
    let (ctx, d) =
        parse_block_status_chunk(&status_payload(3, &[(4096, 0), (8192, 3)]), 10000).unwrap();
    assert_eq!(ctx, 3);
    assert_eq!(
        d,
        vec![
            Descriptor {
                length: 4096,
                flags: 0
            },
            Descriptor {
                length: 8192,
                flags: 3
            }
        ]
    );
    // The last descriptor may run past the request, earlier ones may not.
    let m = protocol_message(parse_block_status_chunk(
        &status_payload(3, &[(4096, 0), (1, 0)]),
        4096,
    ));
    assert!(m.contains("past the requested"), "{m}");
    let m = protocol_message(parse_block_status_chunk(
        &status_payload(3, &[(0, 0)]),
        4096,
    ));
    assert!(m.contains("length 0"), "{m}");
    assert!(
        parse_block_status_chunk(&status_payload(3, &[]), 4096).is_err(),
        "no descriptors"
    );
    assert!(
        parse_block_status_chunk(&[0, 0, 0, 3, 0, 0, 0, 1, 0], 4096).is_err(),
        "ragged"
    );
}

#[test]
fn payload_limits_bound_every_chunk_but_data() {
    assert_eq!(chunk_payload_limit(NBD_REPLY_TYPE_OFFSET_DATA), None);
    assert_eq!(
        chunk_payload_limit(NBD_REPLY_TYPE_BLOCK_STATUS),
        Some(MAX_BLOCK_STATUS_CHUNK)
    );
    assert_eq!(
        chunk_payload_limit(NBD_REPLY_TYPE_ERROR),
        Some(MAX_SMALL_CHUNK)
    );
    assert_eq!(chunk_payload_limit(0x1234), Some(MAX_SMALL_CHUNK));
}

#[test]
fn names_are_readable() {
    assert_eq!(
        reply_type_name(NBD_REP_ERR_UNKNOWN),
        "NBD_REP_ERR_UNKNOWN (export not available)"
    );
    assert_eq!(reply_type_name(NBD_REP_FLAG_ERROR | 99), "error reply 99");
    assert_eq!(errno_name(1234), "error 1234");
    assert_eq!(chunk_type_name(0x1234), "chunk type 0x1234");
    assert_eq!(option_name(99), "option 99");
}

proptest! {
    #[test]
    fn chunk_headers_round_trip(flags: u16, chunk_type: u16, cookie: u64, length: u32) {
        let mut bytes = flags.to_be_bytes().to_vec();
        bytes.extend_from_slice(&chunk_type.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        let h = parse_chunk_header(&bytes).unwrap();
        prop_assert_eq!(h, ChunkHeader { flags, chunk_type, cookie, length });
        prop_assert_eq!(h.done(), flags & 1 == 1);
    }

    #[test]
    fn simple_replies_round_trip(error: u32, cookie: u64) {
        let bytes = [&error.to_be_bytes()[..], &cookie.to_be_bytes()].concat();
        prop_assert_eq!(parse_simple_reply(&bytes).unwrap(), SimpleReply { error, cookie });
    }

    #[test]
    fn requests_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request { flags, command, cookie, offset, length };
        let b = encode_request(&req);
        prop_assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), REQUEST_MAGIC);
        prop_assert_eq!(u16::from_be_bytes(b[4..6].try_into().unwrap()), flags);
        prop_assert_eq!(u16::from_be_bytes(b[6..8].try_into().unwrap()), command);
        prop_assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), cookie);
        prop_assert_eq!(u64::from_be_bytes(b[16..24].try_into().unwrap()), offset);
        prop_assert_eq!(u32::from_be_bytes(b[24..28].try_into().unwrap()), length);
    }

    #[test]
    fn option_reply_headers_round_trip(reply_type: u32, length in 0..=MAX_OPTION_REPLY) {
        let h = parse_option_reply_header(&option_reply(NBD_OPT_SET_META_CONTEXT, reply_type, length), NBD_OPT_SET_META_CONTEXT).unwrap();
        prop_assert_eq!(h, OptionReplyHeader { option: NBD_OPT_SET_META_CONTEXT, reply_type, length });
    }

    #[test]
    fn error_chunks_round_trip(errno in 1u32.., message in "[a-zA-Z0-9 :'.-]{0,200}", offset: Option<u64>) {
        let chunk_type = if offset.is_some() { NBD_REPLY_TYPE_ERROR_OFFSET } else { NBD_REPLY_TYPE_ERROR };
        let e = parse_error_chunk(chunk_type, &error_payload(errno, message.as_bytes(), offset)).unwrap();
        prop_assert_eq!(e, ErrorChunk { errno, message, offset });
    }

    #[test]
    fn block_status_round_trips(context: u32, lens in prop::collection::vec((1u32..1 << 20, any::<u32>()), 1..50)) {
        let requested: u64 = lens.iter().map(|(l, _)| u64::from(*l)).sum();
        let requested = u32::try_from(requested).unwrap();
        let (c, d) = parse_block_status_chunk(&status_payload(context, &lens), requested).unwrap();
        prop_assert_eq!(c, context);
        prop_assert_eq!(d.iter().map(|d| (d.length, d.flags)).collect::<Vec<_>>(), lens);
    }

    #[test]
    fn parsers_never_panic_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..64), t: u16, n: u32) {
        let _ = parse_greeting(&bytes);
        let _ = parse_option_reply_header(&bytes, n);
        let _ = parse_info(&bytes);
        let _ = parse_meta_context(&bytes);
        let _ = parse_export_name_reply(&bytes);
        let _ = parse_simple_reply(&bytes);
        let _ = parse_chunk_header(&bytes);
        let _ = parse_error_chunk(t, &bytes);
        let _ = parse_hole_chunk(&bytes);
        let _ = parse_block_status_chunk(&bytes, n);
    }
}
