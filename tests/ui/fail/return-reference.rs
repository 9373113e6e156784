// A borrowed return type is rejected at the reference.

use offload::offload;

#[offload]
fn greeting() -> &'static str {
    "hello"
}

fn main() {}
