//! The requests and replies of the server's HTTP API (`/v1/...`), their
//! limits, the streamed listing lines, and repository-name validation.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};
use vbackup_storage::{validate_key, ObjectInfo};

use crate::Role;

/// Header of ranged-read replies giving the whole object's size, so the
/// client knows how many bytes the range must hold.
pub const OBJECT_SIZE_HEADER: &str = "vbackup-object-size";

/// The API version prefix of every request path.
pub const API_PREFIX: &str = "/v1";

/// The longest repository name the server accepts.
pub const MAX_REPO_NAME: usize = 64;

/// The most keys one chunk-presence query may carry.
pub const MAX_MISSING_BATCH: usize = 10_000;

/// The longest line of a listing (an object name is far shorter).
pub const MAX_LIST_LINE: usize = 4096;

/// Header carrying an error's machine-readable code in error replies.
pub const ERROR_CODE_HEADER: &str = "vbackup-error";

/// The query a client adds to a stat request to learn who wrote the
/// object ([`WireObject::writer`]).
pub const STAT_WRITER_QUERY: &str = "writer=1";

/// The longest writer description a client accepts from a server.
pub const MAX_WRITER: usize = 512;

/// The longest JSON request body the server reads (`missing`, `rename`).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Error code: the token has stored all the bytes its quota allows.
pub const CODE_OVER_QUOTA: &str = "over-quota";

/// Error code: the repository does not exist on the server.
pub const CODE_NO_REPOSITORY: &str = "no-repository";

/// Checks a repository name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most
/// [`MAX_REPO_NAME`] characters. Names are single path components, so
/// `..`, `/` and anything percent-encoded are refused.
pub fn validate_repo_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || name.len() > MAX_REPO_NAME {
        return Err(format!(
            "invalid repository name {name:?}: names start with a letter or digit and hold only letters, digits, '.', '_' and '-' (at most {MAX_REPO_NAME})"
        ));
    }
    Ok(())
}

/// The body of a chunk-presence query (`POST /v1/repos/NAME/missing`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MissingRequest {
    /// Object names to ask about.
    pub keys: Vec<String>,
}

/// The reply to a chunk-presence query.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MissingReply {
    /// The asked names the server does not hold.
    pub missing: Vec<String>,
}

/// The body of a move (`POST /v1/repos/NAME/rename`, admin only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    /// Current name.
    pub from: String,
    /// New name.
    pub to: String,
}

/// One object as the server describes it (stat replies, listing lines).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WireObject {
    /// Object name.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch, by the
    /// server's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<u64>,
    /// Who wrote the object (`LABEL (token ID)`), for the objects whose
    /// writer the server records; sent only in stat replies a client asked
    /// for with [`STAT_WRITER_QUERY`], so older clients never see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl WireObject {
    /// Describes `info` for the wire.
    pub fn from_info(info: &ObjectInfo) -> Self {
        let modified_ns = info
            .modified
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        Self {
            key: info.key.clone(),
            size: info.size,
            modified_ns,
            writer: info.writer.clone(),
        }
    }

    /// The object as the storage layer sees it, after checking its name.
    pub fn into_info(self) -> Result<ObjectInfo, String> {
        validate_key(&self.key).map_err(|e| format!("the server sent a bad object name: {e}"))?;
        let modified = self
            .modified_ns
            .and_then(|ns| SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(ns)));
        if let Some(writer) = &self.writer {
            if writer.len() > MAX_WRITER || writer.chars().any(char::is_control) {
                return Err(format!(
                    "the server sent an unusable writer for '{}' (control characters or longer than {MAX_WRITER} bytes)",
                    self.key
                ));
            }
        }
        Ok(ObjectInfo {
            key: self.key,
            size: self.size,
            modified,
            writer: self.writer,
        })
    }
}

/// One line of a streamed listing (`GET /v1/repos/NAME/list?prefix=P`):
/// newline-delimited JSON, one object per line, then one end line with the
/// number of objects sent, so a cut stream is never mistaken for a short
/// listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ListLine {
    /// An object.
    Object(WireObject),
    /// The end of the listing, with the number of objects before it.
    End {
        /// Objects sent before this line.
        end: u64,
    },
}

/// A parsed listing line, checked against the prefix that was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListItem {
    /// An object of the listing.
    Object(ObjectInfo),
    /// The end marker with the count the server claims.
    End(u64),
}

/// Parses one listing line (without its newline) of a listing of `prefix`.
pub fn parse_list_line(line: &[u8], prefix: &str) -> Result<ListItem, String> {
    if line.len() > MAX_LIST_LINE {
        return Err(format!("listing line longer than {MAX_LIST_LINE} bytes"));
    }
    let parsed: ListLine =
        serde_json::from_slice(line).map_err(|e| format!("malformed listing line: {e}"))?;
    match parsed {
        ListLine::End { end } => Ok(ListItem::End(end)),
        ListLine::Object(object) => {
            let info = object.into_info()?;
            if !info.key.starts_with(prefix) {
                return Err(format!(
                    "the listing of '{prefix}' named '{}', outside it",
                    info.key
                ));
            }
            Ok(ListItem::Object(info))
        }
    }
}

/// Encodes a listing line, newline included.
pub fn encode_list_line(line: &ListLine) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// What a token is (`GET /v1/repos/NAME/whoami`), so a client can refuse
/// an operation its role does not allow before starting it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WhoAmI {
    /// The token's public id.
    pub id: String,
    /// The repository it opens, or `*`.
    pub repo: String,
    /// The token's role (`read`, `backup` or `admin` on the wire; any
    /// other string fails to parse rather than being guessed).
    pub role: Role,
}

/// The error body every refusal carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong, for the user.
    pub error: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repository_names_cannot_escape_the_data_folder() {
        for bad in [
            "", "..", ".", ".hidden", "a/b", "a\\b", "%2e%2e", "a b", "-x", "_x", "é",
        ] {
            assert!(validate_repo_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_repo_name(&"a".repeat(65)).is_err());
        for good in ["a", "vm1", "web.example-1_b", "0"] {
            assert!(validate_repo_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn listing_lines_round_trip_and_are_checked() {
        let object = ListLine::Object(WireObject {
            key: "chunks/ab/abcd".into(),
            size: 5,
            modified_ns: Some(1_700_000_000_000_000_000),
            writer: None,
        });
        let line = encode_list_line(&object);
        let item = parse_list_line(&line[..line.len() - 1], "chunks/").unwrap();
        let ListItem::Object(info) = item else {
            panic!("not an object")
        };
        assert_eq!(info.key, "chunks/ab/abcd");
        assert_eq!(info.size, 5);
        assert!(info.modified.is_some());
        assert_eq!(
            parse_list_line(br#"{"end":3}"#, "x/").unwrap(),
            ListItem::End(3)
        );
        assert!(parse_list_line(br#"{"key":"chunks/a","size":1}"#, "indexes/").is_err());
        assert!(parse_list_line(br#"{"key":"../etc","size":1}"#, "").is_err());
        assert!(parse_list_line(b"garbage", "").is_err());
        assert!(parse_list_line(br#"{"key":"a","size":-1}"#, "").is_err());
        let ListItem::Object(info) = parse_list_line(
            br#"{"key":"locks/a","size":1,"writer":"ops (token 1)"}"#,
            "",
        )
        .unwrap() else {
            panic!("not an object")
        };
        assert_eq!(info.writer.as_deref(), Some("ops (token 1)"));
        assert!(parse_list_line(br#"{"key":"a","size":1,"writer":"a\nb"}"#, "").is_err());
        let long = format!(
            r#"{{"key":"a","size":1,"writer":"{}"}}"#,
            "x".repeat(MAX_WRITER + 1)
        );
        assert!(parse_list_line(long.as_bytes(), "").is_err());
    }

    #[test]
    fn whoami_replies_keep_the_json_of_older_versions() {
        // What servers wrote when the role was a plain string.
        let old = r#"{"id":"3f2a","repo":"vm1","role":"backup"}"#;
        let parsed: WhoAmI = serde_json::from_str(old).unwrap();
        assert_eq!(
            parsed,
            WhoAmI {
                id: "3f2a".into(),
                repo: "vm1".into(),
                role: Role::Backup,
            }
        );
        assert_eq!(serde_json::to_string(&parsed).unwrap(), old);
        for role in Role::ALL {
            let reply = WhoAmI {
                id: "i".into(),
                repo: "*".into(),
                role,
            };
            let json = serde_json::to_value(&reply).unwrap();
            assert_eq!(json["role"], role.name());
        }
    }

    #[test]
    fn regression_a_whoami_reply_with_an_unknown_role_is_refused() {
        for role in ["superuser", "Admin", "", "owner"] {
            let reply = format!(r#"{{"id":"3f2a","repo":"vm1","role":"{role}"}}"#);
            let error = serde_json::from_str::<WhoAmI>(&reply).unwrap_err();
            assert!(error.to_string().contains("unknown role"), "{error}");
        }
        assert!(serde_json::from_str::<WhoAmI>(r#"{"id":"a","repo":"b"}"#).is_err());
        assert!(serde_json::from_str::<WhoAmI>(r#"{"id":"a","repo":"b","role":2}"#).is_err());
    }

    proptest! {
        #[test]
        fn hostile_listing_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_list_line(&bytes, "chunks/");
        }

        #[test]
        fn any_accepted_repository_name_is_one_plain_component(name in "\\PC{0,70}") {
            if validate_repo_name(&name).is_ok() {
                prop_assert!(!name.contains('/') && !name.starts_with('.') && !name.contains('%'));
            }
        }
    }
}
