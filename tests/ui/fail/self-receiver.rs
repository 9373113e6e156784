// A method is rejected at its `self` receiver: `self` cannot be sent to the worker.

use offload::offload;

struct Counter {
    count: u32,
}

impl Counter {
    #[offload]
    fn count(&self) -> u32 {
        self.count
    }
}

fn main() {}
