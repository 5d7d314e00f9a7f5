//! Finding the line and column of a key path in the YAML source.
//!
//! serde_norway attaches a position to an error raised while a node is being deserialized, but it has no
//! spans on values. To place a *semantic* error (a route naming a missing upstream) we re-read the source
//! with a tiny navigating deserializer that walks the key path and deliberately fails on the target key;
//! the parser then stamps that failure with the key's exact line and column. This uses the real YAML
//! parser, so flow style, quoting, anchors and comments cannot fool it the way a text scan could.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key; the `usize` picks the n-th occurrence (0 = first) for duplicate keys.
    Key(String, usize),
    /// A sequence index.
    Index(usize),
}

impl Seg {
    /// The first occurrence of mapping key `k`.
    pub fn key(k: impl Into<String>) -> Self {
        Seg::Key(k.into(), 0)
    }
}

/// Renders a path as `routes[0].retry.attempts`.
pub fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k, _) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

const MARKER: &str = "\u{0}bulwark-locate";

/// Line and column (1-based) of the last key (or element) of `path` in `src`, if present.
pub fn locate(src: &str, path: &[Seg]) -> Option<(usize, usize)> {
    if path.is_empty() {
        return Some((1, 1));
    }
    let de = serde_norway::Deserializer::from_str(src);
    match (Nav { path }).deserialize(de) {
        Err(e) if e.to_string().contains(MARKER) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

/// Like [`locate`], but falls back to the longest prefix of `path` that exists (so an error about a key
/// that is absent, e.g. a missing required field, points at the mapping that lacks it).
pub fn locate_nearest(src: &str, path: &[Seg]) -> Option<(usize, usize)> {
    (0..=path.len()).rev().find_map(|n| locate(src, &path[..n]))
}

struct Nav<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Nav<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.first() {
            Some(Seg::Key(..)) => d.deserialize_map(self),
            Some(Seg::Index(_)) => d.deserialize_seq(self),
            None => d.deserialize_any(Fail),
        }
    }
}

impl<'de> Visitor<'de> for Nav<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Seg::Key(target, nth)) = self.path.first() else {
            return Ok(());
        };
        let last = self.path.len() == 1;
        let seen = Cell::new(0usize);
        loop {
            let key = KeySeed {
                target,
                nth: *nth,
                seen: &seen,
                fail_on_match: last,
            };
            match map.next_key_seed(key)? {
                None => return Ok(()),
                Some(true) => {
                    return map.next_value_seed(Nav {
                        path: &self.path[1..],
                    })
                }
                Some(false) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(Seg::Index(target)) = self.path.first() else {
            return Ok(());
        };
        let mut i = 0;
        loop {
            if i == *target {
                let _ = seq.next_element_seed(Nav {
                    path: &self.path[1..],
                })?;
                return Ok(());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    // Any scalar where a mapping or sequence was expected: the path does not exist.
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Reads a mapping key; `Ok(true)` if it is the wanted occurrence of the target. When the target is the
/// last segment it fails instead, inside the parser, so the error carries the key's position.
struct KeySeed<'a> {
    target: &'a str,
    nth: usize,
    seen: &'a Cell<usize>,
    fail_on_match: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v != self.target {
            return Ok(false);
        }
        let n = self.seen.get();
        self.seen.set(n + 1);
        if n != self.nth {
            return Ok(false);
        }
        if self.fail_on_match {
            return Err(E::custom(MARKER));
        }
        Ok(true)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.visit_str(if v { "true" } else { "false" })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// Fails on whatever node it is given, so the parser stamps the failure with that node's position.
struct Fail;

impl<'de> Visitor<'de> for Fail {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MARKER)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARKER))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARKER))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "\
listen: 127.0.0.1:8080
upstreams:
  a:
    endpoints: [ { url: 'http://x' } ]
  b: { endpoints: [] }
  a:
    endpoints: []
routes:
  - match: { path_prefix: / }
    upstream: a
  - match:
      path: /x
    # a comment
    upstream: zzz
";

    #[test]
    fn finds_keys_indices_and_duplicates() {
        assert_eq!(locate(SRC, &[Seg::key("listen")]), Some((1, 1)));
        assert_eq!(
            locate(SRC, &[Seg::key("upstreams"), Seg::key("b")]),
            Some((5, 3))
        );
        assert_eq!(
            locate(SRC, &[Seg::key("upstreams"), Seg::Key("a".into(), 1)]),
            Some((6, 3))
        );
        assert_eq!(
            locate(
                SRC,
                &[Seg::key("upstreams"), Seg::key("b"), Seg::key("endpoints")]
            ),
            Some((5, 8))
        );
        assert_eq!(
            locate(
                SRC,
                &[Seg::key("routes"), Seg::Index(1), Seg::key("upstream")]
            ),
            Some((14, 5))
        );
        assert_eq!(
            locate(SRC, &[Seg::key("routes"), Seg::Index(1)]),
            Some((11, 5))
        );
        assert_eq!(locate(SRC, &[Seg::key("nope")]), None);
        assert_eq!(
            locate_nearest(SRC, &[Seg::key("routes"), Seg::Index(0), Seg::key("nope")]),
            Some((9, 5))
        );
        assert_eq!(
            render(&[Seg::key("routes"), Seg::Index(1), Seg::key("upstream")]),
            "routes[1].upstream"
        );
    }
}
