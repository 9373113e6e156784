//! What is emitted when the item cannot be offloaded: the item exactly as written, plus the
//! errors. Callers of a function then type-check against its original signature, so the
//! user sees the macro's errors and not a cascade of unresolved names, and IDEs keep
//! working.

use proc_macro2::TokenStream;

use crate::Errors;

/// The item is not a function with a body, or not one that can be offloaded (and maybe the
/// arguments are wrong too): keep it, report everything.
pub(crate) fn unsupported(
    mut item: TokenStream,
    args_error: Option<syn::Error>,
    item_error: syn::Error,
) -> TokenStream {
    let mut errors = Errors::default();
    errors.extend(args_error);
    errors.push(item_error);
    if let Some(err) = errors.finish() {
        item.extend(err.into_compile_error());
    }
    item
}
