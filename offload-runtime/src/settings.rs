//! What bounds a pool: worker count, deadline, memory, queue, recycling. The attribute gives
//! them per function, a shared pool merges them, and `OFFLOAD_*` environment variables
//! override them when the pool starts.

use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

pub(crate) use offload_spec::{Overload, WorkersSpec};

/// What `breaker(failures = N, reset = "...")` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerConfig {
    pub(crate) failures: u32,
    pub(crate) reset: Duration,
}

/// The pool settings one `#[offload]` attribute gives; `None` where it gives none.
/// Not public API: the macro fills it in through the `Entry` builder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PoolOptions {
    pub(crate) workers: Option<WorkersSpec>,
    pub(crate) memory: Option<u64>,
    pub(crate) queue: Option<u64>,
    pub(crate) overload: Option<Overload>,
    pub(crate) max_tasks: Option<u64>,
    pub(crate) max_rss: Option<u64>,
    pub(crate) max_payload: Option<u64>,
}

/// Two functions in one pool gave one setting different values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub(crate) setting: &'static str,
    pub(crate) ours: String,
    pub(crate) theirs: String,
}

impl PoolOptions {
    /// Takes the settings `other` gives that `self` does not; fails on the first setting
    /// both give with different values.
    pub(crate) fn merge(&mut self, other: &PoolOptions) -> Result<(), Conflict> {
        fn one<T: PartialEq + Copy>(
            setting: &'static str,
            ours: &mut Option<T>,
            theirs: Option<T>,
            show: impl Fn(T) -> String,
        ) -> Result<(), Conflict> {
            match (*ours, theirs) {
                (Some(a), Some(b)) if a != b => Err(Conflict { setting, ours: show(a), theirs: show(b) }),
                (None, Some(b)) => {
                    *ours = Some(b);
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        one("workers", &mut self.workers, other.workers, |w| w.to_string())?;
        one("memory", &mut self.memory, other.memory, bytes)?;
        one("queue", &mut self.queue, other.queue, |n| n.to_string())?;
        one("overload", &mut self.overload, other.overload, |o| o.to_string())?;
        one("max_tasks", &mut self.max_tasks, other.max_tasks, |n| n.to_string())?;
        one("max_rss", &mut self.max_rss, other.max_rss, bytes)?;
        one("max_payload", &mut self.max_payload, other.max_payload, bytes)
    }
}

/// A size for messages: exact bytes, with the binary unit when it divides evenly.
fn bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("\"{}{unit}\"", n / size);
        }
    }
    format!("\"{n}B\"")
}

/// A pool's settings once defaults and environment overrides are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolSettings {
    pub(crate) workers: NonZeroUsize,
    /// From `OFFLOAD_*TIMEOUT`: replaces the deadline of every function in the pool.
    pub(crate) timeout: Option<Duration>,
    /// Address-space limit of each worker, in bytes.
    pub(crate) memory: Option<u64>,
    /// Calls that may wait for a worker beyond those running; `None` is unbounded.
    pub(crate) queue: Option<u64>,
    pub(crate) overload: Overload,
    /// Replace a worker after this many calls.
    pub(crate) max_tasks: Option<u64>,
    /// Replace a worker after a call that left its resident memory above this.
    pub(crate) max_rss: Option<u64>,
    /// Largest encoded arguments or return value, in bytes.
    pub(crate) max_payload: u64,
    /// Where the pool's calls run.
    pub(crate) placement: Placement,
}

/// Where a pool's calls run: which executor serves it (see `crate::executor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Placement {
    /// Worker processes this process starts.
    #[default]
    Local,
}

/// The default `max_payload`: 1 GiB.
pub(crate) const DEFAULT_MAX_PAYLOAD: u64 = 1 << 30;

/// The largest `max_payload`: what a frame's 32-bit length can carry, less room for the
/// frame's own bytes.
pub(crate) const MAX_MAX_PAYLOAD: u64 = (crate::protocol::MAX_FRAME - crate::protocol::FRAME_SLACK) as u64;

impl PoolSettings {
    /// Applies defaults and the environment of this process to `options`.
    ///
    /// `OFFLOAD_POOL_<NAME>_<SETTING>` beats `OFFLOAD_<SETTING>`, which beats the attribute.
    /// `<NAME>` is the pool's name, or for a function with a pool of its own its path
    /// (`app::digest` for `fn digest` in module `app`), upper-cased with every character
    /// that is not a letter or digit replaced by `_`.
    pub(crate) fn resolve(pool: &str, options: PoolOptions) -> Result<PoolSettings, String> {
        let env = |key: &str| lookup(pool, key, |name| std::env::var(name).ok());
        resolve_with(options, env, available_cpus())
    }
}

fn available_cpus() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// The environment variable names for `key` of `pool`, most specific first, and the value of
/// the first that is set.
fn lookup(pool: &str, key: &str, get: impl Fn(&str) -> Option<String>) -> Option<(String, String)> {
    let name: String =
        pool.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    [format!("OFFLOAD_POOL_{name}_{key}"), format!("OFFLOAD_{key}")]
        .into_iter()
        .find_map(|var| get(&var).map(|value| (var, value)))
}

fn resolve_with(
    options: PoolOptions,
    env: impl Fn(&str) -> Option<(String, String)>,
    cpus: NonZeroUsize,
) -> Result<PoolSettings, String> {
    // Parses the override of `key` if one is set, naming the variable in any error.
    fn over<T>(
        env: &impl Fn(&str) -> Option<(String, String)>,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match env(key) {
            None => Ok(None),
            Some((var, value)) => {
                parse(&value).map(Some).map_err(|e| format!("environment variable {var}: {e}"))
            }
        }
    }
    let workers = over(&env, "WORKERS", offload_spec::parse_workers)?
        .or(options.workers)
        .unwrap_or(WorkersSpec::DEFAULT);
    Ok(PoolSettings {
        workers: workers.resolve_with(cpus),
        timeout: over(&env, "TIMEOUT", |v| offload_spec::parse_millis(v, "timeout"))?
            .map(Duration::from_millis),
        memory: over(&env, "MEMORY", |v| offload_spec::parse_size(v, "memory"))?.or(options.memory),
        queue: over(&env, "QUEUE", |v| offload_spec::parse_count(v, "queue", 0))?.or(options.queue),
        overload: over(&env, "OVERLOAD", offload_spec::parse_overload)?
            .or(options.overload)
            .unwrap_or_default(),
        max_tasks: over(&env, "MAX_TASKS", |v| offload_spec::parse_count(v, "max_tasks", 1))?
            .or(options.max_tasks),
        max_rss: over(&env, "MAX_RSS", |v| offload_spec::parse_size(v, "max_rss"))?.or(options.max_rss),
        max_payload: over(&env, "MAX_PAYLOAD", |v| offload_spec::parse_size(v, "max_payload"))?
            .or(options.max_payload)
            .unwrap_or(DEFAULT_MAX_PAYLOAD)
            .min(MAX_MAX_PAYLOAD),
        placement: Placement::Local,
    })
}

impl fmt::Display for PoolSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} workers", self.workers)?;
        if let Some(memory) = self.memory {
            write!(f, ", memory {}", bytes(memory))?;
        }
        match self.queue {
            Some(queue) => write!(f, ", queue {queue} ({})", self.overload)?,
            None => f.write_str(", unbounded queue")?,
        }
        if let Some(n) = self.max_tasks {
            write!(f, ", max_tasks {n}")?;
        }
        if let Some(rss) = self.max_rss {
            write!(f, ", max_rss {}", bytes(rss))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    fn resolve_in(vars: &[(&str, &str)], pool: &str, options: PoolOptions) -> Result<PoolSettings, String> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        resolve_with(options, |key| lookup(pool, key, |name| vars.get(name).cloned()), nz(8))
    }

    #[test]
    fn defaults() {
        let s = resolve_in(&[], "p", PoolOptions::default()).unwrap();
        assert_eq!(s.workers, nz(6), "cpus-2 of 8");
        assert_eq!((s.timeout, s.memory, s.queue, s.overload), (None, None, None, Overload::Wait));
        assert_eq!(s.to_string(), "6 workers, unbounded queue");
    }

    #[test]
    fn pool_variable_beats_global_beats_attribute() {
        let options = PoolOptions { workers: Some(WorkersSpec::Cpus), queue: Some(4), ..Default::default() };
        let vars =
            [("OFFLOAD_WORKERS", "2"), ("OFFLOAD_POOL_APP__DIGEST_WORKERS", "3"), ("OFFLOAD_QUEUE", "9")];
        let s = resolve_in(&vars, "app::digest", options).unwrap();
        assert_eq!((s.workers, s.queue), (nz(3), Some(9)));
        let s = resolve_in(&vars, "other", options).unwrap();
        assert_eq!(s.workers, nz(2));
        let s = resolve_in(&[], "other", options).unwrap();
        assert_eq!((s.workers, s.queue), (nz(8), Some(4)));
    }

    #[test]
    fn every_setting_has_a_variable() {
        let vars = [
            ("OFFLOAD_POOL_P_TIMEOUT", "2s"),
            ("OFFLOAD_POOL_P_MEMORY", "64MiB"),
            ("OFFLOAD_POOL_P_OVERLOAD", "reject"),
            ("OFFLOAD_POOL_P_MAX_TASKS", "10"),
            ("OFFLOAD_POOL_P_MAX_RSS", "1GiB"),
        ];
        let s = resolve_in(&vars, "p", PoolOptions::default()).unwrap();
        assert_eq!(s.timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.memory, Some(64 << 20));
        assert_eq!(s.overload, Overload::Reject);
        assert_eq!(s.max_tasks, Some(10));
        assert_eq!(s.max_rss, Some(1 << 30));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = resolve_in(&[("OFFLOAD_POOL_P_MEMORY", "lots")], "p", PoolOptions::default()).unwrap_err();
        assert!(err.starts_with("environment variable OFFLOAD_POOL_P_MEMORY: invalid size `lots`"), "{err}");
        let err = resolve_in(&[("OFFLOAD_WORKERS", "0")], "p", PoolOptions::default()).unwrap_err();
        assert_eq!(err, "environment variable OFFLOAD_WORKERS: workers must be at least 1");
    }

    #[test]
    fn merge_fills_gaps_and_reports_conflicts() {
        let mut a = PoolOptions { memory: Some(1 << 20), ..Default::default() };
        a.merge(&PoolOptions { queue: Some(3), memory: Some(1 << 20), ..Default::default() }).unwrap();
        assert_eq!((a.memory, a.queue), (Some(1 << 20), Some(3)));
        let conflict = a.merge(&PoolOptions { memory: Some(2 << 20), ..Default::default() }).unwrap_err();
        assert_eq!(
            conflict,
            Conflict { setting: "memory", ours: "\"1MiB\"".into(), theirs: "\"2MiB\"".into() }
        );
    }
}
