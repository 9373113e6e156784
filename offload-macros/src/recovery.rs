//! What is emitted when the function cannot be offloaded: the item exactly as written, plus
//! the errors. Callers of the function then type-check against the original signature, so
//! the user sees the macro's errors and not a cascade of unresolved names, and IDEs keep
//! working.

use proc_macro2::{Span, TokenStream};

use crate::Errors;

/// The function has a problem (and maybe the arguments too): keep it, report everything.
pub(crate) fn unsupported(
    item: TokenStream,
    args_error: Option<syn::Error>,
    fn_error: syn::Error,
) -> TokenStream {
    let mut errors = Errors::default();
    errors.extend(args_error);
    errors.push(fn_error);
    with_errors(item, errors)
}

/// The attribute is not on a function with a body.
pub(crate) fn not_a_function(item: TokenStream, args_error: Option<syn::Error>) -> TokenStream {
    let mut errors = Errors::default();
    errors.extend(args_error);
    errors.push(syn::Error::new(
        Span::call_site(),
        "`#[offload]` can only be applied to a function with a body",
    ));
    with_errors(item, errors)
}

fn with_errors(mut item: TokenStream, errors: Errors) -> TokenStream {
    if let Some(err) = errors.finish() {
        item.extend(err.into_compile_error());
    }
    item
}
