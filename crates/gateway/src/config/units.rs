//! Humane units in the config file: durations (`250ms`, `30s`, `5m`) and sizes (`32KiB`, `10MiB`).
//!
//! Small hand-written parsers rather than a crate: the accepted forms are few, and owning them means
//! the error message can say exactly which forms are accepted.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as `<integer><unit>` with unit `ms`, `s`, `m` or `h` (`250ms`, `30s`, `5m`, `1h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// The std duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h` (also `1.5s`, and `us`, which `bulwark check` prints for a
/// fraction of a millisecond). A bare number is refused: the unit is part of the meaning. Whole
/// numbers are exact; a fraction is rounded to the microsecond.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("invalid duration `{s}`: must not be negative"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| {
            format!("invalid duration `{s}`: missing unit (use ms, s, m or h, e.g. `250ms`, `30s`)")
        })?;
    let (num, unit) = t.split_at(split);
    let scale_us: u64 = match unit.trim() {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        other => {
            return Err(format!(
                "invalid duration `{s}`: unknown unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    let too_large = || format!("invalid duration `{s}`: too large");
    let us = if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale_us))
            .ok_or_else(too_large)?
    } else {
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration `{s}`: `{num}` is not a number"))?;
        let us = value * scale_us as f64;
        if !us.is_finite() || us > MAX_DURATION_US as f64 {
            return Err(too_large());
        }
        us.round() as u64
    };
    if us > MAX_DURATION_US {
        return Err(too_large());
    }
    Ok(Duration::from_micros(us))
}

/// The longest duration accepted: 10^15 ms (about 31,700 years), so that adding one to a clock
/// reading never overflows.
const MAX_DURATION_US: u64 = 1_000_000_000_000_000_000;

/// Formats a duration in the largest unit that represents it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{}us", d.as_micros());
    }
    if ms == 0 {
        "0ms".to_owned()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as `250ms`, `30s` or `5m`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "invalid duration `{v}`: missing unit (use ms, s, m or h, e.g. `{v}ms`)"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!("invalid duration `{v}`: missing unit")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!("invalid duration `{v}`: missing unit")))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// A size in bytes written as `<integer>[unit]` with unit `B`, `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`
/// for powers of 1000); a bare integer means bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    /// The size in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The size in bytes as `usize` (saturating).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

/// Parses `32KiB`, `10MiB`, `1GiB`, `500KB`, `123B`, `123`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("invalid size `{s}`: must not be negative"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "invalid size `{s}`: a size is a whole number (of bytes or of a unit: `1536KiB`, not `1.5MiB`)"
        ));
    }
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size `{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size `{s}`: expected an integer followed by a unit, e.g. `32KiB`")
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size `{s}`: too large"))
}

/// Formats a size in the largest binary unit that represents it exactly.
pub fn format_size(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n % m == 0 {
            return format!("{}{unit}", n / m);
        }
    }
    format!("{n}B")
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as `32KiB` or `10MiB`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size `{v}`: must not be negative")))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").unwrap_err().contains("missing unit"));
        assert!(parse_duration("5x")
            .unwrap_err()
            .contains("unknown unit `x`"));
        assert!(parse_duration("abc")
            .unwrap_err()
            .contains("invalid duration"));
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        // Whole numbers are exact, however large (up to the cap).
        assert_eq!(
            parse_duration("999999999999s"),
            Ok(Duration::from_secs(999_999_999_999))
        );
        assert!(parse_duration("99999999999999999999h")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_duration("1e30s").unwrap_err().contains("invalid"));
        // What `check` prints loads again.
        for d in [
            Duration::from_micros(1500),
            Duration::from_micros(1),
            Duration::from_secs(999_999_999_999),
            Duration::from_millis(1500),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32KiB"), Ok(32 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("500KB"), Ok(500_000));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("3 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert_eq!(format_size(32 * 1024), "32KiB");
        assert_eq!(format_size(1000), "1000B");
    }
}
