//! A worker never starts workers: an offloaded function that calls another offloaded function
//! gets an error instead of a process tree that grows without bound.

use offload::{Error, offload};

#[offload(timeout = "20s", workers = "1")]
fn inner(x: u32) -> u32 {
    x + 1
}

#[offload(timeout = "20s", workers = "1")]
fn outer(x: u32) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match runtime.block_on(inner(x)) {
        Ok(v) => format!("nested call ran and returned {v}"),
        Err(e @ Error::Spawn { .. }) => format!("refused: {e}"),
        Err(e) => format!("unexpected error: {e:?}"),
    }
}

#[tokio::test]
async fn nested_call_is_refused_inside_a_worker() {
    let answer = outer(1).await.unwrap();
    assert!(answer.starts_with("refused: "), "{answer}");
    assert!(answer.contains("cannot start workers of its own"), "{answer}");
    // The same function still works from the parent.
    assert_eq!(inner(1).await.unwrap(), 2);
}
