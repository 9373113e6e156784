// `Self` in the signature of an associated function is rejected at `Self`: the body moves
// into a function of its own, where `Self` means nothing.

use offload::offload;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Point {
    x: f64,
    y: f64,
}

impl Point {
    #[offload]
    fn origin() -> Self {
        Point { x: 0.0, y: 0.0 }
    }
}

fn main() {}
