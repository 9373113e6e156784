// An `async fn` is rejected at the `async` keyword: the macro is what makes it async.

use offload::offload;

#[offload]
async fn work() {}

fn main() {}
