//! Hot reload: on SIGHUP, and when the config file changes.
//!
//! A reload reads and validates the whole file, builds a new [`Runtime`] and swaps it in with
//! [`Gateway::swap`]. Nothing is torn down: connections stay open, requests in flight finish on the
//! runtime they started on, and every upstream whose section is unchanged is carried over as the same
//! object, so its breaker window and state, endpoint health, load and connection pools survive
//! ([`Runtime::build`]). Admin breaker overrides are re-applied to the new runtime before it serves.
//! A file that does not load is logged with its `FILE:LINE:COL: key.path: what is wrong` error and
//! changes nothing.
//!
//! The file is watched by polling its modification time and length every [`POLL_INTERVAL`] rather
//! than with inotify (the `notify` crate): one `stat` a second costs nothing, needs no dependency,
//! and follows the path, so it also sees the file replaced by a rename or a symlink swap (how editors
//! and Kubernetes ConfigMaps update files), which inode watches miss. The certificate, key, CA and
//! CRL files the config in force names are watched the same way ([`Look`]): a renewed certificate
//! reloads as an edit of the config does.
//!
//! Settings bound when the process starts (listen addresses, TLS, connection limits and timeouts,
//! drain timeout, admin listener and token, log format and level) are not changed by a reload; when
//! they differ, the reload says so in its log line.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::{self, Config};
use crate::proxy::{Gateway, Runtime};

/// How often the config file's modification time and length are checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What a successful reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The gateway's generation after the swap.
    pub generation: u64,
    /// Upstreams carried over with their live state.
    pub kept: Vec<String>,
    /// Upstreams whose settings changed (rebuilt, fresh state).
    pub rebuilt: Vec<String>,
    /// New upstreams.
    pub added: Vec<String>,
    /// Upstreams no longer in the config.
    pub removed: Vec<String>,
    /// Changed settings that only a restart applies.
    pub restart_required: Vec<&'static str>,
}

/// What identifies one version of the file behind the config path (symlinks followed): its
/// modification time and length, and which file it is (device, inode) and when its metadata last
/// changed. A rename or symlink swap to another file is a new inode even when that file has the
/// same length and modification time (files copied with `cp -p` or `rsync -a`, Nix store files,
/// all at 1 s past the epoch); an in-place write changes the change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        dev: m.dev(),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// One look at the config file and at the certificate, key, CA and CRL files the config in force
/// names (the listener's `tls`, each upstream's `tls`): a renewed certificate (certbot,
/// cert-manager) reloads the config as an edit of the file does, as Envoy watches its SDS files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Look {
    config: Stamp,
    /// In the order of [`tls_files`]; `None` for a file that is not there.
    files: Vec<Option<Stamp>>,
}

/// The files `config` names that a reload reads again: the listener's certificate and key, and
/// each upstream's `ca`, `cert`, `key` and `crl`.
fn tls_files(config: &Config) -> Vec<&Path> {
    let listener = config.tls.iter().flat_map(|t| [&t.cert, &t.key]);
    let upstreams = config
        .upstreams
        .iter()
        .filter_map(|(_, u)| u.tls.as_ref())
        .flat_map(|t| [&t.ca, &t.cert, &t.key, &t.crl].into_iter().flatten());
    listener.chain(upstreams).map(PathBuf::as_path).collect()
}

fn file_stamps(config: &Config) -> Vec<Option<Stamp>> {
    tls_files(config).into_iter().map(stamp).collect()
}

#[derive(Debug, Default)]
struct State {
    stamp: Option<Look>,
    /// A new look seen at the last look, applied if the next look sees it again.
    pending: Option<Look>,
    last_error: Option<String>,
    /// Looks between two retries of the same failed reload: 1 after a new failure, doubling
    /// with each failed retry up to [`RETRY_MAX_LOOKS`].
    retry_every: u32,
    /// Looks left before the next retry.
    retry_wait: u32,
}

/// At most this many looks (seconds, at the default poll) between two retries of a failed reload:
/// a config that stays broken costs a reload attempt (and a blocking-pool thread, which tokio lets
/// go after 10 s idle) about twice a minute, not every second.
const RETRY_MAX_LOOKS: u32 = 32;

/// Reloads one gateway from one config file.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
    /// Also serialises reloads (SIGHUP and the file poll may coincide).
    state: Mutex<State>,
}

impl Reloader {
    /// A reloader for `gateway` from `path`; the file as it is now counts as already loaded.
    pub fn new(path: impl Into<PathBuf>, gateway: Arc<Gateway>) -> Self {
        let path = path.into();
        gateway.set_config_file(&path);
        let reloader = Reloader {
            path,
            gateway,
            state: Mutex::new(State::default()),
        };
        // The file may have changed since the gateway loaded it (an edit during start-up): then
        // the first look reloads it.
        let loaded = config::to_yaml(&reloader.gateway.runtime().config);
        if config::load(&reloader.path)
            .map(|c| config::to_yaml(&c))
            .ok()
            == Some(loaded)
        {
            reloader.lock().stamp = reloader.look();
        }
        reloader
    }

    /// The config file's stamp and those of the TLS files the config in force names; `None`
    /// while the config file is not there.
    fn look(&self) -> Option<Look> {
        Some(Look {
            config: stamp(&self.path)?,
            files: file_stamps(&self.gateway.runtime().config),
        })
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error of the last reload attempt, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update of the state is a plain assignment, so it is consistent after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads now (SIGHUP does this), logging the outcome.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let mut state = self.lock();
        state.stamp = self.look();
        state.pending = None;
        self.reload_locked(&mut state, false)
    }

    /// Whether the file's modification time or length changed since the last look (and it is
    /// there), or the last reload failed and is due to be tried again (a file it names may be
    /// there now; retries come at growing intervals, see [`RETRY_MAX_LOOKS`]).
    fn changed(&self) -> bool {
        let now = self.look();
        let mut state = self.lock();
        if now.is_none() {
            return false;
        }
        if now != state.stamp {
            return true;
        }
        if state.last_error.is_none() {
            return false;
        }
        if state.retry_wait > 0 {
            state.retry_wait -= 1;
            return false;
        }
        true
    }

    /// Reloads if the file's modification time or length changed since the last look and then
    /// stayed the same for one more look (a file written in place is truncated, then filled: it
    /// is not loaded half-written), or if the last reload failed (what it refused may be fixed
    /// outside the file: a certificate or CA file it names that was not there yet).
    pub fn reload_if_changed(&self) -> Option<Result<Reloaded, String>> {
        let mut state = self.lock();
        let now = self.look();
        // Momentarily missing (being replaced): look again next time.
        now.as_ref()?;
        let retry = if now == state.stamp {
            state.last_error.as_ref()?;
            true
        } else if state.pending != now {
            state.pending = now;
            return None;
        } else {
            false
        };
        state.stamp = now;
        state.pending = None;
        Some(self.reload_locked(&mut state, retry))
    }

    /// Reloads; `retry`: the file is the one whose reload failed last, and the same error again
    /// is not logged again.
    fn reload_locked(&self, state: &mut State, retry: bool) -> Result<Reloaded, String> {
        let result = self.try_reload();
        let (result, files) = match result {
            Ok((r, files)) => (Ok(r), Some(files)),
            Err(e) => (Err(e), None),
        };
        self.gateway
            .runtime()
            .telemetry()
            .config_reloaded(result.is_ok());
        self.gateway.record_reload(
            result
                .as_ref()
                .map(|r| r.restart_required.as_slice())
                .map_err(String::as_str),
        );
        match &result {
            Ok(r) => {
                // The TLS files to watch from now on are those the new config names, as they were
                // before the build read them: a file replaced while the build read the old one (a
                // certificate renewed just then) differs from its stamp at the next look.
                if let (Some(look), Some(files)) = (&mut state.stamp, files) {
                    look.files = files;
                }
                state.last_error = None;
                state.retry_every = 0;
                state.retry_wait = 0;
                tracing::info!(
                    file = %self.path.display(),
                    generation = r.generation,
                    kept = ?r.kept,
                    rebuilt = ?r.rebuilt,
                    added = ?r.added,
                    removed = ?r.removed,
                    "config reloaded"
                );
                if !r.restart_required.is_empty() {
                    tracing::warn!(
                        settings = ?r.restart_required,
                        "config reload: these settings changed but take effect only after a restart"
                    );
                }
            }
            Err(e) => {
                if !(retry && state.last_error.as_ref() == Some(e)) {
                    tracing::error!(error = %e, "config reload rejected; the previous config keeps serving");
                }
                state.last_error = Some(e.clone());
                state.retry_every = if retry {
                    (state.retry_every * 2).clamp(1, RETRY_MAX_LOOKS)
                } else {
                    1
                };
                state.retry_wait = state.retry_every - 1;
            }
        }
        result
    }

    /// Also the stamps of the TLS files the new config names, taken before it read them.
    fn try_reload(&self) -> Result<(Reloaded, Vec<Option<Stamp>>), String> {
        // An empty file is a valid config (every default: no upstream, no route), and what a file
        // being written in place holds for a moment: never swapped in for a running config.
        if std::fs::read(&self.path).is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace)) {
            return Err(format!(
                "{}: the file is empty (being written?); a reload needs a complete config",
                self.path.display()
            ));
        }
        let config = config::load(&self.path).map_err(|e| e.to_string())?;
        // (`load` checks that the TLS files are there and read, the build reads them again.)
        let files = file_stamps(&config);
        let old = self.gateway.runtime();
        let new = Runtime::build(&config, old.telemetry(), Some(&old))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut r = Reloaded {
            restart_required: restart_required(&old.started, &config),
            ..Reloaded::default()
        };
        for up in &new.upstreams {
            let name = up.name.to_string();
            match old.upstream(&up.name) {
                Some(o) if Arc::ptr_eq(o, up) => r.kept.push(name),
                Some(_) => r.rebuilt.push(name),
                None => r.added.push(name),
            }
        }
        for up in &old.upstreams {
            if new.upstream(&up.name).is_none() {
                r.removed.push(up.name.to_string());
            }
        }
        self.gateway.swap(new);
        r.generation = self.gateway.generation();
        Ok((r, files))
    }

    /// Reloads on SIGHUP and whenever the file changes (checked every `poll`), until dropped. The
    /// SIGHUP handler is installed when this is called (inside the runtime), not when the future is
    /// first polled: from then on a SIGHUP reloads rather than kills the process.
    pub fn watch(self: Arc<Self>, poll: Duration) -> impl std::future::Future<Output = ()> {
        self.watch_with(poll, hangup())
    }

    /// [`watch`](Self::watch) with a SIGHUP handler installed earlier ([`hangup`]): a SIGHUP
    /// received since then reloads at once.
    pub async fn watch_with(self: Arc<Self>, poll: Duration, mut hup: Hangup) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        loop {
            // Off the runtime's threads: a reload reads files, builds the new runtime, and
            // waits for an admin change in progress (whose store write may wait on the file's
            // lock); with `--threads 1` any of that on the runtime thread would stall every
            // request.
            tokio::select! {
                _ = next_hangup(&mut hup) => {
                    tracing::info!("SIGHUP: reloading the config");
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.reload()).await;
                }
                // The look itself (one `stat`) stays here: a blocking-pool thread started
                // every tick would make the process multi-threaded for good, and every
                // socket call a little dearer (glibc's cancellation points).
                _ = tick.tick() => if self.changed() {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
                }
            }
        }
    }
}

/// A SIGHUP handler (none where signals are not available, or if it could not be installed).
#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
/// A SIGHUP handler (none where signals are not available, or if it could not be installed).
#[cfg(not(unix))]
pub type Hangup = Option<()>;

/// Installs the SIGHUP handler (inside a runtime): from then on a SIGHUP no longer kills the
/// process, and the next [`Reloader::watch_with`] given it reloads.
pub fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on file change only");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn next_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = h {
        if s.recv().await.is_some() {
            return;
        }
        *h = None;
    }
    #[cfg(not(unix))]
    let _ = h;
    std::future::pending::<()>().await
}

/// Settings bound at start that differ between `old` (the config the process started with) and
/// `new`.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, changed: bool| {
        if changed {
            out.push(name);
        }
    };
    check("listen", old.listen != new.listen);
    // A reload applies new `tls` files (or the same paths with renewed contents) to new
    // connections; a listener cannot switch between TLS and plaintext.
    check("tls", old.tls.is_some() != new.tls.is_some());
    check(
        "limits.header_read_timeout",
        old.limits.header_read_timeout != new.limits.header_read_timeout,
    );
    check(
        "limits.idle_timeout",
        old.limits.idle_timeout != new.limits.idle_timeout,
    );
    check(
        "limits.lingering_timeout",
        old.limits.lingering_timeout != new.limits.lingering_timeout,
    );
    check(
        "limits.max_connections",
        old.limits.max_connections != new.limits.max_connections,
    );
    check(
        "limits.max_concurrent_streams",
        old.limits.max_concurrent_streams != new.limits.max_concurrent_streams,
    );
    // Lowering is applied at once; the listener's read buffer is sized at start, so raising is not.
    check(
        "limits.max_header_bytes",
        new.limits.max_header_bytes.get() > old.limits.max_header_bytes.get(),
    );
    check("drain_timeout", old.drain_timeout != new.drain_timeout);
    check("admin", !same(&old.admin, &new.admin));
    check("store", !same(&old.store, &new.store));
    check("logging.format", old.logging.format != new.logging.format);
    check("logging.level", old.logging.level != new.logging.level);
    out
}

fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
