//! The HTTP API (`/v1/...`, described in `docs/server.md`): each request
//! is authenticated, its repository name and object name checked, its role
//! checked at the object level ([`crate::access`]), then carried out on the
//! repository's [`LocalBackend`] in a blocking thread.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use vbackup_core::roles::Role;
use vbackup_remote::protocol::{
    encode_list_line, validate_repo_name, ErrorReply, ListLine, MissingReply, MissingRequest,
    RenameRequest, WhoAmI, WireObject, CODE_NO_REPOSITORY, ERROR_CODE_HEADER, MAX_MISSING_BATCH,
};
use vbackup_remote::OBJECT_SIZE_HEADER;
use vbackup_storage::{validate_key, Backend, ErrorKind, LocalBackend, StorageError};

use crate::access::{decide_put, may_delete, may_rename, Existing, PutDecision};
use crate::tokens::{AuthError, TokenEntry, TokenStore};

/// The largest request body (a sealed 64 MiB chunk, with room to spare).
const MAX_BODY: usize = 80 << 20;

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
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            code,
        }
    }

    fn bad_request(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }

    fn forbidden(message: String) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
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

    /// The sidecar that records which token created lock `key`.
    fn owner_file(&self, key: &str) -> PathBuf {
        self.shared
            .data
            .join("lock-owners")
            .join(&self.repo)
            .join(key.trim_start_matches("locks/"))
    }

    fn owns_lock(&self, key: &str) -> bool {
        key.starts_with("locks/")
            && fs::read_to_string(self.owner_file(key)).is_ok_and(|id| id == self.token.id)
    }

    fn record_owner(&self, key: &str) -> ApiResult<()> {
        let path = self.owner_file(key);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(&path, &self.token.id)
        };
        write().map_err(|e| ApiError::internal(format!("cannot record the lock's owner: {e}")))
    }
}

/// Checks the repository name, the token and its scope.
fn authorize(shared: &AppState, headers: &HeaderMap, repo: &str) -> ApiResult<Access> {
    validate_repo_name(repo).map_err(ApiError::bad_request)?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.into());
    let token = match bearer.map(|b| shared.tokens.authenticate(b.trim())) {
        None | Some(Err(AuthError::Missing)) => return Err(unauthorized("no token given")),
        Some(Err(AuthError::Invalid)) => return Err(unauthorized("unknown or wrong token")),
        Some(Ok(token)) => token,
    };
    if !token.covers(repo) {
        return Err(ApiError::forbidden(format!(
            "this token opens repository '{}', not '{repo}'",
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
    blocking(move || {
        let backend = &access.backend;
        let octets = [(header::CONTENT_TYPE, "application/octet-stream".to_string())];
        match (range.offset, range.length) {
            (None, None) => Ok((octets, backend.get(&key)?).into_response()),
            (offset, length) => {
                let (offset, length) = (offset.unwrap_or(0), length.unwrap_or(u64::MAX));
                let size = backend
                    .stat(&key)?
                    .ok_or_else(|| StorageError::new(ErrorKind::NotFound, &key, "not found"))?
                    .size;
                let data = backend.get_range(&key, offset, length)?;
                let size_header = [(OBJECT_SIZE_HEADER, size.to_string())];
                Ok((octets, size_header, data).into_response())
            }
        }
    })
    .await
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
        Err(e) if e.is_not_found() => Ok(access.backend.put(key, body)?),
        other => Ok(other?),
    }
}

async fn put_object(
    State(shared): State<AppState>,
    Path((repo, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Authenticated before the body is read, so a client without a valid
    // token cannot make the server buffer anything.
    let access = authorize(&shared, &headers, &repo)?;
    check_key(&key)?;
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    blocking(move || {
        let role = access.token.role;
        if role == Role::Read {
            return Err(ApiError::forbidden(
                "a read token cannot store objects".into(),
            ));
        }
        let existing = match role {
            Role::Admin => Existing::Absent,
            _ => compare(&access, &key, &body)?,
        };
        match decide_put(role, &key, existing, access.owns_lock(&key)) {
            PutDecision::Write => {
                if role == Role::Backup && key.starts_with("locks/") {
                    access.record_owner(&key)?;
                }
                access.backend.put(&key, &body)?;
                Ok(StatusCode::CREATED.into_response())
            }
            PutDecision::Touch if existing == Existing::Different => {
                touch_or_write(&access, &key, &body)?;
                Ok((StatusCode::OK, [(KEPT_HEADER, "existing")]).into_response())
            }
            PutDecision::Touch => {
                touch_or_write(&access, &key, &body)?;
                Ok(StatusCode::OK.into_response())
            }
            PutDecision::Refuse(reason) => Err(ApiError::forbidden(reason)),
        }
    })
    .await
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
        may_delete(role, &key, access.owns_lock(&key)).map_err(ApiError::forbidden)?;
        access.backend.delete(&key)?;
        if lock {
            let _ = fs::remove_file(access.owner_file(&key));
        }
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn stat_object(
    State(shared): State<AppState>,
    Path((repo, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<WireObject>> {
    let access = authorize(&shared, &headers, &repo)?;
    check_key(&key)?;
    blocking(move || match access.backend.stat(&key)? {
        Some(info) => Ok(Json(WireObject::from_info(&info))),
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

async fn missing(
    State(shared): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    Json(request): Json<MissingRequest>,
) -> ApiResult<Json<MissingReply>> {
    let access = authorize(&shared, &headers, &repo)?;
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
    Json(request): Json<RenameRequest>,
) -> ApiResult<StatusCode> {
    let access = authorize(&shared, &headers, &repo)?;
    may_rename(access.token.role).map_err(ApiError::forbidden)?;
    check_key(&request.from)?;
    check_key(&request.to)?;
    blocking(move || {
        access.backend.rename(&request.from, &request.to)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn whoami(
    State(shared): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<WhoAmI>> {
    let access = authorize(&shared, &headers, &repo)?;
    let role = match access.token.role {
        Role::Read => "read",
        Role::Backup => "backup",
        Role::Admin => "admin",
    };
    Ok(Json(WhoAmI {
        id: access.token.id,
        repo: access.token.repo,
        role: role.to_string(),
    }))
}
