// A `where` clause is rejected at the clause.

use offload::offload;

#[offload]
fn work(value: u32) -> u32
where
    u32: Copy,
{
    value
}

fn main() {}
