// An argument that borrows through a lifetime (`'_`) is rejected at the lifetime.

use offload::offload;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Borrowed<'a> {
    name: &'a str,
}

#[offload]
fn name_len(value: Borrowed<'_>) -> usize {
    value.name.len()
}

fn main() {}
