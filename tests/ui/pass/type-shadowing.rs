// The expansion names everything by absolute path: it must compile where prelude types,
// traits, variants, macros, primitive types and the `core`/`std` crates are shadowed.

#![allow(dead_code, non_camel_case_types, unused_macros)]

struct Result;
struct Option;
struct Box;
struct Vec;
struct String;
struct Ok;
struct Err;
struct Some;
struct None;
struct u8;
struct usize;
trait Send {}
trait Sized {}
trait From {}
trait Into {}
trait Iterator {}
trait Deserialize {}
trait Serialize {}
mod core {}
mod std {}
mod serde {}
mod linkme {}
mod offload {}
macro_rules! concat {
    () => {};
}
macro_rules! module_path {
    () => {};
}
macro_rules! panic {
    () => {};
}

#[::offload::offload]
fn shadowed(
    data: ::std::vec::Vec<::core::primitive::u8>,
    count: u32,
) -> ::core::result::Result<::std::vec::Vec<::core::primitive::u8>, ::std::string::String> {
    let _ = count;
    ::core::result::Result::Ok(data)
}

#[::offload::offload(timeout = "1s", workers = "2", pool = "shadowed")]
fn settings(value: u64) -> ::core::option::Option<u64> {
    ::core::option::Option::Some(value)
}

#[::offload::offload(workers = "cpus/2")]
fn nothing() {}

fn fallback(value: u64) -> ::core::option::Option<u64> {
    ::core::option::Option::Some(value)
}

async fn nothing_instead(_: (u64, u64)) {}

#[::offload::offload(breaker(failures = 2, reset = "1m"), fallback = fallback)]
fn with_fallback(value: u64) -> ::core::option::Option<u64> {
    ::core::option::Option::Some(value)
}

#[::offload::offload(breaker, fallback = nothing_instead)]
fn with_async_fallback((a, b): (u64, u64)) {
    let _ = a + b;
}

fn main() {}
