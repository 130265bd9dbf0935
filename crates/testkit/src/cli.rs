//! Running the `vbackup` binary in a test: [`CliEnv`] owns a temporary
//! folder with the repository (`repo`), the client state (`cache`) and
//! whatever files the test makes, and builds commands whose environment
//! holds the passphrase, a cheap key derivation and nothing inherited
//! from the caller that could change what vbackup does.
//!
//! Why the binary path is a parameter: Cargo tells only the CLI crate's
//! own tests where it built `vbackup` (`env!("CARGO_BIN_EXE_vbackup")`),
//! so they pass it in: `CliEnv::new(env!("CARGO_BIN_EXE_vbackup"))`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::text;

/// The passphrase of a [`CliEnv`]'s repository unless it is given one.
pub const DEFAULT_PASSWORD: &str = "pw";

/// Sets up `cmd` (the `vbackup` binary, or a shell that runs it) for a
/// local repository in `dir/repo` opened with `password`, with a cheap
/// key derivation and the client state in `dir/cache` (never the real
/// home), no configuration file, and nothing inherited that could change
/// what it does.
pub fn local_env<'a>(cmd: &'a mut Command, dir: &Path, password: &str) -> &'a mut Command {
    cmd.env("VBACKUP_REPOSITORY", dir.join("repo"))
        .env("VBACKUP_PASSWORD", password)
        .env("VBACKUP_KDF_MEMORY_KIB", "1024")
        .env("VBACKUP_CACHE_DIR", dir.join("cache"))
        .env("VBACKUP_CONFIG", "/dev/null")
        .env_remove("VBACKUP_PASSWORD_FILE")
        .env_remove("VBACKUP_ALLOW_UNENCRYPTED")
        .env_remove("VBACKUP_NO_CACHE")
        .stdin(Stdio::null())
}

/// Runs `cmd` to completion; fails the test if it cannot be started.
pub fn output(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()))
}

/// Runs `cmd` (vbackup with `args`), which must succeed; returns stdout.
pub fn stdout_of(cmd: Command, args: &[&str]) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "vbackup {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("vbackup {args:?}: stdout is not UTF-8: {e}"))
}

/// A temporary folder for one test's repository, client state and files,
/// and the `vbackup` binary to run on it.
#[derive(Debug)]
pub struct CliEnv {
    binary: PathBuf,
    dir: tempfile::TempDir,
    password: String,
    first_args: Vec<String>,
    umask: Option<String>,
    in_dir: bool,
}

impl CliEnv {
    /// A fresh empty folder (no repository yet) for `binary`, with the
    /// passphrase [`DEFAULT_PASSWORD`].
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            dir: tempfile::tempdir().expect("a temporary folder for the test"),
            password: DEFAULT_PASSWORD.to_owned(),
            first_args: Vec::new(),
            umask: None,
            in_dir: false,
        }
    }

    /// The same with the repository's passphrase `password`.
    pub fn with_password(mut self, password: &str) -> Self {
        self.password = password.to_owned();
        self
    }

    /// The same with `args` before every command's own (`--threads 2`).
    pub fn with_first_args(mut self, args: &[&str]) -> Self {
        self.first_args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// The same with vbackup run under `umask` (through `sh`), e.g.
    /// `"000"`, so that only vbackup's own modes keep its files private.
    pub fn with_umask(mut self, umask: &str) -> Self {
        self.umask = Some(umask.to_owned());
        self
    }

    /// The same with vbackup run in the temporary folder (relative paths
    /// are inside it).
    pub fn run_in_dir(mut self) -> Self {
        self.in_dir = true;
        self
    }

    /// The temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the temporary folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The repository's folder, `repo` inside the temporary folder.
    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// The repository's passphrase.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The `vbackup` binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// A command for vbackup with this environment (see [`local_env`]),
    /// before any arguments, even the [`CliEnv::with_first_args`].
    pub fn cmd(&self) -> Command {
        let mut cmd = match &self.umask {
            Some(umask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
                    .arg(&self.binary);
                sh
            }
            None => Command::new(&self.binary),
        };
        local_env(&mut cmd, self.dir.path(), &self.password);
        if self.in_dir {
            cmd.current_dir(self.dir.path());
        }
        cmd
    }

    /// `vbackup [first args] args…` with this environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.cmd();
        cmd.args(&self.first_args).args(args);
        cmd
    }

    /// Runs `vbackup args…` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        output(self.command(args))
    }

    /// Runs `vbackup args…`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        stdout_of(self.command(args), args)
    }

    /// Runs `vbackup --json args…`, which must succeed; returns its JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("vbackup {all:?} printed no JSON ({e}): {out}"))
    }

    /// Runs `vbackup args…`, which must exit with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "vbackup {args:?}:\n{}",
            text(&out)
        );
        stderr_of(out, args)
    }

    /// Runs `vbackup args…`, which must fail (any way); returns its exit
    /// code (none if a signal ended it) and stderr.
    pub fn fails_somehow(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "vbackup {args:?} succeeded:\n{}",
            text(&out)
        );
        (out.status.code(), stderr_of(out, args))
    }
}

/// `out`'s stderr, which must be UTF-8.
fn stderr_of(out: Output, args: &[&str]) -> String {
    String::from_utf8(out.stderr)
        .unwrap_or_else(|e| panic!("vbackup {args:?}: stderr is not UTF-8: {e}"))
}
