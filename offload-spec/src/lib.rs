//! The grammar of offload's settings: what `#[offload(...)]` accepts at compile time and the
//! `OFFLOAD_*` environment variables accept at run time, parsed by the same code so the two
//! can never disagree. Depend on the `offload` crate instead; this is its internal part.
//!
//! Every parser returns a message that says what was expected, for a compile error or an
//! [`offload::Error::Config`](https://docs.rs/offload).

#![warn(missing_docs, unreachable_pub)]

mod schema;

pub use schema::{Conflict, Grammar, Options, SETTINGS, Scope, Setting, Value, defaults, setting};

use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

/// How many workers a pool runs, as written in `workers = "..."`; resolved against the
/// machine when the pool starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkersSpec {
    /// `"4"`: exactly this many.
    Fixed(NonZeroUsize),
    /// `"cpus"`: one per available core.
    Cpus,
    /// `"cpus-2"`: the available cores less this many, at least 1.
    CpusMinus(usize),
    /// `"cpus/2"`: the available cores divided by this, at least 1.
    CpusDiv(NonZeroUsize),
}

impl WorkersSpec {
    /// The worker count on a machine with `cpus` available cores; never below 1.
    pub fn resolve_with(self, cpus: NonZeroUsize) -> NonZeroUsize {
        let n = match self {
            WorkersSpec::Fixed(n) => return n,
            WorkersSpec::Cpus => cpus.get(),
            WorkersSpec::CpusMinus(k) => cpus.get().saturating_sub(k),
            WorkersSpec::CpusDiv(d) => cpus.get() / d.get(),
        };
        NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
    }
}

impl fmt::Display for WorkersSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkersSpec::Fixed(n) => write!(f, "\"{n}\""),
            WorkersSpec::Cpus => f.write_str("\"cpus\""),
            WorkersSpec::CpusMinus(k) => write!(f, "\"cpus-{k}\""),
            WorkersSpec::CpusDiv(d) => write!(f, "\"cpus/{d}\""),
        }
    }
}

/// Parses `"4"`, `"cpus"`, `"cpus-N"` or `"cpus/N"`, with optional spaces around `-` and `/`.
pub fn parse_workers(text: &str) -> Result<WorkersSpec, String> {
    let invalid = || {
        format!(
            "invalid workers spec `{text}`: expected a count such as \"4\", or \"cpus\", \
             \"cpus-N\" or \"cpus/N\""
        )
    };
    let trimmed = text.trim();
    let Some(rest) = trimmed.strip_prefix("cpus") else {
        let n = number(trimmed).ok_or_else(invalid)?;
        return NonZeroUsize::new(n)
            .map(WorkersSpec::Fixed)
            .ok_or_else(|| "workers must be at least 1".to_owned());
    };
    let rest = rest.trim_start();
    if rest.is_empty() {
        return Ok(WorkersSpec::Cpus);
    }
    if let Some(n) = rest.strip_prefix('-') {
        return number(n.trim_start()).map(WorkersSpec::CpusMinus).ok_or_else(invalid);
    }
    if let Some(n) = rest.strip_prefix('/') {
        let n = number(n.trim_start()).ok_or_else(invalid)?;
        return NonZeroUsize::new(n).map(WorkersSpec::CpusDiv).ok_or_else(|| {
            format!(
                "invalid workers spec `{text}`: cannot divide by zero; expected \"cpus/N\" with N at least 1"
            )
        });
    }
    Err(invalid())
}

/// Parses a [humantime](https://docs.rs/humantime) duration (`"30s"`, `"500ms"`, `"1m 30s"`)
/// to whole milliseconds, rounding sub-millisecond parts up so a limit is never shorter than
/// written. `what` names the setting in messages. Zero is refused.
pub fn parse_millis(text: &str, what: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|err| {
        format!("invalid duration `{text}`: {err}; expected a duration such as \"30s\" or \"500ms\"")
    })?;
    if duration.is_zero() {
        return Err(format!("{what} must be greater than zero"));
    }
    let millis = duration.as_millis() + u128::from(has_sub_millis(duration));
    u64::try_from(millis).map_err(|_| {
        format!(
            "{what} `{text}` is too large: it must fit in {} milliseconds (about 584 million years)",
            u64::MAX
        )
    })
}

fn has_sub_millis(duration: Duration) -> bool {
    !duration.subsec_nanos().is_multiple_of(1_000_000)
}

/// Parses a size in bytes: a whole number followed by a unit, `B`, `KiB`, `MiB`, `GiB`, `TiB`
/// (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000), with optional space between.
/// `what` names the setting in messages. Zero is refused.
pub fn parse_size(text: &str, what: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size `{text}`: expected a whole number and a unit, such as \"512MiB\", \"2GiB\" or \"100MB\""
        )
    };
    let trimmed = text.trim();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let scale: u64 = match unit.trim_start() {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(invalid()),
    };
    if number == 0 {
        return Err(format!("{what} must be greater than zero"));
    }
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{what} `{text}` is too large: it must fit in {} bytes", u64::MAX))
}

/// What a call does when the pool's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// `"wait"`: the caller waits for room in the queue (backpressure). The default.
    Wait,
    /// `"reject"`: the call fails at once with `Error::Overloaded` (load shedding).
    Reject,
}

impl fmt::Display for Overload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Overload::Wait => "\"wait\"",
            Overload::Reject => "\"reject\"",
        })
    }
}

/// Parses `"wait"` or `"reject"`.
pub fn parse_overload(text: &str) -> Result<Overload, String> {
    match text.trim() {
        "wait" => Ok(Overload::Wait),
        "reject" => Ok(Overload::Reject),
        _ => Err(format!("invalid overload policy `{text}`: expected \"wait\" or \"reject\"")),
    }
}

/// Parses a whole number that must be at least `min`, such as `queue` (0 allowed: no call
/// waits) or `max_tasks` (at least 1).
pub fn parse_count(text: &str, what: &str, min: u64) -> Result<u64, String> {
    let digits = text.trim();
    match digits.parse::<u64>() {
        Ok(n) if n < min => Err(format!("{what} must be at least {min}")),
        Ok(n) => Ok(n),
        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Err(format!("{what} `{text}` is too large: it must be at most {}", u64::MAX))
        }
        Err(_) => Err(format!("invalid {what} `{text}`: expected a whole number such as \"64\"")),
    }
}

/// A plain decimal count: digits only, no sign, fits `usize`.
fn number(text: &str) -> Option<usize> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn workers_grammar() {
        assert_eq!(parse_workers("4"), Ok(WorkersSpec::Fixed(nz(4))));
        assert_eq!(parse_workers(" 16 "), Ok(WorkersSpec::Fixed(nz(16))));
        assert_eq!(parse_workers("cpus"), Ok(WorkersSpec::Cpus));
        assert_eq!(parse_workers("cpus-2"), Ok(WorkersSpec::CpusMinus(2)));
        assert_eq!(parse_workers("cpus - 2"), Ok(WorkersSpec::CpusMinus(2)));
        assert_eq!(parse_workers("cpus/2"), Ok(WorkersSpec::CpusDiv(nz(2))));
        assert_eq!(parse_workers("0"), Err("workers must be at least 1".to_owned()));
        assert!(parse_workers("cpus/0").unwrap_err().contains("cannot divide by zero"));
        for bad in ["", "-1", "+4", "4.5", "four", "cpu", "cpus-", "cpus/", "cpus+1", "cpus2", "CPUS"] {
            assert!(parse_workers(bad).unwrap_err().starts_with("invalid workers spec"), "{bad}");
        }
    }

    #[test]
    fn workers_never_below_one() {
        assert_eq!(WorkersSpec::CpusMinus(2).resolve_with(nz(2)), nz(1));
        assert_eq!(WorkersSpec::CpusMinus(2).resolve_with(nz(1)), nz(1));
        assert_eq!(WorkersSpec::CpusMinus(2).resolve_with(nz(16)), nz(14));
        assert_eq!(WorkersSpec::CpusDiv(nz(4)).resolve_with(nz(2)), nz(1));
        assert_eq!(WorkersSpec::CpusDiv(nz(2)).resolve_with(nz(16)), nz(8));
        assert_eq!(WorkersSpec::Cpus.resolve_with(nz(3)), nz(3));
        assert_eq!(WorkersSpec::Fixed(nz(5)).resolve_with(nz(1)), nz(5));
        assert_eq!(WorkersSpec::CpusDiv(nz(2)).to_string(), "\"cpus/2\"");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_millis("30s", "timeout"), Ok(30_000));
        assert_eq!(parse_millis("1m 30s", "timeout"), Ok(90_000));
        assert_eq!(parse_millis("1500us", "timeout"), Ok(2));
        assert_eq!(parse_millis("0s", "timeout"), Err("timeout must be greater than zero".to_owned()));
        assert!(parse_millis("30", "timeout").unwrap_err().starts_with("invalid duration `30`"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB", "memory"), Ok(512 << 20));
        assert_eq!(parse_size("1 GiB", "memory"), Ok(1 << 30));
        assert_eq!(parse_size("100MB", "memory"), Ok(100_000_000));
        assert_eq!(parse_size("64KiB", "memory"), Ok(65_536));
        assert_eq!(parse_size("4096B", "memory"), Ok(4096));
        assert_eq!(parse_size("0MiB", "memory"), Err("memory must be greater than zero".to_owned()));
        assert!(parse_size("99999999999TiB", "memory").unwrap_err().contains("too large"));
        for bad in ["", "512", "MiB", "1.5GiB", "-1MiB", "512mib", "512 M"] {
            assert!(parse_size(bad, "memory").unwrap_err().starts_with("invalid size"), "{bad}");
        }
    }

    #[test]
    fn overload_and_counts() {
        assert_eq!(parse_overload("reject"), Ok(Overload::Reject));
        assert_eq!(parse_overload("wait"), Ok(Overload::Wait));
        assert!(parse_overload("drop").is_err());
        assert_eq!(parse_count("64", "queue", 0), Ok(64));
        assert_eq!(parse_count("0", "queue", 0), Ok(0));
        assert_eq!(parse_count("0", "max_tasks", 1), Err("max_tasks must be at least 1".to_owned()));
        assert!(parse_count("-1", "queue", 0).unwrap_err().starts_with("invalid queue `-1`"));
        assert!(parse_count("99999999999999999999", "queue", 0).unwrap_err().contains("too large"));
    }
}
