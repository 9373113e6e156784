//! Workers die with their parent, even when the parent is killed with SIGKILL and has no
//! chance to clean up.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use offload::offload;

const PARENT_ROLE: &str = "OFFLOAD_TEST_ORPHAN_PARENT";

#[offload(timeout = "120s", workers = "2")]
fn linger(seconds: u64) -> u32 {
    std::thread::sleep(Duration::from_secs(seconds));
    std::process::id()
}

/// The parent to be killed: starts both workers, keeps one busy, reports their pids.
#[test]
#[ignore = "a helper process of `parent_killed_with_sigkill_leaves_no_worker`"]
fn orphan_parent() {
    if std::env::var_os(PARENT_ROLE).is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        let idle = linger(0).await.unwrap();
        let busy = tokio::spawn(linger(100));
        assert!(support::eventually(Duration::from_secs(30), || support::worker_children().len() == 2));
        let pids = support::worker_children();
        assert!(pids.contains(&idle));
        println!("workers: {}", pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
        let _ = busy.await;
    });
}

#[test]
fn parent_killed_with_sigkill_leaves_no_worker() {
    let mut parent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_parent", "--ignored", "--nocapture", "--test-threads=1"])
        .env(PARENT_ROLE, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = parent.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness may have printed "test orphan_parent ... " on the same line.
            if let Some((_, pids)) = line.split_once("workers: ") {
                let pids: Vec<u32> = pids.split(' ').map(|p| p.parse().unwrap()).collect();
                let _ = tx.send(pids);
            }
        }
    });
    let workers = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(pids) => pids,
        Err(e) => {
            let _ = parent.kill();
            let _ = parent.wait();
            panic!("the parent never reported its workers: {e}");
        }
    };
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|&pid| support::alive(pid)));

    support::kill9(parent.id());
    parent.wait().unwrap();

    assert!(
        support::eventually(Duration::from_secs(20), || workers.iter().all(|&pid| !support::alive(pid))),
        "workers outlived their SIGKILLed parent: {:?}",
        workers.iter().filter(|&&pid| support::alive(pid)).collect::<Vec<_>>()
    );
}

/// Terminal signals (Ctrl-C sends SIGINT to the foreground process group) reach the parent
/// only: the workers have a process group of their own.
#[tokio::test]
async fn workers_are_not_in_the_parents_process_group() {
    let pid = linger(0).await.unwrap();
    let group = |pid| rustix::process::getpgid(rustix::process::Pid::from_raw(pid as i32)).unwrap();
    assert_ne!(group(pid), group(std::process::id()));
}
