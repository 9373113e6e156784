// A streamed item must own its data: a reference is rejected at the reference.

use offload::offload;

#[offload]
fn words() -> impl Iterator<Item = &'static str> {
    ["a", "b"].into_iter()
}

fn main() {}
