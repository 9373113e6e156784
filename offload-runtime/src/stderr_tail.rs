//! What a worker leaves behind for a person to read: its stderr, forwarded to the parent's
//! stderr line by line, with the last lines kept for crash reports.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How many of a worker's last stderr lines a crash report carries.
const TAIL_LINES: usize = 16;
/// Longest line kept in the tail; longer ones are cut.
const MAX_LINE: usize = 512;
/// Most bytes held at once while forwarding: a longer line (a worker may write hundreds of
/// MiB without a newline) is forwarded, and kept in the tail, in pieces of this size.
const MAX_PIECE: u64 = 64 << 10;

/// The last lines of one worker's stderr, and whether the stream has ended.
#[derive(Default)]
pub(crate) struct StderrTail {
    state: Mutex<TailState>,
    ended: Condvar,
}

#[derive(Default)]
struct TailState {
    lines: VecDeque<String>,
    eof: bool,
    /// The worker reported a failed allocation: Rust's allocation error handler prints
    /// `memory allocation of N bytes failed` before it aborts. Remembered apart from the
    /// tail, which a backtrace after the line would push it out of.
    alloc_failed: bool,
}

impl StderrTail {
    /// Starts a thread that copies `stream` to this process's stderr and keeps its tail.
    pub(crate) fn capture(pid: u32, stream: impl Read + Send + 'static) -> std::io::Result<Arc<StderrTail>> {
        Self::capture_into(pid, stream, std::io::stderr)
    }

    /// [`StderrTail::capture`], forwarding to the writer `sink` returns for each piece.
    fn capture_into<W: Write>(
        pid: u32,
        stream: impl Read + Send + 'static,
        sink: impl Fn() -> W + Send + 'static,
    ) -> std::io::Result<Arc<StderrTail>> {
        let tail = Arc::new(StderrTail::default());
        let writer = Arc::clone(&tail);
        std::thread::Builder::new()
            .name(format!("offload-stderr-{pid}"))
            .spawn(move || writer.pump(stream, sink))?;
        Ok(tail)
    }

    fn pump<W: Write>(&self, stream: impl Read, sink: impl Fn() -> W) {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(MAX_PIECE).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = sink().write_all(&line);
                    let text = String::from_utf8_lossy(&line);
                    let mut text = text.trim_end_matches(['\n', '\r']).to_owned();
                    if text.len() > MAX_LINE {
                        let mut cut = MAX_LINE;
                        while !text.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        text.truncate(cut);
                        text.push('…');
                    }
                    let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    if text.starts_with("memory allocation of ") && text.ends_with(" failed") {
                        state.alloc_failed = true;
                    }
                    if state.lines.len() == TAIL_LINES {
                        state.lines.pop_front();
                    }
                    state.lines.push_back(text);
                }
            }
        }
        // Close the pipe before saying so: once `eof` is set, no descriptor of this worker is
        // left open in this process.
        drop(reader);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).eof = true;
        self.ended.notify_all();
    }

    /// The kept lines, and whether an allocation failure was reported, after waiting up to
    /// `patience` for the stream to end (it ends when the worker and every process that
    /// inherited its stderr have exited).
    pub(crate) fn at_end(&self, patience: Duration) -> (Vec<String>, bool) {
        let deadline = Instant::now() + patience;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.ended.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        (state.lines.iter().cloned().collect(), state.alloc_failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let tail = StderrTail::capture(0, std::io::Cursor::new(text.into_bytes())).unwrap();
        let (lines, alloc_failed) = tail.at_end(Duration::from_secs(10));
        assert!(!alloc_failed);
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.first().unwrap(), "line 24");
        assert_eq!(lines.last().unwrap(), "line 39");
    }
}

#[cfg(test)]
mod piece_tests {
    use super::*;

    #[test]
    fn a_line_without_end_is_forwarded_in_bounded_pieces() {
        let text = vec![b'x'; 4 << 20];
        let tail = StderrTail::capture_into(0, std::io::Cursor::new(text), std::io::sink).unwrap();
        let (lines, _) = tail.at_end(Duration::from_secs(10));
        // 4 MiB in 64 KiB pieces: the tail is full of pieces, not one huge line.
        assert_eq!(lines.len(), TAIL_LINES);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE + '…'.len_utf8()));
    }
}

#[cfg(test)]
mod alloc_tests {
    use super::*;

    #[test]
    fn remembers_an_allocation_failure_past_the_tail() {
        let mut text = String::from("memory allocation of 4294967296 bytes failed\n");
        text.extend((0..40).map(|i| format!("  {i}: frame\n")));
        let tail = StderrTail::capture(0, std::io::Cursor::new(text.into_bytes())).unwrap();
        let (lines, alloc_failed) = tail.at_end(Duration::from_secs(10));
        assert!(alloc_failed);
        assert!(!lines.iter().any(|l| l.starts_with("memory allocation")));
    }
}
