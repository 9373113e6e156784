// The signatures `#[offload]` accepts, and the types its stubs have: no arguments,
// patterns, `mut`, `Vec<u8>` in and out, `Result` and unit returns, visibilities, docs and
// other attributes, and functions in an `impl` block. Warnings are errors here: the
// expansion must not cause any.

#![deny(warnings, rust_2018_idioms, unused_qualifications, missing_docs)]
//! Offloaded functions of many shapes.

use offload::offload;
use serde::{Deserialize, Serialize};

/// Takes nothing, returns nothing.
#[offload]
pub fn nothing() {}

/// Returns `()` explicitly.
#[offload]
#[allow(clippy::unused_unit)]
pub fn unit(_: u8) -> () {}

/// Patterns and `mut` bindings.
#[offload]
pub fn add((a, b): (u32, u32), mut c: u64) -> u64 {
    c += u64::from(a) + u64::from(b);
    c
}

/// Bytes in and out, as one byte string each, however `Vec` is spelled.
#[offload(timeout = "5s")]
#[allow(unused_qualifications)]
pub fn reverse(mut data: Vec<u8>, tail: std::vec::Vec<u8>) -> Vec<u8> {
    data.reverse();
    data.extend(tail);
    data
}

/// A `Result` is a value like any other.
#[offload]
pub(crate) fn parse(text: String) -> Result<u32, String> {
    text.parse().map_err(|err: std::num::ParseIntError| err.to_string())
}

/// A user type.
#[derive(Serialize, Deserialize)]
pub struct Point {
    /// x
    pub x: f64,
    /// y
    pub y: f64,
}

/// Own types in and out, nested `Vec<u8>`, `'static` lifetimes.
#[offload]
pub fn centroid(
    points: Vec<Point>,
    _labels: Option<Vec<u8>>,
    _name: std::borrow::Cow<'static, str>,
) -> Point {
    let n = points.len().max(1) as f64;
    let (x, y) = points.iter().fold((0.0, 0.0), |(x, y), p| (x + p.x, y + p.y));
    Point { x: x / n, y: y / n }
}

/// Many arguments.
#[offload]
#[allow(clippy::too_many_arguments)]
pub fn many(a: u8, b: u16, c: u32, d: u64, e: i8, f: i16, g: i32, h: i64) -> i128 {
    i128::from(a)
        + i128::from(b)
        + i128::from(c)
        + i128::from(d)
        + i128::from(e)
        + i128::from(f)
        + i128::from(g)
        + i128::from(h)
}

/// In a module, with other attributes kept on the async function.
pub mod inner {
    /// Documented.
    #[offload::offload]
    #[inline]
    #[must_use]
    #[allow(unused_qualifications)]
    pub fn checksum(data: std::vec::Vec<u8>, _seed: [u8; 4]) -> [u8; 32] {
        let mut out = [0; 32];
        for (i, b) in data.iter().enumerate() {
            out[i % 32] ^= b;
        }
        out
    }
}

/// A type with an associated offloaded function.
pub struct Stats;

impl Stats {
    /// An associated function (no `self`).
    #[offload]
    pub fn mean(values: Vec<f64>) -> f64 {
        values.iter().sum::<f64>() / values.len().max(1) as f64
    }
}

/// The stubs have the documented types; not called, as a pass test runs `main`.
pub async fn callers() {
    let _: Result<(), offload::Error> = nothing().await;
    let _: Result<(), offload::Error> = unit(1).await;
    let _: Result<u64, offload::Error> = add((1, 2), 3).await;
    let _: Result<Vec<u8>, offload::Error> = reverse(vec![1, 2], vec![3]).await;
    let _: Result<Result<u32, String>, offload::Error> = parse("1".to_owned()).await;
    let _: Result<Point, offload::Error> = centroid(vec![], None, "".into()).await;
    let _: Result<i128, offload::Error> = many(1, 2, 3, 4, 5, 6, 7, 8).await;
    let _: Result<[u8; 32], offload::Error> = inner::checksum(vec![], [0; 4]).await;
    let _: Result<f64, offload::Error> = Stats::mean(vec![1.0]).await;
}

fn main() {}
