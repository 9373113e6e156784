//! Functions naming the same pool share its workers; conflicting settings are an error.

use offload::{Error, offload};

#[offload(pool = "shared", workers = "1", timeout = "20s")]
fn shared_a() -> u32 {
    std::process::id()
}

#[offload(pool = "shared", timeout = "20s")]
fn shared_b() -> u32 {
    std::process::id()
}

#[offload(pool = "conflicted", workers = "1")]
fn conflicted_a() -> u32 {
    1
}

#[offload(pool = "conflicted", workers = "2")]
fn conflicted_b() -> u32 {
    2
}

#[tokio::test]
async fn a_named_pool_is_shared() {
    let a = shared_a().await.unwrap();
    let b = shared_b().await.unwrap();
    assert_eq!(a, b, "one worker serves both functions");
}

#[tokio::test]
async fn conflicting_settings_are_a_clear_error() {
    for err in [conflicted_a().await.unwrap_err(), conflicted_b().await.map(|_| ()).unwrap_err()] {
        let Error::Config { message, .. } = &err else { panic!("expected a config error, got {err:?}") };
        assert!(message.contains("pool `conflicted` has conflicting settings"), "{message}");
        assert!(message.contains("workers = \"1\"") && message.contains("workers = \"2\""), "{message}");
    }
}
