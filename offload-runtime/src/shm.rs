//! Shared memory for large arrays: [`SharedBytes`] and [`SharedSlice`].
//!
//! Each buffer is an anonymous memory file (`memfd_create`) mapped into this process. When
//! one is an argument or return value of an offloaded function, only its descriptor crosses
//! the socket (`SCM_RIGHTS`) with a small handle in the frame; the other process maps the
//! same pages. Passing 64 MiB costs what passing 64 bytes does.
//!
//! Nothing can leak: the memory has no name in any file system, and the kernel frees it when
//! the last descriptor and mapping are gone, whichever process holds them and however it
//! ends (a worker that crashes mid-call, a parent killed with SIGKILL).
//!
//! No two processes ever use one buffer at once: a buffer is moved into the call (arguments
//! are taken by value), so the caller cannot touch it while the worker runs, and the function
//! cannot touch it once it returns (the worker unmaps it right after sending the reply, so
//! that the unmapping is not part of the call). A buffer the function returns is handed over
//! the same way; the caller lets go of the buffers it passed on a blocking thread after the
//! call.
//!
//! A new buffer's pages cost more to fault in than to fill. So this process keeps buffers it
//! made and let go of, up to [`KEEP_BUFFERS`] and [`KEEP_BYTES`], and
//! [`SharedBytes::from_slice`] reuses one of the same length. Only a buffer no other code can
//! reach: each call it went out with succeeded, and its worker said it holds none of the
//! buffers it was ever sent and sent none of them back ([`Tag::Released`]; a worker that
//! keeps a buffer in a static, or returns one, never says so). The worker's mapping may
//! outlive that word by a moment (it is unmapped right after the reply), but nothing in the
//! worker reaches it any more. Each buffer's [`Sent`] record counts its calls under way and
//! whether a worker may have kept it.
//!
//! [`Tag::Released`]: crate::protocol::Tag

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::protocol::fds::{self, Sent};
use crate::protocol::refusal;
use crate::role;

/// A byte buffer in shared memory, to pass to or return from an `#[offload]` function
/// without copying its contents through the socket.
///
/// It dereferences to `[u8]`, so it is written in place like a slice. Create it empty with
/// [`SharedBytes::new`] and fill it, or copy existing bytes in with
/// [`SharedBytes::from_slice`]. It can only be serialized as an argument or return value of
/// an offloaded function; anywhere else serializing it is an error.
pub struct SharedBytes {
    /// `None` for an empty buffer, which needs no memory.
    map: Option<memmap2::MmapMut>,
    fd: Option<OwnedFd>,
    origin: Origin,
}

/// Where a buffer's memory file comes from.
enum Origin {
    /// Made here, with the record of the calls it went out with: see [`recycle`].
    Made(Arc<Sent>),
    /// Received from another process, which may hold it too.
    Received,
}

impl SharedBytes {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Errors
    ///
    /// The memory file could not be created, sized or mapped (for example under a memory
    /// limit, or on a system other than Linux).
    pub fn new(len: usize) -> std::io::Result<SharedBytes> {
        if len == 0 {
            return Ok(SharedBytes::empty());
        }
        let fd = memfd()?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        seal(&fd)?;
        SharedBytes::map(fd, len, Origin::Made(Arc::default()))
    }

    fn empty() -> SharedBytes {
        SharedBytes { map: None, fd: None, origin: Origin::Received }
    }

    /// A buffer holding a copy of `bytes`.
    ///
    /// # Errors
    ///
    /// As [`SharedBytes::new`].
    ///
    /// It may reuse the memory of a buffer of the same length that this process made and let
    /// go of, and that no worker kept (see the README's "Shared buffers"): then its pages are
    /// already in memory, and the copy is all it costs.
    pub fn from_slice(bytes: &[u8]) -> std::io::Result<SharedBytes> {
        let mut shared = match reuse(bytes.len()) {
            Some(shared) => shared,
            None => {
                let mut shared = SharedBytes::new(bytes.len())?;
                shared.populate();
                shared
            }
        };
        shared.copy_from_slice(bytes);
        Ok(shared)
    }

    /// Allocates every page now, in one system call, rather than one page fault at a time as
    /// the pages are first written: about a quarter faster for a buffer about to be filled.
    /// A hint: on kernels without `MADV_POPULATE_WRITE` (before 5.14) the pages fault in as
    /// before.
    fn populate(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(map) = &mut self.map {
            // SAFETY: the range is this buffer's own mapping, and populating it does not change
            // its contents (the pages are zero either way).
            let _ = unsafe {
                rustix::mm::madvise(
                    map.as_mut_ptr().cast(),
                    map.len(),
                    rustix::mm::Advice::LinuxPopulateWrite,
                )
            };
        }
    }

    fn map(fd: OwnedFd, len: usize, origin: Origin) -> std::io::Result<SharedBytes> {
        // SAFETY: the file is an anonymous memory file that only offload's own handles
        // reach, and no two processes use it at once (see the module docs), so the mapping
        // is not changed behind this reference.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&fd)? };
        if matches!(origin, Origin::Received) {
            RECEIVED_LIVE.fetch_add(1, Ordering::AcqRel);
        }
        Ok(SharedBytes { map: Some(map), fd: Some(fd), origin })
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for SharedBytes {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        if let Origin::Received = self.origin {
            RECEIVED_LIVE.fetch_sub(1, Ordering::AcqRel);
        }
        if role::is_worker() {
            // In a worker, the buffer goes once the reply is sent: unmapping pages the
            // function touched, and freeing the memory if this was its last holder, would
            // otherwise hold the answer back by milliseconds for a large buffer.
            lock_deferred().push((map, self.fd.take()));
        } else if let (Origin::Made(sent), Some(fd)) = (&self.origin, self.fd.take())
            && sent.is_back()
        {
            recycle(map, fd);
        }
    }
}

/// Shared buffers received from other processes and not dropped yet. In a worker: when
/// none is left after a call, it tells the parent so ([`Tag::Released`](crate::protocol::Tag)).
static RECEIVED_LIVE: AtomicUsize = AtomicUsize::new(0);

/// Set when a received buffer is sent back (in a return value or a streamed item): the
/// other process holds it again, so it is not released. Cleared by [`released`].
static ECHOED: AtomicBool = AtomicBool::new(false);

/// In a worker, after a call: whether it holds none of the shared buffers it was ever sent
/// and sent none of those of this call back (then the parent may use them again); starts
/// the count of those sent back anew for the next call.
pub(crate) fn released() -> bool {
    let echoed = ECHOED.swap(false, Ordering::AcqRel);
    !echoed && RECEIVED_LIVE.load(Ordering::Acquire) == 0
}

/// At most this many bytes of let-go buffers are kept for [`SharedBytes::from_slice`] to
/// reuse.
const KEEP_BYTES: usize = 256 << 20;
/// At most this many.
const KEEP_BUFFERS: usize = 4;

/// Buffers this process made and let go of, that no worker kept, oldest first: their pages
/// are in memory, ready for [`SharedBytes::from_slice`] to reuse.
static FREE: Mutex<Vec<(memmap2::MmapMut, OwnedFd)>> = Mutex::new(Vec::new());

fn lock_free() -> std::sync::MutexGuard<'static, Vec<(memmap2::MmapMut, OwnedFd)>> {
    FREE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps a let-go buffer for reuse, if it fits within [`KEEP_BYTES`] and [`KEEP_BUFFERS`]
/// (the oldest go to make room); lets it go otherwise.
fn recycle(map: memmap2::MmapMut, fd: OwnedFd) {
    if map.len() > KEEP_BYTES {
        return;
    }
    let mut free = lock_free();
    free.push((map, fd));
    let mut gone = Vec::new();
    while free.len() > KEEP_BUFFERS || free.iter().map(|(map, _)| map.len()).sum::<usize>() > KEEP_BYTES {
        gone.push(free.remove(0));
    }
    drop(free);
    drop(gone);
}

/// A kept buffer of exactly `len` bytes, with a fresh record: its contents are those it was
/// let go with.
fn reuse(len: usize) -> Option<SharedBytes> {
    let mut free = lock_free();
    let at = free.iter().rposition(|(map, _)| map.len() == len)?;
    let (map, fd) = free.remove(at);
    Some(SharedBytes { map: Some(map), fd: Some(fd), origin: Origin::Made(Arc::default()) })
}

/// Buffers a worker's call let go of, unmapped once its reply is sent.
static DEFERRED: Mutex<Vec<(memmap2::MmapMut, Option<OwnedFd>)>> = Mutex::new(Vec::new());

fn lock_deferred() -> std::sync::MutexGuard<'static, Vec<(memmap2::MmapMut, Option<OwnedFd>)>> {
    DEFERRED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unmaps and closes the buffers the last call let go of: the worker calls this right after
/// sending the reply.
pub(crate) fn release_deferred() {
    drop(std::mem::take(&mut *lock_deferred()));
}

impl Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for SharedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBytes").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl TryFrom<&[u8]> for SharedBytes {
    type Error = std::io::Error;

    fn try_from(bytes: &[u8]) -> std::io::Result<SharedBytes> {
        SharedBytes::from_slice(bytes)
    }
}

/// A slice of plain-old-data elements in shared memory; see [`SharedBytes`].
///
/// `T` is any [`bytemuck::Pod`] type: integers, floats, arrays of them, `#[repr(C)]`
/// structs of them. The memory is page-aligned, so every such `T` is aligned.
pub struct SharedSlice<T> {
    bytes: SharedBytes,
    _elements: PhantomData<T>,
}

impl<T: bytemuck::Pod> SharedSlice<T> {
    /// A zero-filled slice of `len` elements.
    ///
    /// # Errors
    ///
    /// As [`SharedBytes::new`]; also when `len` elements do not fit in memory at all.
    pub fn new(len: usize) -> std::io::Result<SharedSlice<T>> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, "shared slice length overflows")
        })?;
        Ok(SharedSlice { bytes: SharedBytes::new(bytes)?, _elements: PhantomData })
    }

    /// A slice holding a copy of `elements`.
    ///
    /// # Errors
    ///
    /// As [`SharedBytes::new`].
    pub fn from_slice(elements: &[T]) -> std::io::Result<SharedSlice<T>> {
        let bytes = SharedBytes::from_slice(bytemuck::cast_slice(elements))?;
        Ok(SharedSlice { bytes, _elements: PhantomData })
    }

    /// The shared bytes behind the slice.
    pub fn into_bytes(self) -> SharedBytes {
        self.bytes
    }
}

#[cfg(feature = "ndarray")]
impl<T: bytemuck::Pod> SharedSlice<T> {
    /// An n-dimensional view of the elements in row-major order, such as `(rows, columns)`.
    ///
    /// # Errors
    ///
    /// The shape does not hold exactly [`len`](slice::len) elements.
    pub fn view<D: ndarray::Dimension>(
        &self,
        shape: impl ndarray::ShapeBuilder<Dim = D>,
    ) -> Result<ndarray::ArrayView<'_, T, D>, ndarray::ShapeError> {
        ndarray::ArrayView::from_shape(shape, &self[..])
    }

    /// A mutable n-dimensional view of the elements in row-major order.
    ///
    /// # Errors
    ///
    /// The shape does not hold exactly [`len`](slice::len) elements.
    pub fn view_mut<D: ndarray::Dimension>(
        &mut self,
        shape: impl ndarray::ShapeBuilder<Dim = D>,
    ) -> Result<ndarray::ArrayViewMut<'_, T, D>, ndarray::ShapeError> {
        ndarray::ArrayViewMut::from_shape(shape, &mut self[..])
    }
}

impl<T: bytemuck::Pod> Deref for SharedSlice<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.bytes)
    }
}

impl<T: bytemuck::Pod> DerefMut for SharedSlice<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.bytes)
    }
}

impl<T: bytemuck::Pod + fmt::Debug> fmt::Debug for SharedSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSlice").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<T: bytemuck::Pod> TryFrom<&[T]> for SharedSlice<T> {
    type Error = std::io::Error;

    fn try_from(elements: &[T]) -> std::io::Result<SharedSlice<T>> {
        SharedSlice::from_slice(elements)
    }
}

#[cfg(target_os = "linux")]
fn memfd() -> std::io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, memfd_create};
    Ok(memfd_create("offload-shared", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?)
}

#[cfg(not(target_os = "linux"))]
fn memfd() -> std::io::Result<OwnedFd> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "shared buffers need Linux"))
}

/// The seals every shared buffer carries from its creation on: its size can never change,
/// and no seal can be taken away. Whoever else holds its descriptor (a function that
/// duplicated it, say) can write its bytes but cannot truncate it under a mapping, which
/// would make the next read of that mapping a SIGBUS.
#[cfg(target_os = "linux")]
const SEALS: rustix::fs::SealFlags =
    rustix::fs::SealFlags::SHRINK.union(rustix::fs::SealFlags::GROW).union(rustix::fs::SealFlags::SEAL);

#[cfg(target_os = "linux")]
fn seal(fd: &OwnedFd) -> std::io::Result<()> {
    Ok(rustix::fs::fcntl_add_seals(fd, SEALS)?)
}

#[cfg(not(target_os = "linux"))]
fn seal(_: &OwnedFd) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "shared buffers need Linux"))
}

/// Checks a received descriptor before it is mapped: a memory file sealed as [`seal`] leaves
/// it, so that it stays at least `len` bytes for as long as it is mapped.
fn check_received(fd: &OwnedFd, len: u64) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        let seals = rustix::fs::fcntl_get_seals(fd)
            .map_err(|e| format!("a shared buffer's descriptor is not a sealed memory file ({e})"))?;
        if !seals.contains(SEALS) {
            return Err("a shared buffer's memory file is not sealed against resizing".into());
        }
    }
    let size = rustix::fs::fstat(fd).map_err(|e| format!("shared buffer: {e}"))?.st_size;
    if (size as u64) < len {
        return Err("a shared buffer is smaller than its handle says".into());
    }
    Ok(())
}

const NAME: &str = "offload::SharedBytes";

impl serde::Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let index = match &self.fd {
            Some(fd) => {
                let sent = match &self.origin {
                    Origin::Made(sent) => Some(sent),
                    Origin::Received => None,
                };
                let index = fds::attach(fd, sent).map_err(refusal::ser::<S::Error>)?;
                if sent.is_none() {
                    ECHOED.store(true, Ordering::Release);
                }
                index
            }
            None => u32::MAX,
        };
        serializer.serialize_newtype_struct(NAME, &(index, self.len() as u64))
    }
}

impl<'de> serde::Deserialize<'de> for SharedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<SharedBytes, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename = "offload::SharedBytes")]
        struct Handle((u32, u64));

        let Handle((index, len)) = Handle::deserialize(deserializer)?;
        if len == 0 {
            return Ok(SharedBytes::empty());
        }
        let fd = fds::take(index).ok_or_else(|| {
            refusal::de::<D::Error>("a shared buffer's descriptor did not arrive with the frame")
        })?;
        check_received(&fd, len).map_err(refusal::de::<D::Error>)?;
        let len = usize::try_from(len).map_err(refusal::de::<D::Error>)?;
        SharedBytes::map(fd, len, Origin::Received)
            .map_err(|e| refusal::de(format!("could not map a shared buffer: {e}")))
    }
}

impl<T: bytemuck::Pod> serde::Serialize for SharedSlice<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.bytes.serialize(serializer)
    }
}

impl<'de, T: bytemuck::Pod> serde::Deserialize<'de> for SharedSlice<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<SharedSlice<T>, D::Error> {
        let bytes = SharedBytes::deserialize(deserializer)?;
        if size_of::<T>() != 0 && !bytes.len().is_multiple_of(size_of::<T>()) {
            return Err(refusal::de("a shared slice's length is not a whole number of elements"));
        }
        Ok(SharedSlice { bytes, _elements: PhantomData })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
        let (encoded, fds) = fds::collecting(|| postcard::to_stdvec(value).unwrap());
        fds::supplying(fds, || postcard::from_bytes(&encoded).unwrap())
    }

    #[test]
    fn bytes_cross_by_descriptor_and_share_pages() {
        let page = rustix::param::page_size();
        for len in [0, 1, page - 1, page, page + 1] {
            let mut a = SharedBytes::new(len).unwrap();
            for (i, b) in a.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let mut b = round_trip(&a);
            assert_eq!(a, b, "len {len}");
            if len > 0 {
                // The same pages: a write through one mapping shows through the other.
                b[0] = 0xAB;
                assert_eq!(a[0], 0xAB);
            }
        }
    }

    #[test]
    fn slices_of_pod_types() {
        let values: Vec<f64> = (0..1000).map(|i| i as f64 * 0.5).collect();
        let shared = SharedSlice::from_slice(&values).unwrap();
        let back: SharedSlice<f64> = round_trip(&shared);
        assert_eq!(&*back, &values[..]);
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn array_views() {
        let mut matrix = SharedSlice::<f32>::new(6).unwrap();
        matrix.view_mut((2, 3)).unwrap()[[1, 2]] = 5.0;
        assert_eq!(matrix[5], 5.0);
        assert_eq!(matrix.view((3, 2)).unwrap()[[2, 1]], 5.0);
        assert!(matrix.view((4, 2)).is_err());
    }

    #[test]
    fn refused_outside_a_call() {
        let shared = SharedBytes::from_slice(b"abc").unwrap();
        let err = postcard::to_stdvec(&shared).unwrap_err();
        assert!(matches!(err, postcard::Error::SerdeSerCustom), "{err:?}");
    }

    #[test]
    fn a_buffer_cannot_be_resized() {
        use std::os::fd::AsFd;
        let shared = SharedBytes::from_slice(b"abc").unwrap();
        let fd = shared.fd.as_ref().unwrap().as_fd();
        assert_eq!(rustix::fs::ftruncate(fd, 0), Err(rustix::io::Errno::PERM));
        assert_eq!(rustix::fs::ftruncate(fd, 1 << 20), Err(rustix::io::Errno::PERM));
        assert_eq!(
            rustix::fs::fcntl_add_seals(fd, rustix::fs::SealFlags::WRITE),
            Err(rustix::io::Errno::PERM)
        );
    }

    /// Decodes the handle of a 4-byte buffer with `fd` as its descriptor; the error's text.
    fn decode_with(fd: OwnedFd) -> Result<SharedBytes, String> {
        let shared = SharedBytes::from_slice(b"abcd").unwrap();
        let (encoded, _fds) = fds::collecting(|| postcard::to_stdvec(&shared).unwrap());
        fds::supplying(vec![fd], || crate::protocol::decode(&encoded, crate::error::Payload::ReturnValue))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_unsealed_or_foreign_descriptor_is_refused() {
        use rustix::fs::{MemfdFlags, memfd_create};
        let unsealed = memfd_create("unsealed", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 4096).unwrap();
        let said = decode_with(unsealed).unwrap_err();
        assert!(said.contains("sealed"), "{said}");

        let sealable = memfd_create("sealable", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&sealable, 4096).unwrap();
        let said = decode_with(sealable).unwrap_err();
        assert!(said.contains("not sealed against resizing"), "{said}");

        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let said = decode_with(file).unwrap_err();
        assert!(said.contains("not a sealed memory file"), "{said}");
    }

    #[test]
    fn a_handle_without_its_descriptor_is_an_error() {
        let shared = SharedBytes::from_slice(b"abc").unwrap();
        let (encoded, _fds) = fds::collecting(|| postcard::to_stdvec(&shared).unwrap());
        let decoded: Result<SharedBytes, _> = fds::supplying(Vec::new(), || postcard::from_bytes(&encoded));
        assert!(decoded.is_err());
    }
}
