// A fallback must return the offloaded function's return type, be it sync or async: one
// error, at the path, and nothing else.

use offload::offload;

mod cache {
    pub async fn cached(_count: u32) -> u32 {
        0
    }
}

#[offload(fallback = cache::cached)]
fn work(count: u32) -> u64 {
    u64::from(count)
}

fn main() {}
