//! Dropping the future of a call removes it from the queue without running it, or kills the
//! worker that runs it, so abandoned work stops burning CPU.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use offload::offload;

/// Appends `tag` to the file at `log`, then sleeps `ms` milliseconds.
#[offload(pool = "cancel", workers = "1", timeout = "60s")]
fn record(log: String, tag: String, ms: u64) -> u32 {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    writeln!(file, "{tag} {}", std::process::id()).unwrap();
    drop(file);
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("offload-cancel-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(log: &PathBuf) -> Vec<String> {
    std::fs::read_to_string(log).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_calls_are_removed_from_the_queue_or_killed() {
    let dir = scratch("both");
    let log = dir.join("log");
    let path = || log.to_str().unwrap().to_owned();

    // A call that runs long on the pool's only worker; dropped once it has started.
    let running = tokio::spawn(record(path(), "running".into(), 30_000));
    assert!(support::eventually_async(Duration::from_secs(20), || !lines(&log).is_empty()).await);
    let pid: u32 = lines(&log)[0].split(' ').nth(1).unwrap().parse().unwrap();

    // A call queued behind it, abandoned by its caller's own timeout.
    let queued = tokio::time::timeout(Duration::from_millis(200), record(path(), "queued".into(), 0)).await;
    assert!(queued.is_err(), "the queued call cannot have finished");

    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert!(
        support::eventually_async(Duration::from_secs(10), || !support::alive(pid)).await,
        "the worker of the dropped running call is still alive"
    );

    // The pool works, and the abandoned queued call never ran.
    let after = record(path(), "after".into(), 0).await.unwrap();
    assert_ne!(after, pid);
    let tags: Vec<String> = lines(&log).iter().map(|l| l.split(' ').next().unwrap().to_owned()).collect();
    assert_eq!(tags, ["running", "after"], "log: {:?}", lines(&log));
    std::fs::remove_dir_all(&dir).unwrap();
}
