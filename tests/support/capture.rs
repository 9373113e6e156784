//! A minimal `tracing` subscriber for tests: records events with their fields and the fields
//! of the spans they happened in.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One recorded event.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: Level,
    pub target: String,
    /// The event's own fields, `message` included.
    pub fields: HashMap<String, String>,
    /// The fields of every span the event happened in, innermost last.
    pub spans: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, HashMap<String, String>>>,
    metadata: Mutex<HashMap<u64, &'static Metadata<'static>>>,
    events: Mutex<Vec<Captured>>,
}

/// Records every event, at every level, on threads where it is the default subscriber.
#[derive(Clone, Default)]
pub struct Capture(Arc<State>);

thread_local! {
    static STACK: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Capture {
    pub fn events(&self) -> Vec<Captured> {
        self.0.events.lock().unwrap().clone()
    }

    /// Runs `future` on a current-thread runtime, with this as the default subscriber.
    pub fn run<F: std::future::Future>(&self, future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tracing::subscriber::with_default(self.clone(), || runtime.block_on(future))
    }

    /// The events the workers emitted, as forwarded to this process, and their messages.
    pub fn forwarded(&self) -> (Vec<Captured>, Vec<String>) {
        let forwarded: Vec<Captured> =
            self.events().into_iter().filter(|e| e.target == "offload::worker").collect();
        let messages = forwarded.iter().map(|e| e.fields["message"].clone()).collect();
        (forwarded, messages)
    }
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().to_owned(), text);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        self.0.spans.lock().unwrap().insert(id, fields.0);
        self.0.metadata.lock().unwrap().insert(id, attrs.metadata());
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let Some(existing) = self.0.spans.lock().unwrap().get_mut(&span.into_u64()) {
            existing.extend(fields.0);
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans = self.0.spans.lock().unwrap();
        let mut context = HashMap::new();
        STACK.with(|stack| {
            for id in stack.borrow().iter() {
                if let Some(f) = spans.get(id) {
                    context.extend(f.clone());
                }
            }
        });
        self.0.events.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields: fields.0,
            spans: context,
        });
    }

    fn current_span(&self) -> tracing_core::span::Current {
        let top = STACK.with(|stack| stack.borrow().last().copied());
        match top.and_then(|id| Some((id, *self.0.metadata.lock().unwrap().get(&id)?))) {
            Some((id, metadata)) => tracing_core::span::Current::new(Id::from_u64(id), metadata),
            None => tracing_core::span::Current::none(),
        }
    }

    fn enter(&self, span: &Id) {
        STACK.with(|stack| stack.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, span: &Id) {
        STACK.with(|stack| {
            let mut stack = stack.borrow_mut();
            if let Some(pos) = stack.iter().rposition(|&id| id == span.into_u64()) {
                stack.remove(pos);
            }
        });
    }
}
