//! `bulwark demo` and the signals a user, a CI runner or a closed terminal sends it: the real binary
//! as a child process (signals never reach the test runner), its output piped (not a terminal, so
//! progress comes one line a second). Found by a review; each test failed before its fix.
#![cfg(unix)]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{exit_within, gather_lines, signal};

/// A running `bulwark demo`; killed (and its temporary directory removed) on drop.
struct Demo {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    state_dir: Option<PathBuf>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.state_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Demo {
    /// `bulwark demo --duration <duration>`, stdout gathered line by line.
    fn start(duration: &str) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["demo", "--duration", duration])
            .env_remove("BULWARK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = gather_lines(&mut child);
        Demo {
            child,
            lines,
            state_dir: None,
        }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (up to 60 s) until the load runs (a progress line with requests); the generated
    /// config file named in the header.
    fn wait_for_load(&mut self) -> PathBuf {
        for _ in 0..1200 {
            let text = self.text();
            let running = text
                .lines()
                .any(|l| l.starts_with('[') && l.contains("phase 1") && !l.contains("| 0 req ("));
            if running {
                let config = text
                    .lines()
                    .find_map(|l| l.trim_start().strip_prefix("config"))
                    .unwrap_or_else(|| panic!("no config line in\n{text}"))
                    .trim()
                    .to_owned();
                let config = PathBuf::from(config);
                self.state_dir = config.parent().map(PathBuf::from);
                return config;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the demo exited ({status}) before its load ran:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no load within 60 s:\n{}", self.text());
    }

    /// The exit status, if the process ends within `secs`.
    fn exit_within(&mut self, secs: u64) -> Option<ExitStatus> {
        let status = exit_within(&mut self.child, secs)?;
        // The reader thread takes the last lines at the pipe's end.
        std::thread::sleep(Duration::from_millis(200));
        Some(status)
    }
}

/// Ctrl-C during the load: the interrupted summary, then exit status 130 (as for a Ctrl-C during
/// the set-up, and as a shell reports it), so that a script or a shell loop stops too. It was 0.
#[test]
fn ctrl_c_during_the_load_exits_130() {
    let mut demo = Demo::start("60s");
    let config = demo.wait_for_load();
    signal(demo.child.id(), "-INT");
    let status = demo
        .exit_within(30)
        .unwrap_or_else(|| panic!("no exit within 30 s of SIGINT:\n{}", demo.text()));
    let text = demo.text();
    assert!(text.contains("summary (interrupted)"), "{text}");
    assert!(!config.exists(), "{} left behind", config.display());
    assert_eq!(status.code(), Some(130), "{text}");
}

/// SIGTERM (`timeout 60 bulwark demo`, `docker stop`, a cancelled CI job) stops the demo as Ctrl-C
/// does: summary, gateway stopped, temporary config and store removed, exit 143. It died on the
/// spot and left them behind.
#[test]
fn sigterm_stops_the_demo_and_removes_its_files() {
    let mut demo = Demo::start("60s");
    let config = demo.wait_for_load();
    let dir = config.parent().unwrap().to_owned();
    assert!(dir.join("bulwark-demo.db").exists(), "{}", dir.display());
    signal(demo.child.id(), "-TERM");
    let status = demo
        .exit_within(30)
        .unwrap_or_else(|| panic!("no exit within 30 s of SIGTERM:\n{}", demo.text()));
    assert!(
        !dir.exists(),
        "after SIGTERM ({status}) {} is left",
        dir.display()
    );
    assert!(
        demo.text().contains("summary (interrupted)"),
        "{}",
        demo.text()
    );
    assert_eq!(status.code(), Some(143));
}

/// SIGHUP (the terminal running the demo was closed) ends the demo. It was taken as "reload the
/// config" (a generated file nobody edits), and the demo went on driving load, headless, for the
/// rest of `--duration`.
#[test]
fn a_hangup_ends_the_demo() {
    let mut demo = Demo::start("120s");
    let _config = demo.wait_for_load();
    signal(demo.child.id(), "-HUP");
    let status = demo.exit_within(20);
    assert!(
        status.is_some(),
        "still running 20 s after SIGHUP (load of 120 s):\n{}",
        demo.text()
    );
    assert_eq!(status.unwrap().code(), Some(129));
}

/// `bulwark demo ARGS` run to its end with `TMPDIR` set as given, output piped: (exit code,
/// stdout, stderr).
fn demo_output(args: &[&str], tmpdir: Option<&std::path::Path>) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulwark"));
    cmd.arg("demo")
        .args(args)
        .env_remove("BULWARK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = tmpdir {
        cmd.env("TMPDIR", t);
    }
    let mut child = cmd.spawn().unwrap();
    // Guards against a hang (the child is killed), never a timing assertion.
    assert!(
        exit_within(&mut child, 90).is_some(),
        "the demo did not finish"
    );
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The demo's set-up error names the path it could not create (it said only `Not a directory
/// (os error 20)`). Found by a review; failed before.
#[test]
fn a_demo_that_cannot_create_its_temporary_directory_names_the_path() {
    let dir = support::TempDir::new("demo-tmpdir");
    let not_a_dir = dir.join("not-a-directory");
    std::fs::write(&not_a_dir, "x").unwrap();
    let (code, _out, err) = demo_output(&["--duration", "1s"], Some(&not_a_dir));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&not_a_dir.display().to_string()), "{err:?}");
}

/// `--concurrency 0` is a usage error (exit 2), as `run --threads 0` is (it was taken as 1).
#[test]
fn demo_concurrency_zero_is_a_usage_error() {
    let (code, _out, err) = demo_output(&["--concurrency", "0", "--duration", "1s"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--concurrency"), "{err}");
}

/// Piped, each progress line's `(N/s)` is the rate since the line before: the window behind it
/// was closed only once a full second had passed since it opened, just after the previous tick,
/// so every other line repeated the previous rate. Found by a review; failed before.
#[test]
fn piped_progress_lines_show_the_rate_of_their_own_second() {
    let (code, out, err) = demo_output(&["--duration", "12s"], None);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    // `[ 3.0s / 12.0s] phase 2 | 641 req (217/s) | ...`
    let lines: Vec<(f64, u64, u64, &str)> = out
        .lines()
        .filter(|l| l.starts_with('['))
        .map(|l| {
            let t: f64 = l[1..].split('s').next().unwrap().trim().parse().unwrap();
            let mid = l.split(" | ").nth(1).unwrap_or_else(|| panic!("{l}"));
            let (n, rest) = mid.split_once(" req (").unwrap_or_else(|| panic!("{l}"));
            let rate = rest.trim_end_matches("/s)");
            (t, n.parse().unwrap(), rate.parse().unwrap(), l)
        })
        .collect();
    assert!(lines.len() >= 8, "{out}");
    let mut stale = Vec::new();
    for w in lines.windows(2) {
        let ((t0, n0, r0, _), (t1, n1, r1, l1)) = (w[0], w[1]);
        if t1 <= t0 || t1 > 12.0 || n1 <= n0 {
            continue;
        }
        let measured = (n1 - n0) as f64 / (t1 - t0);
        if r1 == r0 && (r1 as f64 - measured).abs() > 0.05 * measured + 5.0 {
            stale.push(format!("{l1}   (since the previous line: {measured:.0}/s)"));
        }
    }
    assert!(stale.is_empty(), "{}\n\n{out}", stale.join("\n"));
}
