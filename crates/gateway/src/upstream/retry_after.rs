//! `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
//!
//! Providers use both forms, so both are read. For dates, the IMF-fixdate form senders must
//! generate is accepted, and so are the two obsolete forms recipients are asked to accept
//! (RFC 850 and asctime). A date in the past means "now" (zero).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::RETRY_AFTER;
use http::HeaderMap;

/// The delay a `Retry-After` header in `headers` asks for, read at wall-clock time `now`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    parse(headers.get(RETRY_AFTER)?.to_str().ok()?, now)
}

/// Parses a `Retry-After` value at wall-clock time `now`.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // A huge number of seconds saturates rather than failing: it still means "much later".
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = http_date(v, now)?;
    Some(at.duration_since(now).unwrap_or_default())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An HTTP-date as a wall-clock time (`now` places the century of an RFC 850 two-digit year).
fn http_date(v: &str, now: SystemTime) -> Option<SystemTime> {
    let (day, month, year, time) = if let Some((_, rest)) = v.split_once(", ") {
        let parts: Vec<&str> = rest.split(' ').collect();
        match parts.as_slice() {
            // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
            [d, m, y, t, "GMT"] => (*d, *m, y.parse::<i64>().ok()?, *t),
            // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
            [dmy, t, "GMT"] => {
                let mut it = dmy.split('-');
                let (d, m, y) = (it.next()?, it.next()?, it.next()?);
                let y: i64 = y.parse().ok()?;
                // Two-digit years (RFC 9110 5.6.7): the latest year with those digits that is not
                // more than 50 years ahead of now (2094 read in 2026 is 1994; 00 read in 2099 is
                // 2100).
                let y = if y < 100 {
                    // The year now, to within a day (plenty for a 50-year rule).
                    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                    let this_year = 1970 + (secs / 31_556_952) as i64;
                    let mut candidate = this_year - this_year % 100 + y;
                    if candidate + 100 <= this_year + 50 {
                        candidate += 100;
                    } else if candidate > this_year + 50 {
                        candidate -= 100;
                    }
                    candidate
                } else {
                    y
                };
                (d, m, y, *t)
            }
            _ => return None,
        }
    } else {
        // asctime: Sun Nov  6 08:49:37 1994
        let parts: Vec<&str> = v.split_whitespace().collect();
        match parts.as_slice() {
            [_, m, d, t, y] => (*d, *m, y.parse::<i64>().ok()?, *t),
            _ => return None,
        }
    };
    let day: u32 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    let mut hms = time.split(':').map(|x| x.parse::<u64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    // Four-digit years only: a year such as 300000000000 would overflow the arithmetic below
    // (and `SystemTime`), and no server means it.
    if !(1..=31).contains(&day)
        || !(1900..=9999).contains(&year)
        || h > 23
        || mi > 59
        || s > 60
        || hms.next().is_some()
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    // Before 1970 is in the past: "now".
    let Ok(days) = u64::try_from(days) else {
        return Some(UNIX_EPOCH);
    };
    let secs = days
        .checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + s)?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn seconds() {
        assert_eq!(parse("120", at(0)), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 ", at(0)), Some(Duration::ZERO));
        assert_eq!(parse("-1", at(0)), None);
        assert_eq!(parse("1.5", at(0)), None);
        assert_eq!(parse("", at(0)), None);
    }

    /// An RFC 850 two-digit year is this century's unless that is more than 50 years ahead of now
    /// (RFC 9110 5.6.7): read in 2026, `60` is 2060 (a fixed pivot read it as 1960: no wait).
    #[test]
    fn two_digit_years_are_placed_around_now() {
        let jan_2026 = at(1_767_225_600); // 2026-01-01T00:00:00Z
        let d = parse("Saturday, 01-Jan-60 00:00:00 GMT", jan_2026).unwrap();
        assert!(d > Duration::from_secs(33 * 365 * 86_400), "{d:?}");
        // 2094 would be 68 years ahead: 1994, a past date.
        assert_eq!(
            parse("Sunday, 06-Nov-94 08:49:37 GMT", jan_2026),
            Some(Duration::ZERO)
        );
        // 2027: next year.
        let d = parse("Friday, 01-Jan-27 00:00:00 GMT", jan_2026).unwrap();
        assert_eq!(d, Duration::from_secs(365 * 86_400));
        // Near a century's end, the next century: read on 2099-12-31, `00` is 2100, tomorrow.
        assert_eq!(
            parse("Friday, 01-Jan-00 00:00:00 GMT", at(4_102_358_400)),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn dates_in_all_three_forms() {
        // 1994-11-06T08:49:37Z
        let t = 784_111_777;
        for v in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse(v, at(t - 30)), Some(Duration::from_secs(30)), "{v}");
            assert_eq!(
                parse(v, at(t + 5)),
                Some(Duration::ZERO),
                "{v}: past is now"
            );
        }
        assert_eq!(
            parse("Thu, 01 Jan 2026 00:00:00 GMT", at(1_767_225_600 - 2)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse("Tue, 29 Feb 2000 12:00:00 GMT", at(951_825_600)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_none() {
        for v in [
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "soon",
        ] {
            assert_eq!(parse(v, at(0)), None, "{v}");
        }
    }

    #[test]
    fn years_out_of_range_are_none_not_a_panic() {
        for v in [
            "Sun, 06 Nov 300000000000 08:49:37 GMT",
            "Sun, 06 Nov 9223372036854775807 08:49:37 GMT",
            "Sun, 06 Nov -9223372036854775808 08:49:37 GMT",
            "Sun, 06 Nov 10000 08:49:37 GMT",
            "Sun, 06 Nov 1899 08:49:37 GMT",
            "Sunday, 06-Nov-300000000000 08:49:37 GMT",
            "Sun Nov  6 08:49:37 300000000000",
        ] {
            assert_eq!(parse(v, at(0)), None, "{v}");
        }
        // The last year accepted, and a date before 1970 (in the past: now).
        assert!(parse("Fri, 31 Dec 9999 23:59:59 GMT", at(0)).is_some());
        assert_eq!(
            parse("Mon, 01 Jan 1900 00:00:00 GMT", at(1000)),
            Some(Duration::ZERO)
        );
    }
}
