// A streamed item type that serde cannot carry is reported at the item type, with what
// offload needs.

use offload::offload;

struct Line {
    text: String,
}

#[offload]
fn lines(text: String) -> impl Iterator<Item = Line> {
    text.lines().map(|l| Line { text: l.to_owned() }).collect::<Vec<_>>().into_iter()
}

fn main() {}
