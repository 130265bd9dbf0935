//! The wire protocol of vbackup's backup server, shared by the client
//! (`vbackup-remote`) and the server (`vbackup-server`) and described for
//! people in `docs/server.md`: the request and reply types, their limits,
//! listing lines, repository names, the roles a token can have and the
//! role each operation needs, and certificate fingerprints.
//!
//! It holds no HTTP code, so the server does not link the client's HTTP
//! stack to get the types, and a front end can check a role or a name
//! without opening a connection.
//!
//! Everything here parses bytes that come from the other side of a network
//! connection, so every function is total: hostile input gives an error,
//! never a panic (see the fuzz target in `crates/protocol/fuzz`).
#![deny(missing_docs)]

mod cert;
mod roles;
mod wire;

pub use cert::{fingerprint, parse_fingerprint};
pub use roles::{Operation, Role, UnknownRole};
pub use wire::*;
