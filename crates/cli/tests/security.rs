//! Attacks of issue 10 replayed against the `vbackup` binary, as the storage
//! or a backup host would make them (docs/security.md).

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::path::PathBuf;
use std::process::Output;

use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::util::{noise, s, text, walk};

const PASSWORD: &str = "correct horse battery staple";

/// A test's folder and repository (not initialised).
struct Env(CliEnv);

impl Deref for Env {
    type Target = CliEnv;
    fn deref(&self) -> &CliEnv {
        &self.0
    }
}

/// `out` must have ended with exit `code`; returns its stderr.
fn fails_with(out: Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    String::from_utf8(out.stderr).unwrap()
}

impl Env {
    fn new() -> Self {
        Self(CliEnv::new(env!("CARGO_BIN_EXE_vbackup")).with_password(PASSWORD))
    }

    fn image(&self) -> PathBuf {
        let image = self.path("web1.raw");
        std::fs::write(&image, noise(6 << 20, 11)).unwrap();
        image
    }

    fn chunk_files(&self) -> usize {
        walk(&self.path("repo/chunks")).len()
    }

    /// Rewrites the config as storage could: unencrypted, without a MAC.
    fn downgrade_config(&self) {
        let path = self.path("repo/config");
        let bytes = std::fs::read(&path).unwrap();
        let mut config: serde_json::Value = serde_json::from_slice(&bytes[8..]).unwrap();
        config["cipher"] = "none".into();
        config["mac"] = "".into();
        let mut out = bytes[..8].to_vec();
        out.extend_from_slice(&serde_json::to_vec_pretty(&config).unwrap());
        std::fs::write(&path, out).unwrap();
    }
}

#[test]
fn attack_encryption_downgrade_makes_the_next_backup_refuse_and_write_nothing() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.image();
    env.ok(&["backup", "--vm", "web1", s(&image)]);
    let chunks = env.chunk_files();
    env.downgrade_config();
    std::fs::write(&image, noise(6 << 20, 12)).unwrap();
    for extra in [&[][..], &["--allow-unencrypted"][..]] {
        let mut args = extra.to_vec();
        args.extend(["backup", "--vm", "web1", s(&image)]);
        let stderr = env.fails(&args, 3);
        assert!(stderr.contains("refusing the repository"), "{stderr}");
        assert!(stderr.contains("key file"), "{stderr}");
    }
    assert_eq!(env.chunk_files(), chunks, "no plaintext chunk was written");
    // With the keys deleted too, the passphrase in the environment and the
    // record of this client still refuse it.
    std::fs::remove_dir_all(env.path("repo/keys")).unwrap();
    let stderr = env.fails(&["snapshots"], 3);
    assert!(stderr.contains("encrypted before"), "{stderr}");
}

#[test]
fn an_unencrypted_repository_is_an_explicit_choice_remembered_per_host() {
    let env = Env::new();
    // A passphrase in the environment means the user expects encryption.
    let stderr = env.fails(&["init", "--encryption", "none"], 2);
    assert!(stderr.contains("passphrase"), "{stderr}");
    let plain = |args: &[&str], state: &str| {
        let mut cmd = env.command(args);
        cmd.env_remove("VBACKUP_PASSWORD")
            .env("VBACKUP_CACHE_DIR", env.path(state));
        cmd.output().unwrap()
    };
    let out = plain(&["init", "--encryption", "none"], "cache");
    assert!(out.status.success(), "{}", text(&out));
    let out = plain(&["snapshots"], "cache");
    assert!(out.status.success(), "{}", text(&out));
    // Another host (another client state) must say so once.
    let stderr = fails_with(plain(&["snapshots"], "other"), 2);
    assert!(stderr.contains("--allow-unencrypted"), "{stderr}");
    let out = plain(&["--allow-unencrypted", "snapshots"], "other");
    assert!(out.status.success(), "{}", text(&out));
    let out = plain(&["snapshots"], "other");
    assert!(out.status.success(), "{}", text(&out));
}
