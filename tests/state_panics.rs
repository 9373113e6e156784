//! A state builder that panics is a start failure: the call gets `Error::Spawn` with the
//! panic's message, and the pool backs off as for any worker that fails to start.

use offload::{Error, offload};

struct Model(Vec<u8>);

fn no_model() -> Model {
    panic!("the model file is missing")
}

#[offload(workers = "1", timeout = "60s", state = no_model)]
fn infer(model: &Model, x: u8) -> usize {
    model.0.len() + x as usize
}

#[tokio::test]
async fn a_panicking_state_builder_is_a_spawn_error_with_its_message() {
    match infer(1).await {
        Err(Error::Spawn { source, .. }) => {
            let said = source.to_string();
            assert!(said.contains("the model file is missing"), "{said}");
            assert!(said.contains("the state of `state_panics::infer` could not be built"), "{said}");
        }
        other => panic!("a call whose state could not be built gave {other:?}"),
    }
    // Warming up reports the same failure.
    assert!(matches!(offload::warm_up().await, Err(Error::Spawn { .. })));
}
