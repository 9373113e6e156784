//! A panic in the offloaded function is reported with its message and location, and the
//! worker that caught it goes on serving.

use offload::{Error, offload};

#[offload(timeout = "20s", workers = "1")]
fn checked(x: i32) -> (u32, i32) {
    if x < 0 {
        panic!("negative input: {x}");
    }
    (std::process::id(), x * 2)
}

#[offload(timeout = "20s", workers = "1")]
fn panics_with_a_non_string() -> u8 {
    std::panic::panic_any(42u32)
}

#[tokio::test]
async fn panic_is_reported_and_the_worker_lives_on() {
    let (pid, value) = checked(4).await.unwrap();
    assert_eq!(value, 8);

    let err = checked(-3).await.unwrap_err();
    let Error::Panicked { entry, pid: panicked_in, message, location } = &err else {
        panic!("expected a panic, got {err:?}")
    };
    assert_eq!(*entry, "panic::checked");
    assert_eq!(*panicked_in, pid);
    assert_eq!(message, "negative input: -3");
    let location = location.as_deref().expect("a location");
    assert!(location.starts_with("tests/panic.rs:"), "{location}");
    assert!(err.to_string().contains("negative input: -3"), "{err}");

    let (same_pid, value) = checked(5).await.unwrap();
    assert_eq!(value, 10);
    assert_eq!(same_pid, pid, "the worker that panicked serves the next call");
}

#[tokio::test]
async fn non_string_payload() {
    let err = panics_with_a_non_string().await.unwrap_err();
    assert!(matches!(&err, Error::Panicked { message, .. } if message == "Box<dyn Any>"), "{err:?}");
}
