//! `timeout = "..."`: a humantime duration, turned into whole milliseconds at compile time.

use std::time::Duration;

/// Milliseconds in a `timeout` value, or the message explaining why it is not one.
///
/// Sub-millisecond remainders round up, so a deadline is never shorter than written.
pub(crate) fn parse_millis(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text).map_err(|err| {
        format!("invalid duration `{text}`: {err}; expected a duration such as \"30s\" or \"500ms\"")
    })?;
    if duration.is_zero() {
        return Err("timeout must be greater than zero".to_owned());
    }
    let millis = duration.as_millis() + u128::from(has_sub_millis(duration));
    u64::try_from(millis).map_err(|_| {
        format!(
            "timeout `{text}` is too large: it must fit in {} milliseconds (about 584 million years)",
            u64::MAX
        )
    })
}

fn has_sub_millis(duration: Duration) -> bool {
    !duration.subsec_nanos().is_multiple_of(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn accepts_humantime() {
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("1m 30s"), Ok(90_000));
        assert_eq!(parse_millis("2h"), Ok(7_200_000));
        assert_eq!(parse_millis("1day"), Ok(86_400_000));
    }

    #[test]
    fn rounds_sub_millis_up() {
        assert_eq!(parse_millis("1us"), Ok(1));
        assert_eq!(parse_millis("1500us"), Ok(2));
        assert_eq!(parse_millis("2000us"), Ok(2));
    }

    #[test]
    fn rejects_zero() {
        assert_eq!(parse_millis("0s"), Err("timeout must be greater than zero".to_owned()));
        assert_eq!(parse_millis("0ms 0s"), Err("timeout must be greater than zero".to_owned()));
    }

    #[test]
    fn rejects_garbage_with_humantime_message() {
        let err = parse_millis("30").unwrap_err();
        assert!(err.starts_with("invalid duration `30`: time unit needed"), "{err}");
        assert!(err.ends_with("expected a duration such as \"30s\" or \"500ms\""), "{err}");

        let err = parse_millis("30 parsecs").unwrap_err();
        assert!(err.contains("unknown time unit \"parsecs\""), "{err}");

        let err = parse_millis("").unwrap_err();
        assert!(err.starts_with("invalid duration ``: value was empty"), "{err}");

        assert!(parse_millis("-5s").is_err());
        assert!(parse_millis("soon").is_err());
    }

    #[test]
    fn rejects_overflow() {
        // Fits a `Duration`, but not `u64` milliseconds.
        let err = parse_millis("1000000000years").unwrap_err();
        assert!(err.starts_with("timeout `1000000000years` is too large"), "{err}");
        // Does not even fit a `Duration`: humantime says so.
        let err = parse_millis("99999999999999999999999s").unwrap_err();
        assert!(err.starts_with("invalid duration"), "{err}");
    }
}
