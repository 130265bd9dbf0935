//! Talking to people: progress bars on a terminal, plain log lines
//! otherwise, human-readable sizes, and the Ctrl-C / SIGTERM handling that
//! turns a signal into a clean cancellation.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vbackup_core::Progress;

/// Formats a byte count with binary units (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a rate in bytes per second.
pub fn human_rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-".to_string();
    }
    format!("{}/s", human_bytes((bytes as f64 / seconds) as u64))
}

/// Installs SIGINT/SIGTERM handlers that set a flag instead of killing the
/// process, so operations can stop and clean up.
pub fn install_signal_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Failing to install a handler only means the default (exit) applies.
        let _ = signal_hook::flag::register(signal, Arc::clone(&flag));
    }
    flag
}

/// A flag set on SIGHUP (the daemon reloads its configuration).
pub fn install_reload_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    // Failing to install the handler only means SIGHUP ends the process.
    let _ = signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&flag));
    flag
}

/// What a progress display counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Bytes,
    Items,
}

/// Runs `work` while showing its progress in bytes; the signal flag
/// cancels it.
pub fn with_progress<T>(
    label: &str,
    quiet: bool,
    signal: &Arc<AtomicBool>,
    work: impl FnOnce(&Progress) -> T,
) -> T {
    run_with_progress(label, Unit::Bytes, quiet, signal, work)
}

/// Like [`with_progress`], for work counted in objects (prune, check).
pub fn with_progress_items<T>(
    label: &str,
    quiet: bool,
    signal: &Arc<AtomicBool>,
    work: impl FnOnce(&Progress) -> T,
) -> T {
    run_with_progress(label, Unit::Items, quiet, signal, work)
}

fn run_with_progress<T>(
    label: &str,
    unit: Unit,
    quiet: bool,
    signal: &Arc<AtomicBool>,
    work: impl FnOnce(&Progress) -> T,
) -> T {
    let progress = Progress::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let progress = &progress;
        scope.spawn(move || watch(label, unit, quiet, signal, progress, &done_rx));
        let result = work(progress);
        // Wakes the watcher at once: the command ends without waiting for
        // its next refresh.
        let _ = done_tx.send(());
        result
    })
}

/// Refreshes the progress display every 100 ms until `done` fires,
/// drawing a bar on a terminal or logging a line every 10 seconds
/// otherwise.
fn watch(
    label: &str,
    unit: Unit,
    quiet: bool,
    signal: &AtomicBool,
    progress: &Progress,
    done: &std::sync::mpsc::Receiver<()>,
) {
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| new_bar(label, unit));
    // Drawn at once, so even a short operation shows what it is doing.
    if let Some(bar) = &bar {
        bar.set_length(progress.total().max(1));
        bar.set_position(progress.done());
        bar.tick();
    }
    let started = Instant::now();
    let mut last_log = Instant::now();
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        done.recv_timeout(Duration::from_millis(100))
    {
        if signal.load(Ordering::Relaxed) && !progress.is_cancelled() {
            progress.cancel();
            eprintln!("vbackup: interrupted, stopping and cleaning up...");
        }
        if let Some(bar) = &bar {
            bar.set_length(progress.total().max(1));
            bar.set_position(progress.done());
        } else if !quiet && last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            log_line(label, unit, progress, started.elapsed().as_secs_f64());
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// A progress bar whose bar takes what the terminal's width leaves after
/// the figures (`wide_bar`), so the line never wraps on an 80-column
/// terminal, and stays one line on narrower ones down to about 60.
fn new_bar(label: &str, unit: Unit) -> ProgressBar {
    let bar = ProgressBar::new(1);
    let template = match unit {
        Unit::Bytes => format!(
            "{label:>9} [{{wide_bar}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
        ),
        Unit::Items => format!("{label:>9} [{{wide_bar}}] {{pos}}/{{len}} objects ETA {{eta}}"),
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn log_line(label: &str, unit: Unit, progress: &Progress, elapsed: f64) {
    let (done, total) = (progress.done(), progress.total());
    let percent = if total == 0 {
        0.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    if unit == Unit::Items {
        eprintln!("{label}: {percent:.1}% ({done} of {total} objects, {elapsed:.0} s)");
        return;
    }
    eprintln!(
        "{label}: {percent:.1}% ({} of {}, {}, {} stored)",
        human_bytes(done),
        human_bytes(total),
        human_rate(done, elapsed),
        human_bytes(progress.stored())
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
