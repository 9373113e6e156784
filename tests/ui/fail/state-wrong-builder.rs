// A state builder takes nothing and returns the state: one of another signature is an error
// on its path.

use offload::offload;

struct Model;

fn load(path: String) -> Model {
    let _ = path;
    Model
}

#[offload(state = load)]
fn infer(model: &Model, x: u32) -> u32 {
    let _ = model;
    x
}

fn main() {}
