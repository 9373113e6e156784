// `crate = "..."` points the expansion at a re-export of `offload`, for crates that wrap it
// and whose users do not depend on `offload` themselves.

#![allow(dead_code)]

mod runtime {
    pub use ::offload as engine;
}

#[runtime::engine::offload(crate = "crate::runtime::engine")]
fn through_reexport(value: u32) -> u32 {
    value + 1
}

#[runtime::engine::offload(crate = "::offload", timeout = "1s")]
fn explicit_default(data: Vec<u8>) -> Vec<u8> {
    data
}

async fn callers() {
    let _: Result<u32, offload::Error> = through_reexport(1).await;
    let _: Result<Vec<u8>, offload::Error> = explicit_default(vec![]).await;
}

fn main() {}
