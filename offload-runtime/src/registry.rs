//! Entries submitted by `#[offload]`: a stable key mapped to the type-erased function the
//! worker runs, plus the function's settings. Plain static data: the per-process state that
//! goes with an entry (the pool its calls go to, its breaker) lives with the layer that uses
//! it, in a [`PerEntry`] table.
//!
//! Entries live in a link-time distributed slice (linkme), so the table is complete before
//! `main` and in the worker's pre-`main` hook alike, with no life-before-main registration.
//! Each stub references its own entry, so the linker keeps every entry that can be called.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use crate::error::ProtocolError;
use crate::settings::{BreakerConfig, PoolOptions};

/// A worker's state for an entry, as its builder (`state = path`) hands it over. Not public API.
#[doc(hidden)]
pub type StateBox = Box<dyn std::any::Any>;

/// Builds an entry's state, once in each worker of its pool.
#[doc(hidden)]
pub type BuildState = fn() -> StateBox;

/// The worker side of an entry: decode the arguments from `input`, run the user's function,
/// append the encoded return value to `out`.
#[doc(hidden)]
pub type Invoke = fn(input: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError>;

/// Every `#[offload]` function in the binary. Not public API.
#[doc(hidden)]
#[linkme::distributed_slice]
pub static ENTRIES: [Entry];

/// One `#[offload]` function. Built by the macro with the `const` builder methods below.
/// Not public API.
#[doc(hidden)]
pub struct Entry {
    /// Unique and the same in every process of one build, what the worker dispatches on:
    /// `module::path::fn_name#signature-hash@line:column`.
    pub(crate) key: &'static str,
    /// `module::path::fn_name`, for people: messages, logs, figures.
    pub(crate) name: &'static str,
    pub(crate) invoke: Invoke,
    /// The shared pool this function names, or `None` for a pool of its own.
    pub(crate) pool: Option<&'static str>,
    /// What the attribute says about the pool and the function; a shared pool merges its
    /// members' pool settings.
    pub(crate) options: PoolOptions,
    /// `breaker(failures = N, reset = "...")`, if given.
    pub(crate) breaker: Option<BreakerConfig>,
    /// `state = path`: what builds the state each worker of the pool keeps for this entry.
    pub(crate) state: Option<BuildState>,
}

impl Entry {
    /// An entry with default settings: `key` is what the worker dispatches on, `name` what
    /// people read.
    pub const fn new(key: &'static str, name: &'static str, invoke: Invoke) -> Entry {
        Entry { key, name, invoke, pool: None, options: PoolOptions::EMPTY, breaker: None, state: None }
    }

    /// What the attribute says about the settings with plain values, checked by the macro.
    pub const fn with_options(mut self, options: PoolOptions) -> Entry {
        self.options = options;
        self
    }

    /// `state = path`: each worker of the pool builds the state with `build` when it starts,
    /// before it takes a call.
    pub const fn with_state(mut self, build: BuildState) -> Entry {
        self.state = Some(build);
        self
    }

    /// `breaker(failures = N, reset = "...")`: open after `failures` worker-side failures
    /// in a row (at least 1), try again after `reset_ms` milliseconds (at least 1).
    pub const fn with_breaker(mut self, failures: u32, reset_ms: u64) -> Entry {
        self.breaker = Some(BreakerConfig { failures, reset: Duration::from_millis(reset_ms) });
        self
    }

    /// `pool = "..."`.
    pub const fn with_pool(mut self, pool: &'static str) -> Entry {
        self.pool = Some(pool);
        self
    }

    /// The deadline of a call, as the attribute gives it or by default.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(match self.options.timeout {
            Some(ms) => ms,
            None => offload_spec::defaults::TIMEOUT_MS,
        })
    }

    /// The name of the pool serving this entry: the named pool, or the entry's own.
    pub(crate) fn pool_key(&self) -> &'static str {
        self.pool.unwrap_or(self.key)
    }

    /// `module::path::fn_name`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The pool's name for people and environment variables: the named pool, or the
    /// function's path.
    pub(crate) fn pool_label(&self) -> &'static str {
        self.pool.unwrap_or(self.name)
    }
}

/// The checked view of [`ENTRIES`], built once per process.
pub(crate) struct Registry {
    entries: &'static [Entry],
    by_key: HashMap<&'static str, &'static Entry>,
    /// Merged options per pool key, or why the pool cannot start.
    pools: HashMap<&'static str, Result<PoolOptions, String>>,
    /// Entries whose name is registered more than once.
    duplicates: Vec<&'static str>,
    /// Hash of every entry name: equal in parent and worker only for the same build.
    hash: u64,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry::build(&ENTRIES));

impl Registry {
    pub(crate) fn get() -> &'static Registry {
        &REGISTRY
    }

    fn build(entries: &'static [Entry]) -> Registry {
        let mut by_key = HashMap::new();
        let mut duplicates = Vec::new();
        for entry in entries {
            if let Some(_first) = by_key.insert(entry.key, entry) {
                duplicates.push(entry.key);
            }
        }

        let mut pools: HashMap<&'static str, Result<PoolOptions, String>> = HashMap::new();
        for entry in entries {
            let merged = pools.entry(entry.pool_key()).or_insert(Ok(PoolOptions::EMPTY));
            let Ok(options) = merged else { continue };
            if let Err(conflict) = options.merge(&entry.options) {
                // Name a function that gave the value this one disagrees with.
                let other = entries
                    .iter()
                    .filter(|e| e.pool_key() == entry.pool_key())
                    .find(|e| {
                        let mut probe = e.options;
                        probe.merge(&entry.options).is_err()
                    })
                    .map_or("another function", |e| e.name);
                *merged = Err(format!(
                    "pool `{}` has conflicting settings: `{other}` says {setting} = {ours} but `{}` \
                     says {setting} = {theirs}; give every function in a pool the same settings, or \
                     set them on one function only",
                    entry.pool_label(),
                    entry.name,
                    setting = conflict.setting,
                    ours = conflict.ours,
                    theirs = conflict.theirs,
                ));
            }
        }

        let mut keys: Vec<&str> = by_key.keys().copied().collect();
        keys.sort_unstable();
        let hash = keys.iter().fold(FNV_OFFSET, |h, key| fnv1a(fnv1a(h, key.as_bytes()), &[0]));

        Registry { entries, by_key, pools, duplicates, hash }
    }

    /// Every entry, in link order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &'static Entry> + '_ {
        self.entries.iter()
    }

    /// The entry registered under `key`, for the worker's dispatch.
    pub(crate) fn lookup(&self, key: &str) -> Option<&'static Entry> {
        self.by_key.get(key).copied()
    }

    /// Where `entry` is in the table, if it is in it (an entry the stub references always is).
    fn index(&self, entry: &'static Entry) -> Option<usize> {
        let first = self.entries.as_ptr() as usize;
        let offset = (entry as *const Entry as usize).checked_sub(first)?;
        let index = offset / size_of::<Entry>();
        (offset % size_of::<Entry>() == 0 && index < self.entries.len()).then_some(index)
    }

    /// The merged options of `entry`'s pool, or a message saying why it cannot be used.
    pub(crate) fn options(&self, entry: &'static Entry) -> Result<PoolOptions, String> {
        if self.duplicates.contains(&entry.key) {
            return Err(format!(
                "`{}` is registered more than once under the name `{}`: two crates with the \
                 same name and module path define it, or a `macro_rules!` macro generates it \
                 twice at one position",
                entry.name, entry.key
            ));
        }
        match self.pools.get(entry.pool_key()) {
            Some(settings) => settings.clone(),
            // Not in the table: the linker dropped the entry, which the stub prevents.
            None => Err(format!("`{}` is missing from the registry of offloaded functions", entry.name)),
        }
    }

    /// Identifies this build's set of entries; checked in the worker handshake.
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }
}

/// Per-process state for each entry of the registry, kept by the layer that uses it: one
/// slot per entry, made on first use, found by the entry's place in the table (no lookup by
/// name, no lock once made).
pub(crate) struct PerEntry<T> {
    slots: OnceLock<Box<[OnceLock<T>]>>,
}

impl<T> PerEntry<T> {
    pub(crate) const fn new() -> PerEntry<T> {
        PerEntry { slots: OnceLock::new() }
    }

    fn slot(&self, entry: &'static Entry) -> Option<&OnceLock<T>> {
        let registry = Registry::get();
        let index = registry.index(entry)?;
        let slots = self.slots.get_or_init(|| registry.entries.iter().map(|_| OnceLock::new()).collect());
        slots.get(index)
    }

    /// `entry`'s state, made by `init` on first use; `None` for an entry that is not in the
    /// registry.
    pub(crate) fn get_or_init(&self, entry: &'static Entry, init: impl FnOnce() -> T) -> Option<&T> {
        Some(self.slot(entry)?.get_or_init(init))
    }

    /// `entry`'s state, if it was made.
    pub(crate) fn get(&self, entry: &'static Entry) -> Option<&T> {
        self.slot(entry)?.get()
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use offload_spec::WorkersSpec;

    fn noop(_: &[u8], _: &mut Vec<u8>) -> Result<(), ProtocolError> {
        Ok(())
    }

    fn table(entries: Vec<Entry>) -> (&'static [Entry], Registry) {
        let entries: &'static [Entry] = Box::leak(entries.into_boxed_slice());
        (entries, Registry::build(entries))
    }

    const FOUR: WorkersSpec = WorkersSpec::Fixed(NonZeroUsize::new(4).unwrap());

    fn workers(spec: WorkersSpec) -> PoolOptions {
        PoolOptions { workers: Some(spec), ..PoolOptions::EMPTY }
    }

    #[test]
    fn shared_pool_takes_the_one_setting_given() {
        let (e, reg) = table(vec![
            Entry::new("m::a#1", "m::a", noop).with_pool("p"),
            Entry::new("m::b#1", "m::b", noop).with_pool("p").with_options(workers(FOUR)),
            Entry::new("m::c#1", "m::c", noop),
        ]);
        assert_eq!(reg.options(&e[0]).unwrap().workers, Some(FOUR));
        assert_eq!(reg.options(&e[1]).unwrap().workers, Some(FOUR));
        assert_eq!(reg.options(&e[2]), Ok(PoolOptions::EMPTY));
        assert_eq!(reg.lookup("m::c#1").map(|x| x.name), Some("m::c"));
        assert!(reg.lookup("m::c").is_none());
    }

    #[test]
    fn conflicting_settings_name_both_functions() {
        let (e, reg) = table(vec![
            Entry::new("m::a#1", "m::a", noop).with_pool("p").with_options(workers(WorkersSpec::Cpus)),
            Entry::new("m::b#1", "m::b", noop).with_pool("p").with_options(workers(FOUR)),
        ]);
        let message = reg.options(&e[1]).unwrap_err();
        assert!(message.contains("`m::a` says workers = \"cpus\""), "{message}");
        assert!(message.contains("`m::b` says workers = \"4\""), "{message}");
        assert_eq!(reg.options(&e[0]), Err(message));
    }

    #[test]
    fn duplicate_names_are_detected() {
        let (e, reg) = table(vec![Entry::new("m::a#1", "m::a", noop), Entry::new("m::a#1", "m::a", noop)]);
        assert!(reg.options(&e[0]).unwrap_err().contains("registered more than once"));
    }

    #[test]
    fn hash_depends_on_the_names() {
        let (_, one) = table(vec![Entry::new("m::a#1", "m::a", noop)]);
        let (_, same) = table(vec![Entry::new("m::a#1", "m::a", noop)]);
        let (_, other) = table(vec![Entry::new("m::a#2", "m::a", noop)]);
        assert_eq!(one.hash(), same.hash());
        assert_ne!(one.hash(), other.hash());
    }
}
