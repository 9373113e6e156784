//! A worker starts as a fresh Rust `main` would: SIGPIPE ignored, no stray inherited
//! descriptor, none of offload's tuning in its environment, no secret left readable in its
//! environment block, and a name an operator can read.

use std::os::fd::{AsRawFd, OwnedFd};

use offload::offload;

/// Writes to a pipe whose reader is gone; returns the error the write got.
#[offload(workers = "1", timeout = "30s")]
fn write_to_closed_pipe() -> String {
    use std::io::Write;
    let (reader, mut writer) = std::io::pipe().unwrap();
    drop(reader);
    match writer.write_all(b"nobody listens") {
        Ok(()) => "the write succeeded".into(),
        Err(e) => format!("{:?}", e.kind()),
    }
}

/// What descriptor `fd` names in the worker, if anything.
#[offload(workers = "1", timeout = "30s")]
fn descriptor_target(fd: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok().map(|p| p.display().to_string())
}

/// The worker's `comm`, its command line's first word, and `MALLOC_ARENA_MAX` as it sees it.
#[offload(pool = "named", workers = "1", timeout = "30s")]
fn identity() -> (String, String, Option<String>) {
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap().trim_end().to_owned();
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap();
    let arg0 = cmdline.split(|b| *b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap();
    (comm, arg0, std::env::var("MALLOC_ARENA_MAX").ok())
}

/// The worker's environment as the kernel shows it to other processes: `/proc/<pid>/environ`.
#[offload(workers = "1", timeout = "30s")]
fn environment_block() -> Vec<String> {
    let block = std::fs::read("/proc/self/environ").unwrap();
    block.split(|b| *b == 0).map(|entry| String::from_utf8_lossy(entry).into_owned()).collect()
}

#[tokio::test]
async fn the_workers_secret_is_not_left_in_its_environment_block() {
    let entries = environment_block().await.unwrap();
    assert!(entries.iter().any(|e| e.starts_with("PATH=") || e.starts_with("HOME=")), "{entries:?}");
    for entry in entries.iter().filter(|e| e.starts_with("OFFLOAD_WORKER=")) {
        let value = &entry["OFFLOAD_WORKER=".len()..];
        assert!(!value.bytes().any(|b| b.is_ascii_hexdigit()), "the secret is readable: {entry}");
    }
}

#[tokio::test]
async fn sigpipe_is_an_error_not_a_death() {
    let got = write_to_closed_pipe().await.expect("the worker survives the write");
    assert_eq!(got, "BrokenPipe");
}

#[tokio::test]
async fn inherited_descriptors_do_not_reach_the_worker() {
    // A descriptor the parent holds without close-on-exec, as careless code (or a C library)
    // leaves one. Held before the pool's first worker starts.
    let path = std::env::temp_dir().join(format!("offload-stray-{}", std::process::id()));
    std::fs::write(&path, b"stray").unwrap();
    let stray: OwnedFd =
        rustix::fs::open(&path, rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
    let fd = stray.as_raw_fd();
    assert!(
        rustix::io::fcntl_getfd(&stray).unwrap().is_empty(),
        "the test's descriptor must lack close-on-exec to prove anything"
    );
    let target = descriptor_target(fd).await.unwrap();
    drop(stray);
    std::fs::remove_file(&path).unwrap();
    assert_ne!(target.as_deref(), Some(path.to_str().unwrap()), "descriptor {fd} reached the worker");
}

#[tokio::test]
async fn the_worker_is_named_after_its_program_and_pool() {
    let (comm, arg0, arena) = identity().await.unwrap();
    let exe = std::env::current_exe().unwrap();
    let program = exe.file_name().unwrap().to_str().unwrap();
    assert_eq!(comm, &program[..program.len().min(15)]);
    let own_arg0 = std::env::args().next().unwrap();
    assert_eq!(arg0, format!("{own_arg0}: offload worker named"));
    assert_eq!(arena, std::env::var("MALLOC_ARENA_MAX").ok(), "offload's tuning leaked into the environment");
}
