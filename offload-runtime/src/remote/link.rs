//! One caller's connection to one broker, shared by every pool that sends calls there: the
//! client, the hosts it has heard from, and the inbox every answer comes to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::{Client, Event, Message};
use tokio::sync::{Notify, mpsc};

use super::wire::{self, Presence};
use super::{Config, DISCOVERY, LOST_AFTER, PRESENCE_EVERY};

pub(crate) struct Link {
    pub(super) client: Client,
    pub(super) config: Config,
    /// The subject every answer to this caller starts with; a call's is `<inbox>.<call>`.
    inbox: String,
    next_call: AtomicU64,
    /// Where each open call's answers go.
    answers: Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    /// Fires when a host joins, leaves, gets room or is lost, and when the connection comes
    /// or goes: whatever may let a waiting call find a place.
    pub(super) changed: Notify,
    /// Fires when the connection is lost: the answers to the calls out are lost with it.
    down: Notify,
    /// How many times the connection was lost.
    downs: AtomicU64,
    /// Since when the connection has been up, if it is.
    connected_since: Mutex<Option<Instant>>,
    /// The connection has been up at least once.
    was_up: AtomicBool,
    born: Instant,
}

/// A host as the caller knows it.
pub(crate) struct Host {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) build: u64,
    pub(super) view: Mutex<View>,
    lost: AtomicBool,
    lost_notify: Notify,
}

/// What changes of a host.
pub(super) struct View {
    /// How many calls it takes for each pool, by key.
    pub(super) limits: HashMap<String, u32>,
    pub(super) draining: bool,
    seen: Instant,
    /// This caller's calls on it, by pool key: running or sent.
    pub(super) holding: HashMap<&'static str, u32>,
    /// Pools for which it said it had no room, until it next says how much it has.
    pub(super) full: Vec<&'static str>,
    /// Calls this caller sent it, by pool key.
    pub(super) calls: HashMap<&'static str, u64>,
}

impl View {
    /// Room for one more call of pool `key`.
    pub(super) fn room(&self, key: &str) -> u32 {
        if self.draining || self.full.contains(&key) {
            return 0;
        }
        let limit = self.limits.get(key).copied().unwrap_or(0);
        limit.saturating_sub(self.holding.get(key).copied().unwrap_or(0))
    }
}

impl Host {
    pub(super) fn view(&self) -> MutexGuard<'_, View> {
        lock(&self.view)
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Waits until the host is lost.
    pub(super) async fn lost(&self) {
        loop {
            let notified = self.lost_notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.is_lost() {
                return;
            }
            notified.await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Link {
    /// The link to the broker at `url`, connected (or connecting) on first use.
    pub(super) fn get(url: &str) -> Result<Arc<Link>, String> {
        static LINKS: Mutex<Vec<Arc<Link>>> = Mutex::new(Vec::new());
        let config = Config::from_env(url)?;
        let mut links = lock(&LINKS);
        if let Some(link) = links.iter().find(|link| link.config == config) {
            return Ok(Arc::clone(link));
        }
        // Connecting returns at once (the connection is made in the background); it runs on
        // the broker's runtime so that it outlives the caller's.
        let (tx, rx) = std::sync::mpsc::channel();
        super::runtime().spawn(async move {
            let _ = tx.send(Link::connect(config).await);
        });
        let link = rx.recv().map_err(|_| "the broker connection's thread is gone".to_owned())??;
        links.push(Arc::clone(&link));
        Ok(link)
    }

    async fn connect(config: Config) -> Result<Arc<Link>, String> {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let client = config
            .connect("offload caller", move |event| {
                let _ = events_tx.send(event);
            })
            .await?;
        let inbox = client.new_inbox();
        let subscribe_error = |e: async_nats::SubscribeError| format!("cannot subscribe at the broker: {e}");
        let mut answers = client.subscribe(format!("{inbox}.*")).await.map_err(subscribe_error)?;
        let mut presences =
            client.subscribe(wire::presence_subject(&config.prefix)).await.map_err(subscribe_error)?;
        let link = Arc::new(Link {
            client,
            config,
            inbox,
            next_call: AtomicU64::new(0),
            answers: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            down: Notify::new(),
            downs: AtomicU64::new(0),
            connected_since: Mutex::new(None),
            was_up: AtomicBool::new(false),
            born: Instant::now(),
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            while let Some(message) = super::next(&mut answers).await {
                let Some(link) = weak.upgrade() else { return };
                link.deliver(message);
            }
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            while let Some(message) = super::next(&mut presences).await {
                let Some(link) = weak.upgrade() else { return };
                match wire::decode::<Presence>(&message.payload) {
                    Ok((presence, _)) if presence.version == wire::VERSION => link.saw(presence),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(target: "offload::remote", %error, "offload: a bad host presence")
                    }
                }
            }
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(link) = weak.upgrade() else { return };
                link.connection_event(event);
            }
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PRESENCE_EVERY);
            loop {
                every.tick().await;
                let Some(link) = weak.upgrade() else { return };
                link.sweep();
            }
        });
        Ok(link)
    }

    fn connection_event(&self, event: Event) {
        match event {
            Event::Connected => {
                *lock(&self.connected_since) = Some(Instant::now());
                tracing::info!(target: "offload::remote", broker = %self.config.shown(), "offload: connected to the broker");
            }
            Event::Disconnected => {
                *lock(&self.connected_since) = None;
                self.downs.fetch_add(1, Ordering::AcqRel);
                self.down.notify_waiters();
                tracing::warn!(target: "offload::remote", broker = %self.config.shown(), "offload: lost the broker");
            }
            _ => return,
        }
        self.changed.notify_waiters();
    }

    /// Whether the connection is up.
    pub(super) fn is_connected(&self) -> bool {
        let up = self.client.connection_state() == async_nats::connection::State::Connected;
        if up {
            self.was_up.store(true, Ordering::Relaxed);
        }
        up
    }

    /// How long the connection has been up, if it is.
    fn up_for(&self) -> Option<Duration> {
        let mut since = lock(&self.connected_since);
        if !self.is_connected() {
            *since = None;
            return None;
        }
        // The first connection is not always announced as an event.
        Some(since.get_or_insert_with(Instant::now).elapsed())
    }

    /// How many times the connection was lost so far: a call sent at one count lost its
    /// answers if the count has moved, even if the connection is back.
    pub(super) fn downs(&self) -> u64 {
        self.downs.load(Ordering::Acquire)
    }

    /// Waits until the connection is lost after `downs` losses.
    pub(super) async fn went_down_since(&self, downs: u64) {
        loop {
            let down = self.down.notified();
            let mut down = std::pin::pin!(down);
            down.as_mut().enable();
            if self.downs() != downs {
                return;
            }
            down.await;
        }
    }

    /// Whether the link has listened long enough to know the hosts there are.
    pub(super) fn has_looked(&self) -> bool {
        self.up_for().is_some_and(|up| up >= DISCOVERY)
    }

    /// Whether the connection has been up at least once.
    pub(super) fn was_up(&self) -> bool {
        self.was_up.load(Ordering::Relaxed)
    }

    /// How long the link has tried to reach the broker.
    pub(super) fn age(&self) -> Duration {
        self.born.elapsed()
    }

    /// A host said it is there.
    fn saw(&self, presence: Presence) {
        let mut hosts = lock(&self.hosts);
        let host = hosts.entry(presence.id.clone()).or_insert_with(|| {
            tracing::info!(target: "offload::remote",
                host = %presence.name, build = %format_args!("{:016x}", presence.build),
                "offload: a host joined"
            );
            Arc::new(Host {
                id: presence.id.clone(),
                name: presence.name.clone(),
                build: presence.build,
                view: Mutex::new(View {
                    limits: HashMap::new(),
                    draining: false,
                    seen: Instant::now(),
                    holding: HashMap::new(),
                    full: Vec::new(),
                    calls: HashMap::new(),
                }),
                lost: AtomicBool::new(false),
                lost_notify: Notify::new(),
            })
        });
        let mut view = host.view();
        view.limits = presence.pools.into_iter().collect();
        view.draining = presence.draining;
        view.seen = Instant::now();
        view.full.clear();
        drop(view);
        drop(hosts);
        self.changed.notify_waiters();
    }

    /// Forgets the hosts not heard from for [`LOST_AFTER`], while the connection has been up
    /// that long (during an outage no host is heard from).
    fn sweep(&self) {
        let up_long_enough = self.up_for().is_some_and(|up| up >= LOST_AFTER);
        if !up_long_enough {
            return;
        }
        let mut lost = Vec::new();
        lock(&self.hosts).retain(|_, host| {
            let keep = host.view().seen.elapsed() < LOST_AFTER;
            if !keep {
                lost.push(Arc::clone(host));
            }
            keep
        });
        for host in &lost {
            tracing::warn!(target: "offload::remote", host = %host.name, "offload: lost a host: no word from it for {LOST_AFTER:?}");
            host.lost.store(true, Ordering::Release);
            host.lost_notify.notify_waiters();
        }
        if !lost.is_empty() {
            self.changed.notify_waiters();
        }
    }

    /// The hosts heard from.
    pub(super) fn hosts(&self) -> Vec<Arc<Host>> {
        lock(&self.hosts).values().cloned().collect()
    }

    /// Opens a call: its reply subject, and where its answers arrive.
    pub(super) fn open_call(&self) -> (u64, String, mpsc::UnboundedReceiver<Message>) {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.answers).insert(id, tx);
        (id, format!("{}.{id}", self.inbox), rx)
    }

    /// Closes a call: answers that still come for it are dropped.
    pub(super) fn close_call(&self, id: u64) {
        lock(&self.answers).remove(&id);
    }

    fn deliver(&self, message: Message) {
        let Some(id) = message.subject.rsplit('.').next().and_then(|id| id.parse::<u64>().ok()) else {
            return;
        };
        if let Some(tx) = lock(&self.answers).get(&id) {
            let _ = tx.send(message);
        }
    }
}
