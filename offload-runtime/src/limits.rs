//! Settings that bound a pool: the worker count and the call deadline.

use std::fmt;
use std::num::NonZeroUsize;

/// How many workers a pool runs, as written in `workers = "..."`.
///
/// Parsed at compile time by the macro; resolved against the machine at run time, when the
/// pool starts. Not public API: the macro emits it.
#[doc(hidden)]
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
    /// The default, `"cpus-2"`: leave a core for the async runtime and one for the rest.
    pub const DEFAULT: WorkersSpec = WorkersSpec::CpusMinus(2);

    /// The worker count on a machine with `cpus` available cores; never below 1.
    pub(crate) fn resolve_with(self, cpus: NonZeroUsize) -> NonZeroUsize {
        let n = match self {
            WorkersSpec::Fixed(n) => return n,
            WorkersSpec::Cpus => cpus.get(),
            WorkersSpec::CpusMinus(k) => cpus.get().saturating_sub(k),
            WorkersSpec::CpusDiv(d) => cpus.get() / d.get(),
        };
        NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
    }

    /// The worker count on this machine, from [`std::thread::available_parallelism`]
    /// (which honours cgroup CPU quotas and affinity masks).
    pub(crate) fn resolve(self) -> NonZeroUsize {
        let cpus = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        self.resolve_with(cpus)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn never_below_one() {
        assert_eq!(WorkersSpec::CpusMinus(2).resolve_with(nz(2)), nz(1));
        assert_eq!(WorkersSpec::CpusMinus(2).resolve_with(nz(1)), nz(1));
        assert_eq!(WorkersSpec::CpusMinus(2).resolve_with(nz(16)), nz(14));
        assert_eq!(WorkersSpec::CpusDiv(nz(4)).resolve_with(nz(2)), nz(1));
        assert_eq!(WorkersSpec::CpusDiv(nz(2)).resolve_with(nz(16)), nz(8));
        assert_eq!(WorkersSpec::Cpus.resolve_with(nz(3)), nz(3));
        assert_eq!(WorkersSpec::Fixed(nz(5)).resolve_with(nz(1)), nz(5));
        assert!(WorkersSpec::DEFAULT.resolve().get() >= 1);
    }

    #[test]
    fn displays_as_written() {
        assert_eq!(WorkersSpec::CpusMinus(2).to_string(), "\"cpus-2\"");
        assert_eq!(WorkersSpec::CpusDiv(nz(2)).to_string(), "\"cpus/2\"");
    }
}
