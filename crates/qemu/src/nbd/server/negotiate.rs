//! The server's half of the fixed newstyle handshake.

use std::io::{Read, Write};
use std::sync::Arc;

use super::transmit::Session;
use super::{read_exact, send, Export, NbdServer};
use crate::error::{Error, Result};
use crate::nbd::proto::*;
use crate::nbd::BASE_ALLOCATION;

/// The id of `base:allocation`, the only metadata context offered.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// The block size constraints every export advertises.
pub(super) const BLOCK_SIZE: BlockSizeConstraints = BlockSizeConstraints {
    minimum: 1,
    preferred: 4096,
    maximum: DEFAULT_MAX_IO,
};

/// What the client negotiated so far.
struct State {
    no_zeroes: bool,
    structured: bool,
    /// The export for which `base:allocation` was selected.
    allocation_for: Option<String>,
}

/// What to do after an option.
enum Step {
    Continue,
    Transmit(Session),
    Close,
}

/// Runs the handshake: `Some` session to enter transmission, `None` when
/// the client aborted or asked for an export that does not exist with
/// `NBD_OPT_EXPORT_NAME` (which cannot report errors).
pub(super) fn negotiate<S: Read + Write>(
    server: &NbdServer,
    io: &mut S,
) -> Result<Option<Session>> {
    send(io, &encode_greeting(SERVER_HANDSHAKE_FLAGS), "the greeting")?;
    let mut flags = [0u8; 4];
    read_exact(io, &mut flags, "client flags")?;
    let flags = parse_client_flags(&flags)?;
    let mut state = State {
        no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
        structured: false,
        allocation_for: None,
    };
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        read_exact(io, &mut header, "an option header")?;
        let (option, length) = parse_option_header(&header)?;
        if length > MAX_OPTION_DATA {
            return Err(Error::protocol(format!(
                "client sent {} of {length} bytes, more than {MAX_OPTION_DATA}",
                option_name(option)
            )));
        }
        let mut data = vec![0u8; length as usize];
        read_exact(io, &mut data, "option data")?;
        match state.option(server, io, option, &data)? {
            Step::Continue => {}
            Step::Transmit(session) => return Ok(Some(session)),
            Step::Close => return Ok(None),
        }
    }
}

fn reply<S: Write>(io: &mut S, option: u32, reply_type: u32, payload: &[u8]) -> Result<()> {
    send(
        io,
        &encode_option_reply(option, reply_type, payload),
        "an option reply",
    )
}

fn refuse<S: Write>(io: &mut S, option: u32, error: u32, message: &str) -> Result<Step> {
    reply(io, option, error, message.as_bytes())?;
    Ok(Step::Continue)
}

fn unknown_export(name: &str) -> String {
    format!(
        "no export named '{}' on this server",
        sanitize(truncate_str(name, 256).as_bytes())
    )
}

/// Transmission flags of `export` for a client that did or did not
/// negotiate structured replies.
pub(super) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    // Flushes go to the one shared disk, so every connection's flushed
    // writes are visible to all: multi-conn is safe.
    let mut flags =
        NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN;
    if structured {
        flags |= NBD_FLAG_SEND_DF;
    }
    if export.disk.writable() {
        flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    } else {
        flags |= NBD_FLAG_READ_ONLY;
    }
    flags
}

impl State {
    fn option<S: Read + Write>(
        &mut self,
        server: &NbdServer,
        io: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Step> {
        match option {
            NBD_OPT_EXPORT_NAME => self.export_name(server, io, data),
            NBD_OPT_ABORT => {
                // The client may already be gone; the spec allows that.
                let _ = reply(io, option, NBD_REP_ACK, &[]);
                Ok(Step::Close)
            }
            NBD_OPT_LIST => list(server, io, data),
            NBD_OPT_INFO | NBD_OPT_GO => self.info(server, io, option, data),
            NBD_OPT_STRUCTURED_REPLY => self.structured_reply(io, data),
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(server, io, option, data)
            }
            NBD_OPT_STARTTLS => refuse(io, option, NBD_REP_ERR_UNSUP, "TLS is not offered"),
            NBD_OPT_EXTENDED_HEADERS => refuse(
                io,
                option,
                NBD_REP_ERR_UNSUP,
                "extended headers are not supported",
            ),
            _ => refuse(io, option, NBD_REP_ERR_UNSUP, "unknown option"),
        }
    }

    fn session(&self, export: &Arc<Export>) -> Session {
        Session {
            export: export.clone(),
            structured: self.structured,
            allocation: self.allocation_for.as_deref() == Some(export.name.as_str()),
        }
    }

    fn export_name<S: Write>(&self, server: &NbdServer, io: &mut S, data: &[u8]) -> Result<Step> {
        let name = parse_export_name(data)?;
        // This option has no error reply: an unknown export ends the
        // connection.
        let Some(export) = server.lookup(&name) else {
            return Ok(Step::Close);
        };
        let flags = transmission_flags(export, self.structured);
        let bytes = encode_export_name_reply(export.disk.size(), flags, self.no_zeroes);
        send(io, &bytes, "the NBD_OPT_EXPORT_NAME reply")?;
        Ok(Step::Transmit(self.session(export)))
    }

    fn info<S: Write>(
        &self,
        server: &NbdServer,
        io: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Step> {
        let request = match parse_info_request(data) {
            Ok(r) => r,
            Err(e) => return refuse(io, option, NBD_REP_ERR_INVALID, &e.to_string()),
        };
        let Some(export) = server.lookup(&request.export) else {
            return refuse(
                io,
                option,
                NBD_REP_ERR_UNKNOWN,
                &unknown_export(&request.export),
            );
        };
        let flags = transmission_flags(export, self.structured);
        reply(
            io,
            option,
            NBD_REP_INFO,
            &encode_info_export(export.disk.size(), flags),
        )?;
        if request.infos.contains(&NBD_INFO_NAME) {
            let name = encode_info_string(NBD_INFO_NAME, &export.name);
            reply(io, option, NBD_REP_INFO, &name)?;
        }
        if request.infos.contains(&NBD_INFO_DESCRIPTION) && !export.description.is_empty() {
            let description = encode_info_string(NBD_INFO_DESCRIPTION, &export.description);
            reply(io, option, NBD_REP_INFO, &description)?;
        }
        let block_size = encode_info_block_size(&BLOCK_SIZE);
        reply(io, option, NBD_REP_INFO, &block_size)?;
        reply(io, option, NBD_REP_ACK, &[])?;
        if option == NBD_OPT_GO {
            Ok(Step::Transmit(self.session(export)))
        } else {
            Ok(Step::Continue)
        }
    }

    fn structured_reply<S: Write>(&mut self, io: &mut S, data: &[u8]) -> Result<Step> {
        let option = NBD_OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return refuse(io, option, NBD_REP_ERR_INVALID, "option takes no data");
        }
        self.structured = true;
        reply(io, option, NBD_REP_ACK, &[])?;
        Ok(Step::Continue)
    }

    fn meta_context<S: Write>(
        &mut self,
        server: &NbdServer,
        io: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Step> {
        let set = option == NBD_OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return refuse(
                io,
                option,
                NBD_REP_ERR_INVALID,
                "metadata contexts need structured replies first",
            );
        }
        let request = match parse_meta_context_request(data) {
            Ok(r) => r,
            Err(e) => return refuse(io, option, NBD_REP_ERR_INVALID, &e.to_string()),
        };
        let Some(export) = server.lookup(&request.export) else {
            return refuse(
                io,
                option,
                NBD_REP_ERR_UNKNOWN,
                &unknown_export(&request.export),
            );
        };
        let selected = if set {
            request.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            request.queries.is_empty()
                || request
                    .queries
                    .iter()
                    .any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        if set {
            self.allocation_for = selected.then(|| export.name.clone());
        }
        if selected {
            let context = encode_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION);
            reply(io, option, NBD_REP_META_CONTEXT, &context)?;
        }
        reply(io, option, NBD_REP_ACK, &[])?;
        Ok(Step::Continue)
    }
}

fn list<S: Write>(server: &NbdServer, io: &mut S, data: &[u8]) -> Result<Step> {
    if !data.is_empty() {
        return refuse(
            io,
            NBD_OPT_LIST,
            NBD_REP_ERR_INVALID,
            "option takes no data",
        );
    }
    for export in server.exports.values() {
        let entry = encode_server_entry(&export.name, &export.description);
        reply(io, NBD_OPT_LIST, NBD_REP_SERVER, &entry)?;
    }
    reply(io, NBD_OPT_LIST, NBD_REP_ACK, &[])?;
    Ok(Step::Continue)
}
