// A function with lifetime parameters is rejected at its generics.

use std::borrow::Cow;

use offload::offload;

#[offload]
fn total<'a>(names: Vec<Cow<'a, str>>) -> usize {
    names.iter().map(|name| name.len()).sum()
}

fn main() {}
