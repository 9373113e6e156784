// A generic function is rejected at its generics: the worker must know the concrete types.

use offload::offload;

#[offload]
fn work<T: Clone>(value: T) -> T {
    value.clone()
}

fn main() {}
