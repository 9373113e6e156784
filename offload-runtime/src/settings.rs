//! What bounds a pool: worker count, deadline, memory, queue, recycling. The attribute gives
//! them per function, a shared pool merges them, and `OFFLOAD_*` environment variables
//! override them when the pool starts.

use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

pub(crate) use offload_spec::Overload;
use offload_spec::defaults;

/// What `breaker(failures = N, reset = "...")` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerConfig {
    pub(crate) failures: u32,
    pub(crate) reset: Duration,
}

/// What one `#[offload]` attribute gives; see [`offload_spec::SETTINGS`].
pub(crate) use offload_spec::Options as PoolOptions;

/// A size for messages: exact bytes, with the binary unit when it divides evenly.
fn bytes(n: u64) -> String {
    offload_spec::Value::Bytes(n).to_string()
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
    /// How long a worker whose call was cancelled (its deadline passed, or its future was
    /// dropped) has to return before it is killed; `None`: killed at once.
    pub(crate) grace: Option<Duration>,
    /// How long a worker that has answered polls for its next call before it sleeps, in µs.
    pub(crate) spin_us: u64,
}

/// Where a pool's calls run: which executor serves it (see `crate::executor`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Placement {
    /// Worker processes this process starts.
    #[default]
    Local,
    /// Worker hosts behind the NATS broker at this URL (`OFFLOAD_REMOTE`,
    /// `OFFLOAD_POOL_<NAME>_REMOTE`).
    Remote(String),
}

/// The variable that sends a pool's calls to remote hosts: the one set for `pool`, or the
/// pool's own when neither is.
#[cfg(not(feature = "nats"))]
pub(crate) fn remote_variable(pool: &str) -> String {
    lookup(pool, "REMOTE", |name| std::env::var(name).ok())
        .map_or_else(|| format!("OFFLOAD_POOL_{}_REMOTE", variable_name(pool)), |(variable, _)| variable)
}

/// `pool` as it appears in a variable's name.
fn variable_name(pool: &str) -> String {
    pool.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// The default `spin_us` of a host that serves other hosts' calls (`OFFLOAD_SERVE`): its
/// next call comes a broker round trip after its answer, a few hundred microseconds, and a
/// worker asleep by then costs more than the round trip's own work.
const HOST_SPIN_US: u64 = 1_000;

/// The default `max_payload`: 1 GiB.
pub(crate) const DEFAULT_MAX_PAYLOAD: u64 = offload_spec::defaults::MAX_PAYLOAD;

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
        let mut settings = resolve_with(options, env, available_cpus())?;
        // A host serving calls runs them here, whatever says where this binary's calls go.
        if !crate::role::is_serving()
            && let Some((variable, url)) = env("REMOTE")
        {
            let url = url.trim();
            if url.is_empty() {
                return Err(format!("environment variable {variable} is empty: give the broker's URL"));
            }
            settings.placement = Placement::Remote(url.to_owned());
        }
        Ok(settings)
    }
}

fn available_cpus() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// The environment variable names for `key` of `pool`, most specific first, and the value of
/// the first that is set.
fn lookup(pool: &str, key: &str, get: impl Fn(&str) -> Option<String>) -> Option<(String, String)> {
    let name = variable_name(pool);
    [format!("OFFLOAD_POOL_{name}_{key}"), format!("OFFLOAD_{key}")]
        .into_iter()
        .find_map(|var| get(&var).map(|value| (var, value)))
}

fn resolve_with(
    options: PoolOptions,
    env: impl Fn(&str) -> Option<(String, String)>,
    cpus: NonZeroUsize,
) -> Result<PoolSettings, String> {
    let overrides = PoolOptions::from_env(env)?;
    // The pool's options carry no function setting; a `timeout` here is an override, which
    // replaces the deadline of every function in the pool.
    let given = overrides.or(options);
    Ok(PoolSettings {
        workers: given.workers.unwrap_or(defaults::WORKERS).resolve_with(cpus),
        timeout: overrides.timeout.map(Duration::from_millis),
        memory: given.memory,
        queue: given.queue,
        overload: given.overload.unwrap_or(defaults::OVERLOAD),
        max_tasks: given.max_tasks,
        max_rss: given.max_rss,
        max_payload: given.max_payload.unwrap_or(defaults::MAX_PAYLOAD).min(MAX_MAX_PAYLOAD),
        placement: Placement::Local,
        grace: given.grace.map(Duration::from_millis),
        spin_us: given.spin_us.unwrap_or(if crate::role::is_serving() {
            HOST_SPIN_US
        } else {
            defaults::SPIN_US
        }),
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

    use offload_spec::{Conflict, WorkersSpec};

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
        let s = resolve_in(&[], "p", PoolOptions::EMPTY).unwrap();
        assert_eq!(s.workers, nz(6), "cpus-2 of 8");
        assert_eq!((s.timeout, s.memory, s.queue, s.overload), (None, None, None, Overload::Wait));
        assert_eq!(s.to_string(), "6 workers, unbounded queue");
    }

    #[test]
    fn pool_variable_beats_global_beats_attribute() {
        let options = PoolOptions { workers: Some(WorkersSpec::Cpus), queue: Some(4), ..PoolOptions::EMPTY };
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
        let s = resolve_in(&vars, "p", PoolOptions::EMPTY).unwrap();
        assert_eq!(s.timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.memory, Some(64 << 20));
        assert_eq!(s.overload, Overload::Reject);
        assert_eq!(s.max_tasks, Some(10));
        assert_eq!(s.max_rss, Some(1 << 30));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = resolve_in(&[("OFFLOAD_POOL_P_MEMORY", "lots")], "p", PoolOptions::EMPTY).unwrap_err();
        assert!(err.starts_with("environment variable OFFLOAD_POOL_P_MEMORY: invalid size `lots`"), "{err}");
        let err = resolve_in(&[("OFFLOAD_WORKERS", "0")], "p", PoolOptions::EMPTY).unwrap_err();
        assert_eq!(err, "environment variable OFFLOAD_WORKERS: workers must be at least 1");
    }

    #[test]
    fn merge_fills_gaps_and_reports_conflicts() {
        let mut a = PoolOptions { memory: Some(1 << 20), ..PoolOptions::EMPTY };
        a.merge(&PoolOptions { queue: Some(3), memory: Some(1 << 20), ..PoolOptions::EMPTY }).unwrap();
        assert_eq!((a.memory, a.queue), (Some(1 << 20), Some(3)));
        let conflict = a.merge(&PoolOptions { memory: Some(2 << 20), ..PoolOptions::EMPTY }).unwrap_err();
        assert_eq!(
            conflict,
            Conflict {
                setting: "memory",
                ours: offload_spec::Value::Bytes(1 << 20),
                theirs: offload_spec::Value::Bytes(2 << 20)
            }
        );
    }
}
