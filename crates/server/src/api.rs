//! The HTTP API (`/v1/...`, described in `docs/server.md`): each request
//! is authenticated, its repository name and object name checked, its role
//! checked at the object level ([`crate::access`]), then carried out on the
//! repository's [`LocalBackend`] in a blocking thread.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use vbackup_core::format::{parse_plain_json, Config, ObjectKind};
use vbackup_protocol::Role;
use vbackup_protocol::{
    encode_list_line, validate_repo_name, ErrorReply, ListLine, MissingReply, MissingRequest,
    RenameRequest, WhoAmI, WireObject, CODE_NO_REPOSITORY, ERROR_CODE_HEADER, MAX_JSON_BODY,
    MAX_MISSING_BATCH,
};
use vbackup_storage::{validate_key, Backend, ErrorKind, LocalBackend, StorageError};

use crate::access::{decide_put, may_delete, may_rename, Existing, PutDecision};
use crate::body::{read_body, reserve_memory};
use crate::records::{self, Usage};
use crate::tokens::{tokens_path, AuthError, TokenEntry, TokenStore};

/// The largest request body (a sealed 64 MiB chunk, with room to spare).
pub(crate) const MAX_BODY: usize = 80 << 20;

/// Header of a put answered as done while the stored bytes were kept
/// (a content-addressed object uploaded again with another sealing).
const KEPT_HEADER: &str = "vbackup-kept";

/// Listing bytes gathered per network write.
const LIST_BATCH: usize = 64 << 10;

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The data folder.
    pub data: PathBuf,
    /// The tokens.
    pub tokens: TokenStore,
    /// How long a client may keep the server waiting for the next bytes
    /// of a request.
    pub timeout: Duration,
    /// The bytes tokens with a quota have added.
    pub usage: Usage,
    /// The budget of upload bodies held in memory at once, in
    /// [`crate::body::MEMORY_UNIT`]s.
    pub upload_memory: Arc<tokio::sync::Semaphore>,
    /// The dashboard's repository overviews, kept for a while.
    pub overviews: crate::overview::Overviews,
}

type AppState = Arc<Shared>;

/// The router of the whole API.
pub(crate) fn router(shared: AppState) -> Router {
    Router::new()
        .route(
            "/v1/repos/{repo}/objects/{*key}",
            get(get_object).put(put_object).delete(delete_object),
        )
        .route("/v1/repos/{repo}/stat/{*key}", get(stat_object))
        .route("/v1/repos/{repo}/list", get(list_objects))
        .route("/v1/repos/{repo}/missing", post(missing))
        .route("/v1/repos/{repo}/rename", post(rename))
        .route("/v1/repos/{repo}/whoami", get(whoami))
        .route("/", get(dashboard))
        .route("/v1/overview", get(overview))
        .fallback(|| async { ApiError::bad_request("unknown request path".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// A refusal or failure, sent as a status, an error code header and a
/// JSON body `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
}

impl ApiError {
    /// A refusal with `status`, the error code `code` and `message`.
    pub(crate) fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            code,
        }
    }

    /// 400: a malformed request.
    pub(crate) fn bad_request(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }

    fn forbidden(message: String) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 500: the server failed.
    pub(crate) fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The reply's status.
    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The reply's message.
    #[cfg(test)]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let (status, code) = match e.kind() {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not-found"),
            ErrorKind::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no-space"),
            ErrorKind::InvalidKey => (StatusCode::BAD_REQUEST, "bad-request"),
            ErrorKind::Transient => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ErrorKind::Unsupported => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
            ErrorKind::PermissionDenied | ErrorKind::Other => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        // The server's own paths stay out of replies: the key and kind suffice.
        let message = match e.kind() {
            ErrorKind::NoSpace => "no space left on the server's storage".to_string(),
            ErrorKind::NotFound => format!("object '{}' not found", e.key()),
            ErrorKind::InvalidKey => e.to_string(),
            _ => {
                eprintln!("vbackup server: storage error: {e}");
                format!("storage failure on the server for object '{}'", e.key())
            }
        };
        Self::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorReply {
            error: self.message,
        });
        (self.status, [(ERROR_CODE_HEADER, self.code)], body).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// An authenticated request on one repository.
struct Access {
    token: TokenEntry,
    repo: String,
    backend: LocalBackend,
    shared: AppState,
}

impl Access {
    fn root(&self) -> PathBuf {
        self.backend.root().to_path_buf()
    }

    fn owns_lock(&self, key: &str) -> bool {
        key.starts_with("locks/")
            && records::writer_of(&self.shared.data, &self.repo, key)
                .is_some_and(|id| id == self.token.id)
    }

    /// Records this token as the writer of `key` when its writer is kept.
    fn record_writer(&self, key: &str) -> ApiResult<()> {
        if !records::recorded(key) {
            return Ok(());
        }
        records::record_writer(&self.shared.data, &self.repo, key, &self.token.id).map_err(|e| {
            ApiError::internal(format!("cannot record which token wrote '{key}': {e}"))
        })
    }

    /// Who wrote `key`, as refusals name it (`LABEL (token ID)`).
    fn writer(&self, key: &str) -> Option<String> {
        let id = records::writer_of(&self.shared.data, &self.repo, key)?;
        Some(match self.shared.tokens.find(&id) {
            Some(token) => token.describe(),
            None => format!("token {id} (since removed)"),
        })
    }
}

/// The token the request carries, authenticated.
fn authenticate(shared: &AppState, headers: &HeaderMap) -> ApiResult<crate::tokens::TokenEntry> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.into());
    let token = match bearer.map(|b| shared.tokens.authenticate(b.trim())) {
        None | Some(Err(AuthError::Missing)) => return Err(unauthorized("no token given")),
        Some(Err(AuthError::Invalid)) => return Err(unauthorized("unknown or wrong token")),
        Some(Err(AuthError::Broken(why))) => return Err(broken_tokens(shared, &why)),
        Some(Ok(token)) => token,
    };
    Ok(token)
}

/// Checks the repository name, the token and its scope.
fn authorize(shared: &AppState, headers: &HeaderMap, repo: &str) -> ApiResult<Access> {
    validate_repo_name(repo).map_err(ApiError::bad_request)?;
    let token = authenticate(shared, headers)?;
    if !token.covers(repo) {
        return Err(ApiError::forbidden(format!(
            "this token opens repository '{}', not '{repo}': use a token made for '{repo}' (`vbackup server token add --repo {repo}`)",
            token.repo
        )));
    }
    let root = shared.data.join("repos").join(repo);
    if token.role != Role::Admin && !root.is_dir() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            CODE_NO_REPOSITORY,
            format!("no repository '{repo}' on this server (`vbackup init` with an admin token creates it)"),
        ));
    }
    Ok(Access {
        token,
        repo: repo.to_string(),
        backend: LocalBackend::new(root),
        shared: Arc::clone(shared),
    })
}

/// 503 while the token file is broken; the reply leaves out the server's
/// own paths.
fn broken_tokens(shared: &Shared, why: &str) -> ApiError {
    let path = tokens_path(&shared.data).display().to_string();
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "tokens-broken",
        format!(
            "the server's token file is broken, so it refuses every request until its operator fixes it: {}",
            why.replace(&path, "tokens.json")
        ),
    )
}

fn check_key(key: &str) -> ApiResult<()> {
    validate_key(key).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Runs blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("request worker failed: {e}")))?
}

/// `?offset=&length=` of a ranged read.
#[derive(Debug, Deserialize)]
struct RangeQuery {
    offset: Option<u64>,
    length: Option<u64>,
}

async fn get_object(
    State(shared): State<AppState>,
    Path((repo, key)): Path<(String, String)>,
    Query(range): Query<RangeQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let access = authorize(&shared, &headers, &repo)?;
    check_key(&key)?;
    let ranged = match (range.offset, range.length) {
        (None, None) => None,
        (offset, length) => Some((offset.unwrap_or(0), length.unwrap_or(u64::MAX))),
    };
    crate::download::object_reply(access.root().join(&key), key, ranged).await
}

/// What is stored under the name `key` compared with `data`.
fn compare(access: &Access, key: &str, data: &[u8]) -> ApiResult<Existing> {
    let Some(info) = access.backend.stat(key)? else {
        return Ok(Existing::Absent);
    };
    if info.size != data.len() as u64 {
        return Ok(Existing::Different);
    }
    let stored = access.backend.get(key)?;
    Ok(if stored == data {
        Existing::Same
    } else {
        Existing::Different
    })
}

/// Refreshes an object's modification time without changing its bytes.
fn touch(access: &Access, key: &str) -> Result<(), StorageError> {
    let path = access.root().join(key);
    let result = fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    result.map_err(|e| StorageError::from_io(key, "refreshing the object's time", e))
}

/// Refreshes an existing object's time; if it vanished since it was
/// compared (a prune moved it to its trash), stores the upload as a new
/// object, as a put after the move would.
fn touch_or_write(access: &Access, key: &str, body: &[u8]) -> ApiResult<()> {
    match touch(access, key) {
        Err(e) if e.is_not_found() => {
            access.record_writer(key)?;
            Ok(access.backend.put(key, body)?)
        }
        other => Ok(other?),
    }
}

async fn put_object(
    State(shared): State<AppState>,
    Path((repo, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Everything that can refuse without the body does so before it is
    // read, so a client without a valid token, or with one that may not
    // write here, cannot make the server buffer anything.
    let access = authorize(&shared, &headers, &repo)?;
    check_key(&key)?;
    if let PutDecision::Refuse(reason) = decide_put(access.token.role, &key, Existing::Absent, true)
    {
        return Err(ApiError::forbidden(reason));
    }
    let access = blocking(move || {
        refuse_loose_chunk_in_packs(&access, &key)?;
        Ok((access, key))
    })
    .await?;
    let (access, key) = access;
    let memory = reserve_memory(&shared.upload_memory, &headers, MAX_BODY, shared.timeout).await?;
    let body = read_body(body, &headers, MAX_BODY, shared.timeout, "the object").await?;
    check_pack_name(&key, &body)?;
    let stored = blocking(move || store(&access, &key, &body)).await;
    drop(memory);
    stored
}

/// Refuses a loose chunk (`chunks/...`) in a repository whose config says
/// it keeps chunks in packs: such a chunk would shadow the packed one
/// (`vbackup_core::packs`), so junk uploaded under a packed chunk's name
/// would let the admin's next prune drop the real one.
fn refuse_loose_chunk_in_packs(access: &Access, key: &str) -> ApiResult<()> {
    if !key.starts_with("chunks/") {
        return Ok(());
    }
    let bytes = match access.backend.get("config") {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let config: Config = parse_plain_json(ObjectKind::Config, "config", &bytes).map_err(|e| {
        ApiError::internal(format!(
            "the config of repository '{}' is unreadable ({e}), so the server accepts no chunk for it",
            access.repo
        ))
    })?;
    if config.version >= 2 && config.packs() {
        return Err(ApiError::forbidden(format!(
            "repository '{}' keeps its chunks in packs, so the loose chunk '{key}' is refused (it would shadow a packed chunk); back up with a vbackup that writes packs",
            access.repo
        )));
    }
    Ok(())
}

/// Checks that a pack's name is the BLAKE3 hash of its bytes, as
/// `vbackup_core::packs::pack_key` names them (checkable without a key).
fn check_pack_name(key: &str, body: &[u8]) -> ApiResult<()> {
    if !key.starts_with(vbackup_core::packs::PACKS_PREFIX) {
        return Ok(());
    }
    let expected = vbackup_core::packs::pack_key(blake3::hash(body).as_bytes());
    if key != expected {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not the name of these bytes: a pack is named by the BLAKE3 hash of its content ('{expected}')"
        )));
    }
    Ok(())
}

/// Carries out a put whose body has arrived: the role's decision, the
/// quota, the writer record, then the write.
fn store(access: &Access, key: &str, body: &[u8]) -> ApiResult<Response> {
    let role = access.token.role;
    let existing = match role {
        Role::Admin if access.token.quota.is_none() => Existing::Absent,
        Role::Admin => match access.backend.stat(key)? {
            None => Existing::Absent,
            Some(_) => Existing::Different,
        },
        _ => compare(access, key, body)?,
    };
    match decide_put(role, key, existing, access.owns_lock(key)) {
        PutDecision::Write => {
            let new = existing == Existing::Absent;
            let size = body.len() as u64;
            if new {
                access.shared.usage.reserve(&access.token, size)?;
            }
            let written = access
                .record_writer(key)
                .and_then(|()| Ok(access.backend.put(key, body)?));
            if let Err(e) = written {
                if new {
                    access.shared.usage.release(&access.token, size);
                }
                return Err(e);
            }
            Ok(StatusCode::CREATED.into_response())
        }
        PutDecision::Touch if existing == Existing::Different => {
            touch_or_write(access, key, body)?;
            Ok((StatusCode::OK, [(KEPT_HEADER, "existing")]).into_response())
        }
        PutDecision::Touch => {
            touch_or_write(access, key, body)?;
            Ok(StatusCode::OK.into_response())
        }
        PutDecision::Refuse(reason) => Err(ApiError::forbidden(match access.writer(key) {
            Some(writer) => format!("{reason} ('{key}' was written by {writer})"),
            None => reason,
        })),
    }
}

async fn delete_object(
    State(shared): State<AppState>,
    Path((repo, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let access = authorize(&shared, &headers, &repo)?;
    check_key(&key)?;
    blocking(move || {
        let role = access.token.role;
        let lock = key.starts_with("locks/");
        // A repeated delete of a lease that is already gone changes nothing.
        if role == Role::Backup && lock && access.backend.stat(&key)?.is_none() {
            return Ok(StatusCode::NO_CONTENT);
        }
        if let Err(reason) = may_delete(role, &key, access.owns_lock(&key)) {
            return Err(ApiError::forbidden(match access.writer(&key) {
                Some(writer) => format!("{reason} ('{key}' was written by {writer})"),
                None => reason,
            }));
        }
        access.backend.delete(&key)?;
        records::forget_writer(&access.shared.data, &access.repo, &key);
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// `?writer=1` of a stat: the client wants to know who wrote the object.
#[derive(Debug, Deserialize)]
struct StatQuery {
    writer: Option<u8>,
}

async fn stat_object(
    State(shared): State<AppState>,
    Path((repo, key)): Path<(String, String)>,
    Query(query): Query<StatQuery>,
    headers: HeaderMap,
) -> ApiResult<Json<WireObject>> {
    let access = authorize(&shared, &headers, &repo)?;
    check_key(&key)?;
    blocking(move || match access.backend.stat(&key)? {
        Some(mut info) => {
            if query.writer == Some(1) {
                info.writer = access.writer(&key);
            }
            Ok(Json(WireObject::from_info(&info)))
        }
        None => Err(StorageError::new(ErrorKind::NotFound, &key, "not found").into()),
    })
    .await
}

/// `?prefix=` of a listing.
#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
}

/// Streams the listing as newline-delimited JSON ending with a count line;
/// a failure midway cuts the stream, which the client notices.
async fn list_objects(
    State(shared): State<AppState>,
    Path(repo): Path<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let access = authorize(&shared, &headers, &repo)?;
    let prefix = query.prefix;
    if !prefix.is_empty() {
        let dir = prefix.trim_end_matches('/');
        check_key(if dir.is_empty() { "x" } else { dir })?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let mut batch = Vec::new();
        let mut count = 0u64;
        let mut open = true;
        let result = access.backend.list_each(&prefix, &mut |info| {
            count += 1;
            batch.extend(encode_list_line(&ListLine::Object(WireObject::from_info(
                &info,
            ))));
            if open && batch.len() >= LIST_BATCH {
                open = tx
                    .blocking_send(Ok(Bytes::from(std::mem::take(&mut batch))))
                    .is_ok();
            }
        });
        let last = match result {
            Ok(()) => {
                batch.extend(encode_list_line(&ListLine::End { end: count }));
                Ok(Bytes::from(batch))
            }
            Err(e) => {
                eprintln!("vbackup server: listing failed: {e}");
                Err(std::io::Error::other("listing failed"))
            }
        };
        if open {
            let _ = tx.blocking_send(last);
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let headers = [(header::CONTENT_TYPE, "application/x-ndjson")];
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// Reads a JSON request body of at most [`MAX_JSON_BODY`] bytes.
async fn read_json<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<T> {
    let bytes = read_body(
        body,
        headers,
        MAX_JSON_BODY,
        shared.timeout,
        "the JSON request",
    )
    .await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON request: {e}")))
}

async fn missing(
    State(shared): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<MissingReply>> {
    let access = authorize(&shared, &headers, &repo)?;
    let request: MissingRequest = read_json(&shared, &headers, body).await?;
    if request.keys.len() > MAX_MISSING_BATCH {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_MISSING_BATCH} keys per query"
        )));
    }
    for key in &request.keys {
        check_key(key)?;
    }
    blocking(move || {
        let mut missing = Vec::new();
        for key in request.keys {
            if access.backend.stat(&key)?.is_none() {
                missing.push(key);
            }
        }
        Ok(Json(MissingReply { missing }))
    })
    .await
}

async fn rename(
    State(shared): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let access = authorize(&shared, &headers, &repo)?;
    may_rename(access.token.role).map_err(ApiError::forbidden)?;
    let request: RenameRequest = read_json(&shared, &headers, body).await?;
    check_key(&request.from)?;
    check_key(&request.to)?;
    blocking(move || {
        access.backend.rename(&request.from, &request.to)?;
        let data = &access.shared.data;
        records::move_writer(
            data,
            &access.repo,
            &request.from,
            &request.to,
            &access.token.id,
        )
        .map_err(|e| {
            ApiError::internal(format!(
                "moved '{}' to '{}' but cannot move the record of its writer: {e}",
                request.from, request.to
            ))
        })?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// The dashboard page: static, built into the binary; it asks
/// `/v1/overview` with the token the user gives it.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

async fn dashboard() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

/// The repositories the token covers, with what each holds.
async fn overview(
    State(shared): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let token = authenticate(&shared, &headers)?;
    let repos = shared.data.join("repos");
    let work = Arc::clone(&shared);
    let views = tokio::task::spawn_blocking(move || {
        let names: Vec<String> = crate::overview::repository_names(&repos)
            .into_iter()
            .filter(|name| token.covers(name))
            .collect();
        let views = work.overviews.of(&repos, &names);
        (token, views)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(serde_json::json!({
        "token": { "id": views.0.id, "repo": views.0.repo, "role": views.0.role },
        "repositories": views.1,
    })))
}

async fn whoami(
    State(shared): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<WhoAmI>> {
    let access = authorize(&shared, &headers, &repo)?;
    Ok(Json(WhoAmI {
        id: access.token.id,
        repo: access.token.repo,
        role: access.token.role,
    }))
}
