//! The client of vbackup's backup server: [`RemoteBackend`] stores a
//! repository's objects on a `vbackup server` over HTTPS, behind the same
//! [`Backend`] trait as a local folder.
//!
//! The client encrypts everything before it leaves (the repository layer
//! above does), so the server only ever sees opaque objects. Requests are
//! synchronous (`ureq` over `rustls`), reuse pooled connections, and every
//! reply is checked: a body shorter than its `Content-Length`, a ranged read
//! of the wrong size, or a malformed listing is an error, never wrong data.
//! HTTP statuses map to [`ErrorKind`]s so [`RetryBackend`] retries only
//! what may pass (5xx, lost connections, timeouts).
//!
//! The wire protocol, shared with the server, is in `vbackup-protocol`.
#![deny(missing_docs)]

mod tls;

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vbackup_storage::{
    validate_key, Backend, ErrorKind, ObjectInfo, Result, RetryBackend, RetryPolicy, StorageError,
};

use vbackup_protocol::{
    parse_fingerprint, parse_list_line, validate_repo_name, ErrorReply, ListItem, MissingReply,
    MissingRequest, RenameRequest, WhoAmI, WireObject, API_PREFIX, CODE_NO_REPOSITORY,
    CODE_OVER_QUOTA, ERROR_CODE_HEADER, MAX_JSON_BODY, MAX_LIST_LINE, OBJECT_SIZE_HEADER,
    STAT_WRITER_QUERY,
};

/// Keys per chunk-presence request.
const MISSING_BATCH: usize = 1000;

/// The largest object a reply may carry (chunks are at most 64 MiB before
/// sealing).
const MAX_OBJECT: u64 = 80 << 20;

/// The largest error or JSON reply read into memory.
const MAX_SMALL_REPLY: u64 = 4 << 20;

/// How to reach a repository on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `https://HOST[:PORT]/REPO`.
    pub url: String,
    /// The secret token (`vbackup server token add` prints it).
    pub token: String,
    /// The server certificate's SHA-256 fingerprint, for self-signed
    /// certificates; without it the certificate must chain to a webpki root.
    pub fingerprint: Option<String>,
}

/// A repository on a `vbackup server`, reached over HTTPS.
pub struct RemoteBackend {
    agent: ureq::Agent,
    /// `https://HOST:PORT`.
    origin: String,
    /// `https://HOST:PORT/v1/repos/NAME`.
    base: String,
    location: String,
    authorization: String,
    tls_failure: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Opens a repository on a server, wrapped in retries of transient
/// failures ([`RetryPolicy::from_env`]).
pub fn open(config: &RemoteConfig) -> Result<RetryBackend<RemoteBackend>> {
    Ok(RetryBackend::new(
        RemoteBackend::new(config)?,
        RetryPolicy::from_env(),
    ))
}

/// Splits `https://HOST[:PORT]/REPO` into origin and repository name.
fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        StorageError::new(
            ErrorKind::Other,
            "",
            format!("repository URL '{url}': {why}; expected https://HOST:PORT/REPO"),
        )
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("only https:// is supported"))?;
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| bad("no repository name"))?;
    let path = path.strip_suffix('/').unwrap_or(path);
    let authority_ok = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !authority_ok {
        return Err(bad("invalid host"));
    }
    validate_repo_name(path).map_err(|e| bad(&e))?;
    Ok((format!("https://{authority}"), path.to_string()))
}

impl RemoteBackend {
    /// A client for the repository at `config.url` (no request is made yet).
    pub fn new(config: &RemoteConfig) -> Result<Self> {
        let (origin, name) = parse_url(&config.url)?;
        let pin = match &config.fingerprint {
            Some(text) => Some(
                parse_fingerprint(text).map_err(|e| StorageError::new(ErrorKind::Other, "", e))?,
            ),
            None => None,
        };
        let token = config.token.trim();
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(StorageError::new(
                ErrorKind::PermissionDenied,
                "",
                "the server token is empty or malformed: set VBACKUP_TOKEN or use --token-file",
            ));
        }
        let tls_failure = Arc::new(Mutex::new(None));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = tls::Verifier::new(pin, provider.clone(), tls_failure.clone())
            .map_err(|e| StorageError::new(ErrorKind::Other, "", e))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StorageError::new(ErrorKind::Other, "", format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .max_idle_connections_per_host(64)
            .redirects(0)
            .build();
        Ok(Self {
            agent,
            base: format!("{origin}{API_PREFIX}/repos/{name}"),
            location: format!("{origin}/{name}"),
            origin,
            authorization: format!("Bearer {token}"),
            tls_failure,
        })
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        self.agent
            .request(method, url)
            .set("Authorization", &self.authorization)
    }

    fn object_url(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(format!("{}/objects/{key}", self.base))
    }

    /// Sends a request and turns every failure into a classified error.
    fn send(
        &self,
        key: &str,
        what: &str,
        request: ureq::Request,
        body: Option<&[u8]>,
    ) -> Result<ureq::Response> {
        let result = match body {
            Some(bytes) => request.send_bytes(bytes),
            None => request.call(),
        };
        result.map_err(|e| self.classify(key, what, e))
    }

    fn classify(&self, key: &str, what: &str, error: ureq::Error) -> StorageError {
        match error {
            ureq::Error::Status(status, response) => status_error(key, what, status, response),
            ureq::Error::Transport(transport) => {
                let tls = self
                    .tls_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                match tls {
                    Some(message) if transport.to_string().contains(&message) => {
                        StorageError::new(ErrorKind::PermissionDenied, key, message)
                    }
                    _ => StorageError::new(
                        ErrorKind::Transient,
                        key,
                        format!(
                            "{what}: cannot talk to the server at {}: {transport}",
                            self.origin
                        ),
                    ),
                }
            }
        }
    }

    /// What the server says the token is (id, repository, role).
    pub fn whoami(&self) -> Result<WhoAmI> {
        let url = format!("{}/whoami", self.base);
        let what = "asking the server about the token";
        let response = self.send("", what, self.request("GET", &url), None)?;
        self.get_json("", what, response)
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        what: &str,
        response: ureq::Response,
    ) -> Result<T> {
        let body = read_body(key, what, response, MAX_SMALL_REPLY)?;
        serde_json::from_slice(&body).map_err(|e| {
            StorageError::new(
                ErrorKind::Other,
                key,
                format!("{what}: the server sent a malformed reply ({e})"),
            )
        })
    }

    fn missing_batch(&self, keys: &[String]) -> Result<Vec<String>> {
        let body = serde_json::to_vec(&MissingRequest {
            keys: keys.to_vec(),
        })
        .map_err(|e| StorageError::new(ErrorKind::Other, "", e.to_string()))?;
        let url = format!("{}/missing", self.base);
        let request = self
            .request("POST", &url)
            .set("Content-Type", "application/json");
        let response = self.send("", "asking which chunks are missing", request, Some(&body))?;
        let reply: MissingReply = self.get_json("", "asking which chunks are missing", response)?;
        if let Some(odd) = reply.missing.iter().find(|k| !keys.contains(k)) {
            return Err(StorageError::new(
                ErrorKind::Other,
                odd,
                "the server named a missing object that was not asked about",
            ));
        }
        Ok(reply.missing)
    }
}

/// Splits `keys` into chunk-presence queries of at most [`MISSING_BATCH`]
/// names whose JSON stays well under the server's [`MAX_JSON_BODY`].
fn missing_batches(keys: &[String]) -> Vec<&[String]> {
    let budget = MAX_JSON_BODY / 2;
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, key) in keys.iter().enumerate() {
        // The name, its quotes and a comma.
        let cost = key.len() + 3;
        if i > start && (i - start == MISSING_BATCH || bytes + cost > budget) {
            batches.push(&keys[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += cost;
    }
    if start < keys.len() {
        batches.push(&keys[start..]);
    }
    batches
}

/// A refusal or failure reply as an error of the matching kind.
fn status_error(key: &str, what: &str, status: u16, response: ureq::Response) -> StorageError {
    let code = response.header(ERROR_CODE_HEADER).map(str::to_string);
    let body = read_body(key, what, response, 64 << 10).unwrap_or_default();
    let detail = serde_json::from_slice::<ErrorReply>(&body)
        .map(|r| r.error)
        .unwrap_or_else(|_| format!("HTTP status {status}"));
    let (kind, message) = match status {
        401 => (
            ErrorKind::PermissionDenied,
            format!("{what}: the server refused the token ({detail}); give a valid token with VBACKUP_TOKEN or --token-file"),
        ),
        403 => (
            ErrorKind::PermissionDenied,
            // The token's role, or its repository: the detail says which.
            format!("{what}: the server refused it ({detail})"),
        ),
        400 => (ErrorKind::InvalidKey, format!("{what}: the server refused the request ({detail})")),
        404 if code.as_deref() == Some(CODE_NO_REPOSITORY) => (
            ErrorKind::NotFound,
            format!("{what}: {detail}"),
        ),
        404 => (ErrorKind::NotFound, format!("{what}: not found on the server")),
        507 if code.as_deref() == Some(CODE_OVER_QUOTA) => {
            (ErrorKind::NoSpace, format!("{what}: {detail}"))
        }
        507 => (
            ErrorKind::NoSpace,
            format!("{what}: the server has no space left ({detail})"),
        ),
        408 => (
            ErrorKind::Transient,
            format!("{what}: the server timed the request out ({detail})"),
        ),
        413 => (
            ErrorKind::Other,
            format!("{what}: the server refused the request as too large ({detail})"),
        ),
        500..=599 => (
            ErrorKind::Transient,
            format!("{what}: the server failed ({detail})"),
        ),
        _ => (ErrorKind::Other, format!("{what}: unexpected reply ({detail})")),
    };
    StorageError::new(kind, key, message)
}

/// Reads a whole reply body of at most `max` bytes and checks it against
/// its `Content-Length` (a cut connection is a transient error).
fn read_body(key: &str, what: &str, response: ureq::Response, max: u64) -> Result<Vec<u8>> {
    let declared = match response.header("Content-Length") {
        Some(text) => Some(text.trim().parse::<u64>().map_err(|_| {
            StorageError::new(
                ErrorKind::Other,
                key,
                format!("{what}: the server sent a malformed Content-Length"),
            )
        })?),
        None => None,
    };
    if declared.is_some_and(|n| n > max) {
        return Err(StorageError::new(
            ErrorKind::Other,
            key,
            format!("{what}: the server announced a reply larger than {max} bytes"),
        ));
    }
    let mut data = Vec::new();
    response
        .into_reader()
        .take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| {
            StorageError::new(
                ErrorKind::Transient,
                key,
                format!("{what}: the reply was truncated, the connection broke before all of it arrived ({e})"),
            )
        })?;
    if data.len() as u64 > max {
        return Err(StorageError::new(
            ErrorKind::Other,
            key,
            format!("{what}: the server sent a reply larger than {max} bytes"),
        ));
    }
    if let Some(declared) = declared.filter(|n| *n != data.len() as u64) {
        return Err(StorageError::new(
            ErrorKind::Transient,
            key,
            format!(
                "{what}: the server sent {} of the {declared} bytes it announced (truncated reply)",
                data.len()
            ),
        ));
    }
    Ok(data)
}

fn require_length(key: &str, what: &str, response: &ureq::Response) -> Result<()> {
    if response.header("Content-Length").is_none() {
        return Err(StorageError::new(
            ErrorKind::Other,
            key,
            format!("{what}: the server sent an object without a Content-Length"),
        ));
    }
    Ok(())
}

fn check_prefix(prefix: &str) -> Result<()> {
    let ok = prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !ok || prefix.starts_with('/') || prefix.contains("..") {
        return Err(StorageError::new(
            ErrorKind::InvalidKey,
            prefix,
            "listing prefixes are object-name characters",
        ));
    }
    Ok(())
}

/// Reads one line (at most [`MAX_LIST_LINE`] bytes) without its newline;
/// `None` at the end of the stream.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<Option<()>> {
    line.clear();
    let limit = MAX_LIST_LINE as u64 + 1;
    let read = reader.by_ref().take(limit).read_until(b'\n', line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() as u64 >= limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "listing line too long",
        ));
    }
    Ok(Some(()))
}

impl Backend for RemoteBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let url = self.object_url(key)?;
        let request = self
            .request("PUT", &url)
            .set("Content-Type", "application/octet-stream");
        let response = self.send(key, "storing the object", request, Some(data))?;
        read_body(key, "storing the object", response, MAX_SMALL_REPLY)?;
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let url = self.object_url(key)?;
        let response = self.send(key, "reading the object", self.request("GET", &url), None)?;
        require_length(key, "reading the object", &response)?;
        read_body(key, "reading the object", response, MAX_OBJECT)
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let what = "reading part of the object";
        let url = format!("{}?offset={offset}&length={length}", self.object_url(key)?);
        let response = self.send(key, what, self.request("GET", &url), None)?;
        require_length(key, what, &response)?;
        let size = response
            .header(OBJECT_SIZE_HEADER)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                StorageError::new(
                    ErrorKind::Other,
                    key,
                    format!("{what}: the server did not say the object's size"),
                )
            })?;
        let data = read_body(key, what, response, length.min(MAX_OBJECT))?;
        let expected = length.min(size.saturating_sub(offset));
        if data.len() as u64 != expected {
            return Err(StorageError::new(
                ErrorKind::Other,
                key,
                format!(
                    "{what}: the server sent {} bytes for a range of {expected}",
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut objects = Vec::new();
        self.list_each(prefix, &mut |o| objects.push(o))?;
        Ok(objects)
    }

    fn list_each(&self, prefix: &str, visit: &mut dyn FnMut(ObjectInfo)) -> Result<()> {
        check_prefix(prefix)?;
        let what = "listing objects";
        let url = format!("{}/list?prefix={prefix}", self.base);
        let response = self.send(prefix, what, self.request("GET", &url), None)?;
        let mut reader = BufReader::new(response.into_reader());
        let mut line = Vec::new();
        let mut count = 0u64;
        loop {
            let read = read_line(&mut reader, &mut line).map_err(|e| {
                StorageError::new(
                    ErrorKind::Transient,
                    prefix,
                    format!("{what}: the connection broke after {count} objects: {e}"),
                )
            })?;
            if read.is_none() {
                return Err(StorageError::new(
                    ErrorKind::Transient,
                    prefix,
                    format!("{what}: the listing was cut short after {count} objects"),
                ));
            }
            match parse_list_line(&line, prefix)
                .map_err(|e| StorageError::new(ErrorKind::Other, prefix, format!("{what}: {e}")))?
            {
                ListItem::Object(info) => {
                    count += 1;
                    visit(info);
                }
                ListItem::End(end) if end == count => return Ok(()),
                ListItem::End(end) => {
                    return Err(StorageError::new(
                        ErrorKind::Other,
                        prefix,
                        format!("{what}: the server sent {count} objects but counted {end}"),
                    ))
                }
            }
        }
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let what = "reading object metadata";
        validate_key(key)?;
        let url = format!("{}/stat/{key}?{STAT_WRITER_QUERY}", self.base);
        match self.request("GET", &url).call() {
            Ok(response) => {
                let object: WireObject = self.get_json(key, what, response)?;
                let info = object
                    .into_info()
                    .map_err(|e| StorageError::new(ErrorKind::Other, key, e))?;
                if info.key != key {
                    return Err(StorageError::new(
                        ErrorKind::Other,
                        key,
                        format!("{what}: the server described another object"),
                    ));
                }
                Ok(Some(info))
            }
            Err(ureq::Error::Status(404, response))
                if response.header(ERROR_CODE_HEADER) != Some(CODE_NO_REPOSITORY) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.classify(key, what, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let url = self.object_url(key)?;
        match self.send(
            key,
            "deleting the object",
            self.request("DELETE", &url),
            None,
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn can_rename(&self) -> bool {
        true
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        validate_key(from)?;
        validate_key(to)?;
        let body = serde_json::to_vec(&RenameRequest {
            from: from.to_string(),
            to: to.to_string(),
        })
        .map_err(|e| StorageError::new(ErrorKind::Other, from, e.to_string()))?;
        let url = format!("{}/rename", self.base);
        let request = self
            .request("POST", &url)
            .set("Content-Type", "application/json");
        self.send(from, "moving the object", request, Some(&body))?;
        Ok(())
    }

    fn missing(&self, keys: &[String]) -> Result<Vec<String>> {
        for key in keys {
            validate_key(key)?;
        }
        let mut missing = Vec::new();
        for batch in missing_batches(keys) {
            missing.extend(self.missing_batch(batch)?);
        }
        Ok(missing)
    }

    fn concurrency(&self) -> usize {
        8
    }

    fn max_object_size(&self) -> Option<u64> {
        Some(MAX_OBJECT)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_name_one_repository_over_https() {
        assert_eq!(
            parse_url("https://127.0.0.1:8443/vm1").unwrap(),
            ("https://127.0.0.1:8443".to_string(), "vm1".to_string())
        );
        assert_eq!(parse_url("https://h/r/").unwrap().1, "r");
        for bad in [
            "http://h/r",
            "https://h",
            "https://h/",
            "https://h/a/b",
            "https://h/..",
            "https://h/%2e%2e",
            "https://u@h/r",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn hostile_repository_urls_never_panic_and_name_one_plain_repository(
            url in "(https?://)?[a-z0-9.:@\\[\\]-]{0,12}(/[a-zA-Z0-9._%-]{0,12}){0,2}/?",
        ) {
            if let Ok((origin, name)) = parse_url(&url) {
                proptest::prop_assert!(origin.starts_with("https://") && !origin.contains('@'));
                proptest::prop_assert!(validate_repo_name(&name).is_ok());
                let location = format!("{origin}/{name}");
                proptest::prop_assert!(url.starts_with(&location));
            }
        }
    }

    #[test]
    fn lines_are_bounded() {
        let long = vec![b'x'; MAX_LIST_LINE + 10];
        let mut reader = std::io::Cursor::new(long);
        let mut line = Vec::new();
        assert!(read_line(&mut reader, &mut line).is_err());
        let mut reader = std::io::Cursor::new(b"a\nb".to_vec());
        assert!(read_line(&mut reader, &mut line).unwrap().is_some());
        assert_eq!(line, b"a");
        assert!(read_line(&mut reader, &mut line).unwrap().is_some());
        assert_eq!(line, b"b");
        assert!(read_line(&mut reader, &mut line).unwrap().is_none());
    }

    #[test]
    fn chunk_presence_queries_stay_under_the_servers_body_limit() {
        let keys: Vec<String> = (0..2500).map(|i| format!("chunks/ab/{i:064}")).collect();
        let batches = missing_batches(&keys);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), keys.len());
        assert!(batches.iter().all(|b| b.len() <= MISSING_BATCH));
        let long: Vec<String> = (0..40)
            .map(|i| format!("x/{i}{}", "y".repeat(60_000)))
            .collect();
        for batch in missing_batches(&long) {
            let body = serde_json::to_vec(&MissingRequest {
                keys: batch.to_vec(),
            })
            .unwrap();
            assert!(body.len() <= MAX_JSON_BODY, "{} bytes", body.len());
        }
        assert!(missing_batches(&[]).is_empty());
    }
}
