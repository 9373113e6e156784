//! How a parent hands a worker what it needs, in the worker's environment: which descriptor
//! is its channel, who its parent is, the secret it proves itself with, and the largest
//! payload it may send.

use std::os::fd::RawFd;

use super::PROTOCOL_VERSION;

/// Set in a worker's environment by its parent:
/// `version:fd:parent-pid:secret-hex:max-payload:spin-us:probe:pool` (the pool's name may
/// hold `:`).
pub(crate) const ENV: &str = "OFFLOAD_WORKER";

/// What the parent put in [`ENV`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub(crate) fd: RawFd,
    pub(crate) parent: u32,
    pub(crate) secret: [u8; 16],
    /// The pool's `max_payload`: the largest encoded return value.
    pub(crate) max_payload: u64,
    /// How long to poll for the next call before sleeping, in microseconds.
    pub(crate) spin_us: u64,
    /// Where [`crate::lend::PROBE`] is in the parent.
    pub(crate) probe: u64,
    /// The pool's key in the registry, whose entries' states the worker builds.
    pub(crate) pool: String,
}

impl WorkerEnv {
    pub(crate) fn encode(&self) -> String {
        let secret: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{PROTOCOL_VERSION}:{}:{}:{secret}:{}:{}:{}:{}",
            self.fd, self.parent, self.max_payload, self.spin_us, self.probe, self.pool
        )
    }

    pub(crate) fn parse(value: &str) -> Option<WorkerEnv> {
        let mut parts = value.splitn(8, ':');
        let version: u32 = parts.next()?.parse().ok()?;
        let fd: RawFd = parts.next()?.parse().ok()?;
        let parent: u32 = parts.next()?.parse().ok()?;
        let hex = parts.next()?;
        let max_payload: u64 = parts.next()?.parse().ok()?;
        let spin_us: u64 = parts.next()?.parse().ok()?;
        let probe: u64 = parts.next()?.parse().ok()?;
        let pool = parts.next()?.to_owned();
        if version != PROTOCOL_VERSION || parts.next().is_some() || hex.len() != 32 || fd < 0 {
            return None;
        }
        let mut secret = [0u8; 16];
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(WorkerEnv { fd, parent, secret, max_payload, spin_us, probe, pool })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_round_trips() {
        let env = WorkerEnv {
            fd: 7,
            parent: 1234,
            secret: *b"0123456789abcdef",
            max_payload: 1 << 30,
            spin_us: 50,
            probe: 0x5555_1234_5678,
            pool: "app::digest".into(),
        };
        assert_eq!(WorkerEnv::parse(&env.encode()), Some(env));
    }

    #[test]
    fn malformed_env_is_rejected() {
        for bad in ["", "1:2:3", "1:x:3:00", "999:3:4:00112233445566778899aabbccddeeff", "1:3:4:zz"] {
            assert_eq!(WorkerEnv::parse(bad), None, "{bad}");
        }
    }
}
