// Two `#[offload] fn work()` with the same signature, in two function bodies of one module,
// are two entries: their names differ by the position of `work` in the source, so each
// call runs its own body instead of both failing as registered twice.

use offload::offload;

async fn first() -> u32 {
    #[offload]
    fn work() -> u32 {
        1
    }
    work().await.unwrap()
}

async fn second() -> u32 {
    #[offload]
    fn work() -> u32 {
        2
    }
    work().await.unwrap()
}

// On one line, told apart by the column.
#[rustfmt::skip]
async fn third() -> u32 { #[offload] fn work() -> u32 { 3 } work().await.unwrap() } async fn fourth() -> u32 { #[offload] fn work() -> u32 { 4 } work().await.unwrap() }

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        assert_eq!(first().await, 1);
        assert_eq!(second().await, 2);
        assert_eq!(third().await, 3);
        assert_eq!(fourth().await, 4);
    });
}
