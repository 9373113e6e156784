//! The one place that spells `<crate>::__private_v1::...`: every path into the runtime that an
//! expansion uses. `<crate>` is `::offload` unless the attribute says `crate = "..."`.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote};
use syn::Path;

/// Paths into the runtime's `__private_v1` module, as seen from the expansion: through one
/// `use` of it at the top of the stub's body ([`Runtime::import`]), so that a runtime without
/// that module (one of another release) is one error, on that `use`, and nothing else.
pub(crate) struct Runtime {
    krate: TokenStream,
    private: TokenStream,
}

impl Runtime {
    pub(crate) fn new(krate: Option<&Path>) -> Runtime {
        let krate = krate.map_or_else(|| quote!(::offload), ToTokens::to_token_stream);
        Runtime { krate, private: quote!(__offload_rt) }
    }

    /// The `use` that every other path here goes through; first in the stub's body.
    pub(crate) fn import(&self) -> TokenStream {
        let (krate, private) = (&self.krate, &self.private);
        quote!(use #krate::__private_v1 as #private;)
    }

    /// The error type of every offloaded call, by its public path: it is in the stub's
    /// signature, outside the body that imports the rest.
    pub(crate) fn public_error(&self) -> TokenStream {
        let krate = &self.krate;
        quote!(#krate::Error)
    }

    /// The error type of every offloaded call.
    pub(crate) fn error(&self) -> TokenStream {
        self.item("Error")
    }

    /// What the worker side reports when it cannot decode or encode.
    pub(crate) fn protocol_error(&self) -> TokenStream {
        self.item("ProtocolError")
    }

    pub(crate) fn linkme(&self) -> TokenStream {
        self.item("linkme")
    }

    /// The distributed slice every entry is added to.
    pub(crate) fn entries(&self) -> TokenStream {
        self.item("ENTRIES")
    }

    /// `fn worker_state<T>(&'static Entry) -> Result<&'static T, ProtocolError>`: the state
    /// this worker built for an entry.
    pub(crate) fn worker_state(&self) -> TokenStream {
        self.item("worker_state")
    }

    /// `Box<dyn Any>`: a state as its builder hands it over.
    pub(crate) fn state_box(&self) -> TokenStream {
        self.item("StateBox")
    }

    /// The worker's pre-`main` hook, which each stub references to keep it linked.
    pub(crate) fn worker_hook(&self) -> TokenStream {
        self.item("ENTER_WORKER_MODE")
    }

    pub(crate) fn entry(&self) -> TokenStream {
        self.item("Entry")
    }

    /// The `Options` struct of `offload_spec`: what an attribute says about plain settings.
    pub(crate) fn options(&self) -> TokenStream {
        self.item("Options")
    }

    pub(crate) fn workers_spec(&self) -> TokenStream {
        self.item("WorkersSpec")
    }

    pub(crate) fn overload(&self) -> TokenStream {
        self.item("Overload")
    }

    /// An item of the `serde` crate that the runtime re-exports, e.g. `serde("ser::Serializer")`.
    pub(crate) fn serde(&self, path: &str) -> TokenStream {
        self.item(&format!("serde::{path}"))
    }

    /// `fn decode_args<T: DeserializeOwned>(&[u8]) -> Result<T, ProtocolError>`.
    pub(crate) fn decode_args(&self) -> TokenStream {
        self.item("decode_args")
    }

    /// `fn encode_return<T: Serialize + ?Sized>(&T, &mut Vec<u8>) -> Result<(), ProtocolError>`.
    pub(crate) fn encode_return(&self) -> TokenStream {
        self.item("encode_return")
    }

    /// `fn encode_return_bytes(Vec<u8>, &mut Vec<u8>) -> Result<(), ProtocolError>`.
    pub(crate) fn encode_return_bytes(&self) -> TokenStream {
        self.item("encode_return_bytes")
    }

    /// `async fn call<A, R>(&'static Entry, A) -> Result<R, Error>`.
    pub(crate) fn call(&self) -> TokenStream {
        self.item("call")
    }

    /// `fn stream<A, T>(&'static Entry, A) -> Streamed<T>`.
    pub(crate) fn stream(&self) -> TokenStream {
        self.item("stream")
    }

    /// `fn stream_items<T: Serialize>(impl IntoIterator<Item = T>) -> Result<(), ProtocolError>`.
    pub(crate) fn stream_items(&self) -> TokenStream {
        self.item("stream_items")
    }

    /// `Streamed<T>`, the stub's return type for a function that streams.
    pub(crate) fn streamed(&self) -> TokenStream {
        let krate = &self.krate;
        quote!(#krate::Streamed)
    }

    /// `trait Args: Serialize + Send + 'static { fn for_each_bytes(..) }`.
    pub(crate) fn args_trait(&self) -> TokenStream {
        self.item("Args")
    }

    /// `struct SendBytes<'a>(&'a [u8])`: a byte-vector argument as the caller encodes it.
    pub(crate) fn send_bytes(&self) -> TokenStream {
        self.item("SendBytes")
    }

    /// `struct RecvBytes`: a byte-vector argument as the worker decodes it.
    pub(crate) fn recv_bytes(&self) -> TokenStream {
        self.item("RecvBytes")
    }

    /// `async fn call_keeping_args<A, R>(&'static Entry, A) -> Result<R, (Error, A)>`.
    pub(crate) fn call_keeping_args(&self) -> TokenStream {
        self.item("call_keeping_args")
    }

    /// `async fn fallback<F: Fallback<Args, R, Kind>, Args, R, Kind>(F, Args) -> R`, with every
    /// token at `span` (the name of the user's fallback), so that a fallback of the wrong
    /// signature is reported there.
    pub(crate) fn fallback(&self, span: Span) -> TokenStream {
        respan(self.item("fallback"), span)
    }

    /// `const fn assert_transferable<T: Transferable>()`, with every token at `span` so
    /// that an unmet bound points at the user's type.
    pub(crate) fn assert_transferable(&self, span: Span) -> TokenStream {
        respan(self.item("assert_transferable"), span)
    }

    fn item(&self, name: &str) -> TokenStream {
        let private = &self.private;
        let name: TokenStream = name.parse().expect("a path");
        quote!(#private::#name)
    }
}

/// `tokens`, every one of them at `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let TokenTree::Group(group) = &token {
                let mut respanned = Group::new(group.delimiter(), respan(group.stream(), span));
                respanned.set_span(span);
                token = TokenTree::Group(respanned);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proc_macro2::Span;
    use syn::parse_quote;

    use super::Runtime;

    #[test]
    fn defaults_to_offload() {
        let runtime = Runtime::new(None);
        assert_eq!(runtime.import().to_string(), "use :: offload :: __private_v1 as __offload_rt ;");
        assert_eq!(runtime.call().to_string(), "__offload_rt :: call");
        assert_eq!(runtime.send_bytes().to_string(), "__offload_rt :: SendBytes");
    }

    #[test]
    fn honours_crate_path() {
        let runtime = Runtime::new(Some(&parse_quote!(my_crate::offload)));
        assert_eq!(runtime.import().to_string(), "use my_crate :: offload :: __private_v1 as __offload_rt ;");
        assert_eq!(runtime.public_error().to_string(), "my_crate :: offload :: Error");
        assert_eq!(
            runtime.assert_transferable(Span::call_site()).to_string(),
            "__offload_rt :: assert_transferable"
        );
    }
}
