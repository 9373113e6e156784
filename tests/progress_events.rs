//! Each progress report is also a `tracing` event in the call's span. One test only, as in
//! `logs.rs`: `tracing` caches callsite interest globally.

#[path = "support/capture.rs"]
mod capture;

use offload::offload;

#[offload(workers = "1", timeout = "30s")]
fn halves() -> u32 {
    offload::progress(1, 2);
    std::thread::sleep(std::time::Duration::from_millis(30));
    offload::progress(2, 2);
    std::process::id()
}

#[test]
fn progress_is_a_tracing_event_in_the_calls_span() {
    let capture = capture::Capture::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pid = tracing::subscriber::with_default(capture.clone(), || runtime.block_on(halves())).unwrap();
    let events = capture.events();
    let progress: Vec<_> =
        events.iter().filter(|e| e.fields.get("message").is_some_and(|m| m == "offload progress")).collect();
    let done: Vec<&str> = progress.iter().map(|e| e.fields["done"].as_str()).collect();
    assert_eq!(done, ["1", "2"], "{events:#?}");
    for event in &progress {
        assert_eq!(event.target, "offload::call");
        assert_eq!(event.fields["total"], "2");
        assert_eq!(event.spans["entry"], "progress_events::halves");
        assert_eq!(event.spans["pid"], pid.to_string());
    }
}
