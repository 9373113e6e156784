// A reference inside an argument type is rejected at the reference.

use offload::offload;

#[offload]
fn total(words: Vec<&'static str>) -> usize {
    words.len()
}

fn main() {}
