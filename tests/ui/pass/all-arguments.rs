// Every argument, in every accepted form, expands to code that compiles.

#![allow(dead_code)]

use offload::offload;

#[offload(timeout = "500ms")]
fn millis() {}

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

#[offload(crate = "offload", pool = "trailing comma")]
fn trailing_comma() {}

fn main() {}
