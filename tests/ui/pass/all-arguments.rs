// Every argument, in every accepted form, expands to code that compiles.

#![allow(dead_code)]

use offload::offload;

#[offload(timeout = "500ms")]
fn millis() {}

#[offload(retries = 2, grace = "2s", spin_us = 0)]
fn retried() {}

fn build_table() -> Vec<u64> {
    vec![1, 2, 3]
}

#[offload(state = build_table, pool = "stateful")]
fn with_state(table: &Vec<u64>, index: usize) -> u64 {
    table[index]
}

#[offload(timeout = "1m 30s", workers = "4")]
fn fixed() {}

#[offload(timeout = "2h", workers = "cpus")]
fn cpus() {}

#[offload(timeout = "1500us", workers = "cpus-2")]
fn cpus_minus() {}

#[offload(workers = "cpus - 0")]
fn cpus_minus_zero() {}

#[offload(workers = " cpus / 2 ")]
fn cpus_div() {}

#[offload(pool = "shared", workers = "cpus/4")]
fn shared_a(value: u32) -> u32 {
    value
}

#[offload(pool = "shared")]
fn shared_b(value: u32) -> u32 {
    value
}

#[offload(timeout = "10s", workers = "3", pool = "all", crate = "::offload")]
fn everything(value: String) -> String {
    value
}

#[offload(crate = "offload", pool = "trailing comma",)]
fn trailing_comma() {}

#[offload(memory = "512MiB", queue = 64, overload = "reject", max_tasks = 1000, max_rss = "1GiB")]
fn limits() {}

#[offload(memory = "100 MB", queue = 0, overload = "wait", max_tasks = 1, max_rss = "64KiB")]
fn limit_edges() {}

#[offload(memory = "1TiB", max_rss = "4096B", max_tasks = 1_000_000, queue = 0x40)]
fn limit_spellings() {}

#[offload(breaker)]
fn breaker_defaults() {}

#[offload(breaker())]
fn breaker_empty() {}

#[offload(breaker(failures = 1))]
fn breaker_failures() {}

#[offload(breaker(reset = "1m 30s",), timeout = "1s")]
fn breaker_reset() {}

#[offload(breaker(reset = "250ms", failures = 4_294_967_295))]
fn breaker_edges() {}

fn fallback(value: u64) -> u64 {
    value
}

async fn fallback_later(value: u64) -> u64 {
    value
}

#[offload(fallback = fallback)]
fn sync_fallback(value: u64) -> u64 {
    value
}

#[offload(fallback = fallback_later, breaker(failures = 2, reset = "5s"))]
fn async_fallback(value: u64) -> u64 {
    value
}

#[offload(
    timeout = "10s",
    workers = "2",
    memory = "2GB",
    queue = 8,
    overload = "reject",
    max_tasks = 50,
    max_rss = "1KB",
    pool = "every argument",
    breaker(failures = 3, reset = "1m"),
    fallback = crate::fallback,
    crate = "::offload",
)]
fn every_argument(value: u64) -> u64 {
    value
}

fn main() {}
