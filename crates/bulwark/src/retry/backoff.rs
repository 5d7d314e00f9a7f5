//! Delays between attempts: [`Backoff`].

use std::fmt;
use std::time::Duration;

use crate::ConfigError;

/// Default cap on any single delay. A retry that waits longer than this is rarely
/// still useful to the caller waiting on the request; raise it with
/// [`Backoff::max`] for background work.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);

/// Default growth factor of [`Backoff::exponential`]: doubling, the usual choice.
pub const DEFAULT_FACTOR: f64 = 2.0;

/// How a computed delay is randomised (AWS Architecture Blog definitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Jitter {
    /// The delay as computed. Exact, but callers that failed together retry together.
    #[default]
    None,
    /// Uniformly random in `[0, d]`: the best spread, the lowest total load.
    Full,
    /// `d/2 + random in [0, d/2]`: keeps at least half the delay.
    Equal,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Fixed(Duration),
    Linear { base: Duration, step: Duration },
    Exponential { base: Duration, factor: f64 },
    Fibonacci(Duration),
    Decorrelated(Duration),
}

/// A schedule of delays between attempts.
///
/// A [`Backoff`] is a plain value: it describes a schedule, and [`Backoff::iter`]
/// produces the delays, one per retry (the first value is the delay before the
/// second attempt). It is usable on its own:
///
/// ```
/// use std::time::Duration;
/// use bulwark::retry::Backoff;
///
/// let ms = Duration::from_millis;
/// let delays: Vec<_> = Backoff::exponential(ms(100)).max(ms(500)).iter().take(5).collect();
/// assert_eq!(delays, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
/// ```
///
/// Every kind is capped by [`Backoff::max`] *before* jitter is applied, as in the AWS
/// Architecture Blog's "Exponential Backoff And Jitter":
///
/// * [`Jitter::None`]: the delay `d` as computed;
/// * [`Jitter::Full`]: uniformly random in `[0, d]`;
/// * [`Jitter::Equal`]: `d/2` plus uniformly random in `[0, d/2]`, so in `[d/2, d]`.
///
/// [`Backoff::decorrelated_jitter`] is the blog's third scheme and carries its own
/// randomness: `sleep = min(max, random_between(base, previous_sleep * 3))`.
///
/// Randomness comes from a [`fastrand::Rng`]. Without [`Backoff::seed`] every
/// iterator gets a fresh random seed; with a seed every iterator yields the same
/// sequence, which is what tests want (and what production must not use, since all
/// callers would then jitter in lock-step).
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    kind: Kind,
    max: Duration,
    jitter: Jitter,
    seed: Option<u64>,
    // Set when `.factor()` was called on a kind other than exponential, so that
    // `validate` can say so instead of silently ignoring it.
    stray_factor: bool,
}

impl Backoff {
    fn of(kind: Kind) -> Self {
        Backoff {
            kind,
            max: DEFAULT_MAX_DELAY,
            jitter: Jitter::None,
            seed: None,
            stray_factor: false,
        }
    }

    /// The same delay every time: `d, d, d, ...`.
    pub fn fixed(delay: Duration) -> Self {
        Self::of(Kind::Fixed(delay))
    }

    /// No delay at all: retry immediately.
    pub fn none() -> Self {
        Self::fixed(Duration::ZERO)
    }

    /// A delay growing by `step` each time: `base, base+step, base+2*step, ...`.
    pub fn linear(base: Duration, step: Duration) -> Self {
        Self::of(Kind::Linear { base, step })
    }

    /// A delay multiplied by [`factor`](Self::factor) (default
    /// [`DEFAULT_FACTOR`]) each time: `base, 2*base, 4*base, ...`.
    pub fn exponential(base: Duration) -> Self {
        Self::of(Kind::Exponential {
            base,
            factor: DEFAULT_FACTOR,
        })
    }

    /// Fibonacci multiples of `base`: `base, base, 2*base, 3*base, 5*base, ...`;
    /// grows slower than doubling.
    pub fn fibonacci(base: Duration) -> Self {
        Self::of(Kind::Fibonacci(base))
    }

    /// AWS "decorrelated jitter": each delay is
    /// `min(max, random_between(base, previous * 3))`, starting from `previous = base`.
    /// Its randomness is built in, so [`jitter`](Self::jitter) must stay
    /// [`Jitter::None`].
    pub fn decorrelated_jitter(base: Duration, max: Duration) -> Self {
        Self::of(Kind::Decorrelated(base)).max(max)
    }

    /// Growth factor for [`exponential`](Self::exponential) (must be finite and
    /// `>= 1`). Calling it on another kind is reported by [`validate`](Self::validate).
    pub fn factor(mut self, factor: f64) -> Self {
        match &mut self.kind {
            Kind::Exponential { factor: f, .. } => *f = factor,
            _ => self.stray_factor = true,
        }
        self
    }

    /// Caps every delay (before jitter). Default [`DEFAULT_MAX_DELAY`].
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Randomises every delay. Default [`Jitter::None`].
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Seeds the random generator, so every [`iter`](Self::iter) yields the same
    /// sequence. For tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The cap on a single delay.
    pub fn max_delay(&self) -> Duration {
        self.max
    }

    /// The jitter mode.
    pub fn jitter_mode(&self) -> Jitter {
        self.jitter
    }

    /// Checks the settings; [`Retry`](crate::retry::Retry)'s builder calls this.
    ///
    /// Rejected: a base (or fixed delay) above `max`, an exponential factor that is
    /// not finite or below 1, `.factor()` on a non-exponential kind, and jitter on
    /// decorrelated jitter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.stray_factor {
            return Err(ConfigError::new(
                "backoff",
                "factor() only applies to exponential backoff",
            ));
        }
        let base = match self.kind {
            Kind::Fixed(d) => d,
            Kind::Linear { base, .. } => base,
            Kind::Exponential { base, factor } => {
                if base.is_zero() {
                    return Err(ConfigError::new(
                        "backoff",
                        "exponential backoff needs a base above zero (it would stay at zero; \
                         a fixed backoff of zero retries at once)",
                    ));
                }
                if !factor.is_finite() || factor < 1.0 {
                    return Err(ConfigError::new(
                        "backoff",
                        format!("exponential factor must be finite and >= 1, got {factor}"),
                    ));
                }
                base
            }
            Kind::Fibonacci(d) => {
                if d.is_zero() {
                    return Err(ConfigError::new(
                        "backoff",
                        "fibonacci backoff needs a base above zero (it would stay at zero; \
                         a fixed backoff of zero retries at once)",
                    ));
                }
                d
            }
            Kind::Decorrelated(d) => {
                if d.is_zero() {
                    return Err(ConfigError::new(
                        "backoff",
                        "decorrelated jitter needs a base above zero (it would stay at zero)",
                    ));
                }
                if self.jitter != Jitter::None {
                    return Err(ConfigError::new(
                        "backoff",
                        "decorrelated jitter is already random; leave jitter at None",
                    ));
                }
                d
            }
        };
        if base > self.max {
            return Err(ConfigError::new(
                "backoff",
                format!("base delay {base:?} is above the max delay {:?}", self.max),
            ));
        }
        Ok(())
    }

    /// The delays, one per retry, without end.
    pub fn iter(&self) -> BackoffIter {
        let rng = match self.seed {
            Some(s) => fastrand::Rng::with_seed(s),
            None => fastrand::Rng::new(),
        };
        let prev = match self.kind {
            Kind::Decorrelated(base) => base,
            _ => Duration::ZERO,
        };
        BackoffIter {
            kind: self.kind,
            max: self.max,
            jitter: self.jitter,
            rng,
            n: 0,
            fib: (1, 1),
            prev,
        }
    }
}

impl IntoIterator for &Backoff {
    type Item = Duration;
    type IntoIter = BackoffIter;
    fn into_iter(self) -> BackoffIter {
        self.iter()
    }
}

impl IntoIterator for Backoff {
    type Item = Duration;
    type IntoIter = BackoffIter;
    fn into_iter(self) -> BackoffIter {
        self.iter()
    }
}

/// The delays of a [`Backoff`]: an endless iterator (it never returns `None`).
#[derive(Clone)]
pub struct BackoffIter {
    kind: Kind,
    max: Duration,
    jitter: Jitter,
    rng: fastrand::Rng,
    n: u32,
    fib: (u64, u64),
    prev: Duration,
}

impl fmt::Debug for BackoffIter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackoffIter")
            .field("kind", &self.kind)
            .field("max", &self.max)
            .field("jitter", &self.jitter)
            .field("n", &self.n)
            .finish()
    }
}

fn nanos(d: Duration) -> u128 {
    d.as_nanos()
}

/// `min(n, cap)` as a Duration; `cap` came from a Duration so the result fits.
fn capped(n: u128, cap: Duration) -> Duration {
    if n >= cap.as_nanos() {
        cap
    } else {
        // n < cap.as_nanos() <= Duration::MAX in nanos, so the split is exact.
        Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
    }
}

/// Uniform in `[lo, hi]` (nanosecond resolution).
fn between(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = u64::try_from((hi - lo).as_nanos()).unwrap_or(u64::MAX);
    lo + Duration::from_nanos(rng.u64(0..=span))
}

impl Iterator for BackoffIter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let n = self.n;
        self.n = self.n.saturating_add(1);
        let d = match self.kind {
            Kind::Fixed(d) => d.min(self.max),
            Kind::Linear { base, step } => capped(
                nanos(base) + nanos(step).saturating_mul(n as u128),
                self.max,
            ),
            Kind::Exponential { base, factor } => {
                let v = nanos(base) as f64 * factor.powi(n.min(i32::MAX as u32) as i32);
                if !v.is_finite() || v >= nanos(self.max) as f64 {
                    self.max
                } else {
                    capped(v.max(0.0) as u128, self.max)
                }
            }
            Kind::Fibonacci(base) => {
                let mult = self.fib.0;
                self.fib = (self.fib.1, self.fib.0.saturating_add(self.fib.1));
                capped(nanos(base).saturating_mul(mult as u128), self.max)
            }
            Kind::Decorrelated(base) => {
                let hi = self.prev.saturating_mul(3);
                let d = between(&mut self.rng, base, hi).min(self.max);
                self.prev = d;
                return Some(d);
            }
        };
        Some(match self.jitter {
            Jitter::None => d,
            Jitter::Full => between(&mut self.rng, Duration::ZERO, d),
            Jitter::Equal => {
                let half = d / 2;
                // `d - half` rather than `half` so an odd nanosecond is not lost.
                half + between(&mut self.rng, Duration::ZERO, d - half)
            }
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn take(b: &Backoff, n: usize) -> Vec<Duration> {
        b.iter().take(n).collect()
    }

    #[test]
    fn exact_sequences_without_jitter() {
        assert_eq!(take(&Backoff::fixed(ms(50)), 3), [ms(50); 3]);
        assert_eq!(take(&Backoff::none(), 2), [Duration::ZERO; 2]);
        assert_eq!(
            take(&Backoff::linear(ms(100), ms(50)).max(ms(260)), 5),
            [ms(100), ms(150), ms(200), ms(250), ms(260)]
        );
        assert_eq!(
            take(&Backoff::exponential(ms(10)).max(ms(100)), 6),
            [ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]
        );
        assert_eq!(
            take(&Backoff::exponential(ms(10)).factor(3.0).max(ms(1000)), 6),
            [ms(10), ms(30), ms(90), ms(270), ms(810), ms(1000)]
        );
        assert_eq!(
            take(&Backoff::fibonacci(ms(10)).max(ms(100)), 8),
            [
                ms(10),
                ms(10),
                ms(20),
                ms(30),
                ms(50),
                ms(80),
                ms(100),
                ms(100)
            ]
        );
    }

    #[test]
    fn huge_exponents_saturate_at_the_cap() {
        let b = Backoff::exponential(ms(1)).max(Duration::from_secs(3600));
        let v: Vec<_> = b.iter().skip(1000).take(2).collect();
        assert_eq!(v, [Duration::from_secs(3600); 2]);
        let f = Backoff::fibonacci(ms(1)).max(Duration::from_secs(3600));
        assert_eq!(f.iter().nth(500), Some(Duration::from_secs(3600)));
        let l = Backoff::linear(Duration::MAX, Duration::MAX).max(Duration::MAX);
        assert_eq!(l.iter().nth(3), Some(Duration::MAX));
    }

    #[test]
    fn full_jitter_stays_in_zero_to_d_and_is_seeded() {
        let b = Backoff::exponential(ms(100))
            .max(ms(800))
            .jitter(Jitter::Full)
            .seed(7);
        let plain = take(&Backoff::exponential(ms(100)).max(ms(800)), 200);
        let a = take(&b, 200);
        for (j, d) in a.iter().zip(&plain) {
            assert!(*j <= *d, "{j:?} > {d:?}");
        }
        assert_eq!(a, take(&b, 200), "same seed, same sequence");
        assert_ne!(a, take(&b.clone().seed(8), 200), "another seed differs");
        // Not degenerate: some values well below d.
        assert!(a.iter().zip(&plain).any(|(j, d)| *j < *d / 2));
    }

    #[test]
    fn equal_jitter_stays_in_half_d_to_d() {
        let b = Backoff::fibonacci(ms(10))
            .max(ms(1000))
            .jitter(Jitter::Equal)
            .seed(42);
        let plain = take(&Backoff::fibonacci(ms(10)).max(ms(1000)), 200);
        let a = take(&b, 200);
        for (j, d) in a.iter().zip(&plain) {
            assert!(
                *j >= *d / 2 && *j <= *d,
                "{j:?} not in [{:?}, {d:?}]",
                *d / 2
            );
        }
        assert_eq!(a, take(&b, 200));
    }

    #[test]
    fn decorrelated_jitter_bounds() {
        let base = ms(10);
        let max = ms(1000);
        let b = Backoff::decorrelated_jitter(base, max).seed(3);
        let a = take(&b, 500);
        let mut prev = base;
        for d in &a {
            assert!(*d >= base && *d <= max, "{d:?}");
            assert!(*d <= prev * 3, "{d:?} > 3 * {prev:?}");
            prev = *d;
        }
        assert!(a.contains(&max), "reaches the cap eventually");
        assert_eq!(a, take(&b, 500));
    }

    #[test]
    fn validation() {
        assert!(Backoff::exponential(ms(10)).validate().is_ok());
        assert!(Backoff::fixed(ms(10)).max(ms(5)).validate().is_err());
        assert!(Backoff::exponential(ms(10)).factor(0.5).validate().is_err());
        assert!(Backoff::exponential(ms(10))
            .factor(f64::NAN)
            .validate()
            .is_err());
        assert!(Backoff::linear(ms(10), ms(1))
            .factor(2.0)
            .validate()
            .is_err());
        assert!(Backoff::decorrelated_jitter(ms(10), ms(100))
            .jitter(Jitter::Full)
            .validate()
            .is_err());
        assert!(Backoff::decorrelated_jitter(ms(100), ms(10))
            .validate()
            .is_err());
    }
}
