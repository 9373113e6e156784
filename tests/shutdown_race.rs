//! Shutdown returns as soon as the last running call ends, with every worker reaped, however
//! it races a call that is releasing its worker or waiting for one that is still starting.
//! Shutdown is process-wide, so each round runs in a fresh process of this test binary.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offload::{Error, offload};

const ROLE: &str = "OFFLOAD_TEST_SHUTDOWN_ROUND";
const ROUNDS: usize = 8;

#[offload(pool = "racing", workers = "2", timeout = "60s", max_rss = "1GiB")]
fn nap(ms: u64, pid_file: Option<String>) -> u64 {
    if let Some(file) = pid_file {
        // Written aside and renamed, so that a reader sees the whole pid or nothing.
        let aside = format!("{file}.tmp");
        std::fs::write(&aside, std::process::id().to_string()).unwrap();
        std::fs::rename(&aside, file).unwrap();
    }
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// One round: warm workers, a few calls, then shutdown with ample grace while one 300 ms
/// call runs and another waits for a worker that is still starting (the idle one was
/// killed, so the call finds it dead and starts its replacement).
#[test]
#[ignore = "a helper process of `shutdown_is_prompt_and_complete_in_every_round`"]
fn shutdown_round() {
    if std::env::var_os(ROLE).is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        offload::warm_up().await.unwrap();
        for _ in 0..3 {
            nap(0, None).await.unwrap();
        }
        let workers: Vec<u32> = support::worker_children();
        let pid_file = std::env::temp_dir().join(format!("offload-shutdown-race-{}", std::process::id()));
        let running = tokio::spawn(nap(300, Some(pid_file.to_str().unwrap().to_owned())));
        // The worker writes its pid as the call starts.
        let read_pid = || std::fs::read_to_string(&pid_file).ok()?.parse::<u32>().ok();
        assert!(support::eventually_async(Duration::from_secs(20), || read_pid().is_some()).await);
        let busy = read_pid().unwrap();
        std::fs::remove_file(&pid_file).unwrap();
        let idle = *workers.iter().find(|&&pid| pid != busy).expect("two workers");
        support::kill9(idle);
        assert!(support::eventually_async(Duration::from_secs(10), || !support::alive(idle)).await);
        let late = tokio::spawn(nap(0, None));
        let started = Instant::now();
        tokio::task::yield_now().await;
        offload::shutdown(Duration::from_secs(5)).await;
        let took = started.elapsed();

        assert_eq!(running.await.unwrap().unwrap(), 300, "the running call finishes within grace");
        match late.await.unwrap() {
            Ok(_) | Err(Error::Shutdown { .. }) => {}
            Err(e) => panic!("a call racing shutdown got {e:?}, not Ok or Shutdown"),
        }
        assert!(matches!(nap(0, None).await, Err(Error::Shutdown { .. })));
        // 300 ms of call, then milliseconds: a generous margin for a loaded machine, far from
        // the grace period or a fixed wait.
        assert!(took < Duration::from_millis(1_500), "shutdown took {took:?}");
        assert!(support::worker_children().is_empty(), "workers left: {:?}", support::worker_children());
        assert!(workers.iter().all(|&pid| !support::alive(pid)));
    });
    println!("round ok");
}

#[test]
fn shutdown_is_prompt_and_complete_in_every_round() {
    for round in 0..ROUNDS {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "shutdown_round", "--ignored", "--nocapture", "--test-threads=1"])
            .env(ROLE, "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("round ok"),
            "round {round} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
