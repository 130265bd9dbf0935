//! The daemon's REST API, on a unix socket for local root.
//!
//! JSON over HTTP/1.1 (axum on a private tokio runtime, so nothing async
//! leaks out of this module):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/jobs` | every job: schedule, next run, last run, progress |
//! | POST | `/api/v1/runs` `{"job": NAME}` | run a job now (or as soon as it may) |
//! | GET | `/api/v1/runs?job=&vm=&status=&limit=` | the history, newest first |
//! | GET | `/api/v1/runs/{id}` | one run |
//! | POST | `/api/v1/runs/{id}/cancel` | cancel a running run |
//! | GET | `/api/v1/repositories` | each repository's usage and damaged snapshots |
//! | GET | `/api/v1/snapshots?vm=` | a VM's snapshots |
//! | GET | `/` | the dashboard |
//! | GET | `/metrics` | Prometheus metrics |
//! | GET | `/api/v1/openapi.json` | this API as an OpenAPI document (utoipa) |
//! | GET | `/api/v1/host` | the host's name and vbackup's version |
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 404 (unknown job
//! or run) or 500. The socket is created 0600: whoever can open it can run
//! and cancel backups, which is root's business. The TCP listener
//! (`[daemon] listen`) serves the same reads and `GET /metrics`, and no
//! request that changes anything: it has no authentication. Described in
//! `docs/daemon.md`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::history::{Run, RunFilter, Status};
use crate::scheduler::{Daemon, JobStatus};
use crate::views::{RepositoryView, SnapshotView};
use crate::{Error, Result};

/// A running API server; dropping it stops it (and removes its socket).
pub struct ApiServer {
    socket: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Serves `daemon`'s API on the unix socket `socket`. A socket file left
/// by a killed daemon is replaced; one that a running daemon answers on is
/// refused.
pub fn serve_unix(daemon: Arc<Daemon>, socket: &Path) -> Result<ApiServer> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(Error::Invalid(format!(
            "another daemon answers on {}; stop it first",
            socket.display()
        )));
    }
    let _ = std::fs::remove_file(socket);
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io(format!(
            "creating the folder of {}",
            socket.display()
        )))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(Error::io(format!("listening on {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("making {} private", socket.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io("preparing the API socket"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the API's runtime"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = router(daemon);
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        })
        .map_err(Error::io("starting the API thread"))?;
    Ok(ApiServer {
        socket: Some(socket.to_path_buf()),
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Serves the reads of `daemon`'s API and `/metrics` on the TCP address
/// `listen` (`127.0.0.1:8470`).
pub fn serve_tcp(daemon: Arc<Daemon>, listen: &str) -> Result<ApiServer> {
    let listener =
        std::net::TcpListener::bind(listen).map_err(Error::io(format!("listening on {listen}")))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io("preparing the TCP listener"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the listener's runtime"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = read_only_router(daemon);
    let thread = std::thread::Builder::new()
        .name("listen".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        })
        .map_err(Error::io("starting the listener thread"))?;
    Ok(ApiServer {
        socket: None,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The routes of the unix socket: everything.
fn router(daemon: Arc<Daemon>) -> Router {
    reads()
        .route("/api/v1/runs", get(list_runs).post(start_run))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .with_state(daemon)
}

/// The routes of the TCP listener: reads only.
fn read_only_router(daemon: Arc<Daemon>) -> Router {
    reads()
        .route("/api/v1/runs", get(list_runs))
        .with_state(daemon)
}

/// The API's OpenAPI document, generated from the handlers and types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "vbackup daemon",
        description = "Jobs, runs, repositories and snapshots of `vbackup daemon`. The unix socket serves everything; the TCP listener only the GET routes."
    ),
    paths(
        host,
        list_jobs,
        start_run,
        list_runs,
        show_run,
        cancel_run,
        list_repositories,
        list_snapshots,
        metrics
    ),
    components(schemas(
        JobStatus,
        Run,
        RunRequest,
        RunStarted,
        RepositoryView,
        SnapshotView,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

async fn openapi() -> Response {
    Json(<ApiDoc as utoipa::OpenApi>::openapi()).into_response()
}

/// The routes that read: the dashboard, the API's GETs, the metrics.
fn reads() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/host", get(host))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/runs/{id}", get(show_run))
        .route("/api/v1/repositories", get(list_repositories))
        .route("/api/v1/snapshots", get(list_snapshots))
        .route("/metrics", get(metrics))
}

/// The dashboard: one page of HTML, CSS and JS built into the binary,
/// which needs nothing from the internet.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

async fn dashboard() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/host", responses((status = 200, description = "The host's name and vbackup's version", body = Object)))]
async fn host() -> Response {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    Json(serde_json::json!({ "host": host, "version": env!("CARGO_PKG_VERSION") })).into_response()
}

#[utoipa::path(get, path = "/api/v1/repositories", responses((status = 200, description = "Each repository's usage and damaged snapshots", body = [RepositoryView])))]
async fn list_repositories(
    State(daemon): State<Arc<Daemon>>,
) -> std::result::Result<Response, ApiError> {
    let views = blocking(move || Ok(daemon.repositories())).await?;
    Ok(Json(views).into_response())
}

/// The query of `GET /api/v1/snapshots`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct SnapshotQuery {
    /// The VM.
    vm: String,
}

#[utoipa::path(get, path = "/api/v1/snapshots", params(SnapshotQuery), responses((status = 200, description = "The VM's snapshots, newest first", body = [SnapshotView]), (status = 400, description = "No such VM", body = ErrorBody)))]
async fn list_snapshots(
    State(daemon): State<Arc<Daemon>>,
    Query(query): Query<SnapshotQuery>,
) -> std::result::Result<Response, ApiError> {
    let list = blocking(move || daemon.snapshots(&query.vm)).await?;
    Ok(Json(list).into_response())
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus metrics (OpenMetrics text)", body = String, content_type = "application/openmetrics-text")))]
async fn metrics(State(daemon): State<Arc<Daemon>>) -> std::result::Result<Response, ApiError> {
    let text = blocking(move || crate::metrics::render(&daemon)).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// An error as the API answers it.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = match &error {
            Error::Invalid(text)
                if text.starts_with("no job") || text.contains("is not running") =>
            {
                StatusCode::NOT_FOUND
            }
            Error::Invalid(_) | Error::Config { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, error.to_string())
    }
}

/// Runs blocking daemon work off the runtime's thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

#[utoipa::path(get, path = "/api/v1/jobs", responses((status = 200, description = "Every job: schedule, next run, last run, progress, RPO", body = [JobStatus])))]
async fn list_jobs(State(daemon): State<Arc<Daemon>>) -> std::result::Result<Response, ApiError> {
    let jobs = blocking(move || daemon.status()).await?;
    Ok(Json(jobs).into_response())
}

/// The body of `POST /api/v1/runs`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct RunRequest {
    /// The job's name, or a VM's for its backup.
    pub job: String,
}

/// The answer to `POST /api/v1/runs`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct RunStarted {
    /// The run's id when it started at once.
    pub run: Option<i64>,
    /// Whether it waits for its VM, its repository or a limit.
    pub queued: bool,
}

#[utoipa::path(post, path = "/api/v1/runs", request_body = RunRequest, responses((status = 202, description = "Started, or queued until it may start", body = RunStarted), (status = 404, description = "No such job", body = ErrorBody)))]
async fn start_run(
    State(daemon): State<Arc<Daemon>>,
    Json(request): Json<RunRequest>,
) -> std::result::Result<Response, ApiError> {
    let run = blocking(move || daemon.run_now(&request.job)).await?;
    let answer = RunStarted {
        run,
        queued: run.is_none(),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// The query of `GET /api/v1/runs`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
struct RunQuery {
    /// Only this job's runs.
    job: Option<String>,
    /// Only this VM's runs.
    vm: Option<String>,
    /// Only runs that ended so (or are `running`).
    status: Option<String>,
    /// At most this many (default 50, at most 10,000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/runs", params(RunQuery), responses((status = 200, description = "Runs, newest first", body = [Run]), (status = 400, description = "Unknown status", body = ErrorBody)))]
async fn list_runs(
    State(daemon): State<Arc<Daemon>>,
    Query(query): Query<RunQuery>,
) -> std::result::Result<Response, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(parse_status(text).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown status '{text}': running, succeeded, failed, interrupted or cancelled"
                ),
            )
        })?),
    };
    let filter = RunFilter {
        job: query.job,
        vm: query.vm,
        status,
        limit: query.limit.unwrap_or(50).min(10_000),
    };
    let runs = blocking(move || daemon.history().runs(&filter)).await?;
    Ok(Json(runs).into_response())
}

/// A status word.
fn parse_status(text: &str) -> Option<Status> {
    [
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Interrupted,
        Status::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
}

#[utoipa::path(get, path = "/api/v1/runs/{id}", params(("id" = i64, Path, description = "The run")), responses((status = 200, description = "The run", body = Run), (status = 404, description = "No such run", body = ErrorBody)))]
async fn show_run(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<i64>,
) -> std::result::Result<Response, ApiError> {
    match blocking(move || daemon.history().run(id)).await? {
        Some(run) => Ok(Json(run).into_response()),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no run {id}"))),
    }
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", params(("id" = i64, Path, description = "The run")), responses((status = 202, description = "The run is being cancelled", body = Object), (status = 404, description = "The run is not running", body = ErrorBody)))]
async fn cancel_run(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<i64>,
) -> std::result::Result<Response, ApiError> {
    blocking(move || daemon.cancel(id)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "cancelled": id })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_openapi_document_describes_every_api_route() {
        let doc = <ApiDoc as utoipa::OpenApi>::openapi();
        let json = serde_json::to_value(&doc).unwrap();
        let paths: Vec<&str> = json["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for route in [
            "/api/v1/host",
            "/api/v1/jobs",
            "/api/v1/runs",
            "/api/v1/runs/{id}",
            "/api/v1/runs/{id}/cancel",
            "/api/v1/repositories",
            "/api/v1/snapshots",
            "/metrics",
        ] {
            assert!(paths.contains(&route), "{route} missing from {paths:?}");
        }
        assert!(json["paths"]["/api/v1/runs"]["post"].is_object());
        let run = &json["components"]["schemas"]["Run"]["properties"];
        assert!(run["bytes-read"].is_object(), "kebab-case names: {run}");
        assert!(json["components"]["schemas"]["JobStatus"]["properties"]["next-run"].is_object());
    }
}
