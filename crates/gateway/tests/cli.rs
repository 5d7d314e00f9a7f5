//! `bulwark check`: effective config, amplification, warnings, and FILE:LINE:COL errors with exit 1.
use std::process::Command;

mod support;

/// A config file `name` with `content`, in a directory removed when the guard is dropped.
struct Written {
    _dir: support::TempDir,
    path: std::path::PathBuf,
}

impl std::ops::Deref for Written {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

fn write(name: &str, content: &str) -> Written {
    let dir = support::TempDir::new("cli");
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    Written { _dir: dir, path }
}

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_effective_config_and_amplification() {
    let p = write(
        "ok.yaml",
        "upstreams:
  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }
  b: { endpoints: [{url: 'http://127.0.0.1:9002'}] }
  c: { endpoints: [{url: 'http://127.0.0.1:9003'}] }
routes:
  - name: safe
    match: { path_prefix: /v1/ }
    upstream: a
    retry: { attempts: 3, budget: { ratio: 0.2 } }
  - name: risky
    upstream: a
    failover: [b, c]
    retry: { attempts: 3 }
    hedge: { delay: 50ms }
",
    );
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "{err}");
    // Defaults filled in.
    assert!(out.contains("max_header_bytes: 32KiB"), "{out}");
    assert!(out.contains("idle_timeout: 1m"), "{out}");
    assert!(out.contains("balance: least_request"), "{out}");
    // Amplification lines and warnings.
    assert!(out.contains("route safe -> a: 3 x 1 x 1 = 3\n"), "{out}");
    assert!(
        out.contains("route risky -> a -> b -> c: 3 x 2 x 3 = 18\n"),
        "{out}"
    );
    assert!(out.contains("warning: route risky can send up to 18 upstream requests per client request (threshold 10)"), "{out}");
    assert!(
        out.contains("warning: route risky retries without a budget"),
        "{out}"
    );
    assert!(!out.contains("warning: route safe"), "{out}");
}

#[test]
fn check_reports_errors_with_file_line_col_and_exits_1() {
    let p = write(
        "bad.yaml",
        "upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }\nroutes:\n  - upstream: a\n    timeout: 3 weeks\n",
    );
    let (code, out, err) = check(&p);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:5:14: routes[0].timeout: invalid duration `3 weeks`: unknown unit `weeks` (use ms, s, m or h)",
            p.display()
        )
    );
    let p = write("missing.yaml", "upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }\nroutes:\n  - upstream: nope\n");
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:4:5: routes[0].upstream: unknown upstream `nope` (defined: a)",
            p.display()
        )
    );
}

#[test]
fn check_inspects_the_store_without_creating_it() {
    let dir = support::TempDir::new("cli");
    let db = dir.join("state.db");
    let cfg = |db: &std::path::Path| {
        format!(
            "store: {{ path: '{}' }}\nupstreams:\n  a: {{ endpoints: [{{url: 'http://127.0.0.1:9001'}}] }}\nroutes:\n  - upstream: a\n",
            db.display()
        )
    };
    let p = write("store.yaml", &cfg(&db));
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.ends_with(&format!(
            "# store: {} does not exist; `run` will create it\n",
            db.display()
        )),
        "{out}"
    );
    assert!(!db.exists(), "check must not create the store file");

    // Not a SQLite file: exit 1, the path named, nothing on stdout.
    std::fs::write(&db, "not sqlite, just text that is long enough to have a header ........................................").unwrap();
    let (code, out, err) = check(&p);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err.trim_end(),
        format!("bulwark: store {}: not a SQLite database", db.display())
    );

    // A directory that does not exist.
    let p = write("nodir.yaml", &cfg(&dir.join("nope/state.db")));
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert!(err.contains("the directory"), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    // Redis is refused at load, placed in the file.
    let p = write(
        "redis.yaml",
        "store:\n  redis: redis://127.0.0.1:6379\nupstreams: {}\n",
    );
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "{}:2:3: store.redis: not available yet",
            p.display()
        )),
        "{err}"
    );
}
