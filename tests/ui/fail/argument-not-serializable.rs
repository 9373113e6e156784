// An argument type that serde cannot carry is reported once, at the type, with what
// offload needs.

use offload::offload;

struct Config {
    level: u32,
}

#[offload]
fn compress(data: Vec<u8>, config: Config) -> usize {
    data.len() * config.level as usize
}

fn main() {}
