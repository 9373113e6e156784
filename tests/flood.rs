//! Whatever a worker sends, the caller's memory stays bounded: a flood of bulk frames before
//! the reply is refused once it passes `max_payload`, and stderr without a newline is forwarded
//! in pieces. Each flood runs in a fresh process of this test binary, which measures its own
//! peak memory (`VmHWM`) around the call.

use std::process::{Command, Stdio};

use offload::{Error, offload};

const ROLE: &str = "OFFLOAD_TEST_FLOOD";
/// How much each flood sends.
const FLOOD: usize = 400 << 20;
/// How far the caller's peak memory may rise during a flood: the 1 MiB payload limit, the
/// buffers a worker start needs, and room for the allocator; far below the flood's size.
const MAX_GROWTH_KIB: u64 = 16 << 10;

/// Sends `FLOOD` bytes in 1 MiB bulk frames, as a hostile worker might, then returns.
#[offload(pool = "flood-bulk", workers = "1", timeout = "60s", max_payload = "1MiB")]
fn bulk_flood() -> u32 {
    const PIECE: usize = 1 << 20;
    let mut frame = Vec::with_capacity(5 + PIECE);
    frame.extend_from_slice(&(PIECE as u32 + 1).to_le_bytes());
    frame.push(7); // the bulk frame's tag
    frame.resize(5 + PIECE, 0xab);
    for _ in 0..FLOOD / PIECE {
        offload::__private_v1::write_garbage_to_channel(&frame);
    }
    1
}

/// Writes `FLOOD` bytes to stderr without a newline, then returns.
#[offload(pool = "flood-stderr", workers = "1", timeout = "60s")]
fn stderr_flood() -> u32 {
    use std::io::Write;
    let piece = vec![b'x'; 1 << 20];
    let mut stderr = std::io::stderr().lock();
    for _ in 0..FLOOD / piece.len() {
        stderr.write_all(&piece).unwrap();
    }
    2
}

#[offload(pool = "flood-bulk", workers = "1", timeout = "60s", max_payload = "1MiB")]
fn bulk_after() -> u32 {
    3
}

#[offload(pool = "flood-stderr", workers = "1", timeout = "60s")]
fn stderr_after() -> u32 {
    4
}

fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
#[ignore = "a helper process of `a_flood_from_a_worker_leaves_the_callers_memory_bounded`"]
fn flood_round() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        offload::warm_up().await.unwrap();
        // Start from the memory the process uses now, not from its peak so far.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = peak_kib();
        match role.as_str() {
            "bulk" => {
                match bulk_flood().await {
                    Err(Error::Protocol { kind, .. }) => {
                        assert!(kind.to_string().contains("max_payload"), "{kind}")
                    }
                    other => panic!("a bulk flood got {other:?}, not Error::Protocol"),
                }
                assert_eq!(bulk_after().await.unwrap(), 3, "the pool recovers");
            }
            "stderr" => {
                assert_eq!(stderr_flood().await.unwrap(), 2);
                assert_eq!(stderr_after().await.unwrap(), 4);
            }
            other => panic!("unknown role {other}"),
        }
        let grew = peak_kib().saturating_sub(before);
        println!("peak grew by {grew} KiB");
        assert!(grew < MAX_GROWTH_KIB, "a {role} flood grew the caller's peak memory by {grew} KiB");
    });
    println!("round ok");
}

#[test]
fn a_flood_from_a_worker_leaves_the_callers_memory_bounded() {
    for role in ["bulk", "stderr"] {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "flood_round", "--ignored", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .stdin(Stdio::null())
            // The stderr flood is forwarded here: 400 MiB of it.
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("round ok"),
            "{role} flood failed ({}):\n{stdout}",
            output.status
        );
    }
}
