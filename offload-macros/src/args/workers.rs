//! `workers = "..."`: a fixed count, or a share of the machine's cores that the runtime
//! resolves when the pool starts.

/// The parsed `workers` value; mirrors the runtime's `WorkersSpec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkersSpec {
    /// `"4"`: never zero.
    Fixed(usize),
    /// `"cpus"`.
    Cpus,
    /// `"cpus-2"`.
    CpusMinus(usize),
    /// `"cpus/2"`: never zero.
    CpusDiv(usize),
}

/// Parses `"4"`, `"cpus"`, `"cpus-N"` or `"cpus/N"`, with optional spaces around `-` and `/`.
pub(crate) fn parse(text: &str) -> Result<WorkersSpec, String> {
    let invalid = || {
        format!(
            "invalid workers spec `{text}`: expected a count such as \"4\", or \"cpus\", \
             \"cpus-N\" or \"cpus/N\""
        )
    };
    let trimmed = text.trim();
    let Some(rest) = trimmed.strip_prefix("cpus") else {
        return match number(trimmed).ok_or_else(invalid)? {
            0 => Err("workers must be at least 1".to_owned()),
            n => Ok(WorkersSpec::Fixed(n)),
        };
    };
    let rest = rest.trim_start();
    if rest.is_empty() {
        return Ok(WorkersSpec::Cpus);
    }
    if let Some(n) = rest.strip_prefix('-') {
        return number(n.trim_start()).map(WorkersSpec::CpusMinus).ok_or_else(invalid);
    }
    if let Some(n) = rest.strip_prefix('/') {
        return match number(n.trim_start()).ok_or_else(invalid)? {
            0 => Err(format!(
                "invalid workers spec `{text}`: cannot divide by zero; expected \"cpus/N\" with N \
                 at least 1"
            )),
            n => Ok(WorkersSpec::CpusDiv(n)),
        };
    }
    Err(invalid())
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
    use super::{WorkersSpec, parse};

    #[test]
    fn accepts_the_grammar() {
        assert_eq!(parse("4"), Ok(WorkersSpec::Fixed(4)));
        assert_eq!(parse(" 16 "), Ok(WorkersSpec::Fixed(16)));
        assert_eq!(parse("cpus"), Ok(WorkersSpec::Cpus));
        assert_eq!(parse("cpus-2"), Ok(WorkersSpec::CpusMinus(2)));
        assert_eq!(parse("cpus - 2"), Ok(WorkersSpec::CpusMinus(2)));
        assert_eq!(parse("cpus -0"), Ok(WorkersSpec::CpusMinus(0)));
        assert_eq!(parse("cpus/2"), Ok(WorkersSpec::CpusDiv(2)));
        assert_eq!(parse("cpus /  3"), Ok(WorkersSpec::CpusDiv(3)));
    }

    #[test]
    fn rejects_zero() {
        assert_eq!(parse("0"), Err("workers must be at least 1".to_owned()));
        assert_eq!(parse("00"), Err("workers must be at least 1".to_owned()));
        let err = parse("cpus/0").unwrap_err();
        assert!(err.contains("cannot divide by zero"), "{err}");
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            " ",
            "-1",
            "+4",
            "4.5",
            "four",
            "cpu",
            "cpus-",
            "cpus/",
            "cpus+1",
            "cpus2",
            "cpus*2",
            "cpus-2-1",
            "cpus - -2",
            "CPUS",
            "99999999999999999999999999",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "invalid workers spec `{bad}`: expected a count such as \"4\", or \"cpus\", \
                     \"cpus-N\" or \"cpus/N\""
                ),
            );
        }
    }
}
