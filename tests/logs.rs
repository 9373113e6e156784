//! What the offloaded function logs with `tracing` in the worker reaches the parent's
//! subscriber, inside the call's span: function, task id and worker pid.
//!
//! One test only: `tracing` caches callsite interest globally, so a parallel test without a
//! subscriber could race with this one's thread-local subscriber. Every other test binary
//! runs without a subscriber.

#[path = "support/capture.rs"]
mod capture;
mod support;

use offload::offload;
use tracing::Level;

#[offload(workers = "1", timeout = "30s")]
fn chatty(n: u32) -> u32 {
    tracing::info!(n, "working on it");
    tracing::debug!(step = "detail", "fine print");
    tracing::warn!("almost done");
    std::process::id()
}

#[test]
fn worker_events_reach_the_parent_subscriber_with_call_context() {
    let capture = capture::Capture::default();
    let pid = capture.run(chatty(7)).unwrap();

    let events = capture.events();
    let (forwarded, messages) = capture.forwarded();
    assert_eq!(messages, ["working on it", "fine print", "almost done"], "{events:#?}");
    assert_eq!(forwarded[0].level, Level::INFO);
    assert_eq!(forwarded[1].level, Level::DEBUG);
    assert_eq!(forwarded[2].level, Level::WARN);
    assert_eq!(forwarded[0].fields["fields"], "n=7");
    assert_eq!(forwarded[0].fields["worker_target"], "logs");
    for event in &forwarded {
        assert_eq!(event.spans["entry"], "logs::chatty");
        assert_eq!(event.spans["pid"], pid.to_string(), "the worker's pid is on the span");
        assert!(event.spans.contains_key("task"), "{event:?}");
    }
    // The call's own events carry the same context.
    assert!(events.iter().any(|e| e.fields.get("message").is_some_and(|m| m == "dispatch")));
}
