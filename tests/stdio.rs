//! What the offloaded function prints or reads does not touch the protocol.

use std::io::{Read, Write};

use offload::offload;

#[offload(timeout = "20s", workers = "1")]
fn chatty(n: u32) -> u32 {
    for i in 0..n {
        println!("chatty line {i} with some text that looks like a frame: \x00\x00\x00\x05\x03");
        if i < 3 {
            eprintln!("chatty stderr line {i}");
        }
    }
    print!("no newline at the end");
    std::io::stdout().flush().unwrap();
    n * 3
}

#[offload(timeout = "20s", workers = "1")]
fn reads_stdin() -> (usize, u32) {
    let mut input = Vec::new();
    let read = std::io::stdin().read_to_end(&mut input).unwrap();
    (read, 7)
}

#[tokio::test]
async fn printing_does_not_corrupt_results() {
    for n in [0, 1, 100, 2000] {
        assert_eq!(chatty(n).await.unwrap(), n * 3);
    }
}

#[tokio::test]
async fn stdin_is_empty_not_the_channel() {
    assert_eq!(reads_stdin().await.unwrap(), (0, 7));
}
