//! A check of the machine this process runs on: load, memory, disk.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::{CheckFuture, CheckResult, HealthCheck, HealthStatus};
use crate::ConfigError;

/// The default name of a [`SystemCheck`].
pub const DEFAULT_SYSTEM_CHECK_NAME: &str = "system";

/// 1-minute load per core above which the machine is degraded: more runnable
/// threads than cores means requests queue for CPU.
pub const DEFAULT_LOAD_DEGRADED: f64 = 1.5;
/// 1-minute load per core above which it is unhealthy: latency is dominated by
/// waiting for a CPU.
pub const DEFAULT_LOAD_UNHEALTHY: f64 = 3.0;
/// Available memory (% of total) below which the machine is degraded: the page
/// cache is being squeezed.
pub const DEFAULT_MEMORY_DEGRADED: f64 = 10.0;
/// Available memory (% of total) below which it is unhealthy: the OOM killer is near.
pub const DEFAULT_MEMORY_UNHEALTHY: f64 = 5.0;
/// Free disk (% of the file system) below which it is degraded.
pub const DEFAULT_DISK_DEGRADED: f64 = 10.0;
/// Free disk (% of the file system) below which it is unhealthy: writes (logs, the
/// embedded store) are about to fail.
pub const DEFAULT_DISK_UNHEALTHY: f64 = 5.0;

/// A pair of levels: `degraded` is crossed first, `unhealthy` is worse.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Levels {
    degraded: f64,
    unhealthy: f64,
}

/// Builds a [`SystemCheck`]. Start with [`SystemCheck::builder`].
#[derive(Debug, Clone)]
pub struct SystemCheckBuilder {
    name: String,
    load: Option<Levels>,
    memory: Option<Levels>,
    disk: Option<(PathBuf, Levels)>,
}

impl SystemCheckBuilder {
    /// The component name (default [`DEFAULT_SYSTEM_CHECK_NAME`]).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Degraded above `degraded`, unhealthy above `unhealthy` 1-minute load average
    /// per core (defaults [`DEFAULT_LOAD_DEGRADED`], [`DEFAULT_LOAD_UNHEALTHY`]).
    pub fn load_per_core(mut self, degraded: f64, unhealthy: f64) -> Self {
        self.load = Some(Levels {
            degraded,
            unhealthy,
        });
        self
    }

    /// Degraded below `degraded`, unhealthy below `unhealthy` percent of memory
    /// available (defaults [`DEFAULT_MEMORY_DEGRADED`], [`DEFAULT_MEMORY_UNHEALTHY`]).
    pub fn memory_available_percent(mut self, degraded: f64, unhealthy: f64) -> Self {
        self.memory = Some(Levels {
            degraded,
            unhealthy,
        });
        self
    }

    /// Also checks the file system holding `path`: degraded below `degraded`,
    /// unhealthy below `unhealthy` percent free (for unprivileged users). Off by
    /// default; [`DEFAULT_DISK_DEGRADED`] and [`DEFAULT_DISK_UNHEALTHY`] are
    /// sensible levels.
    pub fn disk_free_percent(
        mut self,
        path: impl Into<PathBuf>,
        degraded: f64,
        unhealthy: f64,
    ) -> Self {
        self.disk = Some((
            path.into(),
            Levels {
                degraded,
                unhealthy,
            },
        ));
        self
    }

    /// Does not look at the load average.
    pub fn skip_load(mut self) -> Self {
        self.load = None;
        self
    }

    /// Does not look at memory.
    pub fn skip_memory(mut self) -> Self {
        self.memory = None;
        self
    }

    /// Validates the levels: finite, the unhealthy level at least as severe as the
    /// degraded one, percentages within 0..=100, and something to check.
    pub fn build(self) -> Result<SystemCheck, ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if let Some(l) = self.load {
            if !(l.degraded.is_finite() && l.unhealthy.is_finite() && l.degraded >= 0.0) {
                return Err(ConfigError::new(
                    "load_per_core",
                    "levels must be finite and not negative",
                ));
            }
            if l.unhealthy < l.degraded {
                return Err(ConfigError::new(
                    "load_per_core",
                    "the unhealthy level must not be below the degraded level",
                ));
            }
        }
        let percent_ok = |l: Levels| {
            (0.0..=100.0).contains(&l.degraded)
                && (0.0..=100.0).contains(&l.unhealthy)
                && l.unhealthy <= l.degraded
        };
        if let Some(l) = self.memory {
            if !percent_ok(l) {
                return Err(ConfigError::new(
                    "memory_available_percent",
                    "levels must be within 0..=100, the unhealthy one not above the degraded one",
                ));
            }
        }
        if let Some((_, l)) = &self.disk {
            if !percent_ok(*l) {
                return Err(ConfigError::new(
                    "disk_free_percent",
                    "levels must be within 0..=100, the unhealthy one not above the degraded one",
                ));
            }
        }
        if self.load.is_none() && self.memory.is_none() && self.disk.is_none() {
            return Err(ConfigError::new("build", "nothing left to check"));
        }
        Ok(SystemCheck {
            name: self.name,
            load: self.load,
            memory: self.memory,
            disk: self.disk,
            measuring: Arc::new(Mutex::new(None)),
        })
    }
}

/// Checks the 1-minute load average per core (`/proc/loadavg`), available memory
/// (`MemAvailable` of `/proc/meminfo`) and, if asked, free disk space of a path,
/// each against a degraded and an unhealthy level; the worst one wins. The detail
/// lists every measurement.
///
/// Linux only: elsewhere the check is [`HealthStatus::Healthy`] with a detail saying
/// nothing was measured (an unknown is no reason to take traffic away). On Linux, a
/// measurement that cannot be read makes the check degraded. The reads happen on
/// Tokio's blocking pool (a `statvfs` on a hung network file system blocks). A check
/// made while a measurement runs waits for that one's result instead of starting
/// another (concurrent probes share it), so a hung mount takes one blocking thread,
/// not one per interval: every check then waits until its caller's timeout.
///
/// ```
/// use bulwark::health::{HealthCheck, HealthStatus, SystemCheck};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let check = SystemCheck::builder()
///     .load_per_core(1e9, 1e9) // levels nothing reaches: this check must pass
///     .memory_available_percent(0.0, 0.0)
///     .build()
///     .unwrap();
/// assert_eq!(check.check().await.status, HealthStatus::Healthy);
/// # }
/// ```
#[derive(Clone)]
pub struct SystemCheck {
    name: String,
    load: Option<Levels>,
    memory: Option<Levels>,
    disk: Option<(PathBuf, Levels)>,
    /// The latest measurement on the blocking pool, which checks made while it runs
    /// wait for (shared by clones).
    measuring: Arc<Mutex<Option<Measurement>>>,
}

type Measurement = Shared<BoxFuture<'static, CheckResult>>;

impl fmt::Debug for SystemCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemCheck")
            .field("name", &self.name)
            .field("load", &self.load)
            .field("memory", &self.memory)
            .field("disk", &self.disk)
            .finish()
    }
}

impl SystemCheck {
    /// A builder checking load and memory at the default levels, and no disk.
    pub fn builder() -> SystemCheckBuilder {
        SystemCheckBuilder {
            name: DEFAULT_SYSTEM_CHECK_NAME.to_owned(),
            load: Some(Levels {
                degraded: DEFAULT_LOAD_DEGRADED,
                unhealthy: DEFAULT_LOAD_UNHEALTHY,
            }),
            memory: Some(Levels {
                degraded: DEFAULT_MEMORY_DEGRADED,
                unhealthy: DEFAULT_MEMORY_UNHEALTHY,
            }),
            disk: None,
        }
    }

    /// Measures and judges, synchronously (blocking reads).
    fn run(&self) -> CheckResult {
        let mut worst = HealthStatus::Healthy;
        let mut parts: Vec<String> = Vec::with_capacity(3);
        let mut judge = |label: String, status: HealthStatus| {
            worst = worst.max(status);
            parts.push(label);
        };
        if let Some(l) = self.load {
            match measure::load_per_core() {
                Ok(Some(v)) => {
                    let s = above(v, l);
                    judge(format!("load1/core {v:.2}{}", verdict(s)), s);
                }
                Ok(None) => judge(
                    "load1/core not measured on this OS".into(),
                    HealthStatus::Healthy,
                ),
                Err(e) => judge(
                    format!("load1/core unreadable: {e}"),
                    HealthStatus::Degraded,
                ),
            }
        }
        if let Some(l) = self.memory {
            match measure::memory_available_percent() {
                Ok(Some(v)) => {
                    let s = below(v, l);
                    judge(format!("memory available {v:.1}%{}", verdict(s)), s);
                }
                Ok(None) => judge(
                    "memory not measured on this OS".into(),
                    HealthStatus::Healthy,
                ),
                Err(e) => judge(format!("memory unreadable: {e}"), HealthStatus::Degraded),
            }
        }
        if let Some((path, l)) = &self.disk {
            let shown = path.display();
            match measure::disk_free_percent(path) {
                Ok(Some(v)) => {
                    let s = below(v, *l);
                    judge(format!("disk free {shown} {v:.1}%{}", verdict(s)), s);
                }
                Ok(None) => judge(
                    format!("disk free {shown} not measured on this OS"),
                    HealthStatus::Healthy,
                ),
                Err(e) => judge(
                    format!("disk free {shown} unreadable: {e}"),
                    HealthStatus::Degraded,
                ),
            }
        }
        CheckResult {
            status: worst,
            detail: Some(parts.join("; ")),
        }
    }
}

fn verdict(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Healthy => "",
        HealthStatus::Degraded => " (degraded)",
        HealthStatus::Unhealthy => " (unhealthy)",
    }
}

/// Status of a value that is bad when high.
fn above(v: f64, l: Levels) -> HealthStatus {
    if v > l.unhealthy {
        HealthStatus::Unhealthy
    } else if v > l.degraded {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    }
}

/// Status of a value that is bad when low.
fn below(v: f64, l: Levels) -> HealthStatus {
    if v < l.unhealthy {
        HealthStatus::Unhealthy
    } else if v < l.degraded {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    }
}

impl HealthCheck for SystemCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self) -> CheckFuture<'_> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Box::pin(async {
                CheckResult::degraded("the system check needs a Tokio runtime")
            });
        };
        let this = self.clone();
        let measurement = {
            let mut running = self
                .measuring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &*running {
                Some(m) if m.peek().is_none() => m.clone(),
                _ => {
                    let m = async move {
                        match tokio::task::spawn_blocking(move || this.run()).await {
                            Ok(result) => result,
                            Err(e) => {
                                CheckResult::degraded(format!("system check did not finish: {e}"))
                            }
                        }
                    }
                    .boxed()
                    .shared();
                    // Driven to its end even when every caller gave up waiting, so a finished
                    // measurement is never handed to a later check as if it were running.
                    drop(runtime.spawn(m.clone()));
                    *running = Some(m.clone());
                    m
                }
            }
        };
        Box::pin(measurement)
    }
}

/// Parses the 1-minute load average (the first field of `/proc/loadavg`).
fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Parses `MemAvailable` and `MemTotal` (kB) from `/proc/meminfo` into a percentage.
fn parse_meminfo(text: &str) -> Option<f64> {
    let field = |key: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    (total > 0.0).then(|| available / total * 100.0)
}

#[cfg(target_os = "linux")]
mod measure {
    use std::io;
    use std::path::Path;

    pub(super) fn load_per_core() -> io::Result<Option<f64>> {
        let text = std::fs::read_to_string("/proc/loadavg")?;
        let load = super::parse_loadavg(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected format"))?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Some(load / cores as f64))
    }

    pub(super) fn memory_available_percent() -> io::Result<Option<f64>> {
        let text = std::fs::read_to_string("/proc/meminfo")?;
        super::parse_meminfo(&text)
            .map(Some)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no MemTotal/MemAvailable"))
    }

    pub(super) fn disk_free_percent(path: &Path) -> io::Result<Option<f64>> {
        let st = rustix::fs::statvfs(path)?;
        if st.f_blocks == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "file system reports no blocks",
            ));
        }
        Ok(Some(st.f_bavail as f64 / st.f_blocks as f64 * 100.0))
    }
}

#[cfg(not(target_os = "linux"))]
mod measure {
    use std::io;
    use std::path::Path;

    pub(super) fn load_per_core() -> io::Result<Option<f64>> {
        Ok(None)
    }

    pub(super) fn memory_available_percent() -> io::Result<Option<f64>> {
        Ok(None)
    }

    pub(super) fn disk_free_percent(_path: &Path) -> io::Result<Option<f64>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks made while a measurement runs share it: one blocking thread for any
    /// number of concurrent probes, and each gets its result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_share_one_measurement() {
        let check = SystemCheck::builder()
            .load_per_core(1e9, 1e9)
            .memory_available_percent(0.0, 0.0)
            .build()
            .unwrap();
        let clone = check.clone();
        for _ in 0..20 {
            let (a, b, c) = tokio::join!(check.check(), check.check(), clone.check());
            for r in [a, b, c] {
                assert_eq!(r.status, HealthStatus::Healthy, "{r:?}");
            }
        }
        // A hung measurement (a future that never ends, standing in for a `statvfs` on a
        // dead mount): later checks wait for it rather than start another.
        *check.measuring.lock().unwrap() = Some(std::future::pending().boxed().shared());
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), check.check()).await;
        assert!(waited.is_err(), "waited for the running measurement");
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/967 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg(""), None);
        let meminfo = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some(25.0));
        assert_eq!(parse_meminfo("MemTotal: 10 kB\n"), None);
    }

    #[test]
    fn levels() {
        let l = Levels {
            degraded: 1.0,
            unhealthy: 2.0,
        };
        assert_eq!(above(1.0, l), HealthStatus::Healthy);
        assert_eq!(above(1.5, l), HealthStatus::Degraded);
        assert_eq!(above(2.5, l), HealthStatus::Unhealthy);
        let p = Levels {
            degraded: 10.0,
            unhealthy: 5.0,
        };
        assert_eq!(below(10.0, p), HealthStatus::Healthy);
        assert_eq!(below(7.0, p), HealthStatus::Degraded);
        assert_eq!(below(4.9, p), HealthStatus::Unhealthy);
    }

    #[test]
    fn builder_validates() {
        let err = |b: SystemCheckBuilder| b.build().unwrap_err().field();
        assert_eq!(
            err(SystemCheck::builder().load_per_core(2.0, 1.0)),
            "load_per_core"
        );
        assert_eq!(
            err(SystemCheck::builder().load_per_core(f64::NAN, 1.0)),
            "load_per_core"
        );
        assert_eq!(
            err(SystemCheck::builder().memory_available_percent(5.0, 10.0)),
            "memory_available_percent"
        );
        assert_eq!(
            err(SystemCheck::builder().disk_free_percent("/", 101.0, 5.0)),
            "disk_free_percent"
        );
        assert_eq!(
            err(SystemCheck::builder().skip_load().skip_memory()),
            "build"
        );
        assert!(SystemCheck::builder()
            .skip_load()
            .skip_memory()
            .disk_free_percent("/", 10.0, 5.0)
            .build()
            .is_ok());
    }
}
