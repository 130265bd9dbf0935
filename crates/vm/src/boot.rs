//! Booting a VM from a snapshot's stored definition, with its disks served
//! from the backup: the part instant recovery and boot verification share.
//!
//! The definition is the QEMU command line stored at backup (`--definition
//! FILE`). Each disk's backup-time source is replaced by a local qcow2
//! overlay whose backing file is the disk's NBD export (what the VM writes
//! stays in the overlay; reads of the rest go to the repository), and the
//! options that would tie the new process to the original VM's host files
//! are replaced by vbackup's own, in a run folder:
//!
//! - the QMP socket (`-qmp`, `-monitor`, `-mon` dropped, ours added);
//! - the serial console, written to `console.log` (`-serial` dropped);
//! - every `-chardev` socket or file path (the guest agent's included)
//!   moved into the run folder, so nothing collides with a VM still
//!   running elsewhere from the same definition;
//! - no display, no daemonizing, no pid file;
//! - the accelerator: KVM where `/dev/kvm` can be opened, TCG otherwise;
//! - with `isolate`: no network at all (`-nic none`; every `-netdev`,
//!   `-net`, `-nic` and NIC `-device` dropped).
//!
//! A guest agent channel (`virtserialport` named `org.qemu.guest_agent.0`)
//! is added when the definition has none.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vbackup_core::format::VmDefinition;
use vbackup_qemu::qga::GuestAgent;
use vbackup_qemu::qmp::QmpClient;

use crate::definition::{
    join_pairs as join, rewrite_config, split_pair, value_of as get, Pair, RestoredImage,
};
use crate::{Error, Result};

/// The guest agent's virtio-serial port name.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// Options that take no value (everything else starting with `-` takes
/// the next word).
const FLAGS: &[&str] = &[
    "-nodefaults",
    "-no-reboot",
    "-no-shutdown",
    "-enable-kvm",
    "-nographic",
    "-snapshot",
    "-S",
    "-daemonize",
    "-no-user-config",
    "-no-hpet",
    "-no-acpi",
    "-full-screen",
    "-usb",
    "-s",
    "-version",
    "-help",
    "-win2k-hack",
    "-no-fd-bootchk",
    "-no-frame",
    "-alt-grab",
    "-ctrl-grab",
    "-old-param",
    "-preconfig",
];
/// Options vbackup replaces with its own.
const REPLACED: &[&str] = &[
    "-qmp",
    "-qmp-pretty",
    "-monitor",
    "-mon",
    "-serial",
    "-daemonize",
    "-pidfile",
    "-display",
    "-vnc",
    "-spice",
    "-nographic",
    "-enable-kvm",
    "-accel",
    "-runas",
    "-chroot",
    "-D",
    "-S",
];
/// Network options dropped when isolated.
const NETWORK: &[&str] = &["-netdev", "-net", "-nic"];
/// Device drivers that are network cards.
const NICS: &[&str] = &[
    "virtio-net-pci",
    "virtio-net-device",
    "virtio-net",
    "e1000",
    "e1000e",
    "e1000-82545em",
    "rtl8139",
    "vmxnet3",
    "ne2k_pci",
    "i82559er",
    "i82559b",
    "i82551",
    "pcnet",
    "igb",
];

/// One disk of the VM to boot: where it was at backup time, in which
/// format, and the local overlay it now runs on.
#[derive(Debug, Clone)]
pub struct BootDisk {
    /// The disk's backup-time source (the manifest's `source`).
    pub source: String,
    /// Its backup-time format.
    pub source_format: String,
    /// The qcow2 overlay over the disk's export.
    pub overlay: PathBuf,
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// The QEMU binary (the definition's own if `None`, else
    /// `qemu-system-x86_64`).
    pub qemu: Option<PathBuf>,
    /// Extra firmware folder (`-L`).
    pub firmware: Option<PathBuf>,
    /// No network at all.
    pub isolate: bool,
    /// The accelerator: `kvm`, `tcg`, or `None` for KVM where `/dev/kvm`
    /// can be opened and TCG otherwise.
    pub accel: Option<String>,
}

/// The command that boots the VM, and the files vbackup talks to it by.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The accelerator chosen (`kvm`, `tcg`).
    pub accel: String,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The guest agent socket.
    pub agent: PathBuf,
    /// The serial console's log.
    pub console: PathBuf,
    /// QEMU's own stderr.
    pub log: PathBuf,
}

/// The stored QEMU command line of `definition`, or why there is none.
fn command_line(definition: Option<&VmDefinition>) -> Result<&str> {
    let file = definition.and_then(|d| d.config_file.as_ref());
    match file {
        Some(file) if file.content.contains("<domain") => Err(Error::Invalid(format!(
            "the snapshot's definition {} is libvirt domain XML; booting it needs libvirt (define it with `virsh define` over the restored disks)",
            file.name
        ))),
        Some(file) => Ok(&file.content),
        None => Err(Error::Invalid(
            "the snapshot has no stored QEMU command line to boot (back up with --definition FILE holding the VM's qemu-system command line)".into(),
        )),
    }
}

/// The words of a shell-style command line: quotes, backslash-newline
/// continuations and `#` comments understood.
fn split_command_line(text: &str) -> Result<Vec<String>> {
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    let mut words = Vec::new();
    for line in joined.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(split) = shlex::split(line) else {
            return Err(Error::Invalid(format!(
                "the stored QEMU command line has an unbalanced quote: {line}"
            )));
        };
        words.extend(split);
    }
    Ok(words)
}

/// `key=value,...` of an option value.
fn pairs(value: &str) -> Vec<Pair> {
    value.split(',').map(split_pair).collect()
}

/// Whether `/dev/kvm` can be used.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Builds the command that boots `definition` on `disks`' overlays, with
/// its sockets and logs in `run_dir`.
pub fn plan(
    definition: Option<&VmDefinition>,
    disks: &[BootDisk],
    run_dir: &Path,
    options: &BootOptions,
) -> Result<BootPlan> {
    let text = command_line(definition)?;
    let images: Vec<RestoredImage<'_>> = disks
        .iter()
        .map(|d| RestoredImage {
            source: &d.source,
            source_format: &d.source_format,
            path: d.overlay.to_str().unwrap_or_default(),
            format: "qcow2",
        })
        .collect();
    if disks.iter().any(|d| d.overlay.to_str().is_none()) {
        return Err(Error::Invalid("overlay paths must be UTF-8".into()));
    }
    let rewritten = rewrite_config(text, &images);
    let mut words = split_command_line(&rewritten)?.into_iter().peekable();
    let binary = match words.peek() {
        Some(first) if !first.starts_with('-') => words.next().map(PathBuf::from),
        _ => None,
    };
    let qemu = options
        .qemu
        .clone()
        .or(binary)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let plan_paths = |name: &str| run_dir.join(name);
    let (qmp, agent, console, log) = (
        plan_paths("qmp.sock"),
        plan_paths("qga.sock"),
        plan_paths("console.log"),
        plan_paths("qemu.log"),
    );
    let mut args: Vec<String> = Vec::new();
    let mut agent_chardev: Option<String> = None;
    let mut chardevs: Vec<(usize, String)> = Vec::new();
    while let Some(word) = words.next() {
        if !word.starts_with('-') {
            args.push(word);
            continue;
        }
        let option = word.replacen("--", "-", 1);
        let value = match FLAGS.contains(&option.as_str()) {
            true => None,
            false => words.next(),
        };
        if REPLACED.contains(&option.as_str())
            || (options.isolate && NETWORK.contains(&option.as_str()))
        {
            continue;
        }
        let Some(value) = value else {
            args.push(word);
            continue;
        };
        let mut kv = pairs(&value);
        match option.as_str() {
            "-device" => {
                let driver = kv.first().map(|(k, _)| k.as_str()).unwrap_or_default();
                let driver = get(&kv, "driver").unwrap_or(driver);
                if options.isolate && (NICS.contains(&driver) || get(&kv, "netdev").is_some()) {
                    continue;
                }
                if driver == "virtserialport" && get(&kv, "name") == Some(GUEST_AGENT_PORT) {
                    agent_chardev = get(&kv, "chardev").map(str::to_string);
                }
            }
            "-chardev" => {
                if let Some(id) = get(&kv, "id").map(str::to_string) {
                    chardevs.push((args.len() + 1, id));
                }
            }
            "-machine" | "-M" => {
                kv.retain(|(k, _)| k != "accel");
            }
            // Zeros written to an overlay (a live restore's block-stream
            // copies the backup's holes as zeros) become zero clusters,
            // not allocated ones: the restored disk stays sparse.
            "-drive" | "-blockdev"
                if disks
                    .iter()
                    .any(|d| value.contains(d.overlay.to_str().unwrap_or("\0")))
                    && get(&kv, "detect-zeroes").is_none() =>
            {
                kv.push(("detect-zeroes".into(), Some("on".into())));
            }
            _ => {}
        }
        args.push(word);
        args.push(join(&kv));
    }
    // Chardev paths into the run folder; the agent's is ours.
    for (at, id) in &chardevs {
        let mut kv = pairs(&args[*at]);
        if get(&kv, "path").is_none() {
            continue;
        }
        let path = match agent_chardev.as_deref() == Some(id.as_str()) {
            true => agent.clone(),
            false => run_dir.join(format!("chardev-{id}")),
        };
        for (k, v) in kv.iter_mut() {
            if k == "path" {
                *v = Some(path.display().to_string());
            }
        }
        args[*at] = join(&kv);
    }
    if disks.iter().any(|d| {
        !args
            .iter()
            .any(|a| a.contains(d.overlay.to_str().unwrap_or("\0")))
    }) {
        let missing: Vec<&str> = disks
            .iter()
            .filter(|d| {
                !args
                    .iter()
                    .any(|a| a.contains(d.overlay.to_str().unwrap_or("\0")))
            })
            .map(|d| d.source.as_str())
            .collect();
        return Err(Error::Invalid(format!(
            "the stored QEMU command line does not name the disk(s) {} (as `file=` of a -drive or `filename=` of a -blockdev), so vbackup cannot put them on the backup",
            missing.join(", ")
        )));
    }
    if options.isolate {
        args.extend(["-nic".into(), "none".into()]);
    }
    if agent_chardev.is_none() {
        args.extend([
            "-device".into(),
            "virtio-serial-pci,id=vbackup-serial".into(),
            "-chardev".into(),
            format!(
                "socket,id=vbackup-qga,path={},server=on,wait=off",
                agent.display()
            ),
            "-device".into(),
            format!(
                "virtserialport,bus=vbackup-serial.0,chardev=vbackup-qga,name={GUEST_AGENT_PORT}"
            ),
        ]);
    }
    let accel = match &options.accel {
        Some(accel) => accel.clone(),
        None if kvm_usable() => "kvm".into(),
        None => "tcg".into(),
    };
    args.extend([
        "-accel".into(),
        accel,
        "-display".into(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-serial".into(),
        format!("file:{}", console.display()),
    ]);
    if let Some(firmware) = &options.firmware {
        args.extend(["-L".into(), firmware.display().to_string()]);
    }
    let accel = args
        .windows(2)
        .rev()
        .find(|w| w[0] == "-accel")
        .map(|w| w[1].clone())
        .unwrap_or_default();
    Ok(BootPlan {
        qemu,
        args,
        accel,
        qmp,
        agent,
        console,
        log,
    })
}

/// Creates a qcow2 overlay at `overlay` backed by the NBD export `uri`
/// (raw), so a VM writes there and reads the rest from the backup.
pub fn create_overlay(overlay: &Path, uri: &str, size: u64) -> Result<()> {
    vbackup_qemu::img::create_overlay(overlay, uri, "raw", size).map_err(Error::qemu(format!(
        "creating the overlay {} over {uri}",
        overlay.display()
    )))
}

/// A VM started from a [`BootPlan`]; killed when dropped unless
/// [`RunningVm::detach`]ed.
#[derive(Debug)]
pub struct RunningVm {
    child: Option<Child>,
    plan: BootPlan,
    started: Instant,
    /// Started by someone else (`attached`).
    attached: bool,
}

/// How a heartbeat is recognised.
#[derive(Debug, Clone)]
pub enum Heartbeat {
    /// The guest agent answers a ping.
    Agent,
    /// The serial console shows this text.
    Console(String),
}

impl RunningVm {
    /// Starts QEMU as `plan` says (in its own process group, so a Ctrl-C
    /// on the terminal reaches vbackup, which decides, not the VM).
    pub fn start(plan: BootPlan) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(&plan.log).map_err(|source| Error::Io {
            context: format!("creating {}", plan.log.display()),
            source,
        })?;
        let child = Command::new(&plan.qemu)
            .args(&plan.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Io {
                context: format!("starting {}", plan.qemu.display()),
                source,
            })?;
        Ok(Self {
            child: Some(child),
            plan,
            started: Instant::now(),
            attached: false,
        })
    }

    /// A VM vbackup did not start (`recover instant --qmp`): it is
    /// reached through `plan`'s QMP and agent sockets (connected to only
    /// when needed: QMP serves one client at a time), and never stopped
    /// or watched by vbackup.
    pub fn attached(plan: BootPlan) -> Self {
        Self {
            child: None,
            plan,
            started: Instant::now(),
            attached: true,
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The plan it runs.
    pub fn plan(&self) -> &BootPlan {
        &self.plan
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// What the serial console printed so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.plan.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the console and of QEMU's stderr, for a failure
    /// message.
    pub fn tail(&self) -> String {
        let last = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(6)..].join("\n")
        };
        let log = std::fs::read_to_string(&self.plan.log).unwrap_or_default();
        format!("console:\n{}\nqemu:\n{}", last(self.console()), last(log))
    }

    /// Whether QEMU has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        if self.attached {
            // Not ours to watch: QMP takes one client at a time, and the
            // owner may hold it.
            return None;
        }
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Connects to QMP, waiting for the socket (up to `timeout`).
    pub fn qmp(&mut self, timeout: Duration) -> Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match QmpClient::connect_with_timeout(&self.plan.qmp, Duration::from_secs(10)) {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() >= deadline || self.exited().is_some() => {
                    return Err(Error::Invalid(format!(
                        "QEMU did not answer on its QMP socket: {e}\n{}",
                        self.tail()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Waits until QMP reports the VM running; returns the time since start.
    pub fn wait_running(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        let mut qmp = self.qmp(timeout)?;
        loop {
            let status = qmp
                .execute("query-status", json!({}))
                .map_err(Error::qemu("asking QEMU whether the VM runs"))?;
            if status["running"].as_bool() == Some(true) {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(Error::Invalid(format!(
                    "the VM was not running after {} s (status {})",
                    timeout.as_secs(),
                    status["status"]
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the heartbeat; returns the time since start, or why none
    /// came (QEMU exited, or the timeout passed), with the console's tail.
    pub fn wait_heartbeat(&mut self, heartbeat: &Heartbeat, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(Error::Invalid(format!(
                    "the VM stopped ({status}) before its heartbeat\n{}",
                    self.tail()
                )));
            }
            let beat = match heartbeat {
                Heartbeat::Console(text) => self.console().contains(text.as_str()),
                Heartbeat::Agent => self.ping(),
            };
            if beat {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                let what = match heartbeat {
                    Heartbeat::Console(text) => format!("the console never showed '{text}'"),
                    Heartbeat::Agent => "the guest agent never answered".to_string(),
                };
                return Err(Error::Invalid(format!(
                    "no heartbeat within {} s: {what}\n{}",
                    timeout.as_secs(),
                    self.tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One guest agent ping (with a sync first, so a reply left over from
    /// an earlier try is not taken for this one).
    fn ping(&self) -> bool {
        let Ok(mut agent) =
            GuestAgent::connect_with_timeout(&self.plan.agent, Duration::from_secs(2))
        else {
            return false;
        };
        agent.sync().is_ok() && agent.ping().is_ok()
    }

    /// Runs `command` in the guest with `/bin/sh -c` through the agent;
    /// returns its exit code (-1 when a signal ended it) and output.
    pub fn guest_exec(&self, command: &str, timeout: Duration) -> Result<(i64, String)> {
        let mut agent = self.agent()?;
        let status = agent
            .run("/bin/sh", &["-c", command], timeout)
            .map_err(Error::qemu(format!("running '{command}' in the guest")))?;
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        Ok((status.exit_code.unwrap_or(-1), output))
    }

    /// The guest agent, synced, and thawed if it starts frozen: a backup
    /// taken while the guest's file systems were frozen (application
    /// consistency) may hold the agent's own "frozen" marker, and an agent
    /// that boots from it refuses everything but a ping and a thaw.
    fn agent(&self) -> Result<GuestAgent> {
        let mut agent = GuestAgent::connect_with_timeout(&self.plan.agent, Duration::from_secs(5))
            .map_err(Error::qemu("connecting to the guest agent"))?;
        agent
            .sync()
            .map_err(Error::qemu("syncing with the guest agent"))?;
        if matches!(
            agent.fsfreeze_status(),
            Ok(vbackup_qemu::qga::FreezeStatus::Frozen)
        ) {
            agent
                .fsfreeze_thaw()
                .map_err(Error::qemu("thawing the guest agent, which booted frozen"))?;
        }
        Ok(agent)
    }

    /// Reads (at most 4 KiB of) the file `path` in the guest through its
    /// agent.
    pub fn guest_read(&self, path: &str) -> Result<Vec<u8>> {
        let mut agent = self.agent()?;
        agent
            .read_file(path, 4096)
            .map_err(Error::qemu(format!("reading {path} in the guest")))
    }

    /// Stops the VM: `quit` over QMP, then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return; // detached, or stopped already
        }
        if let Ok(mut qmp) = QmpClient::connect_with_timeout(&self.plan.qmp, Duration::from_secs(2))
        {
            let _ = qmp.execute("quit", json!({}));
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for QEMU to exit by itself (the guest powered off), up to
    /// `timeout`; `false` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Leaves the VM running after this value is gone; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vbackup_core::format::ConfigFile;

    fn definition(text: &str) -> VmDefinition {
        VmDefinition {
            qmp: None,
            config_file: Some(ConfigFile {
                name: "vm.sh".into(),
                content: text.into(),
            }),
        }
    }

    fn disk() -> BootDisk {
        BootDisk {
            source: "/vms/web/vda.qcow2".into(),
            source_format: "qcow2".into(),
            overlay: "/run/r/vda.qcow2".into(),
        }
    }

    fn options(isolate: bool) -> BootOptions {
        BootOptions {
            qemu: None,
            firmware: None,
            isolate,
            accel: Some("tcg".into()),
        }
    }

    #[test]
    fn the_plan_puts_disks_on_overlays_and_replaces_host_ties() {
        let text = "qemu-system-x86_64 -machine q35,accel=kvm -m 256 -enable-kvm \\\n  -drive file=/vms/web/vda.qcow2,format=qcow2,if=virtio \\\n  -qmp unix:/vms/web/qmp.sock,server=on,wait=off -serial stdio -daemonize \\\n  -chardev socket,id=ga,path=/vms/web/qga.sock,server=on,wait=off -device virtio-serial-pci \\\n  -device virtserialport,chardev=ga,name=org.qemu.guest_agent.0 \\\n  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 -append 'console=ttyS0 root=/dev/vda'";
        let plan = plan(
            Some(&definition(text)),
            &[disk()],
            Path::new("/run/r"),
            &options(true),
        )
        .unwrap();
        let args = plan.args.join(" ");
        assert_eq!(plan.qemu, PathBuf::from("qemu-system-x86_64"));
        assert!(
            args.contains("-drive file=/run/r/vda.qcow2,format=qcow2,if=virtio"),
            "{args}"
        );
        assert!(
            !args.contains("/vms/web"),
            "no path of the original VM is left: {args}"
        );
        assert!(
            args.contains("-chardev socket,id=ga,path=/run/r/qga.sock"),
            "{args}"
        );
        assert!(
            !args.contains("vbackup-qga"),
            "the definition's agent channel is used: {args}"
        );
        assert!(
            !args.contains("netdev") && !args.contains("virtio-net") && args.contains("-nic none"),
            "{args}"
        );
        assert!(
            !args.contains("-daemonize") && !args.contains("stdio") && !args.contains("accel=kvm"),
            "{args}"
        );
        assert!(
            args.contains("-qmp unix:/run/r/qmp.sock")
                && args.contains("-serial file:/run/r/console.log"),
            "{args}"
        );
        assert!(
            plan.args
                .contains(&"console=ttyS0 root=/dev/vda".to_string()),
            "quoted words stay one: {args}"
        );
    }

    #[test]
    fn without_isolation_the_network_stays_and_an_agent_channel_is_added() {
        let text = "-m 128 -blockdev driver=file,filename=/vms/web/vda.qcow2,node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0 -device virtio-blk-pci,drive=d0 -nic user";
        let plan = plan(
            Some(&definition(text)),
            &[disk()],
            Path::new("/run/r"),
            &options(false),
        )
        .unwrap();
        let args = plan.args.join(" ");
        assert!(args.contains("filename=/run/r/vda.qcow2"), "{args}");
        assert!(
            args.contains("-nic user") && !args.contains("-nic none"),
            "{args}"
        );
        assert!(
            args.contains("name=org.qemu.guest_agent.0") && args.contains("path=/run/r/qga.sock"),
            "{args}"
        );
    }

    #[test]
    fn a_definition_that_does_not_name_the_disk_or_is_missing_is_refused() {
        let err = plan(
            Some(&definition("-m 128 -drive file=/other.img")),
            &[disk()],
            Path::new("/r"),
            &options(true),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not name the disk"), "{err}");
        let err = plan(None, &[disk()], Path::new("/r"), &options(true)).unwrap_err();
        assert!(err.to_string().contains("--definition"), "{err}");
        let err = plan(
            Some(&definition("qemu -m 'x")),
            &[disk()],
            Path::new("/r"),
            &options(true),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unbalanced quote"), "{err}");
    }
}
