//! Feeds arbitrary bytes to every parser of the server protocol: listing
//! lines (client side), repository and object names (server side), roles,
//! the JSON bodies of chunk-presence queries, moves, replies and
//! fingerprints. None may panic, whatever a name check accepts must be a
//! plain path, and a role parses only from its own name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_protocol::{
    parse_fingerprint, parse_list_line, validate_repo_name, ListItem, MissingReply, MissingRequest,
    RenameRequest, Role, WhoAmI, WireObject, MAX_WRITER,
};

fuzz_target!(|data: &[u8]| {
    for prefix in ["", "chunks/", "snapshots/"] {
        if let Ok(ListItem::Object(info)) = parse_list_line(data, prefix) {
            assert!(info.key.starts_with(prefix));
            assert!(vbackup_storage::validate_key(&info.key).is_ok());
            if let Some(writer) = &info.writer {
                assert!(writer.len() <= MAX_WRITER && !writer.chars().any(char::is_control));
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    if validate_repo_name(&text).is_ok() {
        assert!(!text.contains('/') && !text.contains('%') && !text.starts_with('.'));
    }
    if vbackup_storage::validate_key(&text).is_ok() {
        assert!(!text.split('/').any(|p| p == ".." || p.is_empty()));
    }
    let _ = parse_fingerprint(&text);
    if let Ok(role) = text.parse::<Role>() {
        assert_eq!(role.name(), text);
    }
    if let Ok(role) = serde_json::from_slice::<Role>(data) {
        assert!(Role::ALL.contains(&role));
    }
    let _ = serde_json::from_slice::<MissingRequest>(data);
    let _ = serde_json::from_slice::<MissingReply>(data);
    let _ = serde_json::from_slice::<RenameRequest>(data);
    let _ = serde_json::from_slice::<WhoAmI>(data);
    if let Ok(object) = serde_json::from_slice::<WireObject>(data) {
        let _ = object.into_info();
    }
});
