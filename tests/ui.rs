//! Compile-fail and compile-pass cases for `#[offload]`. Compiler output drifts between
//! releases, so the expected `.stderr` files are checked on the toolchain they were written
//! for only; regenerate them with `TRYBUILD=overwrite` when that toolchain moves.

#[rustversion::attr(not(stable(1.95)), ignore)]
#[test]
fn ui_fail() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
}

#[rustversion::attr(not(stable(1.95)), ignore)]
#[test]
fn ui_pass() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
}
