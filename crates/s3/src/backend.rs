//! [`S3Backend`]: the synchronous [`Backend`] over an OpenDAL operator.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use opendal::layers::TimeoutLayer;
use opendal::services::S3;
use opendal::{HttpTransporter, OperationContext, Operator};
use opendal_http_transport_reqwest::ReqwestTransport;
use vbackup_storage::{validate_key, Backend, ErrorKind, ObjectInfo, Result, StorageError};

use crate::error::{Op, Place};
use crate::S3Location;

/// Requests the backend wants in flight: enough to hide a few milliseconds
/// of latency per request at disk speed with 4 MiB chunks.
const CONCURRENCY: usize = 16;

/// Default limit for one request, or one body read or write, to make
/// progress; `VBACKUP_S3_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Time allowed to open a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An S3-compatible object store (AWS S3, Garage, MinIO, Ceph RGW, …)
/// holding a repository under a prefix of a bucket.
///
/// Requests go through OpenDAL on a private tokio runtime; every method
/// blocks its calling thread until the request is done, and many threads
/// may call at once (the runtime multiplexes their connections). It
/// retries nothing itself: wrap it in [`vbackup_storage::RetryBackend`],
/// as [`open`](crate::open) does.
///
/// A repository name may list several endpoints of one cluster
/// (`s3:http://node1:3900,node2:3900/BUCKET`): requests go to one of them,
/// and a transient failure (a node down, a refused connection, a timeout)
/// moves every later request to the next, so a retried request reaches a
/// node that still answers.
#[derive(Debug)]
pub struct S3Backend {
    runtime: tokio::runtime::Runtime,
    endpoints: Vec<Endpoint>,
    /// Index into `endpoints` of the one requests go to now.
    current: AtomicUsize,
}

/// One endpoint of the store: its client and how errors name it.
#[derive(Debug)]
struct Endpoint {
    operator: Operator,
    place: Place,
}

impl Endpoint {
    fn err(&self, op: Op, key: &str) -> impl Fn(opendal::Error) -> StorageError + '_ {
        let key = key.to_string();
        move |e| self.place.error(op, &key, &e)
    }
}

/// An access key, its secret and the region, given explicitly rather than
/// through the environment or the AWS files.
#[derive(Clone)]
pub struct S3Credentials {
    /// The access key id (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// The secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
    /// The region (`AWS_REGION`).
    pub region: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Builds a backend for `location` with credentials and region from
    /// the environment (see the crate docs). Sends no request.
    pub fn new(location: &S3Location) -> Result<Self> {
        Self::build(location, None)
    }

    /// Builds a backend for `location` with the given credentials and
    /// region; the environment's are ignored. Sends no request.
    pub fn with_credentials(location: &S3Location, credentials: &S3Credentials) -> Result<Self> {
        Self::build(location, Some(credentials))
    }

    fn build(location: &S3Location, credentials: Option<&S3Credentials>) -> Result<Self> {
        let config_error = |what: &str, e: &dyn std::fmt::Display| {
            StorageError::new(
                ErrorKind::Other,
                &location.display(),
                format!("cannot set up the S3 client: {what}: {e}"),
            )
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vbackup-s3")
            .enable_all()
            .build()
            .map_err(|e| config_error("starting the I/O runtime", &e))?;
        let client = http_client().map_err(|e| config_error("building the HTTP client", &e))?;
        let endpoints = location
            .endpoints
            .iter()
            .map(|endpoint| {
                let operator = operator(location, endpoint, credentials, &client)
                    .map_err(|e| config_error("invalid S3 settings", &e))?;
                let place = Place {
                    location: location.display(),
                    endpoint: endpoint.to_string(),
                    bucket: location.bucket.clone(),
                };
                Ok(Endpoint { operator, place })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            runtime,
            endpoints,
            current: AtomicUsize::new(0),
        })
    }

    /// Checks that the bucket exists and the credentials may list it, so a
    /// wrong endpoint, bucket or key fails at once with a clear message.
    pub fn check(&self) -> Result<()> {
        self.on_endpoint(|ep| {
            self.run(ep.operator.check())
                .map_err(|e| ep.place.error(Op::Check, &ep.place.bucket, &e))
        })
    }

    fn run<F: IntoFuture>(&self, future: F) -> F::Output {
        self.runtime.block_on(future.into_future())
    }

    /// Runs `request` against the current endpoint; after a transient
    /// failure, later requests go to the next endpoint (once per failure,
    /// even when many workers fail at the same moment).
    fn on_endpoint<T>(&self, request: impl FnOnce(&Endpoint) -> Result<T>) -> Result<T> {
        let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        let result = request(&self.endpoints[index]);
        if matches!(&result, Err(e) if e.is_transient()) && self.endpoints.len() > 1 {
            let next = (index + 1) % self.endpoints.len();
            let _ =
                self.current
                    .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
        }
        result
    }
}

/// An OpenDAL operator for the bucket and prefix of `location` at
/// `endpoint`, with the given credentials or the environment's.
fn operator(
    location: &S3Location,
    endpoint: &str,
    credentials: Option<&S3Credentials>,
    client: &reqwest::Client,
) -> opendal::Result<Operator> {
    let builder = S3::default()
        .endpoint(endpoint)
        .bucket(&location.bucket)
        .root(&format!("/{}", location.prefix))
        .disable_ec2_metadata();
    let builder = match credentials {
        Some(c) => builder
            .region(&c.region)
            .access_key_id(&c.access_key_id)
            .secret_access_key(&c.secret_access_key)
            .disable_config_load(),
        None => match std::env::var("AWS_PROFILE") {
            Ok(profile) if !profile.is_empty() => builder.region(&region()).profile(&profile),
            _ => builder.region(&region()),
        },
    };
    let timeout = timeout();
    Ok(Operator::new(builder)?
        .with_context(
            OperationContext::new()
                .with_http_transport(HttpTransporter::new(ReqwestTransport::new(client.clone()))),
        )
        .layer(
            TimeoutLayer::new()
                .with_timeout(timeout)
                .with_io_timeout(timeout),
        ))
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.endpoints[0].place.location.clone()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        validate_key(key)?;
        // One PutObject: S3 stores it whole or not at all.
        self.on_endpoint(|ep| {
            self.run(ep.operator.write(key, data.to_vec()))
                .map_err(ep.err(Op::Put, key))?;
            Ok(())
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        validate_key(key)?;
        // The HTTP layer fails a body shorter than its Content-Length.
        self.on_endpoint(|ep| {
            let buffer = self
                .run(ep.operator.read(key))
                .map_err(ep.err(Op::Get, key))?;
            Ok(buffer.to_vec())
        })
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        validate_key(key)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let end = offset
            .checked_add(length)
            .ok_or_else(|| StorageError::new(ErrorKind::Other, key, "the byte range overflows"))?;
        self.on_endpoint(|ep| {
            let buffer = self
                .run(ep.operator.read_with(key).range(offset..end))
                .map_err(ep.err(Op::Get, key))?;
            // A server may end a range early only at the end of the object
            // (as a file read does); more bytes than asked is a broken reply.
            if buffer.len() as u64 > length {
                return Err(StorageError::new(
                    ErrorKind::Other,
                    key,
                    format!(
                        "the S3 server at {} sent {} bytes for a range of {length}",
                        ep.place.endpoint,
                        buffer.len()
                    ),
                ));
            }
            Ok(buffer.to_vec())
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut objects = Vec::new();
        self.list_each(prefix, &mut |o| objects.push(o))?;
        Ok(objects)
    }

    fn list_each(&self, prefix: &str, visit: &mut dyn FnMut(ObjectInfo)) -> Result<()> {
        // List the folder part recursively (one ListObjectsV2 page of up
        // to 1000 names per request) and keep the names with the prefix.
        let folder = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let path = if folder.is_empty() {
            "/".to_string()
        } else {
            format!("{folder}/")
        };
        self.on_endpoint(|ep| self.list_on(ep, prefix, &path, visit))
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        validate_key(key)?;
        self.on_endpoint(|ep| match self.run(ep.operator.stat(key)) {
            Ok(meta) => Ok(Some(info(key, &meta))),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ep.place.error(Op::Stat, key, &e)),
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.on_endpoint(|ep| {
            self.run(ep.operator.delete(key))
                .map_err(ep.err(Op::Delete, key))
        })
    }

    fn concurrency(&self) -> usize {
        CONCURRENCY
    }
}

impl S3Backend {
    /// Streams the objects under `path` whose names start with `prefix` to
    /// `visit`, from one endpoint.
    fn list_on(
        &self,
        ep: &Endpoint,
        prefix: &str,
        path: &str,
        visit: &mut dyn FnMut(ObjectInfo),
    ) -> Result<()> {
        let to_err = ep.err(Op::List, prefix);
        self.run(async {
            let mut lister = ep.operator.lister_with(path).recursive(true).await?;
            while let Some(entry) = lister.try_next().await? {
                let key = entry.path();
                if !entry.metadata().is_file()
                    || !key.starts_with(prefix)
                    || validate_key(key).is_err()
                {
                    continue;
                }
                visit(info(key, entry.metadata()));
            }
            Ok::<(), opendal::Error>(())
        })
        .or_else(|e| {
            if e.kind() == opendal::ErrorKind::NotFound && !e.to_string().contains("NoSuchBucket") {
                Ok(())
            } else {
                Err(to_err(e))
            }
        })
    }
}

fn info(key: &str, meta: &opendal::Metadata) -> ObjectInfo {
    ObjectInfo {
        key: key.to_string(),
        size: meta.content_length(),
        modified: meta.last_modified().map(SystemTime::from),
        writer: None,
    }
}

/// `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`.
fn region() -> String {
    ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "us-east-1".to_string())
}

fn timeout() -> Duration {
    std::env::var("VBACKUP_S3_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
}

/// A reqwest client over rustls with `ring` crypto, enough idle
/// connections for every worker, and a bounded connect time.
fn http_client() -> std::result::Result<reqwest::Client, reqwest::Error> {
    // Only the first provider installed in a process counts; a second call
    // (a second backend) finds it there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_max_idle_per_host(2 * CONCURRENCY)
        .tcp_nodelay(true)
        .build()
}
