// A function that returns `impl Iterator<Item = T>` streams: its stub is a plain `fn` that
// returns `offload::Streamed<T>`, a `Stream` of `Result<T, offload::Error>`, also with
// state and several arguments.

use offload::offload;

fn table() -> Vec<u64> {
    vec![1, 2, 3]
}

#[offload(timeout = "10s")]
fn repeat(word: String, times: usize) -> impl Iterator<Item = String> {
    std::iter::repeat_n(word, times)
}

#[offload(state = table)]
fn scaled(table: &Vec<u64>, by: u64) -> impl Iterator<Item = u64> {
    table.clone().into_iter().map(move |x| x * by)
}

fn assert_stream<S: futures_core::Stream<Item = Result<T, offload::Error>> + Send + Unpin + 'static, T>(_: &S) {}

async fn caller() -> Result<usize, offload::Error> {
    let mut words: offload::Streamed<String> = repeat("hi".to_owned(), 3);
    assert_stream(&words);
    let mut n = 0;
    while let Some(word) = words.next().await {
        n += word?.len();
    }
    let mut numbers = scaled(2);
    while let Some(x) = numbers.next().await {
        n += x? as usize;
    }
    Ok(n)
}

fn main() {
    let _ = caller;
}
