//! The embedded store: one SQLite file (`store.path`) holding the admin overrides and the audit log.
//!
//! Why a file at all: an operator who forces a breaker open during an incident expects it to stay
//! open until someone closes it, not until the next deploy restarts the process. The file's config
//! says what the gateway should do; the store says what an operator changed on top of it, and who
//! changed what when (the audit log).
//!
//! Why SQLite (`rusqlite`, SQLite compiled in with the `bundled` feature): a single gateway needs
//! nothing but its binary and its YAML file, so the store must be embedded; SQLite gives atomic,
//! durable transactions (an override and its audit row are written together or not at all) and a file
//! any operator can inspect with the `sqlite3` shell.
//!
//! The file is opened in WAL mode with `synchronous = FULL`: writes are rare (admin calls only, never
//! on the request path), so each is made durable before the API answers. The schema version is
//! `PRAGMA user_version` ([`SCHEMA_VERSION`]); a file written by a newer bulwark is refused rather
//! than guessed at.
//!
//! Every method here blocks on SQLite. Async callers run them on the blocking pool
//! ([`tokio::task::spawn_blocking`]); the gateway does so for admin writes and audit reads.
//!
//! Tables (version 1). A table added later, such as `mode_override`, is created when the file is
//! opened, without changing the version: a bulwark that does not know it ignores it, so going back
//! to an earlier release keeps working on the same file. The version changes only for a change an
//! earlier release would misread. Audit rows of mode changes have an empty `upstream`.
//!
//! ```sql
//! CREATE TABLE breaker_overrides (
//!     upstream TEXT PRIMARY KEY,   -- upstream name from the config
//!     state    TEXT NOT NULL,      -- 'forced_open' | 'disabled'
//!     set_at   TEXT NOT NULL,      -- RFC 3339, UTC
//!     set_by   TEXT NOT NULL       -- who set it: 'admin-api'
//! );
//! CREATE TABLE audit_log (         -- append-only
//!     id        INTEGER PRIMARY KEY AUTOINCREMENT,
//!     time      TEXT NOT NULL,     -- RFC 3339, UTC
//!     action    TEXT NOT NULL,     -- 'set_override' | 'clear_override'
//!     upstream  TEXT NOT NULL,
//!     old_state TEXT,              -- the breaker's state before (library state name)
//!     new_state TEXT,              -- what was asked: 'forced_open' | 'disabled' | 'closed'
//!     client    TEXT               -- the admin caller's address, when known
//! );
//! CREATE TABLE mode_override (     -- at most one row
//!     id     INTEGER PRIMARY KEY CHECK (id = 1),
//!     mode   TEXT NOT NULL,        -- 'normal' | 'maintenance' | 'read_only' | 'degraded'
//!     set_at TEXT NOT NULL,
//!     set_by TEXT NOT NULL
//! );
//! ```
//!
//! Audit actions: `set_override` and `clear_override` (a breaker), `set_mode` and `clear_mode` (the
//! operating mode: `old_state` the mode in force before, `new_state` the one after).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::config::Mode;
use crate::proxy::BreakerCommand;

/// The schema version this build writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// How long a write waits for another connection's lock before failing. The gateway is the file's
/// only writer in normal operation; a second process holding it (a `sqlite3` shell left in a
/// transaction) should fail an admin call quickly and visibly rather than hang it.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// Who set an override through the admin API (`breaker_overrides.set_by`).
pub const SET_BY_ADMIN_API: &str = "admin-api";
/// Audit entries returned by `GET /api/audit` without `limit`.
pub const DEFAULT_AUDIT_LIMIT: usize = 100;
/// Most audit entries one `GET /api/audit` returns.
pub const MAX_AUDIT_LIMIT: usize = 1000;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// A store error, naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    /// The store file.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store {}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for StoreError {}

/// One row of the audit log, as `GET /api/audit` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// When, RFC 3339 UTC.
    pub time: String,
    /// `set_override` or `clear_override` (a breaker), `set_mode` or `clear_mode`.
    pub action: String,
    /// The upstream; `None` for a mode change.
    pub upstream: Option<String>,
    /// The breaker's state before the change.
    pub from: Option<String>,
    /// The state asked for.
    pub to: Option<String>,
    /// The admin caller's address, when known.
    pub client: Option<String>,
}

/// A breaker change to record: the override is written (or, for `closed`, deleted) together with its
/// audit row.
#[derive(Debug, Clone, Copy)]
pub struct BreakerChange<'a> {
    /// The upstream.
    pub upstream: &'a str,
    /// The breaker's state before (or the override's, for an upstream no longer configured).
    pub from: &'a str,
    /// The state asked for.
    pub to: BreakerCommand,
    /// Who: [`SET_BY_ADMIN_API`].
    pub by: &'a str,
    /// The admin caller's address, when known.
    pub client: Option<&'a str>,
}

/// The open store file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Audit entries kept (the newest); each change drops the older ones.
    audit_keep: u64,
}

impl Store {
    /// Opens (creating it if absent) the store file at `path`, switches it to WAL mode and brings its
    /// schema to [`SCHEMA_VERSION`]. Fails, naming the path, when the file cannot be opened or
    /// created, is not a SQLite database, or was written by a newer bulwark. Blocks.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |message: String| StoreError {
            path: path.to_owned(),
            message,
        };
        if path.is_dir() {
            return Err(err("is a directory".into()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| err(format!("cannot open or create: {e}")))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| err(e.to_string()))?;
        // The first statement reads the header: a file that is not a database fails here.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| err(format!("cannot read: {e}")))?;
        if version > SCHEMA_VERSION {
            return Err(err(format!(
                "schema version {version} is newer than this bulwark supports ({SCHEMA_VERSION}); \
                 use a newer bulwark or another file"
            )));
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| err(format!("cannot switch to WAL mode: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(file = %path.display(), journal_mode = %mode, "store: WAL mode not available on this file system; using the rollback journal");
        }
        conn.execute_batch("PRAGMA synchronous = FULL")
            .map_err(|e| err(e.to_string()))?;
        let mut store = Store {
            path: path.to_owned(),
            conn: Mutex::new(conn),
            audit_keep: crate::config::DEFAULT_AUDIT_MAX_ENTRIES,
        };
        store.migrate(version)?;
        Ok(store)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves at most an open transaction, which rusqlite's
        // `Transaction` rolls back on drop: the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the tables of each schema version above `from`, and the tables added since without
    /// a version change, in one transaction.
    fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let err = |e: rusqlite::Error| StoreError {
            path: path.clone(),
            message: format!("cannot create the schema: {e}"),
        };
        let tx = conn.transaction().map_err(err)?;
        if from < 1 {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS breaker_overrides (
                     upstream TEXT PRIMARY KEY,
                     state    TEXT NOT NULL CHECK (state IN ('forced_open', 'disabled')),
                     set_at   TEXT NOT NULL,
                     set_by   TEXT NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS audit_log (
                     id        INTEGER PRIMARY KEY AUTOINCREMENT,
                     time      TEXT NOT NULL,
                     action    TEXT NOT NULL,
                     upstream  TEXT NOT NULL,
                     old_state TEXT,
                     new_state TEXT,
                     client    TEXT
                 );",
            )
            .map_err(err)?;
        }
        // Added after version 1 was released; an older bulwark ignores it.
        {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS mode_override (
                     id     INTEGER PRIMARY KEY CHECK (id = 1),
                     mode   TEXT NOT NULL
                            CHECK (mode IN ('normal', 'maintenance', 'read_only', 'degraded')),
                     set_at TEXT NOT NULL,
                     set_by TEXT NOT NULL
                 );",
            )
            .map_err(err)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// The persisted breaker overrides, by upstream name. Blocks.
    pub fn overrides(&self) -> Result<BTreeMap<String, BreakerCommand>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT upstream, state FROM breaker_overrides ORDER BY upstream")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (name, state) = row.map_err(|e| self.err(e))?;
            match state.as_str() {
                "forced_open" => out.insert(name, BreakerCommand::ForcedOpen),
                "disabled" => out.insert(name, BreakerCommand::Disabled),
                other => {
                    return Err(self.err(format!(
                        "breaker_overrides: unknown state `{other}` for upstream `{name}`"
                    )))
                }
            };
        }
        Ok(out)
    }

    /// Records `change`: for `forced_open` and `disabled` the override is inserted or replaced, for
    /// `closed` it is deleted; in the same transaction an audit row is appended. Blocks (one fsync).
    pub fn record(&self, change: &BreakerChange<'_>) -> Result<(), StoreError> {
        self.write_change(change.client, |tx, now| {
            Ok(match change.to {
                BreakerCommand::Closed => {
                    tx.execute(
                        "DELETE FROM breaker_overrides WHERE upstream = ?1",
                        params![change.upstream],
                    )?;
                    ("clear_override", change.upstream, change.from, "closed")
                }
                cmd => {
                    let state = command_name(cmd);
                    tx.execute(
                        "INSERT INTO breaker_overrides (upstream, state, set_at, set_by)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (upstream) DO UPDATE
                         SET state = excluded.state, set_at = excluded.set_at, set_by = excluded.set_by",
                        params![change.upstream, state, now, change.by],
                    )?;
                    ("set_override", change.upstream, change.from, state)
                }
            })
        })
    }

    /// One admin change, durable before it returns: `apply` writes the override (given the
    /// transaction and the time) and says what to log (action, upstream, from, to); the audit row
    /// goes in the same transaction. Blocks (one fsync).
    fn write_change<'a>(
        &self,
        client: Option<&str>,
        apply: impl FnOnce(
            &rusqlite::Transaction<'_>,
            &str,
        ) -> rusqlite::Result<(&'a str, &'a str, &'a str, &'a str)>,
    ) -> Result<(), StoreError> {
        let write = |e: rusqlite::Error| self.err(format!("cannot write: {e}"));
        let now = rfc3339(SystemTime::now());
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(write)?;
        let (action, upstream, from, to) = apply(&tx, &now).map_err(write)?;
        tx.execute(
            "INSERT INTO audit_log (time, action, upstream, old_state, new_state, client)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now, action, upstream, from, to, client],
        )
        .map_err(write)?;
        // Ids only grow (AUTOINCREMENT): the newest `audit_keep` rows have the highest ones.
        let last = tx.last_insert_rowid();
        let keep = i64::try_from(self.audit_keep).unwrap_or(i64::MAX);
        tx.execute(
            "DELETE FROM audit_log WHERE id <= ?1",
            params![last.saturating_sub(keep)],
        )
        .map_err(write)?;
        tx.commit().map_err(write)
    }

    /// Keeps at most `n` audit entries (the newest; at least one) from the next change on
    /// (`store.audit_max_entries`; [`DEFAULT_AUDIT_MAX_ENTRIES`] until set).
    ///
    /// [`DEFAULT_AUDIT_MAX_ENTRIES`]: crate::config::DEFAULT_AUDIT_MAX_ENTRIES
    pub fn keep_audit(mut self, n: u64) -> Self {
        self.audit_keep = n.max(1);
        self
    }

    /// The persisted operating-mode override, if any. Blocks.
    pub fn mode_override(&self) -> Result<Option<Mode>, StoreError> {
        let conn = self.lock();
        let mode: Option<String> = conn
            .query_row("SELECT mode FROM mode_override WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        match mode {
            None => Ok(None),
            Some(m) => Mode::from_name(&m)
                .map(Some)
                .ok_or_else(|| self.err(format!("mode_override: unknown mode `{m}`"))),
        }
    }

    /// Records a mode change: the override `over` is written (`Some`) or deleted (`None`), and an
    /// audit row says the mode went `from` -> `to`, in one transaction. Blocks (one fsync).
    pub fn record_mode(
        &self,
        over: Option<Mode>,
        from: Mode,
        to: Mode,
        by: &str,
        client: Option<&str>,
    ) -> Result<(), StoreError> {
        // A mode change's audit row has an empty `upstream`.
        self.write_change(client, |tx, now| {
            let action = match over {
                Some(m) => {
                    tx.execute(
                        "INSERT INTO mode_override (id, mode, set_at, set_by) VALUES (1, ?1, ?2, ?3)
                         ON CONFLICT (id) DO UPDATE
                         SET mode = excluded.mode, set_at = excluded.set_at, set_by = excluded.set_by",
                        params![m.as_str(), now, by],
                    )?;
                    "set_mode"
                }
                None => {
                    tx.execute("DELETE FROM mode_override", [])?;
                    "clear_mode"
                }
            };
            Ok((action, "", from.as_str(), to.as_str()))
        })
    }

    /// The newest `limit` audit entries, newest first. Blocks.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT time, action, upstream, old_state, new_state, client
                 FROM audit_log ORDER BY id DESC LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![limit], |r| {
                let upstream: String = r.get(2)?;
                Ok(AuditEntry {
                    time: r.get(0)?,
                    action: r.get(1)?,
                    upstream: (!upstream.is_empty()).then_some(upstream),
                    from: r.get(3)?,
                    to: r.get(4)?,
                    client: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

/// What `bulwark check` can say about a store file without creating or changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// The file does not exist; its directory does, so `run` will create it.
    WillBeCreated,
    /// A SQLite file at a schema version this build reads.
    Existing {
        /// Its `user_version` (0: not yet initialised by bulwark).
        version: i64,
    },
}

/// Checks the store file at `path` as far as can be done without creating it or opening it with
/// SQLite (which could create `-wal`/`-shm` files next to it): its directory exists, and if the
/// file exists it starts with the SQLite header and its schema version (read from the header) is
/// not newer than [`SCHEMA_VERSION`]. An empty file counts as a new database, as SQLite treats it.
pub fn inspect(path: &Path) -> Result<Inspection, StoreError> {
    use std::io::Read;
    let err = |message: String| StoreError {
        path: path.to_owned(),
        message,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(err("is a directory".into())),
        Ok(_) => {
            let mut header = Vec::with_capacity(100);
            std::fs::File::open(path)
                .and_then(|f| f.take(100).read_to_end(&mut header))
                .map_err(|e| err(format!("cannot read: {e}")))?;
            if header.is_empty() {
                return Ok(Inspection::Existing { version: 0 });
            }
            if header.len() < 100 || &header[..16] != SQLITE_MAGIC {
                return Err(err("not a SQLite database".into()));
            }
            // The header's user version: 4 bytes, big-endian, at offset 60.
            let mut version = i64::from(i32::from_be_bytes([
                header[60], header[61], header[62], header[63],
            ]));
            // In WAL mode the header is brought up to date only at a checkpoint: with a
            // write-ahead log beside it (a gateway running, or one that crashed), SQLite itself
            // says, opening the file read-only.
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                if let Ok(v) = Connection::open_with_flags(path, flags)
                    .and_then(|c| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)))
                {
                    version = v;
                }
            }
            if version > SCHEMA_VERSION {
                return Err(err(format!(
                    "schema version {version} is newer than this bulwark supports ({SCHEMA_VERSION})"
                )));
            }
            Ok(Inspection::Existing { version })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if dir.is_dir() {
                Ok(Inspection::WillBeCreated)
            } else {
                Err(err(format!(
                    "cannot be created: the directory {} does not exist",
                    dir.display()
                )))
            }
        }
        Err(e) => Err(err(format!("cannot read: {e}"))),
    }
}

/// The stored name of a command (`forced_open`, `disabled`, `closed`).
pub fn command_name(cmd: BreakerCommand) -> &'static str {
    match cmd {
        BreakerCommand::ForcedOpen => "forced_open",
        BreakerCommand::Closed => "closed",
        BreakerCommand::Disabled => "disabled",
    }
}

/// `t` as RFC 3339 in UTC with milliseconds: `2026-11-27T20:35:24.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bulwark-store-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rfc3339_formats_utc_with_millis() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_overrides_and_audit_and_reopens() {
        let dir = temp("roundtrip");
        let path = dir.join("s.db");
        assert_eq!(inspect(&path).unwrap(), Inspection::WillBeCreated);
        let s = Store::open(&path).unwrap();
        let change = |to, from| BreakerChange {
            upstream: "a",
            from,
            to,
            by: SET_BY_ADMIN_API,
            client: Some("127.0.0.1:1"),
        };
        s.record(&change(BreakerCommand::ForcedOpen, "closed"))
            .unwrap();
        s.record(&change(BreakerCommand::Disabled, "forced_open"))
            .unwrap();
        assert_eq!(
            s.overrides().unwrap().get("a"),
            Some(&BreakerCommand::Disabled)
        );
        drop(s);
        assert_eq!(
            inspect(&path).unwrap(),
            Inspection::Existing {
                version: SCHEMA_VERSION
            }
        );
        let s = Store::open(&path).unwrap();
        s.record(&change(BreakerCommand::Closed, "disabled"))
            .unwrap();
        assert!(s.overrides().unwrap().is_empty());
        let log = s.audit(10).unwrap();
        let steps: Vec<(&str, Option<&str>, Option<&str>)> = log
            .iter()
            .map(|e| (e.action.as_str(), e.from.as_deref(), e.to.as_deref()))
            .collect();
        assert_eq!(
            steps,
            [
                ("clear_override", Some("disabled"), Some("closed")),
                ("set_override", Some("forced_open"), Some("disabled")),
                ("set_override", Some("closed"), Some("forced_open")),
            ]
        );
        assert_eq!(s.audit(1).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let dir = temp("refuse");
        let junk = dir.join("junk.db");
        std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
        let e = Store::open(&junk).unwrap_err();
        assert_eq!(e.path, junk);
        assert!(e.to_string().contains("junk.db"), "{e}");
        assert!(inspect(&junk).unwrap_err().message.contains("not a SQLite"));

        let newer = dir.join("newer.db");
        {
            let c = Connection::open(&newer).unwrap();
            c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let e = Store::open(&newer).unwrap_err();
        assert!(e.message.contains("newer"), "{e}");
        assert!(inspect(&newer).unwrap_err().message.contains("newer"));

        let missing = dir.join("no/such/dir/s.db");
        assert!(Store::open(&missing).is_err());
        assert!(inspect(&missing)
            .unwrap_err()
            .message
            .contains("does not exist"));
        assert!(!missing.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_audit_log_keeps_its_newest_entries() {
        let dir = temp("keep");
        let path = dir.join("s.db");
        let s = Store::open(&path).unwrap().keep_audit(3);
        let modes = [Mode::Normal, Mode::Maintenance];
        for i in 0..7 {
            let (from, to) = (modes[i % 2], modes[(i + 1) % 2]);
            s.record_mode(Some(to), from, to, SET_BY_ADMIN_API, Some(&format!("c{i}")))
                .unwrap();
        }
        let log = s.audit(100).unwrap();
        let clients: Vec<_> = log.iter().map(|e| e.client.clone().unwrap()).collect();
        assert_eq!(clients, ["c6", "c5", "c4"]);
        let rows: i64 = s
            .lock()
            .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3);
        // Reopened with the default, the older rows are gone for good; the next change keeps all.
        drop(s);
        let s = Store::open(&path).unwrap();
        s.record_mode(None, Mode::Normal, Mode::Normal, SET_BY_ADMIN_API, None)
            .unwrap();
        assert_eq!(s.audit(100).unwrap().len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mode_override_round_trips_and_is_audited() {
        let dir = temp("mode");
        let path = dir.join("s.db");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.mode_override().unwrap(), None);
        s.record_mode(
            Some(Mode::Maintenance),
            Mode::Normal,
            Mode::Maintenance,
            SET_BY_ADMIN_API,
            None,
        )
        .unwrap();
        s.record_mode(
            Some(Mode::ReadOnly),
            Mode::Maintenance,
            Mode::ReadOnly,
            SET_BY_ADMIN_API,
            Some("127.0.0.1:9"),
        )
        .unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.mode_override().unwrap(), Some(Mode::ReadOnly));
        s.record_mode(None, Mode::ReadOnly, Mode::Normal, SET_BY_ADMIN_API, None)
            .unwrap();
        assert_eq!(s.mode_override().unwrap(), None);
        type Row = (String, Option<String>, Option<String>, Option<String>);
        let steps: Vec<Row> = s
            .audit(10)
            .unwrap()
            .into_iter()
            .map(|e| (e.action, e.upstream, e.from, e.to))
            .collect();
        let row = |a: &str, f: &str, t: &str| {
            (a.to_owned(), None, Some(f.to_owned()), Some(t.to_owned()))
        };
        assert_eq!(
            steps,
            [
                row("clear_mode", "read_only", "normal"),
                row("set_mode", "maintenance", "read_only"),
                row("set_mode", "normal", "maintenance"),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_from_before_modes_gains_the_table_and_keeps_its_rows_and_version() {
        let dir = temp("v1");
        let path = dir.join("s.db");
        {
            // What bulwark wrote before `mode_override` existed.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE breaker_overrides (upstream TEXT PRIMARY KEY, state TEXT NOT NULL
                     CHECK (state IN ('forced_open', 'disabled')), set_at TEXT NOT NULL, set_by TEXT NOT NULL);
                 CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
                     action TEXT NOT NULL, upstream TEXT NOT NULL, old_state TEXT, new_state TEXT, client TEXT);
                 INSERT INTO breaker_overrides VALUES ('a', 'forced_open', '2026-01-01T00:00:00.000Z', 'admin-api');
                 INSERT INTO audit_log (time, action, upstream, old_state, new_state)
                     VALUES ('2026-01-01T00:00:00.000Z', 'set_override', 'a', 'closed', 'forced_open');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        assert_eq!(inspect(&path).unwrap(), Inspection::Existing { version: 1 });
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.overrides().unwrap().get("a"),
            Some(&BreakerCommand::ForcedOpen)
        );
        assert_eq!(s.mode_override().unwrap(), None);
        s.record_mode(
            Some(Mode::Degraded),
            Mode::Normal,
            Mode::Degraded,
            SET_BY_ADMIN_API,
            None,
        )
        .unwrap();
        let log = s.audit(10).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[1].upstream.as_deref(), Some("a"));
        drop(s);
        assert_eq!(
            inspect(&path).unwrap(),
            Inspection::Existing {
                version: SCHEMA_VERSION
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
