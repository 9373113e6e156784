//! Calls served by other hosts of the same binary, through a NATS broker (the `nats`
//! feature).
//!
//! ```text
//! caller process                     broker          host process (OFFLOAD_SERVE)
//! call -> executor -> remote::Pool   <offload>.hosts  <- presence, 4 times a second
//!   picks a host with room (link)    <offload>.host.<id>.call -> host: admission, deadline,
//!   Lease: publish, await answers                        call::run on its local pool
//!        <- log, progress, item frames; the reply or the failure (wire::Answer)
//!   dropped: <offload>.host.<id>.cancel -> the host drops its call: the worker is killed
//! ```
//!
//! - [`wire`]: subjects and messages, no I/O;
//! - [`link`]: one connection per broker: its client, the hosts seen, the answers' inbox;
//! - [`caller`]: the executor of a pool whose calls go to hosts, and its places;
//! - [`host`]: serve mode, entered before `main` when `OFFLOAD_SERVE` is set. It sits
//!   above `call`, as a stub does: it makes the calls that come to it.
//!
//! `caller` is below the executor seam, beside the local `pool`: it uses the transport's
//! and the pool's types, never the executor's.

mod caller;
mod host;
mod link;
mod wire;

use std::sync::OnceLock;
use std::time::Duration;

pub(crate) use caller::{Lease, Pool, shutdown, stats};
pub(crate) use host::serve_if_asked;

/// How often a host says it is there.
const PRESENCE_EVERY: Duration = Duration::from_millis(250);
/// A host not heard from for this long is lost: the calls it holds fail (or run again).
const LOST_AFTER: Duration = Duration::from_secs(2);
/// How long a new connection waits to hear from hosts before it says none serves a call.
const DISCOVERY: Duration = Duration::from_secs(1);
/// Calls a host takes for each pool beyond its workers, so that a worker that answers has
/// its next call at hand.
const PREFETCH: u32 = 1;

/// How to reach a broker: its URL (with any user and password or token in it, and `tls://`
/// for TLS), and what the environment adds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    url: String,
    /// Every subject starts with it: `OFFLOAD_NATS_PREFIX`, `offload` by default.
    prefix: String,
    /// `OFFLOAD_NATS_CREDS`: a `.creds` file (a user JWT and its nkey seed).
    creds: Option<String>,
    /// `OFFLOAD_NATS_NKEY`: a file that holds an nkey seed.
    nkey: Option<String>,
    /// `OFFLOAD_NATS_CA`: a PEM file of root certificates to trust for `tls://`.
    ca: Option<String>,
}

impl Config {
    fn from_env(url: &str) -> Result<Config, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let prefix = var("OFFLOAD_NATS_PREFIX").unwrap_or_else(|| "offload".to_owned());
        if !wire::valid_prefix(&prefix) {
            return Err(format!(
                "environment variable OFFLOAD_NATS_PREFIX: `{prefix}` is not a subject prefix (tokens of \
                 letters, digits, `-` and `_`, split by `.`)"
            ));
        }
        Ok(Config {
            url: url.trim().to_owned(),
            prefix,
            creds: var("OFFLOAD_NATS_CREDS"),
            nkey: var("OFFLOAD_NATS_NKEY"),
            ca: var("OFFLOAD_NATS_CA"),
        })
    }

    /// The URL without its user, password or token, for messages.
    fn shown(&self) -> String {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &self.url[..scheme + 3], &self.url[at + 1..])
            }
            (None, Some(at)) => self.url[at + 1..].to_owned(),
            _ => self.url.clone(),
        }
    }

    /// Connects (in the background: this returns at once), telling `on_event` when the
    /// connection comes and goes.
    async fn connect(
        &self,
        name: &str,
        on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
    ) -> Result<async_nats::Client, String> {
        let on_event = std::sync::Arc::new(on_event);
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .event_callback(move |event| {
                on_event(event);
                async {}
            })
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(1_000)));
        if let Some(path) = &self.creds {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| format!("environment variable OFFLOAD_NATS_CREDS: cannot read `{path}`: {e}"))?;
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| format!("environment variable OFFLOAD_NATS_NKEY: cannot read `{path}`: {e}"))?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &self.ca {
            options = options.add_root_certificates(path.into()).require_tls(true);
        }
        options
            .connect(&self.url)
            .await
            .map_err(|e| format!("cannot use the broker at {}: {e}", self.shown()))
    }
}

/// The runtime that drives every broker connection of a caller: a thread of its own, so
/// connections outlive the runtimes that make calls (each test has its own).
fn runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("offload: cannot build the runtime for the broker connection");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("offload-nats".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("offload: cannot start the thread for the broker connection");
        handle
    })
}

/// The next message of a subscription; `None` once it is closed.
async fn next(subscriber: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    use futures_core::Stream;
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *subscriber).poll_next(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_not_shown() {
        let config =
            |url: &str| Config { url: url.into(), prefix: "p".into(), creds: None, nkey: None, ca: None };
        assert_eq!(config("nats://alice:secret@broker:4222").shown(), "nats://broker:4222");
        assert_eq!(config("tls://token@broker").shown(), "tls://broker");
        assert_eq!(config("broker:4222").shown(), "broker:4222");
        assert_eq!(config("user:pw@broker").shown(), "broker");
    }
}
