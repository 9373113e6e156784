//! Procedural macros of [`offload`](https://docs.rs/offload). Depend on the `offload` crate
//! instead: it re-exports [`macro@offload`] together with the runtime its expansion needs.

#![warn(missing_docs, unreachable_pub)]

mod args;
mod ast;
mod expand;
mod paths;
mod recovery;
mod signature;

use proc_macro::TokenStream;

/// Runs a synchronous function in a worker process.
///
/// Put `#[offload]` on a plain, synchronous `fn`. It becomes an `async fn` of the same name,
/// visibility, docs and attributes, that sends the arguments to a worker process, runs the
/// body there, and returns what it returned as `Result<R, offload::Error>` (`R` is the
/// function's return type, `()` if it has none). A panic, a crash or a timeout in the worker
/// is an `Err` for the caller, never a panic or an abort of the caller's process.
///
/// A function that returns `impl Iterator<Item = T>` streams instead: it becomes a plain
/// `fn` that returns `offload::Streamed<T>`, a `Stream` of `Result<T, offload::Error>` whose
/// items arrive as the worker's iterator yields them (it cannot have `fallback` or
/// `retries`). Any offloaded function can also run over many inputs in batches with
/// `offload::map`.
///
/// ```ignore
/// use offload::offload;
///
/// /// Hashes `data`: CPU-bound, so it runs in a worker process.
/// #[offload(timeout = "10s")]
/// pub fn digest(data: Vec<u8>, rounds: u32) -> [u8; 32] {
///     let mut hash = [0; 32];
///     for _ in 0..rounds {
///         for (i, byte) in data.iter().enumerate() {
///             hash[i % 32] ^= byte.rotate_left(i as u32);
///         }
///     }
///     hash
/// }
///
/// async fn caller() -> Result<(), offload::Error> {
///     let hash: [u8; 32] = digest(b"hello".to_vec(), 1000).await?;
///     Ok(())
/// }
/// ```
///
/// # Arguments
///
/// All arguments are optional and checked at compile time: a mistake is a compile error
/// pointing at the value. Values are string literals, except `queue`, `max_tasks` and
/// `breaker`'s `failures`, which are integer literals, `breaker`, which is a list, and
/// `fallback`, which is a path. The same grammar applies to the `OFFLOAD_*` environment
/// variables that override these settings when a pool starts.
///
/// | argument | grammar | default | meaning |
/// |---|---|---|---|
/// | `timeout` | a [humantime](https://docs.rs/humantime) duration: `"500ms"`, `"30s"`, `"1m 30s"`, `"2h"`; greater than zero, rounded up to whole milliseconds | `"30s"` | how long a call may take, waiting for a worker included; past it the worker is killed (with `grace`, told to stop first) and the call fails with a timeout error |
/// | `workers` | `"4"` (at least 1), `"cpus"`, `"cpus-N"`, `"cpus/N"` (`N` at least 1); spaces around `-` and `/` allowed | `"cpus-2"` | how many worker processes serve the pool; a count computed from the cores available when the pool starts, never below 1 |
/// | `memory` | a size: a whole number and a unit, `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000): `"512MiB"`, `"2GiB"`, `"100MB"`; greater than zero | no limit | `RLIMIT_AS` of each worker: it bounds the worker's whole address space, the binary and its libraries included, not only what the function allocates; a call that runs past it fails and the worker is replaced |
/// | `queue` | an integer: `64`; `0` allowed | unbounded | how many calls may wait for a worker beyond those running; `0`: none waits |
/// | `overload` | `"wait"` or `"reject"` | `"wait"` | what a call does when the queue is full: wait for room (backpressure), or fail at once with `Error::Overloaded` (load shedding) |
/// | `max_tasks` | an integer: `1000`; at least 1 | none | replace a worker after it has run this many calls |
/// | `max_rss` | a size, as `memory`: `"1GiB"` | none | replace a worker after a call that left its resident memory above this |
/// | `max_payload` | a size, as `memory`: `"256MiB"` | `"1GiB"` | the largest encoded arguments or return value; over it a call fails with `Error::PayloadTooLarge` before anything is copied |
/// | `grace` | a duration, as `timeout`: `"2s"` | none: killed at once | when a call is cancelled (its deadline passed, or its future was dropped), its worker is told (`offload::cancelled()` turns true, `offload::checkpoint()` returns `Err(Cancelled)`) and killed only if it has not returned within this period; a worker that returns in time serves the next call. The caller gets its error at the deadline, not after the grace period |
/// | `spin_us` | an integer, in microseconds: `50`; `0` allowed | `50` | how long a worker that has answered polls for its next call (yielding the CPU between polls) before it sleeps: under load the next call often comes within microseconds, and waking a sleeping CPU costs tens of them on a VM. `0` sleeps at once; on a machine with one CPU the worker never polls |
/// | `retries` | an integer: `2`; `0` allowed | none | run a call whose worker died (`Error::Crashed`, `Error::MemoryLimit`) again on a fresh worker, up to this many more times, within the call's deadline; a panic or a timeout is never retried; the final error lists the earlier attempts in `earlier_attempts`; only for functions that are safe to run more than once |
/// | `pool` | a name: `"images"` | a pool per function | share a pool of workers with every function that names the same pool |
/// | `breaker` | `breaker(failures = N, reset = "...")`: `failures` an integer, at least 1, `reset` a duration, as `timeout`; either may be left out (`failures = 5`, `reset = "30s"`), as may the parentheses: `breaker` alone takes both defaults | no breaker | a circuit breaker for this function: after `failures` worker-side failures in a row (the timeout of a running call, a panic, a crash, the memory limit), it opens, and calls fail at once with `Error::CircuitOpen`, without a worker; after `reset`, one trial call goes through (half-open), and the breaker closes if it succeeds |
/// | `fallback` | a path to a function, not a string: `fallback = cached_digest`, `fallback = Cache::get` | none | a sync or async fn with the same argument types, in the same order, and the same return type as this one, called in the caller's process with the same arguments when the breaker is open or the call failed worker-side; what it returns is returned (as `Ok`) instead of the error. It runs on the caller's async runtime, so keep it cheap: a sync fallback blocks that thread while it runs; an async fallback's future is part of the function's, which is `Send` only if it is |
/// | `state` | a path to a function, not a string: `state = load_model` | none | a `fn() -> T` that each worker of the pool calls once, when it starts and before its first call; the function then takes `&T` as its first argument, which the async stub does not have (`fn infer(model: &Model, input: Vec<f32>)` is called as `infer(input).await`). A builder that panics makes the worker fail to start: calls get `Error::Spawn` with the panic's message |
/// | `crate` | a path: `"my_crate::offload"` | `"::offload"` | where the `offload` crate is, for code that re-exports it |
///
/// `workers`, `memory`, `queue`, `overload`, `max_tasks`, `max_rss`, `max_payload`, `grace` and `spin_us` belong to the pool: in
/// a shared pool, give each on one function only, or the same value on several; functions
/// that disagree make calls to that pool fail with `Error::Config`. `timeout`, `retries`,
/// `state`, `breaker` and `fallback` belong to the function.
///
/// ```ignore
/// #[offload(timeout = "2m", workers = "cpus/2", pool = "images", memory = "1GiB", queue = 64,
///           overload = "reject", max_tasks = 1000, max_rss = "512MiB",
///           breaker(failures = 3, reset = "1m"), fallback = placeholder)]
/// fn thumbnail(image: Vec<u8>, width: u32) -> Vec<u8> {
///     # unimplemented!()
/// }
///
/// /// Stands in for `thumbnail` when its workers keep failing: cheap, in-process.
/// fn placeholder(image: Vec<u8>, width: u32) -> Vec<u8> {
///     # unimplemented!()
/// }
/// ```
///
/// Errors that say nothing about the function (a timeout while the call still waited for a
/// worker, a full queue with `overload = "reject"`, a pool that is shut down or
/// misconfigured, a worker that could not be started) neither count for the breaker nor call
/// the fallback: they are returned as they are.
///
/// # Requirements
///
/// The function runs in another process, so:
///
/// - It is a plain synchronous `fn`: not `async`, `const`, `unsafe` or `extern`, with no
///   `self` receiver, no generic or lifetime parameters and no `where` clause.
/// - Arguments are taken by value (no `&T`, `&mut T` or `'_`, anywhere in the type) and have
///   concrete types (no `impl Trait`). So does the return type, but for
///   `impl Iterator<Item = T>`, whose items `T` are sent one by one. Any irrefutable pattern works: `(a, b): (u32, u32)`,
///   `mut buf: Vec<u8>`.
/// - Every argument type and the return type is `Serialize + DeserializeOwned + Send +
///   'static`: derive `serde::Serialize` and `serde::Deserialize` for your own types. A
///   type that is not is a compile error at the type, saying what offload needs.
/// - A `Vec<u8>` argument or return type (written `Vec<u8>`, `std::vec::Vec<u8>`, ...) is
///   sent as one byte string rather than element by element, which is several times faster;
///   from 64 KiB on, it is written straight from the vector and read straight into the
///   receiving side's vector, with no copy in between.
///   This applies to the whole argument or return type only: a `Vec<u8>` nested in another
///   type (`Option<Vec<u8>>`, a struct field) goes element by element, unless you mark it
///   with [`serde_bytes`](https://docs.rs/serde_bytes) yourself. The macro goes by the
///   written type: a type of your own named `Vec` would be taken for the standard one.
/// - In an `impl` block it can be an associated function (without `self`), but neither its
///   signature nor its body can use `Self`: write the type's name.
/// - The body must not call the function by its own name: that name is the async function
///   now.
///
/// # How it works
///
/// `#[offload] pub fn digest(data: Vec<u8>, rounds: u32) -> [u8; 32] { ... }` expands to
/// code equivalent to this (abridged; `__private_v1` is not public API):
///
/// ```ignore
/// pub async fn digest(data: Vec<u8>, rounds: u32)
///     -> ::core::result::Result<[u8; 32], ::offload::Error>
/// {
///     // The body, unchanged.
///     fn __offload_impl_digest(data: Vec<u8>, rounds: u32) -> [u8; 32] { ... }
///
///     // Runs in the worker: decode the arguments, call the body, encode the result.
///     fn __offload_invoke(input: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
///         let (data, rounds): (ByteBuf, u32) = ::offload::__private_v1::decode_args(input)?;
///         let ret = __offload_impl_digest(data.into_vec(), rounds);
///         ::offload::__private_v1::encode_return(&ret, out)
///     }
///
///     // Registered at link time under a name that is the same in every process: the
///     // path, a hash of the signature, and where `digest` is written in the source.
///     #[distributed_slice(::offload::__private_v1::ENTRIES)]
///     static __OFFLOAD_ENTRY: Entry = Entry::new(
///         concat!(module_path!(), "::digest#<hash of the signature>@", line!(), ":", column!()),
///         concat!(module_path!(), "::digest"),
///         __offload_invoke,
///     )
///     .with_timeout_ms(10_000);
///
///     // Runs in the caller: send the arguments to a worker of the pool, await the result.
///     // The arguments are moved into the call (large ones are encoded on a blocking thread).
///     ::offload::__private_v1::call::<_, [u8; 32]>(&__OFFLOAD_ENTRY, __OffloadArgs(data, rounds))
///         .await
/// }
/// ```
///
/// With `fallback = placeholder`, the stub's last expression becomes:
///
/// ```ignore
///     match ::offload::__private_v1::call_keeping_args::<_, Vec<u8>>(&__OFFLOAD_ENTRY, __OffloadArgs(image, width))
///         .await
///     {
///         Ok(value) => Ok(value),
///         // The call gives the arguments back with the error: they move into the fallback.
///         Err((error, Some(__OffloadArgs(image, width)))) if error.should_fall_back() => {
///             Ok(placeholder(image, width))
///         }
///         Err((error, _)) => Err(error),
///     }
/// ```
///
/// The real expansion serialises the arguments and the result through small hand-written
/// serde impls that assert, type by type, that each can cross the process boundary, so that
/// a type that cannot is reported once, at the type.
///
/// # Compile errors
///
/// Each mistake is one error, spanned on what is wrong: an unknown, misspelt or duplicate
/// argument, a value that is not the kind of literal the argument takes or does not parse, a
/// function that is `async`, `const`, `unsafe`, `extern` or generic, takes `self`, a
/// reference or `impl Trait`, or uses `Self`, an argument or return type that cannot be
/// sent, and a `fallback` whose arguments or return type are not the function's. All of them
/// are reported at once. When only the attribute's arguments are wrong, the function is still expanded with
/// the defaults, so its callers compile; when the function itself cannot be offloaded, it is
/// left as written. The body is not parsed: a syntax error in it is the compiler's own error,
/// once, as without the attribute, and the function is still expanded.
#[proc_macro_attribute]
pub fn offload(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::offload(args.into(), item.into()).into()
}

/// Collects errors so that all of them are reported at once.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn finish(self) -> Option<syn::Error> {
        self.0
    }
}

impl Extend<syn::Error> for Errors {
    fn extend<I: IntoIterator<Item = syn::Error>>(&mut self, errors: I) {
        for error in errors {
            self.push(error);
        }
    }
}
