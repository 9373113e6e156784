// An inner attribute of the body applies to the body, as without the attribute: the body is
// kept as written, so `#![allow(..)]` is not moved in front of the async stub, where it
// would be an error.

#![deny(warnings)]

use offload::offload;

#[offload]
fn answer() -> u32 {
    #![allow(unused_variables)]
    let unused = 1;
    42
}

fn main() {
    let _ = answer();
}
