//! Locks and backup leases (`locks/<32 hex>`), `vbackup locks` and
//! `vbackup unlock`.
//!
//! Every backup holds a *lease*: a sealed lock object of kind `backup` that
//! a thread rewrites every refresh interval and that is removed when the
//! backup ends. Leases never exclude anything and nobody waits for them;
//! they tell a prune which backups are running and which prune lists each
//! has seen. Prune and repair hold *exclusive* locks: each writes its lock,
//! then lists the others, and refuses if another live exclusive lock
//! exists — two of them can both refuse, but never both run.
//!
//! A lock whose holder stopped refreshing it for longer than the holder
//! promised (`stale-after-secs`) is *stale*; so is a lock whose process is
//! provably gone (same boot and pid namespace, pid no longer running). Stale
//! locks are ignored by prune, reported by `check`, and removed by `unlock`.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use vbackup_storage::{Backend, ObjectInfo};

use crate::crypto::{random_bytes, Crypto};
use crate::format::lifecycle::{check_version, LockFile, LockKind, LIFECYCLE_VERSION};
use crate::format::{open_object_owned, seal_object, ObjectKind};
use crate::repo::LOCKS_PREFIX;
use crate::{Error, Repository, Result};

/// How often a lock is rewritten and when it counts as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// Interval between rewrites.
    pub refresh: Duration,
    /// A lock not rewritten for longer than this is stale.
    pub stale_after: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(60),
            stale_after: Duration::from_secs(600),
        }
    }
}

/// The longest stale limit a lock may claim: the limit every lock and
/// lease of this version promises ([`LeaseTiming::default`], 10 minutes,
/// refreshed every minute). A lock that claims more is judged with this,
/// so a forged lock cannot block the repository for longer than a crashed
/// prune would.
pub const MAX_STALE_AFTER: Duration = Duration::from_secs(600);

/// How far a lock's modification time may lie ahead of the clock it is
/// judged by and still count as a refresh: storage clocks and the estimate
/// of them differ by a few seconds, a host's clock by more. Anything later
/// is a time in the future, which no refresh can have produced.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);

/// The clock locks are judged by: the storage's, read through the judge's
/// own freshly written lock, or the host's where the judge holds none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    now: SystemTime,
    storage: bool,
}

impl Clock {
    /// This host's clock.
    pub(crate) fn host() -> Self {
        Self {
            now: SystemTime::now(),
            storage: false,
        }
    }

    /// The time now by this clock.
    pub(crate) fn now(self) -> SystemTime {
        self.now
    }

    fn name(self) -> &'static str {
        match self.storage {
            true => "the storage's clock",
            false => "this host's clock",
        }
    }
}

/// A lock as found in the repository.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockInfo {
    /// The lock id (object name without the folder).
    pub id: String,
    /// The lock's content; `None` when it cannot be read.
    pub lock: Option<LockFile>,
    /// Why it cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// When the storage says the lock object was last written (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified: Option<String>,
    /// Seconds since it was last written (by the storage's modification
    /// time; the holder's claimed refresh time only where the storage tells
    /// none).
    pub age_secs: u64,
    /// Why the lock is stale; `None` for a live lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
    /// The object as listed.
    #[serde(skip)]
    pub object: ObjectInfo,
}

impl LockInfo {
    /// The object name.
    pub fn key(&self) -> String {
        format!("{LOCKS_PREFIX}{}", self.id)
    }

    /// True when the lock's holder is considered alive.
    pub fn is_live(&self) -> bool {
        self.stale.is_none()
    }

    /// The holder's kind; unreadable locks count as backups (they block
    /// garbage collection until they are stale or removed).
    pub fn kind(&self) -> LockKind {
        self.lock.as_ref().map_or(LockKind::Backup, |l| l.kind)
    }

    /// "backup lock 1234abcd held by pid 123 on host 'h' since <time>
    /// (object 'locks/…' (last written …), N s ago)", for messages.
    pub fn describe(&self) -> String {
        self.describe_object_as(&self.object)
    }

    /// [`LockInfo::describe`], naming also the token that wrote the lock
    /// where the storage knows it (one more request: for refusals).
    pub fn describe_with_writer(&self, repo: &crate::Repository) -> String {
        self.describe_object_as(&super::with_writer(repo, &self.object))
    }

    fn describe_object_as(&self, object: &vbackup_storage::ObjectInfo) -> String {
        let object = super::describe_object(object);
        match &self.lock {
            Some(l) => format!(
                "{} lock {} held by pid {} on host '{}' since {} ({object}, {} s ago)",
                l.kind,
                short(&self.id),
                l.pid,
                l.host,
                l.started,
                self.age_secs
            ),
            None => format!("unreadable lock {} ({object})", short(&self.id)),
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// Every lock in the repository, judged by this host's clock (for
/// commands that hold no lock of their own). `stale_after` overrides the
/// holders' own stale limits (to treat locks as stale sooner or later).
pub fn list_locks(repo: &Repository, stale_after: Option<Duration>) -> Result<Vec<LockInfo>> {
    list_locks_by(repo, stale_after, Clock::host())
}

/// Every lock, judged by `clock`.
pub(crate) fn list_locks_by(
    repo: &Repository,
    stale_after: Option<Duration>,
    clock: Clock,
) -> Result<Vec<LockInfo>> {
    let mut locks = Vec::new();
    for object in repo.backend().list(LOCKS_PREFIX)? {
        let id = object.key.trim_start_matches(LOCKS_PREFIX).to_string();
        let info = match read_listed(repo, &object.key) {
            Ok(lock) => judge(id, lock, object, clock, stale_after),
            Err(e) if e.is_not_found() => continue,
            Err(e @ Error::Corrupt { .. }) => junk(id, &e, object, clock),
            Err(e) => unreadable(id, &e, object, clock, stale_after),
        };
        locks.push(info);
    }
    locks.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(locks)
}

/// Opens a listed lock. A lock that does not authenticate (or decode, in
/// an unencrypted repository) is [`Error::Corrupt`]; one that opens but
/// whose content this version does not understand is
/// [`Error::UnsupportedVersion`] (a newer vbackup's lock: still counted).
fn read_listed(repo: &Repository, key: &str) -> Result<LockFile> {
    let json = repo.get_sealed(ObjectKind::Lock, key)?;
    let lock: LockFile = serde_json::from_slice(&json).map_err(|e| {
        let version = serde_json::from_slice::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
        match version {
            Some(found) => Error::UnsupportedVersion {
                what: format!("lock '{key}' ({e})"),
                found: u32::try_from(found).unwrap_or(u32::MAX),
                supported: LIFECYCLE_VERSION,
            },
            None => Error::corrupt(key, format!("invalid JSON: {e}")),
        }
    })?;
    check_version(key, lock.version)?;
    Ok(lock)
}

/// Every lock, stale only when it is stale both by its own limit and by
/// `stale_after` (which can therefore only lengthen the limits).
pub(crate) fn list_locks_carefully(
    repo: &Repository,
    stale_after: Option<Duration>,
    clock: Clock,
) -> Result<Vec<LockInfo>> {
    let mut locks = list_locks_by(repo, None, clock)?;
    if stale_after.is_some() {
        let longer = list_locks_by(repo, stale_after, clock)?;
        for lock in &mut locks {
            if longer.iter().any(|l| l.id == lock.id && l.is_live()) {
                lock.stale = None;
            }
        }
    }
    Ok(locks)
}

fn parse_time(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)))
}

/// Seconds since `written` by `clock`, or why that time is not a refresh:
/// unknown, or ahead of the clock by more than [`CLOCK_SKEW`].
fn age_of(written: Option<SystemTime>, clock: Clock) -> std::result::Result<u64, String> {
    let Some(written) = written else {
        return Err("no time of writing is known for it".to_string());
    };
    match written.duration_since(clock.now) {
        Ok(ahead) if ahead > CLOCK_SKEW => Err(format!(
            "written at {}, {} s ahead of {}: a time in the future is not a refresh",
            super::rfc3339(written),
            ahead.as_secs(),
            clock.name()
        )),
        Ok(_) => Ok(0),
        Err(behind) => Ok(behind.duration().as_secs()),
    }
}

/// The stale limit a lock is judged with: its own, at most
/// [`MAX_STALE_AFTER`], unless the reader overrides it.
fn limit_for(claimed: u64, stale_after: Option<Duration>) -> (u64, String) {
    if let Some(limit) = stale_after {
        return (limit.as_secs(), String::new());
    }
    let cap = MAX_STALE_AFTER.as_secs();
    match claimed > cap {
        true => (
            cap,
            format!("; it claims {claimed} s, more than the {cap} s a vbackup lock may claim"),
        ),
        false => (claimed, String::new()),
    }
}

fn judge(
    id: String,
    lock: LockFile,
    object: ObjectInfo,
    clock: Clock,
    stale_after: Option<Duration>,
) -> LockInfo {
    // The storage's time of writing; the holder's claim only where the
    // storage tells none (a claim is whatever the writer chose).
    let written = object.modified.or_else(|| parse_time(&lock.refreshed));
    let age = age_of(written, clock);
    let (limit, capped) = limit_for(lock.stale_after_secs, stale_after);
    let stale = if holder_is_gone(&lock) {
        Some(format!("process {} on this host is gone", lock.pid))
    } else {
        match &age {
            Err(reason) => Some(reason.clone()),
            Ok(age) if *age > limit => {
                Some(format!("not written for {age} s (limit {limit} s{capped})"))
            }
            Ok(_) => None,
        }
    };
    info(id, Some(lock), None, object, age.unwrap_or(0), stale)
}

fn info(
    id: String,
    lock: Option<LockFile>,
    problem: Option<String>,
    object: ObjectInfo,
    age_secs: u64,
    stale: Option<String>,
) -> LockInfo {
    LockInfo {
        id,
        lock,
        problem,
        modified: object.modified.map(super::rfc3339),
        age_secs,
        stale,
        object,
    }
}

/// A lock this version cannot read (a newer version's, or one the storage
/// failed to return): counted as a backup's lease until it is old by the
/// longest limit a lock may claim.
fn unreadable(
    id: String,
    error: &Error,
    object: ObjectInfo,
    clock: Clock,
    stale_after: Option<Duration>,
) -> LockInfo {
    let age = age_of(object.modified, clock);
    let limit = stale_after.unwrap_or(MAX_STALE_AFTER).as_secs();
    let stale = match &age {
        Err(reason) => Some(format!("unreadable and {reason}")),
        Ok(age) if *age > limit => Some("unreadable and old".to_string()),
        Ok(_) => None,
    };
    let age_secs = age.unwrap_or(0);
    info(id, None, Some(error.to_string()), object, age_secs, stale)
}

/// A lock object that does not authenticate: no holder of the repository's
/// key wrote it (vbackup writes locks atomically and sealed), so no backup
/// or prune stands behind it. Stale at once; `unlock` removes it.
fn junk(id: String, error: &Error, object: ObjectInfo, clock: Clock) -> LockInfo {
    let age_secs = age_of(object.modified, clock).unwrap_or(0);
    let stale = Some(
        "it does not authenticate with the repository's key, so no vbackup process wrote it (junk or damage)"
            .to_string(),
    );
    info(id, None, Some(error.to_string()), object, age_secs, stale)
}

/// Identifies this process's boot and pid namespace, where Linux tells.
fn process_domain() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}:{}", boot.trim(), pid_ns.display()))
}

/// Start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/<pid>/stat`); `None` when there is no such process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// True when the lock was written in this boot and pid namespace and its
/// process no longer exists (or the pid now belongs to another process).
fn holder_is_gone(lock: &LockFile) -> bool {
    let (Some(domain), Some(mine)) = (&lock.domain, process_domain()) else {
        return false;
    };
    if *domain != mine {
        return false;
    }
    match (process_start(lock.pid), lock.process_start) {
        (None, _) => true,
        (Some(now), Some(then)) => now != then,
        (Some(_), None) => false,
    }
}

/// Removes locks: the given ids (or unique id prefixes), or with no ids
/// every stale lock. With `stale_only`, live locks among the given ids are
/// refused. Returns the removed locks.
///
/// Locks are judged by the storage's clock: the command first writes a
/// short lease of its own (a `backup` lock, which excludes nothing) and
/// reads that lease's modification time, so a host whose clock is off
/// removes no live lock (where the storage takes no writes, by this
/// host's clock).
pub fn unlock(repo: &Repository, ids: &[String], stale_only: bool) -> Result<Vec<LockInfo>> {
    // Storage that takes no writes (full, read-only) can still drop locks:
    // then this host's clock judges them, as `vbackup locks` does.
    let Ok(probe) = Lease::start(repo, LockKind::Backup, LeaseTiming::default()) else {
        return remove_locks(repo, list_locks(repo, None)?, "", ids, stale_only);
    };
    let result = probe
        .list_locks(repo, None)
        .and_then(|locks| remove_locks(repo, locks, probe.id(), ids, stale_only));
    probe.release()?;
    result
}

fn remove_locks(
    repo: &Repository,
    mut locks: Vec<LockInfo>,
    probe: &str,
    ids: &[String],
    stale_only: bool,
) -> Result<Vec<LockInfo>> {
    locks.retain(|l| l.id != probe);
    let chosen: Vec<LockInfo> = if ids.is_empty() {
        locks.into_iter().filter(|l| !l.is_live()).collect()
    } else {
        select_locks(&locks, ids)?
    };
    if stale_only {
        if let Some(live) = chosen.iter().find(|l| l.is_live()) {
            return Err(Error::Conflict(format!(
                "refusing to remove the live {}; without --stale-only it can be removed (only do that if its holder is really gone)",
                live.describe_with_writer(repo)
            )));
        }
    }
    for lock in &chosen {
        repo.backend().delete(&lock.key())?;
    }
    Ok(chosen)
}

fn select_locks(locks: &[LockInfo], ids: &[String]) -> Result<Vec<LockInfo>> {
    let mut chosen = Vec::new();
    for id in ids {
        let matching: Vec<&LockInfo> = locks.iter().filter(|l| l.id.starts_with(id)).collect();
        match matching.as_slice() {
            [one] => chosen.push((*one).clone()),
            [] => {
                return Err(Error::InvalidInput(format!(
                    "no lock id starts with '{id}'"
                )))
            }
            _ => {
                return Err(Error::InvalidInput(format!(
                    "'{id}' matches several locks; give more digits"
                )))
            }
        }
    }
    Ok(chosen)
}

/// Health of a lease as seen by its holder.
#[derive(Debug)]
struct Health {
    /// Last successful write, by the monotonic and the wall clock.
    last_ok: (Instant, SystemTime),
    /// Set when the lease was once not refreshed in time: others may have
    /// judged this holder dead meanwhile.
    lapsed: Option<String>,
    /// The last refresh error, if the latest attempt failed.
    error: Option<String>,
}

/// State shared between a lease holder and its refresh thread.
struct Shared {
    backend: Arc<dyn Backend>,
    crypto: Crypto,
    key: String,
    file: Mutex<LockFile>,
    health: Mutex<Health>,
    timing: LeaseTiming,
    /// Held while the lock is written, so a reading of the storage's clock
    /// pairs the object's modification time with the write that made it.
    writing: Mutex<()>,
}

impl Shared {
    /// Rewrites the lock with a fresh `refreshed` time.
    fn write(&self) -> Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let json = {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            file.refreshed = now_rfc3339();
            serde_json::to_vec(&*file)
                .map_err(|e| Error::internal(format!("cannot encode a lock: {e}")))?
        };
        let bytes = seal_object(&self.crypto, ObjectKind::Lock, &self.key, &json, None)?;
        let result = self.backend.put(&self.key, &bytes);
        self.record(result.as_ref().err().map(|e| e.to_string()));
        Ok(result?)
    }

    fn record(&self, error: Option<String>) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if error.is_none() {
            if let Some(gap) = gap_since(health.last_ok).filter(|g| *g > self.limit()) {
                health.lapsed.get_or_insert(format!(
                    "the lease was not refreshed for {} s",
                    gap.as_secs()
                ));
            }
            health.last_ok = (Instant::now(), SystemTime::now());
        }
        health.error = error;
    }

    /// The storage's clock now: the modification time of this lock's last
    /// write plus the time elapsed since that write returned (so it errs
    /// early, never late); `None` when the storage tells no times.
    fn storage_now(&self) -> Result<Option<SystemTime>> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(modified) = self.backend.stat(&self.key)?.and_then(|i| i.modified) else {
            return Ok(None);
        };
        let since = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_ok
            .0
            .elapsed();
        Ok(Some(modified + since))
    }

    /// The longest silence others tolerate, minus a margin for clock skew
    /// and the time a refresh takes.
    fn limit(&self) -> Duration {
        self.timing
            .stale_after
            .saturating_sub(self.timing.stale_after / 4)
    }

    fn check(&self) -> Result<()> {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let silence = gap_since(health.last_ok).unwrap_or_default();
        let lapsed = health.lapsed.clone().or_else(|| {
            (silence > self.limit())
                .then(|| format!("the lease was not refreshed for {} s", silence.as_secs()))
        });
        match lapsed {
            Some(reason) => Err(Error::Conflict(format!(
                "{reason} (this process was paused or could not write to the repository: {}), so a prune may have judged it dead; nothing was recorded — run it again",
                health.error.as_deref().unwrap_or("no error recorded")
            ))),
            None => Ok(()),
        }
    }
}

/// The longest of the monotonic and wall-clock times since `last`
/// (the monotonic clock stops during suspend, the wall clock may jump).
fn gap_since(last: (Instant, SystemTime)) -> Option<Duration> {
    let wall = SystemTime::now().duration_since(last.1).unwrap_or_default();
    Some(last.0.elapsed().max(wall))
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A lock held by this process, refreshed by a thread until released or
/// dropped (dropping removes it, best effort).
pub struct Lease {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.shared.key)
            .finish()
    }
}

impl Lease {
    /// Writes a new lock of `kind` and starts refreshing it.
    pub fn start(repo: &Repository, kind: LockKind, timing: LeaseTiming) -> Result<Self> {
        let id = hex::encode(random_bytes::<16>()?);
        let now = now_rfc3339();
        let file = LockFile {
            version: LIFECYCLE_VERSION,
            kind,
            host: crate::hostname(),
            pid: std::process::id(),
            started: now.clone(),
            refreshed: now,
            stale_after_secs: timing.stale_after.as_secs(),
            domain: process_domain(),
            process_start: process_start(std::process::id()),
            pending_seen: Vec::new(),
        };
        let shared = Arc::new(Shared {
            backend: Arc::clone(repo.backend()),
            crypto: repo.crypto().clone(),
            key: format!("{LOCKS_PREFIX}{id}"),
            file: Mutex::new(file),
            health: Mutex::new(Health {
                last_ok: (Instant::now(), SystemTime::now()),
                lapsed: None,
                error: None,
            }),
            timing,
            writing: Mutex::new(()),
        });
        shared.write()?;
        let (stop, stopped) = mpsc::channel();
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vbackup-lease".to_string())
            .spawn(move || refresh_loop(&worker, &stopped))
            .map_err(|e| Error::internal(format!("cannot start the lease thread: {e}")))?;
        Ok(Self {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Takes an exclusive lock of `kind`: fails, naming the holder, when
    /// another live exclusive lock exists.
    pub fn exclusive(repo: &Repository, kind: LockKind, timing: LeaseTiming) -> Result<Self> {
        let lease = Self::start(repo, kind, timing)?;
        let others = match lease.list_locks(repo, None) {
            Ok(others) => others,
            Err(e) => {
                lease.release()?;
                return Err(e);
            }
        };
        let holder = others
            .iter()
            .find(|l| l.id != lease.id() && l.is_live() && l.kind().is_exclusive());
        if let Some(holder) = holder {
            let message = format!(
                "cannot {}: the repository is locked by the {}; if that process is gone, `vbackup unlock --stale-only` removes the lock once it is stale (`vbackup locks` shows it)",
                kind.verb(),
                holder.describe_with_writer(repo)
            );
            lease.release()?;
            return Err(Error::Conflict(message));
        }
        Ok(lease)
    }

    /// Takes the repository for itself (a [`LockKind::PruneExclusive`]
    /// lock): writes the lock, *then* lists the locks, and gives up (removing
    /// its lock, naming the holders) when another live exclusive lock or any
    /// live backup lease exists. Backups do the same in the other order
    /// (lease, then listing), so of a backup and such a prune that start
    /// together at least one sees the other. `stale_after` can only
    /// lengthen the locks' own stale limits here: with no other line of
    /// defence, judging a running backup stale early would let the prune
    /// delete chunks it reuses. Returns the lease and the locks it found.
    pub fn stop_the_world(
        repo: &Repository,
        timing: LeaseTiming,
        stale_after: Option<Duration>,
    ) -> Result<(Self, Vec<LockInfo>)> {
        let lease = Self::exclusive(repo, LockKind::PruneExclusive, timing)?;
        let locks = match lease
            .clock()
            .and_then(|clock| list_locks_carefully(repo, stale_after, clock))
        {
            Ok(locks) => locks,
            Err(e) => {
                lease.release()?;
                return Err(e);
            }
        };
        let backups: Vec<String> = locks
            .iter()
            .filter(|l| l.id != lease.id() && l.is_live() && !l.kind().is_exclusive())
            .map(LockInfo::describe)
            .collect();
        if !backups.is_empty() {
            let message = format!(
                "cannot prune: the storage at {} cannot move objects atomically, so prune needs the repository to itself, and {} backup(s) are running: {}; nothing was changed — run prune when they have finished (a crashed backup's lease counts until it is stale; `vbackup locks` shows the leases, `vbackup unlock --stale-only` removes stale ones)",
                repo.backend().location(),
                backups.len(),
                backups.join("; ")
            );
            lease.release()?;
            return Err(Error::Conflict(message));
        }
        Ok((lease, locks))
    }

    /// The clock to judge other locks by: the storage's, read through this
    /// lease's own object (this host's where the storage tells no times).
    pub(crate) fn clock(&self) -> Result<Clock> {
        Ok(match self.shared.storage_now()? {
            Some(now) => Clock { now, storage: true },
            None => Clock::host(),
        })
    }

    /// Every lock in the repository, judged by the storage's clock.
    pub fn list_locks(
        &self,
        repo: &Repository,
        stale_after: Option<Duration>,
    ) -> Result<Vec<LockInfo>> {
        list_locks_by(repo, stale_after, self.clock()?)
    }

    /// The lock id.
    pub fn id(&self) -> &str {
        self.shared.key.trim_start_matches(LOCKS_PREFIX)
    }

    /// Records the prune lists this holder has loaded, and rewrites the lock.
    pub fn set_pending_seen(&self, names: Vec<String>) -> Result<()> {
        self.shared
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending_seen = names;
        self.shared.write()
    }

    /// Fails when the lease was, at any time, not refreshed for about as
    /// long as others wait before judging it stale.
    pub fn check_fresh(&self) -> Result<()> {
        self.shared.check()
    }

    /// Stops refreshing and removes the lock.
    pub fn release(mut self) -> Result<()> {
        self.stop_thread();
        Ok(self.shared.backend.delete(&self.shared.key)?)
    }

    fn stop_thread(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            let _ = self.shared.backend.delete(&self.shared.key);
        }
    }
}

/// Rewrites the lock every refresh interval until the holder hangs up.
fn refresh_loop(shared: &Shared, stopped: &mpsc::Receiver<()>) {
    let mut next = shared.timing.refresh;
    loop {
        match stopped.recv_timeout(next) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        // A failed refresh is retried sooner; the holder sees the failure
        // through `check_fresh` if it lasts.
        next = match shared.write() {
            Ok(()) => shared.timing.refresh,
            Err(_) => shared.timing.refresh / 4,
        };
    }
}

/// Reads one lock object (for tests and tools).
pub fn read_lock(repo: &Repository, id: &str) -> Result<LockFile> {
    let key = format!("{LOCKS_PREFIX}{id}");
    let bytes = repo.backend().get(&key)?;
    let json = open_object_owned(repo.crypto(), ObjectKind::Lock, &key, bytes, 1 << 20)?;
    serde_json::from_slice(&json).map_err(|e| Error::corrupt(&key, format!("invalid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{CipherKind, DigestKind};
    use vbackup_storage::MemoryBackend;

    fn lock_file(pid: u32, process_start: Option<u64>) -> LockFile {
        LockFile {
            version: LIFECYCLE_VERSION,
            kind: LockKind::Backup,
            host: "h".into(),
            pid,
            started: now_rfc3339(),
            refreshed: now_rfc3339(),
            stale_after_secs: 600,
            domain: process_domain(),
            process_start,
            pending_seen: vec![],
        }
    }

    #[test]
    fn a_lease_silent_for_too_long_refuses_even_after_it_recovers() {
        let ago = Duration::from_secs(10);
        let shared = Shared {
            backend: Arc::new(MemoryBackend::new()),
            crypto: Crypto::new(CipherKind::None, DigestKind::Blake3Keyed, None),
            key: "locks/x".into(),
            file: Mutex::new(lock_file(1, None)),
            health: Mutex::new(Health {
                last_ok: (
                    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
                    SystemTime::now() - ago,
                ),
                lapsed: None,
                error: None,
            }),
            timing: LeaseTiming {
                refresh: Duration::from_secs(1),
                stale_after: Duration::from_secs(4),
            },
            writing: Mutex::new(()),
        };
        assert!(shared.check().is_err());
        shared.write().unwrap();
        let err = shared.check().unwrap_err().to_string();
        assert!(err.contains("not refreshed for 10 s"), "{err}");
    }

    #[test]
    fn locks_of_gone_processes_in_this_namespace_are_stale_at_once() {
        if process_domain().is_none() {
            return;
        }
        let me = std::process::id();
        let now = Clock::host();
        let object = || ObjectInfo::new("locks/x", 1);
        let mine = judge(
            "a".into(),
            lock_file(me, process_start(me)),
            object(),
            now,
            None,
        );
        assert!(mine.is_live(), "{mine:?}");
        let reused = judge("b".into(), lock_file(me, Some(1)), object(), now, None);
        assert!(!reused.is_live(), "a reused pid is not the holder");
        let gone = judge(
            "c".into(),
            lock_file(u32::MAX - 1, None),
            object(),
            now,
            None,
        );
        assert!(gone.stale.unwrap().contains("gone"));
        let mut foreign = lock_file(u32::MAX - 1, None);
        foreign.domain = Some("other-boot:pid:[1]".into());
        assert!(judge("d".into(), foreign, object(), now, None).is_live());
    }

    #[test]
    fn attack_forged_lock_claimed_times_and_limits_do_not_keep_it_live() {
        let now = Clock::host();
        let mut forged = lock_file(u32::MAX - 1, None);
        forged.domain = None;
        forged.kind = LockKind::PruneExclusive;
        forged.stale_after_secs = u64::MAX;
        forged.refreshed = "2999-01-01T00:00:00Z".into();
        let written = |ago: u64| ObjectInfo {
            modified: Some(now.now - Duration::from_secs(ago)),
            ..ObjectInfo::new("locks/f", 1)
        };
        let old = judge("f".into(), forged.clone(), written(601), now, None);
        let reason = old.stale.unwrap_or_default();
        assert!(
            reason.contains("limit 600 s") && reason.contains("claims"),
            "{reason}"
        );
        assert!(judge("f".into(), forged.clone(), written(599), now, None).is_live());
        let ahead = ObjectInfo {
            modified: Some(now.now + CLOCK_SKEW + Duration::from_secs(5)),
            ..ObjectInfo::new("locks/f", 1)
        };
        let future = judge("f".into(), forged.clone(), ahead, now, None);
        assert!(future.stale.unwrap_or_default().contains("in the future"));
        // Without a storage time, the claimed refresh time counts, but not
        // when it lies in the future.
        let unknown = judge("f".into(), forged, ObjectInfo::new("locks/f", 1), now, None);
        assert!(unknown.stale.unwrap_or_default().contains("in the future"));
    }
}
