//! Calling `fallback = path::to::fn`: a sync or async function with the offloaded function's
//! arguments and return type, run in the caller's process when the breaker is open or the
//! call failed worker-side. Not public API: the macro's stub uses it.

use std::future::{Future, Ready, ready};

/// Selects the impl for a fallback that returns the value itself.
#[doc(hidden)]
pub enum ReturnsValue {}

/// Selects the impl for a fallback that returns a future of the value (an `async fn`).
#[doc(hidden)]
pub enum ReturnsFuture {}

/// A function that can stand in for an offloaded one: same arguments (`Args`, a tuple), same
/// return type `R`, directly (`Kind = ReturnsValue`) or as a future (`Kind = ReturnsFuture`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the fallback of this `#[offload]` function",
    label = "the fallback must take the offloaded function's arguments and return its return type",
    note = "a fallback is a sync or async fn with the same argument types, in the same order, and the \
            same return type as the function it stands in for"
)]
pub trait Fallback<Args, R, Kind> {
    /// The future `invoke` returns.
    type Future: Future<Output = R>;

    /// Calls the fallback with `args`.
    fn invoke(self, args: Args) -> Self::Future;
}

macro_rules! fallbacks {
    ($($arg:ident),*) => {
        impl<F, R, $($arg,)*> Fallback<($($arg,)*), R, ReturnsValue> for F
        where
            F: FnOnce($($arg),*) -> R,
        {
            type Future = Ready<R>;

            #[allow(non_snake_case)]
            fn invoke(self, ($($arg,)*): ($($arg,)*)) -> Ready<R> {
                ready(self($($arg),*))
            }
        }

        impl<F, Fut, R, $($arg,)*> Fallback<($($arg,)*), R, ReturnsFuture> for F
        where
            F: FnOnce($($arg),*) -> Fut,
            Fut: Future<Output = R>,
        {
            type Future = Fut;

            #[allow(non_snake_case)]
            fn invoke(self, ($($arg,)*): ($($arg,)*)) -> Fut {
                self($($arg),*)
            }
        }
    };
}

fallbacks!();
fallbacks!(A1);
fallbacks!(A1, A2);
fallbacks!(A1, A2, A3);
fallbacks!(A1, A2, A3, A4);
fallbacks!(A1, A2, A3, A4, A5);
fallbacks!(A1, A2, A3, A4, A5, A6);
fallbacks!(A1, A2, A3, A4, A5, A6, A7);
fallbacks!(A1, A2, A3, A4, A5, A6, A7, A8);
fallbacks!(A1, A2, A3, A4, A5, A6, A7, A8, A9);
fallbacks!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10);
fallbacks!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11);
fallbacks!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12);

/// Runs `fallback` with `args`. The stub calls it only when
/// [`Error::should_fall_back`](crate::Error::should_fall_back) says so.
pub async fn fallback<F, Args, R, Kind>(fallback: F, args: Args) -> R
where
    F: Fallback<Args, R, Kind>,
{
    fallback.invoke(args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u32, y: u32) -> u64 {
        u64::from(x + y) * 2
    }

    async fn double_later(x: u32, y: u32) -> u64 {
        u64::from(x + y) * 2
    }

    #[tokio::test]
    async fn sync_and_async_fallbacks() {
        assert_eq!(fallback::<_, _, u64, _>(double, (1u32, 2u32)).await, 6);
        assert_eq!(fallback::<_, _, u64, _>(double_later, (1u32, 2u32)).await, 6);
        assert_eq!(fallback::<_, _, &str, _>(|| "none", ()).await, "none");
    }
}
