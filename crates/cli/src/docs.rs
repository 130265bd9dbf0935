//! `vbackup completions` and `vbackup man`: shell completion scripts and
//! manual pages, generated from the one command-line definition
//! ([`crate::args::command`]) so they never drift from `--help`.

use std::io::Write;

use anyhow::{Context as _, Result};

use crate::args::{CompletionsArgs, ManArgs};
use crate::{ExitError, EXIT_USAGE};

/// Prints the completion script for the shell asked for.
pub fn completions(args: &CompletionsArgs) -> Result<()> {
    let mut cmd = crate::args::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "vbackup", &mut out);
    print(&out)
}

/// Prints the manual page of vbackup, or of the command named, in roff.
pub fn man(args: &ManArgs) -> Result<()> {
    let page = page_of(crate::args::command(), &args.command)?;
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .context("cannot render the manual page")?;
    print(&out)
}

/// The command whose page to render: `path` names it below `root` (empty:
/// `root` itself). `root` is built, so a subcommand's page is titled
/// `vbackup-backup`, `vbackup-server-token`... and its synopsis says
/// `vbackup backup`.
fn page_of(root: clap::Command, path: &[String]) -> Result<clap::Command> {
    let mut cmd = root;
    for name in path {
        let Some(sub) = cmd
            .get_subcommands()
            .find(|sub| sub.get_name() == name && !sub.is_hide_set())
        else {
            return Err(unknown_command(&cmd, name));
        };
        cmd = sub.clone();
    }
    Ok(cmd)
}

/// The usage error for `vbackup man NAME` when NAME is no command of `cmd`.
fn unknown_command(cmd: &clap::Command, name: &str) -> anyhow::Error {
    let known: Vec<&str> = cmd
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
        .map(clap::Command::get_name)
        .collect();
    let message = match known.is_empty() {
        true => format!(
            "'{}' has no subcommands, so no page '{name}'",
            cmd.get_name()
        ),
        false => format!(
            "'{}' has no command '{name}'; its commands: {}",
            cmd.get_name(),
            known.join(", ")
        ),
    };
    ExitError {
        code: EXIT_USAGE,
        message,
    }
    .into()
}

/// Writes generated text to stdout; a reader that went away (`| head`) is
/// not an error.
fn print(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_of_subcommands_are_titled_by_their_path() {
        let cmd = page_of(crate::args::command(), &["server".into(), "token".into()]).unwrap();
        assert_eq!(cmd.get_display_name(), Some("vbackup-server-token"));
        assert_eq!(cmd.get_bin_name(), Some("vbackup server token"));
        let err = page_of(crate::args::command(), &["synth".into()]).unwrap_err();
        assert!(err.to_string().contains("no command 'synth'"), "{err}");
        let err = page_of(crate::args::command(), &["speed".into(), "x".into()]).unwrap_err();
        assert!(err.to_string().contains("no subcommands"), "{err}");
    }
}
