// With `state`, the first argument is the worker's state: taken by value, it is an error on
// its type.

use offload::offload;

struct Model;

fn load() -> Model {
    Model
}

#[offload(state = load)]
fn infer(model: Model, x: u32) -> u32 {
    let _ = model;
    x
}

fn main() {}
