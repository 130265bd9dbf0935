//! Feeds arbitrary repository URLs, tokens and certificate pins (one per
//! line) to the client's constructor, which parses all three before any
//! request. None may panic, and a client is made only for one plain
//! repository name over https, with a token that fits in a header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_remote::{RemoteBackend, RemoteConfig};
use vbackup_storage::Backend;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let url = lines.next().unwrap_or_default().to_string();
    let token = lines.next().unwrap_or_default().to_string();
    let fingerprint = lines.next().map(str::to_string);
    let config = RemoteConfig {
        url: url.clone(),
        token: token.clone(),
        fingerprint,
    };
    let Ok(client) = RemoteBackend::new(&config) else {
        return;
    };
    let location = client.location();
    let rest = location.strip_prefix("https://").expect("not https");
    let (authority, name) = rest.split_once('/').expect("no repository name");
    assert!(!authority.is_empty() && !authority.contains('@'));
    assert!(vbackup_protocol::validate_repo_name(name).is_ok());
    assert!(url.starts_with(&location));
    let token = token.trim();
    assert!(!token.is_empty() && token.chars().all(|c| c.is_ascii_graphic()));
});
