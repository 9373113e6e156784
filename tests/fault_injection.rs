//! Sustained concurrent load while workers are broken in every way the library knows:
//! outside SIGKILLs of busy workers, panics, aborts, infinite loops past the timeout, memory
//! bombs past the limit, garbage on the protocol channel, results over `max_payload`.
//!
//! Every call is answered with `Ok` or the error its fault calls for, the counts match the
//! pool's figures, the pool returns to full size, and after shutdown nothing is left: no
//! process, no descriptor, no shared-memory object. Shutdown is process-wide, so this binary
//! holds this one test.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use offload::{Error, ErrorKind, ExitReason, Payload, offload};

const CALLERS: u64 = 8;
const CALLS_PER_CALLER: u64 = 300;
const WORKERS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Fault {
    None,
    Panic,
    Abort,
    MemoryBomb,
    Garbage,
    HugeResult,
    /// Sleeps until the killer task sends it SIGKILL.
    Victim,
}

#[offload(pool = "chaos", workers = "2", memory = "512MiB", max_payload = "64KiB", timeout = "20s")]
fn work(fault: Fault, x: u64, victims: String) -> Vec<u8> {
    match fault {
        Fault::None => {}
        Fault::Panic => panic!("injected panic {x}"),
        Fault::Abort => std::process::abort(),
        Fault::MemoryBomb => {
            let bomb = vec![1u8; 2 << 30];
            std::hint::black_box(&bomb);
        }
        Fault::Garbage => offload::__private_v1::write_garbage_to_channel(&[0xff, 0xff, 0xff, 0x7f, 0x63]),
        Fault::HugeResult => return vec![7; 128 << 10],
        Fault::Victim => {
            std::fs::write(Path::new(&victims).join(std::process::id().to_string()), b"").unwrap();
            std::thread::sleep(Duration::from_secs(30));
        }
    }
    x.to_le_bytes().to_vec()
}

/// Loops forever; the pool's other function, with a short deadline.
#[offload(pool = "chaos", timeout = "300ms")]
fn spin(x: u64) -> u64 {
    let mut y = x;
    loop {
        y = std::hint::black_box(y.wrapping_mul(31).wrapping_add(1));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Work(Fault),
    Spin,
}

/// A deterministic mix: mostly good calls, about 1.5% of each fault.
fn plan(caller: u64, i: u64) -> Plan {
    let mut h = (caller << 32 | i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    match h % 200 {
        0..=2 => Plan::Work(Fault::Panic),
        3..=5 => Plan::Work(Fault::Abort),
        6..=8 => Plan::Work(Fault::MemoryBomb),
        9..=11 => Plan::Work(Fault::Garbage),
        12..=14 => Plan::Work(Fault::HugeResult),
        15..=17 => Plan::Work(Fault::Victim),
        18..=20 => Plan::Spin,
        _ => Plan::Work(Fault::None),
    }
}

/// Checks that `outcome` is what `plan` calls for; returns the error kind, if any.
fn check(plan: Plan, x: u64, outcome: Result<Vec<u8>, Error>) -> Option<ErrorKind> {
    let err = match outcome {
        Ok(bytes) => {
            assert_eq!(plan, Plan::Work(Fault::None), "only good calls succeed");
            assert_eq!(bytes, x.to_le_bytes());
            return None;
        }
        Err(err) => err,
    };
    let right = match plan {
        Plan::Work(Fault::None) => false,
        Plan::Work(Fault::Panic) => {
            matches!(&err, Error::Panicked { message, .. } if *message == format!("injected panic {x}"))
        }
        Plan::Work(Fault::Abort) => matches!(err, Error::Crashed { exit: ExitReason::Signal(6), .. }),
        Plan::Work(Fault::MemoryBomb) => {
            matches!(err, Error::MemoryLimit { limit, .. } if limit == 512 << 20)
        }
        Plan::Work(Fault::Garbage) => matches!(err, Error::Protocol { .. }),
        Plan::Work(Fault::HugeResult) => {
            matches!(err, Error::PayloadTooLarge { what: Payload::ReturnValue, max, .. } if max == 64 << 10)
        }
        Plan::Work(Fault::Victim) => matches!(err, Error::Crashed { exit: ExitReason::Signal(9), .. }),
        // Killed at its deadline, or out of time while it waited behind other spinners.
        Plan::Spin => matches!(err, Error::Timeout { .. }),
    };
    assert!(right, "{plan:?} ended with {err:?}");
    Some(err.kind())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn shm_objects() -> usize {
    std::fs::read_dir("/dev/shm").map_or(0, |d| d.count())
}

/// Sends SIGKILL to every worker that reports itself a victim, until told to stop.
async fn killer(dir: PathBuf, stop: Arc<AtomicBool>) -> u64 {
    let mut killed = 0;
    while !stop.load(Ordering::Relaxed) {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let pid: u32 = entry.file_name().to_str().unwrap().parse().unwrap();
            support::kill9(pid);
            std::fs::remove_file(entry.path()).unwrap();
            killed += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_answered_and_nothing_leaks() {
    let fds_before = open_fds();
    let shm_before = shm_objects();
    let victims = std::env::temp_dir().join(format!("offload-victims-{}", std::process::id()));
    std::fs::create_dir_all(&victims).unwrap();
    let started = Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn(killer(victims.clone(), Arc::clone(&stop)));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let victims = victims.to_str().unwrap().to_owned();
            tokio::spawn(async move {
                let mut tally: BTreeMap<Option<ErrorKind>, u64> = BTreeMap::new();
                for i in 0..CALLS_PER_CALLER {
                    let x = caller * 1_000_000 + i;
                    let plan = plan(caller, i);
                    let outcome = match plan {
                        Plan::Work(fault) => work(fault, x, victims.clone()).await,
                        Plan::Spin => spin(x).await.map(|v| v.to_le_bytes().to_vec()),
                    };
                    *tally.entry(check(plan, x, outcome)).or_default() += 1;
                }
                tally
            })
        })
        .collect();
    let mut tally: BTreeMap<Option<ErrorKind>, u64> = BTreeMap::new();
    for caller in callers {
        for (kind, n) in caller.await.expect("a caller panicked") {
            *tally.entry(kind).or_default() += n;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let killed = killer.await.unwrap();
    eprintln!(
        "{} calls in {:?}: {tally:?}; {killed} victims killed",
        CALLERS * CALLS_PER_CALLER,
        started.elapsed()
    );

    // The counts add up, and match the pool's own figures.
    let total: u64 = tally.values().sum();
    assert_eq!(total, CALLERS * CALLS_PER_CALLER);
    let stats = offload::stats();
    let pool = stats.iter().find(|s| s.name == "chaos").expect("the pool is listed");
    assert_eq!(pool.submitted, total);
    assert_eq!(pool.succeeded, tally.get(&None).copied().unwrap_or(0));
    assert_eq!(pool.cancelled, 0);
    for kind in ErrorKind::ALL {
        assert_eq!(pool.failed(kind), tally.get(&Some(kind)).copied().unwrap_or(0), "{kind:?}");
    }
    assert_eq!(pool.submitted, pool.succeeded + pool.failed_total());
    for kind in [ErrorKind::Panicked, ErrorKind::Crashed, ErrorKind::MemoryLimit, ErrorKind::Protocol] {
        assert!(pool.failed(kind) > 0, "no {kind:?} was injected: {tally:?}");
    }
    assert_eq!(u64::from(killed > 0), 1, "the killer killed nobody");

    // The pool returns to full size.
    offload::warm_up().await.expect("the pool starts again");
    let stats = offload::stats();
    let pool = stats.iter().find(|s| s.name == "chaos").unwrap();
    assert_eq!((pool.alive, pool.busy, pool.queued), (WORKERS, 0, 0));
    assert_eq!(support::worker_children().len(), WORKERS);

    // And after shutdown nothing is left behind.
    offload::shutdown(Duration::from_secs(1)).await;
    assert!(support::worker_children().is_empty(), "workers left: {:?}", support::worker_children());
    assert_eq!(open_fds(), fds_before, "descriptors were left open");
    assert_eq!(shm_objects(), shm_before, "shared-memory objects were left");
    std::fs::remove_dir_all(&victims).unwrap();
}
