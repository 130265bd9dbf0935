//! Attacks of issue 10 on locks, junk objects and rollback, played against
//! real `vbackup` processes on a local repository: the attacker writes
//! into the repository folder (as the storage, or a key holder, could),
//! and the commands an administrator would run must see through it.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vbackup_core::format::lifecycle::{LockFile, LockKind};
use vbackup_core::format::ObjectKind;
use vbackup_core::Repository;
use vbackup_storage::LocalBackend;
use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::util::{noise, s, text, walk};

const PASSWORD: &str = "attack test";

/// A repository, a disk image and a cache folder (the client's state).
struct Env(CliEnv);

impl Deref for Env {
    type Target = CliEnv;
    fn deref(&self) -> &CliEnv {
        &self.0
    }
}

impl Env {
    fn new() -> Self {
        let env = Self(
            CliEnv::new(env!("CARGO_BIN_EXE_vbackup"))
                .with_password(PASSWORD)
                .with_first_args(&["--threads", "2"]),
        );
        env.ok(&["init", "--chunk-size", "64K"]);
        env
    }

    /// Backs up a fresh image of VM `vm`; returns the snapshot id.
    fn backup(&self, vm: &str, seed: u64) -> String {
        let image = self.path(&format!("{vm}-{seed}.raw"));
        std::fs::write(&image, noise(4 << 16, seed)).unwrap();
        let json = self.json(&["backup", "--vm", vm, s(&image)]);
        json["snapshot"].as_str().unwrap().to_string()
    }

    /// The repository opened in this process, as a key holder would.
    fn open(&self) -> Repository {
        let backend = Arc::new(LocalBackend::new(self.path("repo")));
        Repository::open(backend, || Ok(Some(PASSWORD.into()))).unwrap()
    }

    fn object(&self, key: &str) -> PathBuf {
        self.path(&format!("repo/{key}"))
    }

    fn set_mtime(&self, key: &str, time: SystemTime) {
        let file = std::fs::File::options()
            .write(true)
            .open(self.object(key))
            .unwrap();
        file.set_modified(time).unwrap();
    }

    fn chunks(&self) -> usize {
        walk(&self.path("repo/chunks")).len()
    }
}

/// Seals a lock that claims to be an exclusive prune refreshed in the far
/// future that never goes stale.
fn forge_lock(env: &Env) -> String {
    let lock = LockFile {
        version: 1,
        kind: LockKind::PruneExclusive,
        host: "attacker".into(),
        pid: 1,
        started: "2999-01-01T00:00:00Z".into(),
        refreshed: "2999-01-01T00:00:00Z".into(),
        stale_after_secs: u64::MAX,
        domain: None,
        process_start: None,
        pending_seen: vec![],
    };
    let key = format!("locks/{}", "f".repeat(32));
    env.open()
        .put_sealed_json(ObjectKind::Lock, &key, &lock)
        .unwrap();
    key
}

#[test]
fn attack_forged_lock_blocks_backups_only_until_it_is_stale_and_unlock_stale_only_removes_it() {
    let env = Env::new();
    env.backup("a", 1);
    let key = forge_lock(&env);
    let (code, err) = env.fails_somehow(&["backup", "--vm", "a", s(&env.path("a-1.raw"))]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("object '{key}' (last written ")) && err.contains("vbackup unlock"),
        "{err}"
    );
    // Ten minutes and a bit after its last write, nothing it claims keeps
    // it live.
    env.set_mtime(&key, SystemTime::now() - Duration::from_secs(610));
    let locks = env.ok(&["locks"]);
    assert!(
        locks.contains("STALE") && locks.contains("limit 600 s"),
        "{locks}"
    );
    env.backup("a", 2);
    let unlocked = env.ok(&["unlock", "--stale-only"]);
    assert!(unlocked.contains("1 lock(s) removed"), "{unlocked}");
    assert!(!env.object(&key).exists());

    // A modification time in the future is no refresh either.
    let key = forge_lock(&env);
    env.set_mtime(&key, SystemTime::now() + Duration::from_secs(86_400));
    env.backup("a", 3);
    let unlocked = env.ok(&["unlock", "--stale-only"]);
    assert!(unlocked.contains("1 lock(s) removed"), "{unlocked}");
}

#[test]
fn attack_junk_lease_uploaded_again_and_again_does_not_hold_prune_back() {
    let env = Env::new();
    env.backup("a", 1);
    env.backup("a", 2);
    let junk = env.object(&format!("locks/{}", "0".repeat(32)));
    let before = env.chunks();
    std::fs::write(&junk, b"no key, no lease").unwrap();
    let json = env.json(&["forget", "--keep-last", "1", "--prune", "--grace", "0"]);
    let prune = &json["prune"];
    assert!(prune["deleted-chunks"].as_u64().unwrap() > 0, "{json}");
    assert!(env.chunks() < before);
    let locks = env.ok(&["locks"]);
    assert!(locks.contains("does not authenticate"), "{locks}");
    env.ok(&["unlock", "--stale-only"]);
    assert!(!junk.exists());
}

#[test]
fn attack_junk_snapshot_object_is_named_and_cleared_by_one_repair() {
    let env = Env::new();
    env.backup("a", 1);
    env.backup("a", 2);
    env.ok(&["forget", "--keep-last", "1"]);
    let key = format!("snapshots/{}", "9".repeat(32));
    std::fs::write(env.object(&key), b"junk").unwrap();
    let (code, err) = env.fails_somehow(&["prune", "--grace", "0"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains(&format!("object '{key}' (last written ")) && err.contains("`vbackup repair`"),
        "{err}"
    );
    let repaired = env.json(&["repair", "--no-read-data"]);
    assert_eq!(repaired["quarantined"][0], key, "{repaired}");
    let pruned = env.json(&["prune", "--grace", "0"]);
    assert!(pruned["deleted-chunks"].as_u64().unwrap() > 0, "{pruned}");
}

#[test]
fn attack_rollback_forgotten_manifest_put_back_is_reported_by_snapshots_and_check() {
    let env = Env::new();
    let first = env.backup("a", 1);
    env.backup("a", 2);
    let manifest = env.object(&format!("snapshots/{first}"));
    let saved = std::fs::read(&manifest).unwrap();
    env.ok(&["forget", "--keep-last", "1"]);
    env.ok(&["check"]);
    // The storage puts the manifest back.
    std::fs::write(&manifest, saved).unwrap();
    let out = env.run(&["snapshots"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&first) && stderr.contains("removed by `vbackup forget` on this host"),
        "{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("FORGOT"));
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("ROLLBACK snapshots/{first}")),
        "{}",
        text(&out)
    );
    // The record: one small private file per repository.
    let id = env.open().config().id.clone();
    let state = env.path(&format!("cache/state/{id}.json"));
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(record["version"], 1);
    assert!(
        record["forgotten"][&first]["forgotten"].is_string(),
        "{record}"
    );
    // Forgetting it again clears the warning.
    env.ok(&["forget", "--keep-last", "1"]);
    env.ok(&["check"]);
}

#[test]
fn attack_rollback_old_policy_put_back_is_not_applied() {
    let env = Env::new();
    for seed in 1..=3 {
        env.backup("a", seed);
    }
    env.ok(&["policy", "set", "--keep-last", "1"]);
    let policy = env.object("policy");
    let old = std::fs::read(&policy).unwrap();
    env.ok(&["policy", "set", "--keep-last", "5"]);
    let shown = env.json(&["policy", "show"]);
    assert_eq!(shown["revision"], 2, "{shown}");
    std::fs::write(&policy, old).unwrap();
    let (code, err) = env.fails_somehow(&["forget"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("revision 1") && err.contains("revision 2"),
        "{err}"
    );
    assert_eq!(
        walk(&env.path("repo/snapshots")).len(),
        3,
        "nothing forgotten"
    );
    let out = env.run(&["policy", "show"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("put back an older policy"),
        "{}",
        text(&out)
    );
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ROLLBACK policy"));
    // Storing the rules again goes past the rolled back revision.
    env.ok(&["policy", "set", "--keep-last", "5"]);
    assert_eq!(env.json(&["policy", "show"])["revision"], 3);
    env.ok(&["forget"]);
}
