// `fallback = path` takes a sync or an async fn with the offloaded function's argument and
// return types, wherever it is and however the path is written, next to `breaker(...)`.
// When the call fails in the worker, or the breaker is open, the stub returns what the
// fallback returns instead of the error. Warnings are errors here: the expansion must not
// cause any.

#![deny(warnings, rust_2018_idioms)]

use offload::offload;

fn zero(_count: u32, _name: String) -> u64 {
    0
}

async fn zero_later(_count: u32, _name: String) -> u64 {
    0
}

mod cache {
    pub(crate) fn same(data: Vec<u8>) -> Vec<u8> {
        data
    }

    pub(crate) struct Cache;

    impl Cache {
        pub(crate) async fn seven() -> u32 {
            7
        }
    }

    pub(crate) fn pair((a, b): (u32, u32)) -> u32 {
        a + b
    }
}

#[offload(fallback = zero)]
fn length(count: u32, name: String) -> u64 {
    u64::from(count) * name.len() as u64
}

#[offload(fallback = zero_later, breaker)]
fn length_later(count: u32, name: String) -> u64 {
    u64::from(count) * name.len() as u64
}

#[offload(fallback = cache::same, breaker(failures = 1))]
fn reverse(mut data: Vec<u8>) -> Vec<u8> {
    data.reverse();
    data
}

#[offload(fallback = cache::Cache::seven, breaker(reset = "1s"))]
fn seven() -> u32 {
    7
}

#[offload(fallback = crate::cache::pair, timeout = "1s")]
fn pair((a, b): (u32, u32)) -> u32 {
    a * b
}

#[offload(fallback = std::mem::drop::<u8>, breaker())]
fn unit(_value: u8) {}

// Called below: the body panics, so every call falls back; the first opens the breaker, and
// the second is refused without a worker and falls back too.
#[offload(fallback = zero, breaker(failures = 1, reset = "1h"))]
fn panics(_count: u32, _name: String) -> u64 {
    panic!("falls back")
}

#[offload(fallback = zero_later)]
fn panics_later(_count: u32, _name: String) -> u64 {
    panic!("falls back")
}

// The stubs have the documented types; not called.
async fn callers() {
    let _: Result<u64, offload::Error> = length(1, String::new()).await;
    let _: Result<u64, offload::Error> = length_later(1, String::new()).await;
    let _: Result<Vec<u8>, offload::Error> = reverse(vec![1]).await;
    let _: Result<u32, offload::Error> = seven().await;
    let _: Result<u32, offload::Error> = pair((1, 2)).await;
    let _: Result<(), offload::Error> = unit(1).await;
}

fn main() {
    let _ = callers;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        assert_eq!(panics(1, "a".to_owned()).await.unwrap(), 0);
        assert_eq!(panics(1, "a".to_owned()).await.unwrap(), 0);
        assert_eq!(panics_later(1, "a".to_owned()).await.unwrap(), 0);
    });
}
