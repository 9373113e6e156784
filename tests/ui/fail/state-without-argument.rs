// With `state`, the function takes the state as its first argument: one that takes none is
// an error on the builder's path.

use offload::offload;

fn load() -> u32 {
    7
}

#[offload(state = load)]
fn infer() -> u32 {
    1
}

fn main() {}
