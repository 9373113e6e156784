//! Forwarding of the function's `tracing` events to the parent.
//!
//! The worker installs a subscriber of its own (the user's `main` never runs here, so no
//! other subscriber is installed). It keeps the events of the running call up to the level
//! the parent's subscribers want, which the call frame carries, and [`finish_call`] turns
//! them into a log frame sent just before the reply. The parent re-emits them inside the
//! call's span, with the call's task id and the worker's pid.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};

use crate::error::Payload;
use crate::protocol::{self, FrameBuf, LogRecord, Tag};

/// At most this many events are kept per call; the rest are counted and dropped.
const MAX_EVENTS: usize = 1_000;

/// The running call's level, as [`protocol::level`] has it on the wire.
static LEVEL: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static EVENTS: RefCell<(Vec<LogRecord>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

pub(crate) fn install() {
    // Fails only if code that ran before `main` installed one; then that one wins.
    let _ = tracing::subscriber::set_global_default(Forward);
}

pub(crate) fn start_call(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

/// The call's events as a log frame, if there were any.
pub(crate) fn finish_call() -> Option<Vec<u8>> {
    LEVEL.store(0, Ordering::Relaxed);
    let (mut events, dropped) = EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()));
    if dropped > 0 {
        events.push(LogRecord {
            level: 2,
            target: "offload::worker".into(),
            message: format!("{dropped} more events of this call were dropped"),
            fields: String::new(),
        });
    }
    if events.is_empty() {
        return None;
    }
    let mut frame = FrameBuf::new(Tag::Log);
    protocol::append(frame.body(), &events, Payload::Message).ok()?;
    frame.finish().ok()
}

struct Forward;

impl Subscriber for Forward {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The level changes from call to call: ask `enabled` each time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && protocol::level::of_level(*metadata.level()) <= LEVEL.load(Ordering::Relaxed)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        EVENTS.with(|events| {
            let (events, dropped) = &mut *events.borrow_mut();
            if events.len() >= MAX_EVENTS {
                *dropped += 1;
                return;
            }
            events.push(LogRecord {
                level: protocol::level::of_level(*metadata.level()),
                target: metadata.target().to_owned(),
                message: visitor.message,
                fields: visitor.fields,
            });
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}
