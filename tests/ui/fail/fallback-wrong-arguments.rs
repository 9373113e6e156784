// A fallback must take the offloaded function's argument types, in the same order: one
// error, at the path, and nothing else.

use offload::offload;

fn swapped(_name: String, _count: u32) -> u64 {
    0
}

#[offload(fallback = swapped)]
fn work(count: u32, name: String) -> u64 {
    u64::from(count) + name.len() as u64
}

fn main() {}
