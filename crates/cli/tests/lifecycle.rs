//! The repository's lifecycle end to end, with real `vbackup` processes on
//! a local repository: backups of several VMs running in a loop while
//! `forget --prune` runs again and again; prunes killed with SIGKILL at
//! random points; damaged repositories checked, repaired and healed.
//! Afterwards every remaining snapshot must restore byte-identical to a copy
//! of the image kept when it was backed up.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::util::text;

const CHUNK: usize = 64 << 10;

/// A test's folder and repository.
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
                .with_password("stress test")
                .with_first_args(&["--threads", "2"]),
        );
        env.ok(&["init", "--chunk-size", "64K"]);
        env
    }

    /// Backs up `image` as `vm` and keeps a copy of the image under the
    /// snapshot's id; returns the id.
    fn backup(&self, vm: &str, image: &Path) -> String {
        let json = self.json(&["backup", "--vm", vm, image.to_str().unwrap()]);
        let id = json["snapshot"].as_str().unwrap().to_string();
        std::fs::create_dir_all(self.path("copies")).unwrap();
        std::fs::copy(image, self.path(&format!("copies/{id}"))).unwrap();
        id
    }

    /// Restores every snapshot in the repository and compares it with the
    /// copy kept at backup time; returns how many there were.
    fn restore_all_and_compare(&self) -> usize {
        let list = self.json(&["snapshots"]);
        let list = list.as_array().unwrap();
        for snapshot in list {
            let id = snapshot["id"].as_str().unwrap();
            let target = self.path(&format!("restored/{id}"));
            self.ok(&["restore", id, "--target", target.to_str().unwrap()]);
            let disk = snapshot["disks"][0]["name"].as_str().unwrap();
            let restored = std::fs::read(target.join(format!("{disk}.raw"))).unwrap();
            let expected = std::fs::read(self.path(&format!("copies/{id}"))).unwrap();
            assert!(
                restored == expected,
                "snapshot {id} does not restore byte-identical"
            );
            std::fs::remove_dir_all(&target).unwrap();
        }
        list.len()
    }

    fn chunk_files(&self) -> Vec<PathBuf> {
        walk(&self.path("repo/chunks"))
    }
}

/// Every file below `dir` but hidden ones (temporary uploads).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if !entry.file_name().to_string_lossy().starts_with('.') {
            files.push(path);
        }
    }
    files
}

/// A small xorshift generator: tests print their seed, so a failure can be
/// replayed.
struct Rng(u64);

impl Rng {
    fn seeded() -> (u64, Self) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        (seed, Self(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One chunk of data from a small pool of patterns, so chunk contents come
/// back again and again (after being forgotten and marked for deletion).
fn pattern(variant: u64, block: usize) -> Vec<u8> {
    let mut state = (variant * 7919 + block as u64 * 104_729) | 1;
    (0..CHUNK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Rewrites a few blocks of `image` with patterns from the pool.
fn mutate(image: &Path, blocks: usize, rng: &mut Rng) {
    let mut data = std::fs::read(image).unwrap();
    for _ in 0..3 {
        let block = rng.below(blocks as u64) as usize;
        let variant = rng.below(4);
        data[block * CHUNK..(block + 1) * CHUNK].copy_from_slice(&pattern(variant, block));
    }
    std::fs::write(image, data).unwrap();
}

fn make_image(env: &Env, name: &str, blocks: usize) -> PathBuf {
    let image = env.path(name);
    let data: Vec<u8> = (0..blocks).flat_map(|b| pattern(0, b)).collect();
    std::fs::write(&image, data).unwrap();
    image
}

/// Deletes the image copies of the snapshots a forget removed.
fn remove_forgotten_copies(env: &Env, forget: &serde_json::Value) {
    for group in forget["groups"].as_array().unwrap() {
        for decision in group["decisions"].as_array().unwrap() {
            if decision["keep"] == false {
                let id = decision["snapshot"].as_str().unwrap();
                let _ = std::fs::remove_file(env.path(&format!("copies/{id}")));
            }
        }
    }
}

#[test]
fn backups_and_prunes_from_separate_processes_never_lose_data() {
    let env = Env::new();
    let (seed, _) = Rng::seeded();
    eprintln!("seed {seed}");
    let blocks = 24;
    let stop = AtomicBool::new(false);
    let backups = AtomicU64::new(0);
    let deleted = AtomicU64::new(0);
    let prunes = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(35);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for vm in 0..3u64 {
            let (env, stop, backups, failures) = (&env, &stop, &backups, &failures);
            scope.spawn(move || {
                let mut rng = Rng(seed ^ (vm + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let name = format!("vm{vm}");
                let image = make_image(env, &format!("{name}.raw"), blocks);
                while !stop.load(Ordering::Relaxed) {
                    mutate(&image, blocks, &mut rng);
                    let out =
                        env.run(&["--json", "backup", "--vm", &name, image.to_str().unwrap()]);
                    if !out.status.success() {
                        failures.lock().unwrap().push(text(&out));
                        continue;
                    }
                    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    let id = json["snapshot"].as_str().unwrap();
                    std::fs::create_dir_all(env.path("copies")).unwrap();
                    std::fs::copy(&image, env.path(&format!("copies/{id}"))).unwrap();
                    backups.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(rng.below(60)));
                }
            });
        }
        let (env, stop, deleted, prunes, failures) = (&env, &stop, &deleted, &prunes, &failures);
        scope.spawn(move || {
            while Instant::now() < deadline {
                let out = env.run(&[
                    "--json",
                    "forget",
                    "--keep-last",
                    "2",
                    "--prune",
                    "--grace",
                    "0",
                ]);
                if !out.status.success() {
                    failures.lock().unwrap().push(text(&out));
                    continue;
                }
                let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                remove_forgotten_copies(env, &json["forget"]);
                let prune = &json["prune"];
                deleted.fetch_add(prune["deleted-chunks"].as_u64().unwrap(), Ordering::Relaxed);
                let kept = prune["kept-referenced"].as_u64().unwrap() + prune["kept-rewritten"].as_u64().unwrap();
                let deferred = prune["deferred"].as_array().unwrap().len();
                if kept > 0 || deferred > 0 {
                    eprintln!("prune kept {kept} marked object(s) in use again, deferred {deferred} list(s)");
                }
                prunes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} command(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let (backups, prunes, deleted) = (
        backups.into_inner(),
        prunes.into_inner(),
        deleted.into_inner(),
    );
    eprintln!("{backups} backups, {prunes} prunes, {deleted} chunks deleted");
    assert!(
        backups >= 15 && prunes >= 5 && deleted > 0,
        "{backups} backups, {prunes} prunes, {deleted} deleted"
    );
    assert!(env.restore_all_and_compare() >= 3 * 2);
    let check = env.ok(&["check", "--read-data"]);
    assert!(check.contains("no damage found"), "{check}");
    // A last forget and prune with nothing running leaves only referenced data.
    env.ok(&["forget", "--keep-last", "2", "--prune", "--grace", "0"]);
    let json = env.json(&["check", "--read-data"]);
    assert_eq!(json["unreferenced-chunks"], 0, "{json}");
    assert_eq!(env.restore_all_and_compare(), 3 * 2);
}

#[test]
fn a_prune_killed_at_random_points_leaves_a_repository_that_checks_clean() {
    let env = Env::new();
    let (seed, mut rng) = Rng::seeded();
    eprintln!("seed {seed}");
    let blocks = 64;
    let image = make_image(&env, "disk.raw", blocks);
    let mut kept = Vec::new();
    for round in 0..5 {
        for _ in 0..4 {
            mutate(&image, blocks, &mut rng);
            kept.push(env.backup("disk", &image));
        }
        // Many unreferenced chunks, and a fresh pending list to sweep.
        let data: Vec<u8> = (0..blocks).flat_map(|b| pattern(100 + round, b)).collect();
        std::fs::write(&image, data).unwrap();
        env.backup("disk", &image);
        env.ok(&["forget", "--keep-last", "3"]);
        let mut child = env
            .command(&["prune", "--grace", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        eprintln!("round {round}: prune {status}");
        let check = env.run(&["check"]);
        assert!(check.status.success(), "round {round}:\n{}", text(&check));
        assert_eq!(env.restore_all_and_compare(), 3, "round {round}");
    }
    let swept = env.json(&["prune", "--grace", "0"]);
    assert!(
        swept["stale-locks"].as_array().unwrap().len() <= 5,
        "{swept}"
    );
    assert!(walk(&env.path("repo/trash")).is_empty());
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    assert_eq!(check["unreferenced-chunks"], 0, "{check}");
    env.ok(&["unlock", "--stale-only"]);
    assert!(env.ok(&["locks"]).contains("0 lock(s)"));
}

#[test]
fn a_damaged_repository_is_checked_repaired_and_healed_by_the_next_backup() {
    let env = Env::new();
    let blocks = 16;
    let image = make_image(&env, "web.raw", blocks);
    let first = env.backup("web", &image);
    // Unchanged: the second snapshot shares the first one's index and chunks.
    let second = env.backup("web", &image);
    let chunks: HashMap<String, PathBuf> = env
        .chunk_files()
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_str().unwrap().to_string(), p))
        .collect();
    let (missing, corrupt) = {
        let mut names: Vec<&String> = chunks.keys().collect();
        names.sort();
        (names[0].clone(), names[1].clone())
    };
    std::fs::remove_file(&chunks[&missing]).unwrap();
    let mut bytes = std::fs::read(&chunks[&corrupt]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&chunks[&corrupt], bytes).unwrap();

    let out = env.run(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        &missing,
        &corrupt,
        &first[..8].to_string(),
        &second[..8].to_string(),
    ] {
        assert!(
            stdout.contains(needle.as_str()),
            "{needle} not named:\n{stdout}"
        );
    }
    let prune = env.run(&["prune", "--grace", "0"]);
    assert!(
        prune.status.success(),
        "missing chunks do not stop prune: {}",
        text(&prune)
    );

    let repaired = env.ok(&["repair"]);
    assert!(
        repaired.contains("quarantine") && repaired.contains("DAMAGED"),
        "{repaired}"
    );
    let table = env.ok(&["snapshots"]);
    assert_eq!(table.matches("DAMAGED").count(), 2, "{table}");
    let out = env.run(&[
        "restore",
        &second,
        "--target",
        env.path("out").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    let healing = env.json(&[
        "backup",
        "--vm",
        "web",
        "--force-read",
        image.to_str().unwrap(),
    ]);
    assert_eq!(healing["stats"]["chunks-new"], 2, "{healing}");
    let id = healing["snapshot"].as_str().unwrap();
    std::fs::copy(&image, env.path(&format!("copies/{id}"))).unwrap();
    assert!(env
        .ok(&["check", "--read-data"])
        .contains("no damage found"));
    let cleared = env.ok(&["repair"]);
    assert!(cleared.contains("clear the damage marker"), "{cleared}");
    assert!(!env.ok(&["snapshots"]).contains("DAMAGED"));
    assert_eq!(env.restore_all_and_compare(), 3);
}

#[test]
fn forget_explains_its_plan_and_refuses_to_forget_everything() {
    let env = Env::new();
    let image = make_image(&env, "a.raw", 4);
    for _ in 0..3 {
        env.backup("a", &image);
    }
    let out = env.run(&["forget"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no keep rule"),
        "{}",
        text(&out)
    );
    let plan = env.ok(&["forget", "--keep-last", "1", "--dry-run"]);
    assert!(
        plan.contains("keep 1, remove 2") && plan.contains("would remove 2"),
        "{plan}"
    );
    env.ok(&["policy", "set", "--keep-last", "2"]);
    let json = env.json(&["forget"]);
    assert_eq!(json["forget"]["from-policy"], true);
    assert_eq!(json["forget"]["removed"], 1);
    let pruned = env.json(&["prune", "--dry-run", "--grace", "0"]);
    assert_eq!(pruned["dry-run"], true);
    assert_eq!(env.restore_all_and_compare(), 2);
}
