// A workers value outside the grammar lists the accepted forms.

use offload::offload;

#[offload(workers = "cpus*2")]
fn work() {}

fn main() {}
