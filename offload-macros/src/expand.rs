//! What `#[offload]` emits for an accepted function: the async stub that callers await, and
//! inside it the user's body as a plain fn, the worker-side entry point, and the registration
//! of that entry point under a stable name.

use std::num::NonZeroUsize;

use proc_macro2::{Literal, Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{ExprPath, FnArg, Ident, Pat, ReturnType, Type};

use offload_spec::{Overload, Value, WorkersSpec};

use crate::args::OffloadArgs;
use crate::ast::Function;
use crate::paths::Runtime;
use crate::{recovery, signature};

/// The whole macro, on `proc_macro2` streams.
pub(crate) fn offload(args: TokenStream, item: TokenStream) -> TokenStream {
    let (mut args, mut args_error) = OffloadArgs::parse(args);
    // Attributes, visibility and signature; the body stays tokens (see `ast`).
    let function: Function = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(err) => return recovery::unsupported(item, args_error, err),
    };
    if let Err(err) = signature::check(&function, args.state.as_ref()) {
        return recovery::unsupported(item, args_error, err);
    }
    let streams =
        matches!(&function.sig.output, ReturnType::Type(_, ty) if signature::streamed_item(ty).is_some());
    if let Some(at) = args.values.iter().position(|setting| streams && setting.value.0 == "retries") {
        // Expand without it, and say why.
        let setting = args.values.remove(at);
        let err = syn::Error::new(
            setting.span,
            "`retries` is not supported for a function that streams its results: items may \
             already have reached the caller when its worker dies",
        );
        combine(&mut args_error, err);
    }
    if let Some(fallback) = args.fallback.take_if(|_| streams) {
        // Expand without it, and say why.
        let err = syn::Error::new_spanned(
            fallback,
            "`fallback` is not supported for a function that streams its results: items may \
             already have reached the caller when the call fails",
        );
        combine(&mut args_error, err);
    }
    let mut expanded = expand(&args, &function);
    if let Some(err) = args_error {
        // The function is fine: keep it usable, and say only what is wrong with the arguments.
        expanded.extend(err.into_compile_error());
    }
    expanded
}

/// Adds `err` to the errors in `errors`.
fn combine(errors: &mut Option<syn::Error>, err: syn::Error) {
    match errors {
        Some(errors) => errors.combine(err),
        None => *errors = Some(err),
    }
}

/// One argument of the offloaded function.
struct Argument<'a> {
    /// The stub's name for it: the user's, when the pattern is a plain name.
    name: Ident,
    ty: &'a Type,
    /// `Vec<u8>`: sent as one byte string instead of element by element.
    bytes: bool,
}

/// What every part of the expansion needs to know about the function.
struct Context<'a> {
    runtime: Runtime,
    function: &'a Function,
    /// `__offload_impl_<name>`: the user's body, as a plain fn.
    impl_name: Ident,
    arguments: Vec<Argument<'a>>,
    /// The declared return type; `None` for `()`.
    return_ty: Option<&'a Type>,
    /// `T`, when the return type is `impl Iterator<Item = T>`: the function streams.
    stream_item: Option<&'a Type>,
    return_bytes: bool,
    /// `fallback = path::to::fn`.
    fallback: Option<&'a ExprPath>,
    /// `state = path::to::fn`, and the type of the state the first argument refers to.
    state: Option<(&'a ExprPath, &'a Type)>,
}

/// The expansion of a function that [`signature::check`] accepted.
fn expand(args: &OffloadArgs, function: &Function) -> TokenStream {
    let sig = &function.sig;
    // With `state`, the first argument is the worker's state, not the caller's.
    let state = args.state.as_ref().map(|path| {
        let Some(FnArg::Typed(arg)) = sig.inputs.first() else { unreachable!("checked by `signature`") };
        let Type::Reference(reference) = &*arg.ty else { unreachable!("checked by `signature`") };
        (path, &*reference.elem)
    });
    let arguments = sig
        .inputs
        .iter()
        .enumerate()
        .skip(usize::from(state.is_some()))
        .map(|(index, input)| {
            let FnArg::Typed(arg) = input else { unreachable!("receivers are rejected") };
            Argument { name: stub_name(&arg.pat, index), ty: &arg.ty, bytes: is_bytes(&arg.ty) }
        })
        .collect();
    let return_ty = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some(&**ty),
    };
    let cx = Context {
        runtime: Runtime::new(args.krate.as_ref()),
        function,
        impl_name: format_ident!("__offload_impl_{}", sig.ident.unraw()),
        arguments,
        return_ty,
        stream_item: return_ty.and_then(signature::streamed_item),
        return_bytes: return_ty.is_some_and(is_bytes),
        fallback: args.fallback.as_ref(),
        state,
    };

    let impl_fn = cx.impl_fn();
    let invoke_fn = cx.invoke_fn();
    let registration = cx.registration(args);
    let call = cx.call();

    let Function { attrs, vis, sig, .. } = function;
    let name = &sig.ident;
    let stub_args = cx.arguments.iter().map(|Argument { name, ty, .. }| quote!(#name: #ty));
    let return_ty = cx.return_ty_tokens();
    let error = cx.runtime.public_error();
    let import = cx.runtime.import();
    // A function that streams has a plain stub that returns the stream; others an async one.
    let (async_token, output) = match cx.stream_item {
        Some(item) => {
            let streamed = cx.runtime.streamed();
            (TokenStream::new(), quote!(#streamed<#item>))
        }
        None => {
            (quote_spanned!(sig.fn_token.span=> async), quote!(::core::result::Result<#return_ty, #error>))
        }
    };
    let fn_token = &sig.fn_token;
    quote! {
        #(#attrs)*
        #vis #async_token #fn_token #name(#(#stub_args),*) -> #output
        {
            #import
            #impl_fn
            #invoke_fn
            #registration
            #call
        }
    }
}

impl Context<'_> {
    /// The return type as written, or `()`.
    fn return_ty_tokens(&self) -> TokenStream {
        self.return_ty.map_or_else(|| quote!(()), ToTokens::to_token_stream)
    }

    /// `assert_transferable::<ty>();`, whose error points at `ty`.
    ///
    /// Every body that puts a user's type under a serde bound (`call`, `encode_return`, the
    /// argument (de)serialisers) asserts it first, and names the type in a turbofish where
    /// it uses it, so rustc blames the same tokens for both: it reports the unmet
    /// `Transferable` bound (with its `on_unimplemented` message) and drops the serde bounds
    /// that one implies. The identical reports of the different bodies are shown once.
    fn assert_transferable(&self, ty: &Type) -> TokenStream {
        let assert = self.runtime.assert_transferable(ty.span());
        quote_spanned!(ty.span()=> #assert::<#ty>();)
    }

    /// The user's function, unchanged but for its name: the body is the tokens as written,
    /// inner attributes included. It sits inside the stub, so its name cannot clash with
    /// anything and the stub can be an associated function.
    fn impl_fn(&self) -> TokenStream {
        let Function { sig, body, .. } = self.function;
        let impl_name = &self.impl_name;
        let inputs = &sig.inputs;
        let output = &sig.output;
        quote! {
            #[allow(non_snake_case, clippy::too_many_arguments, clippy::needless_pass_by_value)]
            fn #impl_name(#inputs) #output #body
        }
    }

    /// The worker side: decode the arguments, run the user's function, encode its result.
    fn invoke_fn(&self) -> TokenStream {
        let rt = &self.runtime;
        let protocol_error = rt.protocol_error();
        let decode_args = rt.decode_args();
        let encode_return = rt.encode_return();
        let input = Ident::new("input", Span::mixed_site());
        let out = Ident::new("out", Span::mixed_site());
        let ret = Ident::new("ret", Span::mixed_site());
        let impl_name = &self.impl_name;

        let decoded: Vec<Ident> = (0..self.arguments.len())
            .map(|index| format_ident!("arg{}", index, span = Span::mixed_site()))
            .collect();
        let (owned_args, decode) = if self.arguments.is_empty() {
            (TokenStream::new(), quote!(let () = #decode_args::<()>(#input)?;))
        } else {
            let decode = quote! {
                let __OffloadOwnedArgs(#(#decoded),*) =
                    #decode_args::<__OffloadOwnedArgs>(#input)?;
            };
            (self.owned_args(), decode)
        };
        let state_arg = self.state.map(|(_, ty)| {
            let worker_state = rt.worker_state();
            quote!(#worker_state::<#ty>(&__OFFLOAD_ENTRY)?)
        });
        let impl_args =
            state_arg.into_iter().chain(self.arguments.iter().zip(&decoded).map(|(arg, decoded)| {
                if arg.bytes { quote!(#decoded.into_vec()) } else { quote!(#decoded) }
            }));
        let (assert, encode) = match (self.stream_item, self.return_ty) {
            (Some(item), _) => {
                let stream_items = rt.stream_items();
                let encode = quote! {
                    #stream_items::<#item>(#ret)?;
                    #encode_return::<()>(&(), #out)
                };
                (self.assert_transferable(item), encode)
            }
            (None, Some(_)) if self.return_bytes => {
                let encode_return_bytes = rt.encode_return_bytes();
                (TokenStream::new(), quote!(#encode_return_bytes(#ret, #out)))
            }
            (None, Some(ty)) => (self.assert_transferable(ty), quote!(#encode_return::<#ty>(&#ret, #out))),
            (None, None) => (TokenStream::new(), quote!(#encode_return::<()>(&#ret, #out))),
        };
        quote! {
            fn __offload_invoke(
                #input: &[::core::primitive::u8],
                #out: &mut ::std::vec::Vec<::core::primitive::u8>,
            ) -> ::core::result::Result<(), #protocol_error> {
                #owned_args
                #assert
                #decode
                let #ret = #impl_name(#(#impl_args),*);
                #encode
            }
        }
    }

    /// `__OffloadOwnedArgs`: the arguments as the worker decodes them, a tuple on the wire.
    /// A hand-written `Deserialize`, so that each argument type is deserialised on its own
    /// and blamed on its own.
    fn owned_args(&self) -> TokenStream {
        let rt = &self.runtime;
        let deserialize = rt.serde("Deserialize");
        let deserializer = rt.serde("Deserializer");
        let visitor = rt.serde("de::Visitor");
        let seq_access = rt.serde("de::SeqAccess");
        let de_error = rt.serde("de::Error");
        let recv_bytes = rt.recv_bytes();
        let seq = Ident::new("seq", Span::mixed_site());
        let formatter = Ident::new("formatter", Span::mixed_site());
        let input = Ident::new("deserializer", Span::mixed_site());
        let value = Ident::new("value", Span::mixed_site());

        let len = self.arguments.len();
        let expecting = format!("a tuple of {len} arguments");
        let wire_types: Vec<TokenStream> = self
            .arguments
            .iter()
            .map(|arg| if arg.bytes { recv_bytes.clone() } else { arg.ty.to_token_stream() })
            .collect();
        let asserts =
            self.arguments.iter().filter(|arg| !arg.bytes).map(|arg| self.assert_transferable(arg.ty));
        let fields: Vec<Ident> =
            (0..len).map(|index| format_ident!("arg{}", index, span = Span::mixed_site())).collect();
        let reads = fields.iter().zip(&wire_types).enumerate().map(|(index, (field, ty))| {
            quote! {
                let #field = match #seq_access::next_element::<#ty>(&mut #seq)? {
                    ::core::option::Option::Some(#value) => #value,
                    ::core::option::Option::None => {
                        return ::core::result::Result::Err(
                            #de_error::invalid_length(#index, &self),
                        );
                    }
                };
            }
        });
        quote! {
            struct __OffloadOwnedArgs(#(#wire_types),*);

            impl<'de> #deserialize<'de> for __OffloadOwnedArgs {
                fn deserialize<__D: #deserializer<'de>>(
                    #input: __D,
                ) -> ::core::result::Result<Self, __D::Error> {
                    struct __OffloadVisitor;

                    impl<'de> #visitor<'de> for __OffloadVisitor {
                        type Value = __OffloadOwnedArgs;

                        fn expecting(
                            &self,
                            #formatter: &mut ::core::fmt::Formatter<'_>,
                        ) -> ::core::fmt::Result {
                            ::core::fmt::Formatter::write_str(#formatter, #expecting)
                        }

                        fn visit_seq<__A: #seq_access<'de>>(
                            self,
                            mut #seq: __A,
                        ) -> ::core::result::Result<Self::Value, __A::Error> {
                            #(#asserts)*
                            #(#reads)*
                            ::core::result::Result::Ok(__OffloadOwnedArgs(#(#fields),*))
                        }
                    }

                    #deserializer::deserialize_tuple(#input, #len, __OffloadVisitor)
                }
            }
        }
    }

    /// `__OffloadArgs`: the caller's arguments, moved into the call, serialised as a tuple.
    /// A hand-written `Serialize`, so that each argument type is serialised and blamed on its
    /// own.
    fn args_struct(&self) -> TokenStream {
        let rt = &self.runtime;
        let serialize = rt.serde("Serialize");
        let serializer = rt.serde("Serializer");
        let serialize_tuple = rt.serde("ser::SerializeTuple");
        let send_bytes = rt.send_bytes();
        let args_trait = rt.args_trait();
        let tuple = Ident::new("tuple", Span::mixed_site());
        let output = Ident::new("serializer", Span::mixed_site());
        let f = Ident::new("f", Span::mixed_site());

        let len = self.arguments.len();
        let types = self.arguments.iter().map(|arg| arg.ty);
        let asserts =
            self.arguments.iter().filter(|arg| !arg.bytes).map(|arg| self.assert_transferable(arg.ty));
        // The byte vectors, which may go in bulk frames of their own.
        let byte_fields: Vec<syn::Index> =
            (0..len).filter(|&index| self.arguments[index].bytes).map(syn::Index::from).collect();
        let for_each_bytes = if byte_fields.is_empty() {
            TokenStream::new()
        } else {
            quote! {
                fn for_each_bytes<'a>(
                    &'a self,
                    #f: &mut dyn ::core::ops::FnMut(&'a [::core::primitive::u8]),
                ) {
                    #(#f(&self.#byte_fields);)*
                }
            }
        };
        let writes = self.arguments.iter().enumerate().map(|(index, arg)| {
            let index = syn::Index::from(index);
            if arg.bytes {
                quote! {
                    #serialize_tuple::serialize_element::<#send_bytes<'_>>(
                        &mut #tuple,
                        &#send_bytes(&self.#index),
                    )?;
                }
            } else {
                let ty = arg.ty;
                quote!(#serialize_tuple::serialize_element::<#ty>(&mut #tuple, &self.#index)?;)
            }
        });
        quote! {
            struct __OffloadArgs(#(#types),*);

            impl #serialize for __OffloadArgs {
                fn serialize<__S: #serializer>(
                    &self,
                    #output: __S,
                ) -> ::core::result::Result<__S::Ok, __S::Error> {
                    #(#asserts)*
                    let mut #tuple = #serializer::serialize_tuple(#output, #len)?;
                    #(#writes)*
                    #serialize_tuple::end(#tuple)
                }
            }

            impl #args_trait for __OffloadArgs {
                #for_each_bytes
            }
        }
    }

    /// The entry the worker looks up by name, with the attribute's settings.
    ///
    /// The name is the module path, the function's name, a hash of its signature and the
    /// position of its name in the source: two functions of one module with the same name
    /// and signature, in two function bodies, are two entries. `line!()` and `column!()` are
    /// spanned on the user's identifier, so they give its position, not the attribute's.
    fn registration(&self, args: &OffloadArgs) -> TokenStream {
        let rt = &self.runtime;
        let linkme = rt.linkme();
        let entries = rt.entries();
        let entry = rt.entry();
        let ident = &self.function.sig.ident;
        let name = ident.unraw();
        let key = format!("::{name}#{:016x}@", self.signature_hash());
        let display = format!("::{name}");
        let line = quote_spanned!(ident.span()=> ::core::line!());
        let column = quote_spanned!(ident.span()=> ::core::column!());

        let mut settings = TokenStream::new();
        // The settings with plain values, as fields of one `Options` constant, each spanned
        // at the literal it came from.
        let fields: Vec<TokenStream> = args
            .values
            .iter()
            .map(|setting| {
                let (name, value) = setting.value;
                let field = Ident::new(name, setting.span);
                let value = match value {
                    Value::Millis(n) | Value::Bytes(n) | Value::Count(n) => {
                        Literal::u64_unsuffixed(n).into_token_stream()
                    }
                    Value::Workers(spec) => workers_spec(rt, spec),
                    Value::Overload(policy) => {
                        let path = rt.overload();
                        match policy {
                            Overload::Wait => quote!(#path::Wait),
                            Overload::Reject => quote!(#path::Reject),
                        }
                    }
                };
                quote_spanned!(setting.span=> #field: ::core::option::Option::Some(#value))
            })
            .collect();
        if !fields.is_empty() {
            let options = rt.options();
            settings.extend(quote!(.with_options(#options { #(#fields,)* ..#options::EMPTY })));
        }
        if let Some(pool) = &args.pool {
            settings.extend(quote_spanned!(pool.span()=> .with_pool(#pool)));
        }
        if let Some((path, ty)) = self.state {
            // A builder of another signature is one error, at the user's path.
            let state_box = rt.state_box();
            let builder = quote_spanned!(path.span()=> let build: fn() -> #ty = #path;);
            settings.extend(quote! {
                .with_state({
                    fn __offload_state() -> #state_box {
                        #builder
                        ::std::boxed::Box::new(build())
                    }
                    __offload_state
                })
            });
        }
        if let Some(breaker) = &args.breaker {
            let failures = Literal::u32_unsuffixed(breaker.value.failures);
            let reset_ms = Literal::u64_unsuffixed(breaker.value.reset_ms);
            settings.extend(quote_spanned!(breaker.span=> .with_breaker(#failures, #reset_ms)));
        }
        quote! {
            #[#linkme::distributed_slice(#entries)]
            #[linkme(crate = #linkme)]
            static __OFFLOAD_ENTRY: #entry = #entry::new(
                ::core::concat!(::core::module_path!(), #key, #line, ":", #column),
                ::core::concat!(::core::module_path!(), #display),
                __offload_invoke,
            )
            #settings;
        }
    }

    /// The caller side: send the arguments, await the result; with a `fallback`, call it in
    /// place of an error that it replaces.
    fn call(&self) -> TokenStream {
        let rt = &self.runtime;
        let call = if self.fallback.is_some() { rt.call_keeping_args() } else { rt.call() };
        let (args_type, args_value) = (self.args_type(), self.args_pattern());
        let args_struct = if self.arguments.is_empty() { TokenStream::new() } else { self.args_struct() };
        let (returned, result) = match (self.stream_item, self.return_ty) {
            (Some(item), _) => {
                let stream = rt.stream();
                let assert = self.assert_transferable(item);
                (assert, quote!(#stream::<#args_type, #item>(&__OFFLOAD_ENTRY, #args_value)))
            }
            (None, Some(_)) if self.return_bytes => {
                let recv_bytes = rt.recv_bytes();
                let result = quote! {
                    #call::<#args_type, #recv_bytes>(&__OFFLOAD_ENTRY, #args_value)
                        .await
                        .map(#recv_bytes::into_vec)
                };
                (TokenStream::new(), result)
            }
            (None, Some(ty)) => {
                let value = Ident::new("value", Span::mixed_site());
                let error = Ident::new("error", Span::mixed_site());
                let result = quote! {
                    match #call::<#args_type, __OffloadReturn>(&__OFFLOAD_ENTRY, #args_value).await {
                        ::core::result::Result::Ok(__OffloadReturn(#value)) => {
                            ::core::result::Result::Ok(#value)
                        }
                        ::core::result::Result::Err(#error) => ::core::result::Result::Err(#error),
                    }
                };
                (self.returned(ty), result)
            }
            (None, None) => {
                (TokenStream::new(), quote!(#call::<#args_type, ()>(&__OFFLOAD_ENTRY, #args_value).await))
            }
        };
        let result = match self.fallback {
            Some(fallback) => self.fall_back(fallback, result),
            None => result,
        };
        let hook = rt.worker_hook();
        quote! {
            #args_struct
            #returned
            // Keeps the worker's pre-`main` hook in every binary that can call: it is what
            // makes a worker of the binary.
            #[cfg(target_os = "linux")]
            ::core::hint::black_box(&#hook);
            #result
        }
    }

    /// `__OffloadArgs`, or `()` for a function without arguments.
    fn args_type(&self) -> TokenStream {
        if self.arguments.is_empty() { quote!(()) } else { quote!(__OffloadArgs) }
    }

    /// `__OffloadArgs(a, b, ..)`: the arguments by their stub names, as a value to send or
    /// a pattern that takes them back.
    fn args_pattern(&self) -> TokenStream {
        if self.arguments.is_empty() {
            return quote!(());
        }
        let names = self.arguments.iter().map(|arg| &arg.name);
        quote!(__OffloadArgs(#(#names),*))
    }

    /// `result`, unless it is an error that `fallback` replaces: then what `fallback` returns.
    /// The call gives the arguments back with an error, and they are moved into `fallback`.
    ///
    /// This is where the fallback's signature is checked: its `Fallback` bound is spanned at
    /// the user's path, so a fallback with other argument or return types is one error,
    /// there, with the message of `Fallback`'s `on_unimplemented`.
    fn fall_back(&self, fallback: &ExprPath, result: TokenStream) -> TokenStream {
        let rt = &self.runtime;
        let error_ty = rt.error();
        // The function's name, the path's last segment: rustc points at the `_` that stands for
        // `F`, one token, and a span cannot be joined across tokens on stable.
        let span =
            fallback.path.segments.last().map_or_else(|| fallback.span(), |segment| segment.ident.span());
        let call_fallback = rt.fallback(span);
        let return_ty = self.return_ty_tokens();
        let types = self.arguments.iter().map(|arg| arg.ty);
        let names = self.arguments.iter().map(|arg| &arg.name);
        // `F` and `Kind` are inferred, `Args` and `R` are the offloaded function's. The call
        // and its `.await` are spanned at the function's name: rustc blames an unmet bound
        // on the inferred `F` there, and shows the identical report about the `.await` once.
        let call = quote_spanned! {span=>
            #call_fallback::<_, (#(#types,)*), #return_ty, _>(#fallback, (#(#names,)*)).await
        };
        let result_var = Ident::new("result", Span::mixed_site());
        let value = Ident::new("value", Span::mixed_site());
        let error = Ident::new("error", Span::mixed_site());
        let (args_type, args) = (self.args_type(), self.args_pattern());
        quote! {
            let #result_var: ::core::result::Result<
                #return_ty,
                (#error_ty, ::core::option::Option<#args_type>),
            > = #result;
            match #result_var {
                ::core::result::Result::Ok(#value) => ::core::result::Result::Ok(#value),
                ::core::result::Result::Err((#error, ::core::option::Option::Some(#args)))
                    if #error_ty::should_fall_back(&#error) =>
                {
                    ::core::result::Result::Ok(#call)
                }
                ::core::result::Result::Err((#error, _)) => ::core::result::Result::Err(#error),
            }
        }
    }

    /// `__OffloadReturn`: the return value as the caller decodes it. A hand-written
    /// `Deserialize` that names the type in a turbofish, so that a type serde cannot decode
    /// is blamed at the type, once.
    fn returned(&self, ty: &Type) -> TokenStream {
        let rt = &self.runtime;
        let deserialize = rt.serde("Deserialize");
        let deserializer = rt.serde("Deserializer");
        let assert = self.assert_transferable(ty);
        let value = Ident::new("value", Span::mixed_site());
        let error = Ident::new("error", Span::mixed_site());
        let input = Ident::new("deserializer", Span::mixed_site());
        quote! {
            struct __OffloadReturn(#ty);

            impl<'de> #deserialize<'de> for __OffloadReturn {
                fn deserialize<__D: #deserializer<'de>>(
                    #input: __D,
                ) -> ::core::result::Result<Self, __D::Error> {
                    fn __offload_deserialize<'de, __T, __D>(
                        #input: __D,
                    ) -> ::core::result::Result<__T, __D::Error>
                    where
                        __T: #deserialize<'de>,
                        __D: #deserializer<'de>,
                    {
                        <__T as #deserialize<'de>>::deserialize(#input)
                    }

                    #assert
                    match __offload_deserialize::<#ty, __D>(#input) {
                        ::core::result::Result::Ok(#value) => {
                            ::core::result::Result::Ok(__OffloadReturn(#value))
                        }
                        ::core::result::Result::Err(#error) => ::core::result::Result::Err(#error),
                    }
                }
            }
        }
    }

    /// Tells apart functions of the same module and name with different signatures, so that
    /// entries of different builds of a crate never match by accident.
    fn signature_hash(&self) -> u64 {
        let types: Vec<String> =
            self.arguments.iter().map(|arg| arg.ty.to_token_stream().to_string()).collect();
        let text = format!("({}) -> {}", types.join(", "), self.return_ty_tokens());
        text.bytes()
            .fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
    }
}

/// The stub's name for argument `index`: the user's name when the pattern is a plain name
/// (so the docs show it), otherwise `__argN`. Mixed-site: only the expansion refers to it.
fn stub_name(pat: &Pat, index: usize) -> Ident {
    match pat {
        Pat::Ident(pat) if pat.subpat.is_none() => {
            let mut name = pat.ident.clone();
            name.set_span(Span::mixed_site());
            name
        }
        _ => format_ident!("__arg{}", index, span = Span::mixed_site()),
    }
}

/// `Vec<u8>`, however the path to `Vec` is written.
fn is_bytes(ty: &Type) -> bool {
    match ty {
        Type::Group(group) => is_bytes(&group.elem),
        Type::Paren(paren) => is_bytes(&paren.elem),
        Type::Path(path) if path.qself.is_none() => {
            let Some(last) = path.path.segments.last() else { return false };
            let syn::PathArguments::AngleBracketed(args) = &last.arguments else { return false };
            last.ident == "Vec" && args.args.len() == 1 && is_u8(&args.args[0])
        }
        _ => false,
    }
}

fn is_u8(arg: &syn::GenericArgument) -> bool {
    let syn::GenericArgument::Type(Type::Path(path)) = arg else { return false };
    path.qself.is_none()
        && path.path.segments.last().is_some_and(|last| last.ident == "u8" && last.arguments.is_none())
}

/// A `WorkersSpec` expression that can initialise a static.
fn workers_spec(rt: &Runtime, spec: WorkersSpec) -> TokenStream {
    let path = rt.workers_spec();
    let non_zero = |n: NonZeroUsize| {
        let n = Literal::usize_unsuffixed(n.get());
        let bound = Ident::new("n", Span::mixed_site());
        quote! {
            match ::core::num::NonZeroUsize::new(#n) {
                ::core::option::Option::Some(#bound) => #bound,
                ::core::option::Option::None => ::core::panic!(),
            }
        }
    };
    match spec {
        WorkersSpec::Fixed(n) => {
            let n = non_zero(n);
            quote!(#path::Fixed(#n))
        }
        WorkersSpec::Cpus => quote!(#path::Cpus),
        WorkersSpec::CpusMinus(n) => {
            let n = Literal::usize_unsuffixed(n);
            quote!(#path::CpusMinus(#n))
        }
        WorkersSpec::CpusDiv(n) => {
            let n = non_zero(n);
            quote!(#path::CpusDiv(#n))
        }
    }
}

#[cfg(test)]
mod tests {
    use proc_macro2::TokenStream;
    use quote::quote;
    use syn::{Type, parse_quote};

    use super::{is_bytes, offload};

    /// The expansion as a string without spaces, for substring checks.
    fn expand(args: TokenStream, item: TokenStream) -> String {
        offload(args, item).to_string().replace(' ', "")
    }

    #[test]
    fn stub_keeps_name_visibility_and_attributes() {
        let out = expand(
            quote!(),
            quote! {
                /// docs
                #[inline]
                pub(crate) fn digest(data: Vec<u8>, (a, b): (u32, u32)) -> [u8; 32] { body() }
            },
        );
        assert!(out.starts_with("#[doc=r\"docs\"]#[inline]pub(crate)asyncfndigest(data:Vec<u8>,__arg1:(u32,u32))->::core::result::Result<[u8;32],::offload::Error>{use::offload::__private_v1as__offload_rt;"), "{out}");
        assert!(
            out.contains("fn__offload_impl_digest(data:Vec<u8>,(a,b):(u32,u32))->[u8;32]{body()}"),
            "{out}"
        );
        assert!(out.contains("::core::concat!(::core::module_path!(),\"::digest#"), "{out}");
        assert!(out.contains("::core::concat!(::core::module_path!(),\"::digest\"),"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn body_is_kept_as_written() {
        // Not valid Rust: the macro does not parse the body, the compiler reports it.
        let out = expand(
            quote!(),
            quote! {
                fn half(x: u32) -> u32 {
                    #![allow(unused)]
                    let y = x / 2
                    y
                }
            },
        );
        assert!(out.starts_with("asyncfnhalf(x:u32)->"), "{out}");
        assert!(out.contains("fn__offload_impl_half(x:u32)->u32{#![allow(unused)]lety=x/2y}"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn settings_only_when_given() {
        let out = expand(
            quote!(),
            quote!(
                fn f() {}
            ),
        );
        assert!(!out.contains(".with_"), "{out}");

        let out = expand(
            quote!(timeout = "1m", pool = "p"),
            quote!(
                fn f() {}
            ),
        );
        assert!(
            out.contains(
                ".with_options(__offload_rt::Options{timeout:::core::option::Option::Some(60000),\
                 ..__offload_rt::Options::EMPTY}).with_pool(\"p\");"
            ),
            "{out}"
        );

        let out = expand(
            quote!(
                pool = "p",
                max_rss = "1KB",
                max_tasks = 7,
                overload = "reject",
                queue = 0,
                memory = "2KiB",
                workers = "cpus",
                timeout = "1s",
            ),
            quote!(
                fn f() {}
            ),
        );
        assert!(
            out.contains(
                ".with_options(__offload_rt::Options{\
                 max_rss:::core::option::Option::Some(1000),\
                 max_tasks:::core::option::Option::Some(7),\
                 overload:::core::option::Option::Some(__offload_rt::Overload::Reject),\
                 queue:::core::option::Option::Some(0),\
                 memory:::core::option::Option::Some(2048),\
                 workers:::core::option::Option::Some(__offload_rt::WorkersSpec::Cpus),\
                 timeout:::core::option::Option::Some(1000),\
                 ..__offload_rt::Options::EMPTY}).with_pool(\"p\");"
            ),
            "{out}"
        );
    }

    #[test]
    fn breaker_after_the_other_settings() {
        let out = expand(
            quote!(breaker(reset = "1m"), pool = "p"),
            quote!(
                fn f() {}
            ),
        );
        assert!(out.contains(".with_pool(\"p\").with_breaker(5,60000);"), "{out}");

        let out = expand(
            quote!(breaker),
            quote!(
                fn f() {}
            ),
        );
        assert!(out.contains("__offload_invoke,).with_breaker(5,30000);"), "{out}");
    }

    #[test]
    fn fallback_replaces_the_errors_it_should() {
        let out = expand(
            quote!(fallback = cache::get),
            quote!(
                fn f(data: Vec<u8>, (a, b): (u32, u32)) -> Vec<u8> {
                    data
                }
            ),
        );
        assert!(
            out.contains(
                "letresult:::core::result::Result<Vec<u8>,\
                 (__offload_rt::Error,::core::option::Option<__OffloadArgs>),>=\
                 __offload_rt::call_keeping_args::<__OffloadArgs,__offload_rt::RecvBytes>\
                 (&__OFFLOAD_ENTRY,__OffloadArgs(data,__arg1)).await\
                 .map(__offload_rt::RecvBytes::into_vec);\
                 matchresult{\
                 ::core::result::Result::Ok(value)=>::core::result::Result::Ok(value),\
                 ::core::result::Result::Err((error,::core::option::Option::Some(__OffloadArgs(data,__arg1))))\
                 if__offload_rt::Error::should_fall_back(&error)=>{\
                 ::core::result::Result::Ok(__offload_rt::fallback::<_,(Vec<u8>,(u32,u32),),Vec<u8>,_>\
                 (cache::get,(data,__arg1,)).await)}\
                 ::core::result::Result::Err((error,_))=>::core::result::Result::Err(error),}}"
            ),
            "{out}"
        );

        let out = expand(
            quote!(fallback = g),
            quote!(
                fn f() {}
            ),
        );
        assert!(out.contains("__offload_rt::fallback::<_,(),(),_>(g,()).await"), "{out}");
        assert!(
            out.contains("::core::result::Result::Err((error,::core::option::Option::Some(())))if"),
            "{out}"
        );

        let out = expand(
            quote!(),
            quote!(
                fn f() {}
            ),
        );
        assert!(!out.contains("should_fall_back"), "{out}");
    }

    #[test]
    fn overload_policies() {
        for (policy, variant) in [("wait", "Wait"), ("reject", "Reject")] {
            let out = expand(
                quote!(overload = #policy, crate = "my::offload"),
                quote!(
                    fn f() {}
                ),
            );
            assert!(
                out.contains(&format!(
                    "overload:::core::option::Option::Some(__offload_rt::Overload::{variant})"
                )),
                "{out}"
            );
        }
    }

    #[test]
    fn entry_name_has_the_position() {
        let out = expand(
            quote!(),
            quote!(
                fn f() {}
            ),
        );
        let prefix = "::core::concat!(::core::module_path!(),\"::f#";
        let start = out.find(prefix).unwrap() + prefix.len();
        let (hash, rest) = out[start..].split_at(16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{out}");
        assert!(rest.starts_with("@\",::core::line!(),\":\",::core::column!()),"), "{out}");
    }

    #[test]
    fn workers_specs() {
        let cases = [
            ("4", "WorkersSpec::Fixed(match::core::num::NonZeroUsize::new(4)"),
            ("cpus", "WorkersSpec::Cpus)"),
            ("cpus-2", "WorkersSpec::CpusMinus(2)"),
            ("cpus/3", "WorkersSpec::CpusDiv(match::core::num::NonZeroUsize::new(3)"),
        ];
        for (spec, expected) in cases {
            let out = expand(
                quote!(workers = #spec),
                quote!(
                    fn f() {}
                ),
            );
            assert!(
                out.contains(&format!("workers:::core::option::Option::Some(__offload_rt::{expected}")),
                "{out}"
            );
        }
    }

    #[test]
    fn crate_path_is_used_everywhere() {
        let out = expand(
            quote!(crate = "my::reexport"),
            quote!(
                fn f(x: u32) -> u32 {
                    x
                }
            ),
        );
        assert!(!out.contains("::offload::"), "{out}");
        assert!(out.contains("usemy::reexport::__private_v1as__offload_rt;"), "{out}");
        assert!(out.contains("->::core::result::Result<u32,my::reexport::Error>"), "{out}");
    }

    #[test]
    fn bytes_go_as_byte_strings_or_bulk_frames() {
        let out = expand(
            quote!(),
            quote!(
                fn f(data: Vec<u8>) -> Vec<u8> {
                    data
                }
            ),
        );
        assert!(out.contains("&__offload_rt::SendBytes(&self.0)"), "{out}");
        assert!(out.contains("next_element::<__offload_rt::RecvBytes>"), "{out}");
        assert!(out.contains("impl__offload_rt::Argsfor__OffloadArgs{fnfor_each_bytes"), "{out}");
        assert!(out.contains("{f(&self.0);}"), "{out}");
        assert!(out.contains("__offload_impl_f(arg0.into_vec())"), "{out}");
        assert!(out.contains("__offload_rt::encode_return_bytes(ret,out)"), "{out}");
        assert!(out.contains(".map(__offload_rt::RecvBytes::into_vec)"), "{out}");
    }

    #[test]
    fn bad_arguments_still_expand() {
        let out = expand(
            quote!(timeout = "0s"),
            quote!(
                fn f() {}
            ),
        );
        assert!(out.contains("asyncfnf()"), "{out}");
        assert!(out.contains("compile_error!{\"timeoutmustbegreaterthanzero\"}"), "{out}");
    }

    #[test]
    fn unsupported_functions_are_left_as_written() {
        let item = quote!(
            async fn f(x: &str) {}
        );
        let out = expand(quote!(timeout = "0s"), item.clone());
        assert!(out.starts_with(&item.to_string().replace(' ', "")), "{out}");
        assert_eq!(out.matches("compile_error!").count(), 3, "{out}");

        let out = expand(
            quote!(),
            quote!(
                struct S;
            ),
        );
        assert!(out.starts_with("structS;"), "{out}");
        assert_eq!(out.matches("compile_error!").count(), 1, "{out}");
    }

    #[test]
    fn signature_hash_tells_signatures_apart() {
        let key = |item: TokenStream| {
            let out = expand(quote!(), item);
            let start = out.find("\"::f#").unwrap();
            out[start..start + 22].to_owned()
        };
        let a = key(quote!(
            fn f(x: u32) -> u64 {
                0
            }
        ));
        assert_eq!(
            a,
            key(quote!(
                fn f(y: u32) -> u64 {
                    1
                }
            ))
        );
        assert_ne!(
            a,
            key(quote!(
                fn f(x: u64) -> u64 {
                    0
                }
            ))
        );
        assert_ne!(
            a,
            key(quote!(
                fn f(x: u32) -> u32 {
                    0
                }
            ))
        );
    }

    #[test]
    fn recognises_byte_vectors() {
        let yes: [Type; 4] = [
            parse_quote!(Vec<u8>),
            parse_quote!(std::vec::Vec<u8>),
            parse_quote!(::alloc::vec::Vec<::core::primitive::u8>),
            parse_quote!((Vec<u8>)),
        ];
        let no: [Type; 5] = [
            parse_quote!(Vec<i8>),
            parse_quote!(Vec<u8, A>),
            parse_quote!(Option<Vec<u8>>),
            parse_quote!([u8; 4]),
            parse_quote!(Box<[u8]>),
        ];
        assert!(yes.iter().all(is_bytes));
        assert!(!no.iter().any(is_bytes));
    }
}
