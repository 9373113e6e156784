// An `impl Trait` argument is rejected at the `impl Trait`.

use offload::offload;

#[offload]
fn work(text: impl Into<String>) -> usize {
    text.into().len()
}

fn main() {}
