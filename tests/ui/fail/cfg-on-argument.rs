// `#[cfg]` on an argument is rejected: the stub and the worker must agree on the arguments.

use offload::offload;

#[offload]
fn work(#[cfg(unix)] value: u32) -> u32 {
    value
}

fn main() {}
