//! Header rules: `request_headers` of an upstream (every request sent to its endpoints, such as
//! each provider's own credentials in a failover chain) and of a route, and a route's
//! `response_headers`: headers set or removed. Values may name
//! environment variables (`${NAME}`), so a secret stays out of the config file and out of what
//! `bulwark check` prints (which shows the value as written).

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config;

/// Names that are the gateway's to set or that frame the message: a header section's entry may
/// not name them.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// A `request_headers` or `response_headers` section, ready to apply: names parsed, `${NAME}`
/// references expanded.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// The entry of a header section a [`Refused`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `set.<name>`, the name as written.
    Set(String),
    /// `remove[<index>]`.
    Remove(usize),
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Set(name) => write!(f, "set.{name}"),
            Entry::Remove(i) => write!(f, "remove[{i}]"),
        }
    }
}

/// Why a header section was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The entry.
    pub entry: Entry,
    /// What is wrong (never the value itself: it may hold a secret).
    pub reason: String,
}

impl HeaderRules {
    /// Builds the section, reading environment variables with `env`. `None` when it changes
    /// nothing.
    pub fn new(
        c: &config::HeaderRules,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, Refused> {
        let mut out = HeaderRules::default();
        for (i, raw) in c.remove.iter().enumerate() {
            let at = || Entry::Remove(i);
            let name = header_name(raw).map_err(|reason| Refused {
                entry: at(),
                reason,
            })?;
            if out.remove.contains(&name) {
                return Err(Refused {
                    entry: at(),
                    reason: format!("`{raw}` is listed twice"),
                });
            }
            out.remove.push(name);
        }
        for (raw, template) in &c.set {
            let at = || Entry::Set(raw.clone());
            let name = header_name(raw).map_err(|reason| Refused {
                entry: at(),
                reason,
            })?;
            if out.set.iter().any(|(n, _)| *n == name) {
                return Err(Refused {
                    entry: at(),
                    reason: format!("`{name}` is set twice (header names ignore case)"),
                });
            }
            if out.remove.contains(&name) {
                return Err(Refused {
                    entry: at(),
                    reason: format!("`{name}` is both set and removed"),
                });
            }
            let (value, secret) = expand(template, &env).map_err(|reason| Refused {
                entry: at(),
                reason,
            })?;
            let mut value = HeaderValue::from_str(&value).map_err(|_| Refused {
                entry: at(),
                reason: "not a valid header value (after `${...}` expansion): visible ASCII, \
                         spaces and tabs only"
                    .to_owned(),
            })?;
            // Kept out of HTTP/2 header compression tables (HPACK's never-indexed literal).
            value.set_sensitive(secret);
            out.set.push((name, value));
        }
        Ok((!out.set.is_empty() || !out.remove.is_empty()).then_some(out))
    }

    /// Applies the section to a request's headers: removals, then the values set (each replacing
    /// whatever the request had under that name).
    pub fn apply(&self, h: &mut HeaderMap) {
        for name in &self.remove {
            h.remove(name);
        }
        for (name, value) in &self.set {
            h.insert(name.clone(), value.clone());
        }
    }
}

fn header_name(raw: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| format!("invalid header name `{raw}`"))?;
    if RESERVED.contains(&name.as_str()) {
        return Err(format!(
            "`{name}` cannot be changed here: the gateway sets it (or it is hop-by-hop)"
        ));
    }
    Ok(name)
}

/// Expands `${NAME}` references in `template` (`$$` is one `$`); also says whether any was there.
/// A reference to a variable that is unset or empty is an error.
fn expand(template: &str, env: impl Fn(&str) -> Option<String>) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(template.len());
    let mut secret = false;
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or("`${` without its closing `}` (write `$$` for a literal `$`)")?;
            let name = &r[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
            if !valid {
                return Err(format!(
                    "`${{{name}}}`: an environment variable name is letters, digits and `_`, \
                     not starting with a digit"
                ));
            }
            match env(name) {
                Some(v) if !v.is_empty() => out.push_str(&v),
                _ => {
                    return Err(format!(
                        "environment variable `{name}` is not set (or empty)"
                    ))
                }
            }
            secret = true;
            rest = &r[end + 1..];
        } else {
            out.push('$');
        }
    }
    out.push_str(rest);
    Ok((out, secret))
}

/// The process environment, for [`HeaderRules::new`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn references_expand_and_dollars_escape() {
        assert_eq!(
            expand("Bearer ${KEY}", env),
            Ok(("Bearer s3cret".into(), true))
        );
        assert_eq!(expand("a$$b$c", env), Ok(("a$b$c".into(), false)));
        assert_eq!(
            expand("${KEY}${KEY}", env),
            Ok(("s3crets3cret".into(), true))
        );
        assert_eq!(expand("$", env), Ok(("$".into(), false)));
        assert!(expand("${MISSING}", env)
            .unwrap_err()
            .contains("`MISSING` is not set"));
        assert!(expand("${EMPTY}", env).unwrap_err().contains("`EMPTY`"));
        assert!(expand("${KEY", env).unwrap_err().contains("closing"));
        assert!(expand("${1A}", env).unwrap_err().contains("letters"));
        assert!(expand("${}", env).unwrap_err().contains("letters"));
    }

    fn section(set: &[(&str, &str)], remove: &[&str]) -> config::HeaderRules {
        config::HeaderRules {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn removals_then_values_replace_what_the_request_had() {
        let h = HeaderRules::new(
            &section(
                &[("Authorization", "Bearer ${KEY}"), ("x-b", "2")],
                &["x-a"],
            ),
            env,
        )
        .unwrap()
        .unwrap();
        let mut m = HeaderMap::new();
        m.insert("authorization", "Bearer client".parse().unwrap());
        m.append("x-b", "1".parse().unwrap());
        m.append("x-b", "1bis".parse().unwrap());
        m.insert("x-a", "gone".parse().unwrap());
        m.insert("x-c", "kept".parse().unwrap());
        h.apply(&mut m);
        assert_eq!(m.get("authorization").unwrap(), "Bearer s3cret");
        assert!(m.get("authorization").unwrap().is_sensitive());
        assert_eq!(m.get_all("x-b").iter().collect::<Vec<_>>(), ["2"]);
        assert!(!m.get("x-b").unwrap().is_sensitive());
        assert!(m.get("x-a").is_none());
        assert_eq!(m.get("x-c").unwrap(), "kept");
        assert!(HeaderRules::new(&section(&[], &[]), env).unwrap().is_none());
    }

    #[test]
    fn bad_sections_name_the_entry_and_never_the_value() {
        let refused = |set: &[(&str, &str)], remove: &[&str]| {
            HeaderRules::new(&section(set, remove), env).unwrap_err()
        };
        let r = refused(&[("host", "x")], &[]);
        assert_eq!(r.entry, Entry::Set("host".into()));
        assert!(r.reason.contains("gateway sets it"), "{}", r.reason);
        let r = refused(&[], &["ok", "Transfer-Encoding"]);
        assert_eq!(r.entry, Entry::Remove(1));
        let r = refused(&[("bad name", "x")], &[]);
        assert!(r.reason.contains("invalid header name"), "{}", r.reason);
        let r = refused(&[("X-A", "1"), ("x-a", "2")], &[]);
        assert!(r.reason.contains("set twice"), "{}", r.reason);
        let r = refused(&[("x-a", "1")], &["X-A"]);
        assert!(r.reason.contains("both set and removed"), "{}", r.reason);
        let r = refused(&[], &["x-a", "x-a"]);
        assert_eq!(r.entry, Entry::Remove(1));
        let r = refused(&[("authorization", "Bearer ${KEY}\n")], &[]);
        assert_eq!(r.entry, Entry::Set("authorization".into()));
        assert!(!r.reason.contains("s3cret"), "{}", r.reason);
    }
}
