//! Which functions `#[offload]` accepts, and why not.
//!
//! The function runs in another process, so it must be a plain synchronous `fn` whose
//! arguments and return value are owned, concrete types that serde can carry. Everything
//! that can be checked on the syntax is checked here, each error spanned on the offending
//! token; what the syntax cannot tell (is this type `Serialize`?) is left to the bound
//! checks that [`crate::expand`] emits.

use quote::ToTokens;
use syn::{Attribute, FnArg, GenericArgument, GenericParam, PathArguments, ReturnType, Type};

use crate::Errors;
use crate::ast::Function;

/// Checks that `function` can be offloaded; every reason it cannot, at once. Only the
/// signature is looked at: the body is the user's, and the compiler checks it. With `state`,
/// the first argument is the worker's state: a shared reference, `&T`.
pub(crate) fn check(function: &Function, state: Option<&syn::ExprPath>) -> syn::Result<()> {
    let mut errors = Errors::default();
    let sig = &function.sig;

    if let Some(token) = &sig.constness {
        errors.push(syn::Error::new_spanned(
            token,
            "`#[offload]` functions cannot be `const`: they run in a worker process, not at \
             compile time",
        ));
    }
    if let Some(token) = &sig.asyncness {
        errors.push(syn::Error::new_spanned(
            token,
            "`#[offload]` functions must be synchronous: remove `async`; the macro makes the \
             function async",
        ));
    }
    if let Some(token) = &sig.unsafety {
        errors.push(syn::Error::new_spanned(
            token,
            "`#[offload]` functions cannot be `unsafe`: remove `unsafe`, and keep unsafe code \
             in `unsafe` blocks inside the body",
        ));
    }
    if let Some(abi) = &sig.abi {
        let written = abi.to_token_stream().to_string();
        errors.push(syn::Error::new_spanned(
            abi,
            format!("`#[offload]` functions cannot declare an ABI: remove `{written}`"),
        ));
    }

    let generics = &sig.generics;
    if generics.params.iter().any(|param| !matches!(param, GenericParam::Lifetime(_))) {
        errors.push(syn::Error::new_spanned(
            generics,
            "`#[offload]` functions cannot be generic: the worker process must know the \
             concrete argument and return types",
        ));
    } else if !generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            generics,
            "`#[offload]` functions cannot have lifetime parameters: arguments are sent to \
             another process, so they cannot borrow",
        ));
    } else if let Some(where_clause) = &generics.where_clause {
        errors.push(syn::Error::new_spanned(
            where_clause,
            "`#[offload]` functions cannot have a `where` clause: the worker process must know \
             the concrete argument and return types",
        ));
    }

    let mut inputs = sig.inputs.iter();
    if let Some(state) = state {
        match inputs.next() {
            Some(FnArg::Typed(arg)) => match &*arg.ty {
                Type::Reference(reference)
                    if reference.mutability.is_none() && reference.lifetime.is_none() =>
                {
                    check_type(&reference.elem, Position::Argument, false, &mut errors);
                }
                other => errors.push(syn::Error::new_spanned(
                    other,
                    "with `state`, the first argument is the worker's state and must be a shared \
                     reference to it, e.g. `model: &Model`",
                )),
            },
            Some(FnArg::Receiver(_)) | None => errors.push(syn::Error::new_spanned(
                state,
                "with `state`, the function takes the worker's state as its first argument, e.g. \
                 `fn infer(model: &Model, input: Vec<f32>)`",
            )),
        }
    }
    for input in inputs {
        match input {
            FnArg::Receiver(receiver) => errors.push(syn::Error::new_spanned(
                receiver,
                "`#[offload]` functions cannot take `self`: they run in another process; make \
                 it a free function and pass what it needs as arguments",
            )),
            FnArg::Typed(arg) => {
                check_argument_attrs(&arg.attrs, &mut errors);
                check_type(&arg.ty, Position::Argument, true, &mut errors);
            }
        }
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new_spanned(variadic, "`#[offload]` functions cannot be variadic"));
    }
    if let ReturnType::Type(_, ty) = &sig.output {
        match streamed_item(ty) {
            Some(item) => check_type(item, Position::Return, false, &mut errors),
            None => check_type(ty, Position::Return, true, &mut errors),
        }
    }

    errors.finish().map_or(Ok(()), Err)
}

/// `T`, for a return type `impl Iterator<Item = T>`: the function streams its results, one
/// item at a time.
pub(crate) fn streamed_item(ty: &Type) -> Option<&Type> {
    let Type::ImplTrait(impl_trait) = ty else { return None };
    let mut bounds = impl_trait.bounds.iter();
    let (Some(syn::TypeParamBound::Trait(bound)), None) = (bounds.next(), bounds.next()) else {
        return None;
    };
    let segment = bound.path.segments.last()?;
    let PathArguments::AngleBracketed(args) = &segment.arguments else { return None };
    let mut args = args.args.iter();
    match (segment.ident == "Iterator", args.next(), args.next()) {
        (true, Some(GenericArgument::AssocType(item)), None)
            if item.ident == "Item" && item.generics.is_none() =>
        {
            Some(&item.ty)
        }
        _ => None,
    }
}

/// `#[cfg]` on an argument would remove it from the function but not from the call.
fn check_argument_attrs(attrs: &[Attribute], errors: &mut Errors) {
    for attr in attrs {
        if attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr") {
            errors.push(syn::Error::new_spanned(
                attr,
                "`#[cfg]` on arguments of `#[offload]` functions is not supported",
            ));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    Argument,
    Return,
}

/// Rejects what cannot cross a process boundary as written: references, `'_` borrows and
/// `impl Trait`, anywhere in the type. One error per offending part; the parts inside an
/// offending part are not looked at.
fn check_type(ty: &Type, position: Position, top_level: bool, errors: &mut Errors) {
    match ty {
        Type::Reference(reference) => {
            let message = match (position, top_level) {
                (Position::Argument, true) => {
                    let hint = match &*reference.elem {
                        Type::Path(path) if path.path.is_ident("str") => "; take `String` instead of `&str`",
                        Type::Slice(_) => "; take a `Vec` instead of a slice",
                        _ => "",
                    };
                    format!("arguments must be passed by value: they are sent to another process{hint}")
                }
                (Position::Argument, false) => {
                    "arguments must own their data: references cannot be sent to another process".to_owned()
                }
                (Position::Return, _) => "return values must own their data: references cannot \
                                          be sent back from another process"
                    .to_owned(),
            };
            errors.push(syn::Error::new_spanned(reference, message));
        }
        Type::ImplTrait(impl_trait) => {
            let message = match position {
                Position::Argument => {
                    "`impl Trait` arguments are not supported: the worker process must know the \
                     concrete type"
                }
                Position::Return => {
                    "`#[offload]` functions cannot return `impl Trait`: the worker process must \
                     know the concrete type to send it back (to stream results one at a time, \
                     return `impl Iterator<Item = T>`)"
                }
            };
            errors.push(syn::Error::new_spanned(impl_trait, message));
        }
        Type::Never(never) if position == Position::Return && top_level => {
            errors.push(syn::Error::new_spanned(never, "`#[offload]` functions cannot return `!`"));
        }
        Type::Group(group) => check_type(&group.elem, position, top_level, errors),
        Type::Paren(paren) => check_type(&paren.elem, position, top_level, errors),
        Type::Array(array) => check_type(&array.elem, position, false, errors),
        Type::Slice(slice) => check_type(&slice.elem, position, false, errors),
        Type::Tuple(tuple) => {
            for elem in &tuple.elems {
                check_type(elem, position, false, errors);
            }
        }
        Type::Path(path) if path.qself.is_none() && path.path.segments[0].ident == "Self" => {
            errors.push(syn::Error::new_spanned(
                path,
                "`#[offload]` functions cannot use `Self`: the body moves into a function of \
                 its own, where `Self` means nothing; write the type's name",
            ));
        }
        Type::Path(path) => {
            if let Some(qself) = &path.qself {
                check_type(&qself.ty, position, false, errors);
            }
            for segment in &path.path.segments {
                let PathArguments::AngleBracketed(args) = &segment.arguments else {
                    continue;
                };
                for arg in &args.args {
                    match arg {
                        GenericArgument::Type(ty) => check_type(ty, position, false, errors),
                        GenericArgument::Lifetime(lifetime) if lifetime.ident == "_" => {
                            errors.push(syn::Error::new_spanned(
                                lifetime,
                                match position {
                                    Position::Argument => {
                                        "arguments must own their data: `'_` borrows, but \
                                         arguments are sent to another process"
                                    }
                                    Position::Return => {
                                        "return values must own their data: `'_` borrows, but \
                                         return values are sent back from another process"
                                    }
                                },
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
        // Anything else that cannot cross (raw pointers, `dyn Trait`, fn pointers) fails
        // the `Transferable` bound check, with a message that names the type.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::check;
    use crate::ast::Function;

    fn errors(item: Function) -> Vec<String> {
        match check(&item, None) {
            Ok(()) => Vec::new(),
            Err(err) => err.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[track_caller]
    fn assert_one_error(item: Function, expected_start: &str) {
        let errors = errors(item);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with(expected_start), "{errors:?}");
    }

    #[test]
    fn accepts_plain_functions() {
        let accepted: [Function; 9] = [
            parse_quote!(
                fn f() {}
            ),
            parse_quote!(
                pub fn f(x: u32) -> u64 {
                    0
                }
            ),
            parse_quote!(
                fn f((a, b): (u32, u32), mut x: String) -> () {}
            ),
            parse_quote!(
                fn f(_: Vec<u8>) -> Vec<u8> {
                    vec![]
                }
            ),
            parse_quote!(
                fn f(x: [u8; 32]) -> Result<String, String> {
                    todo!()
                }
            ),
            parse_quote!(
                fn f(x: std::borrow::Cow<'static, str>) {}
            ),
            parse_quote!(
                fn f(x: Option<Box<[u8]>>, y: ::std::vec::Vec<(u8, char)>) {}
            ),
            parse_quote!(
                #[inline]
                pub(crate) fn f(#[allow(unused)] x: u8) {}
            ),
            parse_quote!(
                fn f(x: <Foo as Bar>::Assoc) {}
            ),
        ];
        for item in accepted {
            assert_eq!(errors(item), Vec::<String>::new());
        }
    }

    #[test]
    fn rejects_qualifiers() {
        assert_one_error(
            parse_quote!(
                async fn f() {}
            ),
            "`#[offload]` functions must be synchronous: remove `async`",
        );
        assert_one_error(
            parse_quote!(
                const fn f() {}
            ),
            "`#[offload]` functions cannot be `const`",
        );
        assert_one_error(
            parse_quote!(
                unsafe fn f() {}
            ),
            "`#[offload]` functions cannot be `unsafe`",
        );
        assert_one_error(
            parse_quote!(
                extern "C" fn f() {}
            ),
            "`#[offload]` functions cannot declare an ABI: remove `extern \"C\"`",
        );
    }

    #[test]
    fn rejects_generics_once() {
        assert_one_error(
            parse_quote!(
                fn f<T: Clone>(x: T)
                where
                    T: Copy,
                {
                }
            ),
            "`#[offload]` functions cannot be generic",
        );
        assert_one_error(
            parse_quote!(
                fn f<const N: usize>() {}
            ),
            "`#[offload]` functions cannot be generic",
        );
        assert_one_error(
            parse_quote!(
                fn f<'a, T>(x: T) {}
            ),
            "`#[offload]` functions cannot be generic",
        );
        assert_one_error(
            parse_quote!(
                fn f<'a>(x: Vec<u8>) {}
            ),
            "`#[offload]` functions cannot have lifetime parameters",
        );
        assert_one_error(
            parse_quote!(
                fn f()
                where
                    u8: Copy,
                {
                }
            ),
            "`#[offload]` functions cannot have a `where` clause",
        );
    }

    #[test]
    fn rejects_receivers() {
        for item in [
            parse_quote!(
                fn f(self) {}
            ),
            parse_quote!(
                fn f(&self) {}
            ),
            parse_quote!(
                fn f(mut self: Box<Self>, x: u8) {}
            ),
        ] {
            assert_one_error(item, "`#[offload]` functions cannot take `self`");
        }
    }

    #[test]
    fn rejects_borrowed_arguments() {
        assert_eq!(
            errors(parse_quote!(
                fn f(x: &str) {}
            )),
            ["arguments must be passed by value: they are sent to another process; take \
              `String` instead of `&str`"]
        );
        assert_eq!(
            errors(parse_quote!(
                fn f(x: &mut [u8]) {}
            )),
            ["arguments must be passed by value: they are sent to another process; take a \
              `Vec` instead of a slice"]
        );
        assert_eq!(
            errors(parse_quote!(
                fn f(x: &'static Config) {}
            )),
            ["arguments must be passed by value: they are sent to another process"]
        );
        assert_one_error(
            parse_quote!(
                fn f(x: Vec<&str>) {}
            ),
            "arguments must own their data: references cannot be sent",
        );
        assert_one_error(
            parse_quote!(
                fn f(x: (u8, [&u8; 2])) {}
            ),
            "arguments must own their data: references cannot be sent",
        );
        assert_one_error(
            parse_quote!(
                fn f(x: Borrowed<'_>) {}
            ),
            "arguments must own their data: `'_` borrows",
        );
    }

    #[test]
    fn rejects_impl_trait() {
        assert_one_error(
            parse_quote!(
                fn f(x: impl Into<String>) {}
            ),
            "`impl Trait` arguments are not supported",
        );
        assert_one_error(
            parse_quote!(
                fn f(x: Vec<impl Clone>) {}
            ),
            "`impl Trait` arguments are not supported",
        );
        assert_one_error(
            parse_quote!(
                fn f() -> impl Clone {
                    0
                }
            ),
            "`#[offload]` functions cannot return `impl Trait`",
        );
    }

    #[test]
    fn rejects_borrowed_returns() {
        assert_one_error(
            parse_quote!(
                fn f() -> &'static str {
                    ""
                }
            ),
            "return values must own their data: references cannot be sent back",
        );
        assert_one_error(
            parse_quote!(
                fn f() -> Option<Borrowed<'_>> {
                    None
                }
            ),
            "return values must own their data: `'_` borrows",
        );
        assert_one_error(
            parse_quote!(
                fn f() -> ! {
                    loop {}
                }
            ),
            "`#[offload]` functions cannot return `!`",
        );
    }

    #[test]
    fn rejects_self_type() {
        assert_one_error(
            parse_quote!(
                fn f() -> Self {
                    todo!()
                }
            ),
            "`#[offload]` functions cannot use `Self`",
        );
        assert_one_error(
            parse_quote!(
                fn f(x: Vec<Self::Item>) {}
            ),
            "`#[offload]` functions cannot use `Self`",
        );
    }

    #[test]
    fn rejects_cfg_on_arguments() {
        assert_one_error(
            parse_quote!(
                fn f(#[cfg(unix)] x: u8) {}
            ),
            "`#[cfg]` on arguments of `#[offload]` functions is not supported",
        );
    }

    #[test]
    fn reports_every_problem() {
        let errors = errors(parse_quote!(
            async unsafe fn f<T>(&self, x: &T) -> impl Sized {}
        ));
        assert_eq!(errors.len(), 6, "{errors:?}");
    }
}
