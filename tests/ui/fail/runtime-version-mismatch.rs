// A runtime from another release than the macro: its hidden API module has another version,
// so the expansion fails to compile on the import of that module, naming it, rather than
// misbehaving.
#![allow(unused_imports)]

mod older_offload {
    pub use offload::Error;
    #[doc(hidden)]
    pub mod __private_v0 {
        pub use offload::__private_v1::*;
    }
}

#[offload::offload(crate = "crate::older_offload")]
fn double(x: u32) -> u32 {
    x * 2
}

fn main() {}
