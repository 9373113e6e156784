//! Types postcard cannot carry fail with a clear error, never with garbage.

use offload::{Error, ProtocolError, offload};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Inner {
    b: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Flattened {
    a: u32,
    #[serde(flatten)]
    inner: Inner,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Untagged {
    Number(u32),
    Text(String),
}

#[offload(timeout = "20s", workers = "1")]
fn take_flattened(value: Flattened) -> u32 {
    value.a + value.inner.b
}

#[offload(timeout = "20s", workers = "1")]
fn take_untagged(value: Untagged) -> u32 {
    match value {
        Untagged::Number(n) => n,
        Untagged::Text(t) => t.len() as u32,
    }
}

#[offload(timeout = "20s", workers = "1")]
fn give_untagged() -> Untagged {
    Untagged::Number(5)
}

fn assert_protocol_error(err: Error) {
    assert!(
        matches!(
            err,
            Error::Protocol { kind: ProtocolError::Encode { .. } | ProtocolError::Decode { .. }, .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn flatten_is_refused() {
    assert_protocol_error(take_flattened(Flattened { a: 1, inner: Inner { b: 2 } }).await.unwrap_err());
}

#[tokio::test]
async fn untagged_is_refused_both_ways() {
    assert_protocol_error(take_untagged(Untagged::Number(3)).await.unwrap_err());
    assert_protocol_error(give_untagged().await.unwrap_err());
    // The worker survived the bad payloads.
    assert_protocol_error(take_untagged(Untagged::Text("x".into())).await.unwrap_err());
}
