//! The function as the macro sees it: attributes, visibility and signature parsed, the body
//! kept as the tokens it was written with.
//!
//! The body is never parsed: nothing in it is checked, and it moves unchanged into a function
//! of its own. So a syntax error in the body is the compiler's own error, reported once as it
//! would be without the attribute, and the function is still expanded: its callers see an
//! `async fn`, not a cascade of errors about a function that is not one.

use proc_macro2::{Group, Span};
use syn::parse::{Parse, ParseStream};
use syn::token::Brace;
use syn::{Abi, Attribute, Signature, Token, Visibility};

/// A function with a body.
pub(crate) struct Function {
    /// The outer attributes, docs included. Inner attributes (`#![...]`) are in the body.
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
    /// `{ ... }`, as written.
    pub(crate) body: Group,
}

impl Parse for Function {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        if !starts_signature(input) {
            return Err(not_a_function());
        }
        let sig = input.parse()?;
        if !input.peek(Brace) {
            return Err(not_a_function());
        }
        let body = input.parse()?;
        Ok(Function { attrs, vis, sig, body })
    }
}

/// `fn`, maybe after `const`, `async`, `unsafe` and `extern "abi"`: how a function starts.
/// Any other item (`struct`, `impl`, `const X: fn() = f;`, a macro call) is not one. A
/// function whose signature then does not parse gets syn's error, at the token it stopped at.
fn starts_signature(input: ParseStream<'_>) -> bool {
    let fork = input.fork();
    fork.parse::<Option<Token![const]>>().is_ok()
        && fork.parse::<Option<Token![async]>>().is_ok()
        && fork.parse::<Option<Token![unsafe]>>().is_ok()
        && fork.parse::<Option<Abi>>().is_ok()
        && fork.peek(Token![fn])
}

fn not_a_function() -> syn::Error {
    syn::Error::new(Span::call_site(), "`#[offload]` can only be applied to a function with a body")
}

#[cfg(test)]
mod tests {
    use proc_macro2::TokenStream;
    use quote::quote;

    use super::Function;

    fn parse(item: TokenStream) -> syn::Result<Function> {
        syn::parse2(item)
    }

    fn error(item: TokenStream) -> String {
        match parse(item) {
            Ok(_) => panic!("parsed"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn keeps_the_body_as_written() {
        let function = parse(quote! {
            /// docs
            #[inline]
            pub fn f(x: u32) -> u32 {
                #![allow(unused)]
                let y = x / 2
                y
            }
        })
        .unwrap();
        assert_eq!(function.attrs.len(), 2);
        assert_eq!(function.sig.ident, "f");
        assert_eq!(function.body.stream().to_string(), quote!(#![allow(unused)] let y = x / 2 y).to_string());
    }

    #[test]
    fn qualifiers_are_left_to_the_checks() {
        for item in [
            quote!(
                async fn f() {}
            ),
            quote!(
                const unsafe fn f() {}
            ),
            quote!(
                extern "C" fn f() {}
            ),
        ] {
            assert!(parse(item).is_ok());
        }
    }

    #[test]
    fn other_items_are_not_functions() {
        for item in [
            quote!(
                struct S;
            ),
            quote!(
                impl S {
                    fn f() {}
                }
            ),
            quote!(
                const F: fn() = f;
            ),
            quote!(
                extern crate alloc;
            ),
            quote!(
                fn f();
            ),
            quote!(),
        ] {
            assert_eq!(error(item), "`#[offload]` can only be applied to a function with a body");
        }
    }

    #[test]
    fn a_broken_signature_gets_syn_error() {
        assert_eq!(
            error(quote!(
                fn f(x u32) {}
            )),
            "expected `:`"
        );
    }
}
