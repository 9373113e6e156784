//! Every setting of `#[offload(...)]`, declared once: its name, how its value is written, its
//! default, whether it belongs to the pool or the function, the environment variable that
//! overrides it, and what it means. The macro takes its keys, their grammar and their
//! examples from [`SETTINGS`]; the runtime keeps what an attribute says in [`Options`],
//! merges a shared pool's with [`Options::merge`] and reads the overrides with
//! [`Options::from_env`]. Adding a setting is one entry here, the code that acts on it, and
//! its docs.

use std::fmt;
use std::time::Duration;

use crate::{Overload, WorkersSpec};

/// The defaults, in one place.
pub mod defaults {
    use crate::{Overload, WorkersSpec};

    /// `timeout`: 30 s.
    pub const TIMEOUT_MS: u64 = 30_000;
    /// `workers`: `"cpus-2"`, a core for the async runtime and one for the rest.
    pub const WORKERS: WorkersSpec = WorkersSpec::CpusMinus(2);
    /// `overload`: wait for room.
    pub const OVERLOAD: Overload = Overload::Wait;
    /// `max_payload`: 1 GiB.
    pub const MAX_PAYLOAD: u64 = 1 << 30;
    /// `spin_us`: how long an idle worker polls for its next call before it sleeps.
    pub const SPIN_US: u64 = 50;
    /// `breaker`'s `failures`.
    pub const BREAKER_FAILURES: u32 = 5;
    /// `breaker`'s `reset`: 30 s.
    pub const BREAKER_RESET_MS: u64 = 30_000;
}

/// How a setting's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// A [humantime](https://docs.rs/humantime) duration, greater than zero, in whole
    /// milliseconds: `"30s"`.
    Duration,
    /// A worker count: `"4"`, `"cpus"`, `"cpus-N"`, `"cpus/N"`.
    Workers,
    /// A size, greater than zero: `"512MiB"`.
    Size,
    /// A whole number of at least `min`; an integer literal in the attribute.
    Count {
        /// The least value allowed.
        min: u64,
    },
    /// `"wait"` or `"reject"`.
    Overload,
    /// A name that is not empty: `"images"`.
    Name,
    /// `breaker(failures = N, reset = "...")`, `breaker()` or `breaker`.
    Breaker,
    /// A path to a function, written as a path: `cached_digest`.
    FunctionPath,
    /// A path to a crate, as a string: `"my_crate::offload"`.
    CratePath,
}

impl Grammar {
    /// Whether the attribute writes the value as an integer literal, not a string.
    pub fn is_integer(self) -> bool {
        matches!(self, Grammar::Count { .. })
    }

    /// Parses a value of a setting named `name` from `text` (what a string literal holds, an
    /// integer literal's digits, or an environment variable). `None` for the grammars whose
    /// values are not plain [`Value`]s: names, lists and paths.
    pub fn parse(self, name: &str, text: &str) -> Option<Result<Value, String>> {
        Some(match self {
            Grammar::Duration => crate::parse_millis(text, name).map(Value::Millis),
            Grammar::Workers => crate::parse_workers(text).map(Value::Workers),
            Grammar::Size => crate::parse_size(text, name).map(Value::Bytes),
            Grammar::Count { min } => crate::parse_count(text, name, min).map(Value::Count),
            Grammar::Overload => crate::parse_overload(text).map(Value::Overload),
            Grammar::Name | Grammar::Breaker | Grammar::FunctionPath | Grammar::CratePath => return None,
        })
    }
}

/// What a setting is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The pool: in a shared pool, give it on one function only, or the same value on
    /// several.
    Pool,
    /// The function alone.
    Function,
}

/// A parsed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A duration, in milliseconds.
    Millis(u64),
    /// A worker count.
    Workers(WorkersSpec),
    /// A size, in bytes.
    Bytes(u64),
    /// A count.
    Count(u64),
    /// An overload policy.
    Overload(Overload),
}

impl fmt::Display for Value {
    /// As it is written in the attribute.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Millis(ms) => write!(f, "\"{}\"", humantime::format_duration(Duration::from_millis(ms))),
            Value::Workers(spec) => spec.fmt(f),
            Value::Bytes(n) => {
                for (unit, size) in
                    [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
                {
                    if n >= size && n.is_multiple_of(size) {
                        return write!(f, "\"{}{unit}\"", n / size);
                    }
                }
                write!(f, "\"{n}B\"")
            }
            Value::Count(n) => write!(f, "{n}"),
            Value::Overload(policy) => policy.fmt(f),
        }
    }
}

/// One setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Its key in the attribute.
    pub name: &'static str,
    /// How its value is written.
    pub grammar: Grammar,
    /// Whether it belongs to the pool or the function.
    pub scope: Scope,
    /// The suffix of the variables that override it, `OFFLOAD_<KEY>` and
    /// `OFFLOAD_POOL_<NAME>_<KEY>`; `None` where no variable does.
    pub env: Option<&'static str>,
    /// Its default; `None` where leaving it out means something else, which
    /// [`Setting::absent`] says.
    pub default: Option<Value>,
    /// What leaving it out means, when there is no default value.
    pub absent: &'static str,
    /// How it is written, for messages: `` `timeout = "30s"` ``.
    pub example: &'static str,
    /// What it does, in one line.
    pub doc: &'static str,
}

/// Declares the settings whose values are plain [`Value`]s, each once: the [`SETTINGS`]
/// entries and the fields of [`Options`] come from the same lines.
macro_rules! settings {
    (
        values { $( $name:ident: $ty:ty = { $($field:ident: $value:expr),* $(,)? } ),* $(,)? }
        others { $( $other:literal = { $($ofield:ident: $ovalue:expr),* $(,)? } ),* $(,)? }
    ) => {
        /// Every setting, in the order messages and docs list them.
        pub const SETTINGS: &[Setting] = &[
            $( Setting { name: stringify!($name), $($field: $value),* }, )*
            $( Setting { name: $other, $($ofield: $ovalue),* }, )*
        ];

        /// What one attribute says about the settings whose values are plain [`Value`]s, or
        /// what the environment overrides; `None` where it says nothing. The macro builds it
        /// as a constant; not public API beyond that.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct Options {
            $(
                #[doc = concat!("`", stringify!($name), "`.")]
                pub $name: Option<$ty>,
            )*
        }

        impl Options {
            /// Nothing said.
            pub const EMPTY: Options = Options { $( $name: None, )* };

            /// Sets the setting `name` to `value`; an error for a name that is not a value
            /// setting, or a value of another kind.
            pub fn set(&mut self, name: &str, value: Value) -> Result<(), String> {
                match name {
                    $( stringify!($name) => self.$name = Some(FromValue::from_value(name, value)?), )*
                    _ => return Err(format!("`{name}` is not a setting with a plain value")),
                }
                Ok(())
            }

            /// The settings given, with their values.
            pub fn given(&self) -> Vec<(&'static str, Value)> {
                let mut given = Vec::new();
                $( if let Some(value) = self.$name { given.push((stringify!($name), value.into_value(stringify!($name)))); } )*
                given
            }

            /// Each setting from `self`, else from `fallback`.
            pub fn or(self, fallback: Options) -> Options {
                Options { $( $name: self.$name.or(fallback.$name), )* }
            }

            /// Takes the pool settings `other` gives that `self` does not; fails on the first
            /// one both give with different values. Function settings are left alone.
            pub fn merge(&mut self, other: &Options) -> Result<(), Conflict> {
                $(
                    if setting(stringify!($name)).scope == Scope::Pool {
                        match (self.$name, other.$name) {
                            (Some(ours), Some(theirs)) if ours != theirs => {
                                return Err(Conflict {
                                    setting: stringify!($name),
                                    ours: ours.into_value(stringify!($name)),
                                    theirs: theirs.into_value(stringify!($name)),
                                });
                            }
                            (None, Some(theirs)) => self.$name = Some(theirs),
                            _ => {}
                        }
                    }
                )*
                Ok(())
            }
        }
    };
}

settings! {
    values {
        timeout: u64 = {
            grammar: Grammar::Duration, scope: Scope::Function, env: Some("TIMEOUT"),
            default: Some(Value::Millis(defaults::TIMEOUT_MS)), absent: "",
            example: "`timeout = \"30s\"`",
            doc: "how long a call may take, waiting for a worker included",
        },
        workers: WorkersSpec = {
            grammar: Grammar::Workers, scope: Scope::Pool, env: Some("WORKERS"),
            default: Some(Value::Workers(defaults::WORKERS)), absent: "",
            example: "`workers = \"4\"`",
            doc: "how many worker processes serve the pool",
        },
        memory: u64 = {
            grammar: Grammar::Size, scope: Scope::Pool, env: Some("MEMORY"),
            default: None, absent: "no limit",
            example: "`memory = \"512MiB\"`",
            doc: "the address-space limit (`RLIMIT_AS`) of each worker",
        },
        queue: u64 = {
            grammar: Grammar::Count { min: 0 }, scope: Scope::Pool, env: Some("QUEUE"),
            default: None, absent: "unbounded",
            example: "`queue = 64`",
            doc: "how many calls may wait for a worker beyond those running",
        },
        overload: Overload = {
            grammar: Grammar::Overload, scope: Scope::Pool, env: Some("OVERLOAD"),
            default: Some(Value::Overload(defaults::OVERLOAD)), absent: "",
            example: "`overload = \"reject\"`",
            doc: "what a call does when the queue is full",
        },
        max_tasks: u64 = {
            grammar: Grammar::Count { min: 1 }, scope: Scope::Pool, env: Some("MAX_TASKS"),
            default: None, absent: "none",
            example: "`max_tasks = 1000`",
            doc: "replace a worker after it has run this many calls",
        },
        max_rss: u64 = {
            grammar: Grammar::Size, scope: Scope::Pool, env: Some("MAX_RSS"),
            default: None, absent: "none",
            example: "`max_rss = \"1GiB\"`",
            doc: "replace a worker after a call that left its resident memory above this",
        },
        max_payload: u64 = {
            grammar: Grammar::Size, scope: Scope::Pool, env: Some("MAX_PAYLOAD"),
            default: Some(Value::Bytes(defaults::MAX_PAYLOAD)), absent: "",
            example: "`max_payload = \"256MiB\"`",
            doc: "the largest encoded arguments or return value",
        },
        spin_us: u64 = {
            grammar: Grammar::Count { min: 0 }, scope: Scope::Pool, env: Some("SPIN_US"),
            default: Some(Value::Count(defaults::SPIN_US)), absent: "",
            example: "`spin_us = 50`",
            doc: "how long, in microseconds, a worker that has answered polls for its next call before it sleeps",
        },
        grace: u64 = {
            grammar: Grammar::Duration, scope: Scope::Pool, env: Some("GRACE"),
            default: None, absent: "none: killed at once",
            example: "`grace = \"2s\"`",
            doc: "how long a cancelled call's worker has to return before it is killed",
        },
        retries: u64 = {
            grammar: Grammar::Count { min: 0 }, scope: Scope::Function, env: None,
            default: None, absent: "none",
            example: "`retries = 2`",
            doc: "run a call whose worker died again on a fresh worker, up to this many more times",
        },
    }
    others {
        "pool" = {
            grammar: Grammar::Name, scope: Scope::Function, env: None,
            default: None, absent: "a pool per function",
            example: "`pool = \"name\"`",
            doc: "share a pool of workers with every function that names the same pool",
        },
        "breaker" = {
            grammar: Grammar::Breaker, scope: Scope::Function, env: None,
            default: None, absent: "no breaker",
            example: "`breaker(failures = 5, reset = \"30s\")`",
            doc: "a circuit breaker for this function",
        },
        "fallback" = {
            grammar: Grammar::FunctionPath, scope: Scope::Function, env: None,
            default: None, absent: "none",
            example: "`fallback = path::to::function`",
            doc: "what stands in for a call that failed worker-side",
        },
        "state" = {
            grammar: Grammar::FunctionPath, scope: Scope::Function, env: None,
            default: None, absent: "none",
            example: "`state = path::to::builder`",
            doc: "state built once in each worker, handed to the function as its first argument",
        },
        "crate" = {
            grammar: Grammar::CratePath, scope: Scope::Function, env: None,
            default: None, absent: "`::offload`",
            example: "`crate = \"::offload\"`",
            doc: "where the `offload` crate is, for code that re-exports it",
        },
    }
}

/// The setting named `name`.
///
/// # Panics
///
/// For a name that is not in [`SETTINGS`]: only offload's own code asks, with its own names.
pub fn setting(name: &str) -> &'static Setting {
    SETTINGS.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no setting `{name}`"))
}

/// Two functions in one pool gave one setting different values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The setting.
    pub setting: &'static str,
    /// The value the pool had so far.
    pub ours: Value,
    /// The value that disagrees.
    pub theirs: Value,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{0} = {1} and {0} = {2}", self.setting, self.ours, self.theirs)
    }
}

impl Options {
    /// The overrides the environment gives: for each setting with a variable, `env(key)` is
    /// the variable set for it (its name and value), if any. An error names the variable.
    pub fn from_env(env: impl Fn(&str) -> Option<(String, String)>) -> Result<Options, String> {
        let mut options = Options::EMPTY;
        for setting in SETTINGS {
            let Some(key) = setting.env else { continue };
            let Some((var, text)) = env(key) else { continue };
            let parsed =
                setting.grammar.parse(setting.name, &text).expect("a variable's setting has a plain value");
            let value = parsed.map_err(|e| format!("environment variable {var}: {e}"))?;
            options.set(setting.name, value)?;
        }
        Ok(options)
    }
}

/// The field types of [`Options`], made from a [`Value`] and back.
trait FromValue: Sized {
    fn from_value(name: &str, value: Value) -> Result<Self, String>;
    /// The value of the setting `name`.
    fn into_value(self, name: &str) -> Value;
}

fn wrong_kind(name: &str, value: Value) -> String {
    format!("`{name}` cannot be {value}")
}

impl FromValue for u64 {
    fn from_value(name: &str, value: Value) -> Result<u64, String> {
        match (setting(name).grammar, value) {
            (Grammar::Duration, Value::Millis(n)) | (Grammar::Size, Value::Bytes(n)) => Ok(n),
            (Grammar::Count { .. }, Value::Count(n)) => Ok(n),
            (_, value) => Err(wrong_kind(name, value)),
        }
    }

    fn into_value(self, name: &str) -> Value {
        match setting(name).grammar {
            Grammar::Duration => Value::Millis(self),
            Grammar::Size => Value::Bytes(self),
            _ => Value::Count(self),
        }
    }
}

impl FromValue for WorkersSpec {
    fn from_value(name: &str, value: Value) -> Result<WorkersSpec, String> {
        match value {
            Value::Workers(spec) => Ok(spec),
            value => Err(wrong_kind(name, value)),
        }
    }

    fn into_value(self, _: &str) -> Value {
        Value::Workers(self)
    }
}

impl FromValue for Overload {
    fn from_value(name: &str, value: Value) -> Result<Overload, String> {
        match value {
            Value::Overload(policy) => Ok(policy),
            value => Err(wrong_kind(name, value)),
        }
    }

    fn into_value(self, _: &str) -> Value {
        Value::Overload(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn every_setting_once_with_an_example_that_names_it() {
        for (i, setting) in SETTINGS.iter().enumerate() {
            assert!(SETTINGS[..i].iter().all(|s| s.name != setting.name), "{} twice", setting.name);
            assert!(setting.example.starts_with(&format!("`{}", setting.name)), "{}", setting.example);
            assert_eq!(setting.default.is_some(), setting.absent.is_empty(), "{}", setting.name);
        }
    }

    #[test]
    fn every_value_setting_parses_its_default_as_written() {
        for setting in SETTINGS {
            let Some(default) = setting.default else { continue };
            let written = default.to_string();
            let text = written.trim_matches('"');
            assert_eq!(setting.grammar.parse(setting.name, text), Some(Ok(default)), "{}", setting.name);
        }
    }

    #[test]
    fn options_are_set_merged_and_read_from_the_environment() {
        let mut a = Options::EMPTY;
        a.set("memory", Value::Bytes(1 << 20)).unwrap();
        a.set("timeout", Value::Millis(5)).unwrap();
        assert!(a.set("memory", Value::Count(3)).is_err());
        assert!(a.set("pool", Value::Count(3)).is_err());
        let mut b = Options { queue: Some(3), timeout: Some(9), ..Options::EMPTY };
        b.merge(&a).unwrap();
        assert_eq!(
            (b.memory, b.queue, b.timeout),
            (Some(1 << 20), Some(3), Some(9)),
            "a function's timeout is its own"
        );
        let conflict = b.merge(&Options { memory: Some(2 << 20), ..Options::EMPTY }).unwrap_err();
        assert_eq!(conflict.to_string(), "memory = \"1MiB\" and memory = \"2MiB\"");

        let vars: HashMap<&str, &str> = [("OFFLOAD_MAX_RSS", "1GiB"), ("OFFLOAD_QUEUE", "4")].into();
        let env = |key: &str| {
            let var = format!("OFFLOAD_{key}");
            vars.get(var.as_str()).map(|v| (var.clone(), v.to_string()))
        };
        let from_env = Options::from_env(env).unwrap();
        assert_eq!(from_env, Options { max_rss: Some(1 << 30), queue: Some(4), ..Options::EMPTY });
        let bad = Options::from_env(|key| (key == "WORKERS").then(|| ("OFFLOAD_WORKERS".into(), "0".into())));
        assert_eq!(bad.unwrap_err(), "environment variable OFFLOAD_WORKERS: workers must be at least 1");
    }
}
