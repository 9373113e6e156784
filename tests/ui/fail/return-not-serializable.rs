// A return type that serde cannot carry is reported once, at the type, with what offload
// needs.

use offload::offload;

struct Report {
    lines: usize,
}

#[offload]
fn summarise(text: String) -> Report {
    Report { lines: text.lines().count() }
}

fn main() {}
