//! The gateway's configuration: one YAML file.
//!
//! Loading has two phases. Parsing (serde_norway, wrapped in serde_path_to_error) checks shapes, types,
//! units and unknown keys; validation checks what a type cannot (a route naming a missing upstream, an
//! empty endpoint list). Both phases report `FILE:LINE:COL: key.path: what is wrong`: parse errors carry
//! the parser's position, validation errors are placed by re-reading the source ([`locate`]).
//!
//! Every default is a named constant below with the reason for its value.

mod locate;
mod schema;
mod units;
mod validate;

use std::fmt;
use std::path::Path;

pub use locate::{locate, locate_nearest, render, Seg};
pub use schema::*;
pub use units::{format_duration, format_size, parse_duration, parse_size, ByteSize, Dur};
pub(crate) use validate::{check_url, EndpointUrl};

/// A configuration error, placed in the file: `FILE:LINE:COL: key.path: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name as given (or `<config>` for in-memory sources).
    pub file: String,
    /// 1-based line and column, when the position is known.
    pub position: Option<(usize, usize)>,
    /// Key path such as `routes[0].retry.attempts` (`.` for the document root).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: ", self.file)?,
            None => write!(f, "{}: ", self.file)?,
        }
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        position: None,
        path: ".".into(),
        message: format!("cannot read the file: {e}"),
    })?;
    // Every default would be a gateway without a route: a file written empty, truncated, or the
    // wrong one, not a config anyone meant.
    let nothing = |l: &str| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    };
    // (A byte order mark, as Windows editors write one, is no setting either.)
    if src.trim_start_matches('\u{feff}').lines().all(nothing) {
        return Err(ConfigError {
            file,
            position: None,
            path: ".".into(),
            message: "the file is empty (or only comments): a config needs at least `upstreams` and `routes`".into(),
        });
    }
    from_str(&src, &file)
}

/// Parses and validates a config from `src`; `file` names it in errors.
pub fn from_str(src: &str, file: &str) -> Result<Config, ConfigError> {
    let config = parse(src, file)?;
    validate::validate(&config).map_err(|(path, message)| ConfigError {
        file: file.to_owned(),
        position: locate_nearest(src, &path),
        path: render(&path),
        message,
    })?;
    Ok(config)
}

fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let de = serde_norway::Deserializer::from_str(src);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|err| {
        let segs = to_segs(err.path());
        let inner = err.inner();
        let mut message = inner.to_string();
        // serde_norway's Display adds ` at line L column C` and its own `path: ` prefix; we print both
        // ourselves, in the FILE:LINE:COL form.
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        let p2e = err.path().to_string();
        if let Some(rest) = message.strip_prefix(&format!("{p2e}: ")) {
            message = rest.to_owned();
        } else if let Some((head, rest)) = message.split_once(": ") {
            if !head.contains(' ') && !head.contains('`') {
                message = rest.to_owned();
            }
        }
        let mut path = segs;
        let position = if let Some(key) = unknown_field(&message) {
            // An unknown key is reported at the key itself, not at the mapping that holds it.
            if path.last() != Some(&Seg::key(key)) {
                path.push(Seg::key(key));
            }
            locate(src, &path).or_else(|| inner.location().map(|l| (l.line(), l.column())))
        } else if let Some(key) = duplicate_field(&message) {
            // A key written twice is reported at the repeat, not at the mapping that holds it.
            path.push(Seg::Key(key.to_owned(), 1));
            locate(src, &path).or_else(|| inner.location().map(|l| (l.line(), l.column())))
        } else if message.contains("more than one document") {
            second_document(src)
                .or_else(|| inner.location().map(|l| (l.line(), l.column())))
                .or_else(|| locate_nearest(src, &path))
        } else {
            if let Some(name) = duplicate_name(&message) {
                if path.last() != Some(&Seg::key(name)) {
                    path.push(Seg::key(name));
                }
            }
            let at = inner.location().map(|l| (l.line(), l.column()));
            // A value's error cannot come before its key. Errors raised after a custom
            // deserializer read its value (`hedge.delay`, `client_rate_limit.key`) are stamped at
            // the start of the mapping that holds them: the key's own position is better.
            match (at, locate(src, &path)) {
                (Some(at), Some(key)) if at < key => Some(key),
                (at, key) => at.or(key).or_else(|| locate_nearest(src, &path)),
            }
        };
        ConfigError {
            file: file.to_owned(),
            position,
            path: render(&path),
            message,
        }
    })
}

/// Where a second YAML document starts: its `---` line (at column 1: a block scalar's lines
/// cannot start there), the first after some content or the second in all.
fn second_document(src: &str) -> Option<(usize, usize)> {
    let mut content = false;
    let mut markers = 0;
    for (i, line) in src.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        if line.trim_end() == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            markers += 1;
            if content || markers == 2 {
                return Some((i + 1, 1));
            }
        } else if !(line.trim().is_empty()
            || line.trim_start().starts_with('#')
            || line.starts_with('%'))
        {
            content = true;
        }
    }
    None
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(k, _)| k)
}

fn duplicate_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("duplicate field `")?;
    rest.split_once('`').map(|(k, _)| k)
}

fn duplicate_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("duplicate name `")?;
    rest.split_once('`').map(|(k, _)| k)
}

fn to_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::key(key.clone())),
            Segment::Enum { variant } => Some(Seg::key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// `config` with the defaults that depend on other settings written out (what `bulwark check`
/// prints): an `admission.max_queued` of `max_concurrent`, and the `burst` of each rate limit (one
/// second's worth). Loading it gives the same gateway.
pub fn effective(config: &Config) -> Config {
    let mut c = config.clone();
    if let Some(a) = &mut c.admission {
        a.max_queued.get_or_insert(a.max_concurrent);
    }
    for (_, up) in &mut c.upstreams.0 {
        if let Some(r) = &mut up.rate_limit {
            r.burst = Some(crate::policy::burst(r.burst, r.per_second));
        }
    }
    for (i, route) in c.routes.iter_mut().enumerate() {
        route.name.get_or_insert_with(|| format!("route{i}"));
        if let Some(r) = &mut route.client_rate_limit {
            r.burst = Some(crate::policy::burst(r.burst, r.per_second));
        }
    }
    c
}

/// The config as YAML.
pub fn to_yaml(config: &Config) -> String {
    serde_norway::to_string(config).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
}

#[cfg(test)]
mod tests;
