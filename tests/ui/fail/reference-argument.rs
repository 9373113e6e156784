// A borrowed argument is rejected at its type: arguments are sent to another process.

use offload::offload;

#[offload]
fn count_words(text: &str) -> usize {
    text.split_whitespace().count()
}

fn main() {}
