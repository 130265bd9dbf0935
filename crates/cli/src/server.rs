//! `vbackup server` (run the backup server, manage its tokens) and the
//! client side: opening `https://HOST:PORT/REPO` repositories.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use vbackup_protocol::{Operation, Role};
use vbackup_server::tokens::TokenEntry;
use vbackup_server::ServerConfig;

use crate::args::{Command, PolicyCommand};
use crate::commands::Context;
use crate::{ExitError, EXIT_USAGE};

/// `vbackup server`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    /// Manage tokens instead of serving.
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
    /// Address to listen on, e.g. 0.0.0.0:8443 (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    pub listen: String,
    /// Data folder: repositories, tokens and the certificate.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Certificate chain (PEM) instead of the self-signed one.
    #[arg(help_heading = "TLS", long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(help_heading = "TLS", long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// How long a client may keep the server waiting for the next bytes of
    /// a request (headers, body, an idle connection); a body also gets one
    /// second per 32 KiB.
    #[arg(help_heading = "Limits", long, value_name = "DURATION", default_value = "60s", value_parser = crate::args::parse_duration)]
    pub timeout: std::time::Duration,
    /// The most connections served at once; more are closed at once.
    #[arg(help_heading = "Limits", long, value_name = "N", default_value_t = vbackup_server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// The most bytes of uploads held in memory at once, e.g. 1G (at least
    /// 80M); more uploads wait for room.
    #[arg(help_heading = "Limits", long, value_name = "SIZE", default_value = "1G", value_parser = crate::args::parse_size)]
    pub max_upload_memory: u64,
}

/// `vbackup server token ...`.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Manage access tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// Token management.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token (its secret is printed once and stored only as a hash).
    Add(TokenAddArgs),
    /// List tokens (ids, repositories, roles, labels; never secrets).
    List(TokenDataArgs),
    /// Remove the tokens with this id or label.
    Remove(TokenRemoveArgs),
}

/// The data folder, for token commands.
#[derive(Debug, Args)]
pub struct TokenDataArgs {
    /// The server's data folder.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
}

/// `vbackup server token add`; the repository the token opens is the
/// global `--repo NAME` (`*` for all).
#[derive(Debug, Args)]
#[command(
    after_help = "--repo NAME names the repository the token opens on this server (`*` for all).\nExample: vbackup server token add --data /srv/vbackup --repo web1 --role backup --label host1"
)]
pub struct TokenAddArgs {
    /// The server's data folder.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// read: list, restore, check; backup: also add snapshots (append-only);
    /// admin: everything (init, forget, prune, repair).
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// A note on whose token this is.
    #[arg(long, default_value = "")]
    pub label: String,
    /// The most bytes of new objects this token may add, e.g. 500G.
    #[arg(long, value_name = "SIZE", value_parser = crate::args::parse_size)]
    pub quota: Option<u64>,
}

/// `vbackup server token remove`.
#[derive(Debug, Args)]
pub struct TokenRemoveArgs {
    /// The server's data folder.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Id or label of the token(s).
    pub which: String,
}

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Read only.
    Read,
    /// Append-only backups.
    Backup,
    /// Everything.
    Admin,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Read => Role::Read,
            RoleArg::Backup => Role::Backup,
            RoleArg::Admin => Role::Admin,
        }
    }
}

fn usage(message: String) -> anyhow::Error {
    ExitError {
        code: EXIT_USAGE,
        message,
    }
    .into()
}

/// Runs `vbackup server ...`.
pub fn run(ctx: &Context, args: &ServerArgs) -> Result<()> {
    match &args.command {
        Some(ServerCommand::Token(command)) => token(ctx, command),
        None => serve(ctx, args),
    }
}

fn serve(ctx: &Context, args: &ServerArgs) -> Result<()> {
    let Some(data) = &args.data else {
        return Err(usage("vbackup server needs --data DIR".into()));
    };
    let config = ServerConfig {
        listen: args.listen.clone(),
        data: data.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        timeout: args.timeout,
        max_connections: args.max_connections,
        max_upload_memory: args.max_upload_memory,
    };
    vbackup_server::run(&config, Arc::clone(&ctx.signal), |started| {
        let mut out = std::io::stdout().lock();
        let fp = &started.fingerprint;
        let made = if started.certificate_created {
            "made a self-signed certificate; "
        } else {
            ""
        };
        let _ = writeln!(out, "vbackup server: {made}certificate SHA-256 fingerprint {fp}");
        let _ = writeln!(
            out,
            "vbackup server: clients pin it with --server-fingerprint {fp} (or VBACKUP_SERVER_FINGERPRINT)"
        );
        if started.tokens == 0 {
            let _ = writeln!(
                out,
                "vbackup server: no tokens yet; make one with `vbackup server token add --data {} --repo NAME --role admin`",
                data.display()
            );
        }
        let _ = writeln!(out, "listening on https://{}", started.address);
        let _ = out.flush();
    })
    .context("the server failed")?;
    eprintln!("vbackup server: stopped");
    Ok(())
}

/// A token as shown by `token list` and `token add --json`.
#[derive(Debug, Serialize)]
struct TokenView<'a> {
    id: &'a str,
    repo: &'a str,
    role: Role,
    label: &'a str,
    created: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
}

fn view<'a>(entry: &'a TokenEntry, token: Option<&'a str>) -> TokenView<'a> {
    TokenView {
        id: &entry.id,
        repo: &entry.repo,
        role: entry.role,
        label: &entry.label,
        created: &entry.created,
        quota: entry.quota,
        token,
    }
}

fn token(ctx: &Context, command: &TokenCommand) -> Result<()> {
    let json = ctx.global.json;
    match command {
        TokenCommand::Add(args) => {
            let Some(repository) = &ctx.global.repo else {
                return Err(usage(
                    "give the repository the token opens: --repo NAME (or --repo '*' for all)"
                        .into(),
                ));
            };
            let (entry, secret) = vbackup_server::tokens::add(
                &args.data,
                repository,
                args.role.into(),
                &args.label,
                args.quota,
            )
            .map_err(server_error)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view(&entry, Some(&secret)))?
                );
            } else {
                println!("{secret}");
                eprintln!(
                    "token {} for repository '{}' with role {}: shown only now; give it to clients as VBACKUP_TOKEN or in a --token-file",
                    entry.id,
                    entry.repo,
                    entry.role
                );
            }
        }
        TokenCommand::List(args) => {
            let file = vbackup_server::tokens::load(&args.data).map_err(server_error)?;
            if json {
                let views: Vec<_> = file.tokens.iter().map(|t| view(t, None)).collect();
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                for t in &file.tokens {
                    let quota = t.quota.map(|q| format!("  quota {q} bytes"));
                    println!(
                        "{}  {:<7} {:<20} {}  {}{}",
                        t.id,
                        t.role,
                        t.repo,
                        t.created,
                        t.label,
                        quota.unwrap_or_default()
                    );
                }
            }
        }
        TokenCommand::Remove(args) => {
            let gone =
                vbackup_server::tokens::remove(&args.data, &args.which).map_err(server_error)?;
            if json {
                let views: Vec<_> = gone.iter().map(|t| view(t, None)).collect();
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                for t in &gone {
                    println!("removed token {} ({}, {})", t.id, t.repo, t.role);
                }
            }
        }
    }
    Ok(())
}

fn server_error(error: vbackup_server::Error) -> anyhow::Error {
    match error {
        vbackup_server::Error::Usage(message) => usage(message),
        other => other.into(),
    }
}

/// The repository operation of a command that changes the repository.
fn operation(command: &Command) -> Option<Operation> {
    Some(match command {
        Command::Backup(_) => Operation::Backup,
        Command::Serve(args) if !args.commit_overlay.is_empty() => Operation::Backup,
        Command::Verify(args) if args.boot.is_some() && !args.no_record => Operation::Backup,
        Command::Forget(_) => Operation::Forget,
        Command::Prune(_) => Operation::Prune,
        Command::Repair(_) => Operation::Repair,
        Command::Unlock(_) => Operation::Unlock,
        Command::Policy(PolicyCommand::Set(_) | PolicyCommand::Clear) => Operation::SetPolicy,
        _ => return None,
    })
}

/// For a repository on a server, refuses at once a command the token's
/// role does not allow (see [`vbackup_open::check_role`]).
pub fn check_role(ctx: &Context, command: &Command) -> Result<()> {
    let Some(operation) = operation(command) else {
        return Ok(());
    };
    // Without a repository the command itself says what is missing.
    let Ok(options) = ctx.repository_options() else {
        return Ok(());
    };
    Ok(vbackup_open::check_role(&options, operation)?)
}

/// The server token from `file`, else `VBACKUP_TOKEN`.
pub fn read_token(file: Option<&Path>) -> Result<String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            usage(format!(
                "cannot read the token file {}: {e}",
                file.display()
            ))
        })?;
        return Ok(text.lines().next().unwrap_or_default().trim().to_string());
    }
    match std::env::var("VBACKUP_TOKEN") {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
        _ => Err(usage(
            "this repository is on a server: give its token with --token-file FILE or VBACKUP_TOKEN"
                .into(),
        )),
    }
}
