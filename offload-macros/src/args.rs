//! The attribute's arguments: `#[offload(timeout = "30s", workers = "cpus-2", ...)]`.
//!
//! Every value is a string literal, checked here at compile time; errors point at the
//! literal (bad value) or the key (unknown, duplicate, missing value). Parsing goes on past a
//! bad argument so that all of them are reported at once.

mod duration;
mod workers;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, ExprLit, Lit, LitStr, Path, Token};

pub(crate) use self::workers::WorkersSpec;
use crate::Errors;

/// A value and the span of the literal it came from.
#[derive(Debug, Clone)]
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// What the attribute says; `None` where it says nothing, or where the value was invalid
/// (and an error was reported).
#[derive(Default)]
pub(crate) struct OffloadArgs {
    /// `timeout = "..."` in milliseconds, never zero.
    pub(crate) timeout_ms: Option<Spanned<u64>>,
    /// `workers = "..."`.
    pub(crate) workers: Option<Spanned<WorkersSpec>>,
    /// `pool = "..."`, never empty.
    pub(crate) pool: Option<LitStr>,
    /// `crate = "..."`: where the `offload` crate is, `::offload` when not given.
    pub(crate) krate: Option<Path>,
}

/// The accepted keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Timeout,
    Workers,
    Pool,
    Crate,
}

impl Key {
    const ALL: [Key; 4] = [Key::Timeout, Key::Workers, Key::Pool, Key::Crate];

    fn name(self) -> &'static str {
        match self {
            Key::Timeout => "timeout",
            Key::Workers => "workers",
            Key::Pool => "pool",
            Key::Crate => "crate",
        }
    }

    /// How the argument is written, for messages.
    fn example(self) -> &'static str {
        match self {
            Key::Timeout => "`timeout = \"30s\"`",
            Key::Workers => "`workers = \"4\"`",
            Key::Pool => "`pool = \"name\"`",
            Key::Crate => "`crate = \"::offload\"`",
        }
    }

    fn from_path(path: &Path) -> Option<Key> {
        Key::ALL.into_iter().find(|key| path.is_ident(key.name()))
    }

    /// The key a misspelt or guessed argument name most likely meant.
    fn suggest(unknown: &str) -> Option<Key> {
        const ALIASES: &[(&str, Key)] = &[
            ("timeout_ms", Key::Timeout),
            ("timeout_s", Key::Timeout),
            ("timeout_secs", Key::Timeout),
            ("time_out", Key::Timeout),
            ("time_limit", Key::Timeout),
            ("deadline", Key::Timeout),
            ("duration", Key::Timeout),
            ("worker", Key::Workers),
            ("num_workers", Key::Workers),
            ("threads", Key::Workers),
            ("processes", Key::Workers),
            ("procs", Key::Workers),
            ("jobs", Key::Workers),
            ("concurrency", Key::Workers),
            ("parallelism", Key::Workers),
            ("pool_size", Key::Workers),
            ("pool_name", Key::Pool),
            ("krate", Key::Crate),
            ("crate_name", Key::Crate),
            ("crate_path", Key::Crate),
        ];
        let unknown = unknown.to_ascii_lowercase();
        if let Some(&(_, key)) = ALIASES.iter().find(|(alias, _)| *alias == unknown) {
            return Some(key);
        }
        Key::ALL.into_iter().find(|key| edit_distance(&unknown, key.name()) <= 2)
    }
}

impl OffloadArgs {
    /// Parses the attribute's arguments. Returns what could be understood, and the errors
    /// about the rest.
    pub(crate) fn parse(tokens: TokenStream) -> (OffloadArgs, Option<syn::Error>) {
        let mut args = OffloadArgs::default();
        let mut errors = Errors::default();
        let mut seen = Vec::new();
        let parser = syn::meta::parser(|meta| args.parse_one(&meta, &mut seen, &mut errors));
        if let Err(err) = parser.parse2(tokens) {
            errors.push(err);
        }
        (args, errors.finish())
    }

    /// One `key = "value"`. Errors about this argument alone go to `errors`, so parsing
    /// goes on; `Err` is for input that the parser cannot get past.
    fn parse_one(
        &mut self,
        meta: &ParseNestedMeta<'_>,
        seen: &mut Vec<Key>,
        errors: &mut Errors,
    ) -> syn::Result<()> {
        let key = Key::from_path(&meta.path);
        let value = value(meta)?;
        let Some(key) = key else {
            errors.push(unknown_key(&meta.path));
            return Ok(());
        };
        if seen.contains(&key) {
            errors.push(syn::Error::new_spanned(&meta.path, format!("duplicate argument `{}`", key.name())));
            return Ok(());
        }
        seen.push(key);

        let lit = match value {
            Some(Expr::Lit(ExprLit { lit: Lit::Str(lit), attrs })) if attrs.is_empty() => lit,
            Some(other) => {
                let message = format!("expected a string literal, e.g. {}", key.example());
                errors.push(syn::Error::new_spanned(other, message));
                return Ok(());
            }
            None => {
                let message = format!("`{}` needs a value, e.g. {}", key.name(), key.example());
                errors.push(syn::Error::new_spanned(&meta.path, message));
                return Ok(());
            }
        };
        if let Err(err) = self.set(key, &lit) {
            errors.push(err);
        }
        Ok(())
    }

    /// Checks a value and stores it.
    fn set(&mut self, key: Key, lit: &LitStr) -> syn::Result<()> {
        let span = lit.span();
        let text = lit.value();
        let error = |message: String| syn::Error::new(span, message);
        match key {
            Key::Timeout => {
                let value = duration::parse_millis(&text).map_err(error)?;
                self.timeout_ms = Some(Spanned { value, span });
            }
            Key::Workers => {
                let value = workers::parse(&text).map_err(error)?;
                self.workers = Some(Spanned { value, span });
            }
            Key::Pool => {
                if text.trim().is_empty() {
                    return Err(error("pool name must not be empty, e.g. `pool = \"images\"`".to_owned()));
                }
                self.pool = Some(lit.clone());
            }
            Key::Crate => {
                let path = lit.parse_with(Path::parse_mod_style).map_err(|_| {
                    error(format!(
                        "invalid crate path `{text}`: expected a path to the `offload` crate, \
                         such as \"::offload\" or \"my_crate::offload\""
                    ))
                })?;
                self.krate = Some(path);
            }
        }
        Ok(())
    }
}

/// The value after the key, if any: `= <expr>` gives the expression; a parenthesised list
/// (`timeout("30s")`) is consumed and gives `None`, as does a bare key.
fn value(meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Expr>> {
    if meta.input.peek(Token![=]) {
        return meta.value()?.parse().map(Some);
    }
    if meta.input.peek(syn::token::Paren) {
        let _ignored: proc_macro2::TokenTree = meta.input.parse()?;
    }
    Ok(None)
}

fn unknown_key(path: &Path) -> syn::Error {
    let name = path.to_token_stream().to_string().replace(' ', "");
    let expected = Key::ALL.iter().map(|key| format!("`{}`", key.name())).collect::<Vec<_>>().join(", ");
    let mut message = format!("unknown argument `{name}`; expected one of {expected}");
    if let Some(key) = Key::suggest(&name) {
        message.push_str(&format!("; did you mean `{}`?", key.name()));
    }
    syn::Error::new_spanned(path, message)
}

/// Levenshtein distance, for the "did you mean" hint.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::{OffloadArgs, WorkersSpec, edit_distance};

    fn parse_ok(tokens: proc_macro2::TokenStream) -> OffloadArgs {
        let (args, err) = OffloadArgs::parse(tokens);
        if let Some(err) = err {
            panic!("unexpected error: {err}");
        }
        args
    }

    fn errors(tokens: proc_macro2::TokenStream) -> Vec<String> {
        let (_, err) = OffloadArgs::parse(tokens);
        err.map(|err| err.into_iter().map(|e| e.to_string()).collect()).unwrap_or_default()
    }

    #[test]
    fn empty_means_defaults() {
        let args = parse_ok(quote!());
        assert!(args.timeout_ms.is_none());
        assert!(args.workers.is_none());
        assert!(args.pool.is_none());
        assert!(args.krate.is_none());
    }

    #[test]
    fn all_arguments() {
        let args = parse_ok(quote!(
            timeout = "1m 30s",
            workers = "cpus / 2",
            pool = "images",
            crate = "my_crate::offload",
        ));
        assert_eq!(args.timeout_ms.map(|t| t.value), Some(90_000));
        assert_eq!(args.workers.map(|w| w.value), Some(WorkersSpec::CpusDiv(2)));
        assert_eq!(args.pool.map(|p| p.value()).as_deref(), Some("images"));
        let krate = args.krate.unwrap();
        assert_eq!(quote!(#krate).to_string(), "my_crate :: offload");
    }

    #[test]
    fn crate_accepts_absolute_and_crate_paths() {
        for path in ["::offload", "crate::reexports::offload", "offload"] {
            let args = parse_ok(quote!(crate = #path));
            assert!(args.krate.is_some());
        }
    }

    #[test]
    fn unknown_key_lists_the_accepted_ones() {
        assert_eq!(
            errors(quote!(retries = "3")),
            ["unknown argument `retries`; expected one of `timeout`, `workers`, `pool`, `crate`"]
        );
        assert_eq!(
            errors(quote!(a::b = "3")),
            ["unknown argument `a::b`; expected one of `timeout`, `workers`, `pool`, `crate`"]
        );
    }

    #[test]
    fn misspellings_get_a_hint() {
        let cases = [
            (quote!(timeout_ms = 500), "timeout"),
            (quote!(time_out = "1s"), "timeout"),
            (quote!(deadline = "1s"), "timeout"),
            (quote!(timout = "1s"), "timeout"),
            (quote!(Timeout = "1s"), "timeout"),
            (quote!(worker = "4"), "workers"),
            (quote!(threads = "4"), "workers"),
            (quote!(processes = "4"), "workers"),
            (quote!(pools = "a"), "pool"),
            (quote!(krate = "a"), "crate"),
        ];
        for (tokens, key) in cases {
            let errors = errors(tokens);
            assert_eq!(errors.len(), 1);
            assert!(errors[0].ends_with(&format!("; did you mean `{key}`?")), "{}", errors[0]);
        }
        assert!(!errors(quote!(retries = "3"))[0].contains("did you mean"));
    }

    #[test]
    fn duplicate_reported_once_on_the_second() {
        assert_eq!(
            errors(quote!(timeout = "1s", workers = "2", timeout = "2s")),
            ["duplicate argument `timeout`"]
        );
        assert_eq!(
            errors(quote!(crate = "a", crate = "b", crate = "c")),
            ["duplicate argument `crate`", "duplicate argument `crate`"]
        );
    }

    #[test]
    fn values_must_be_string_literals() {
        assert_eq!(errors(quote!(timeout = 30)), ["expected a string literal, e.g. `timeout = \"30s\"`"]);
        assert_eq!(errors(quote!(workers = 4)), ["expected a string literal, e.g. `workers = \"4\"`"]);
        assert_eq!(
            errors(quote!(crate = ::offload)),
            ["expected a string literal, e.g. `crate = \"::offload\"`"]
        );
        assert_eq!(errors(quote!(pool)), ["`pool` needs a value, e.g. `pool = \"name\"`"]);
        assert_eq!(errors(quote!(timeout("1s"))), ["`timeout` needs a value, e.g. `timeout = \"30s\"`"]);
    }

    #[test]
    fn bad_values() {
        assert_eq!(errors(quote!(timeout = "0s")), ["timeout must be greater than zero"]);
        assert_eq!(errors(quote!(workers = "0")), ["workers must be at least 1"]);
        assert_eq!(errors(quote!(pool = "")), ["pool name must not be empty, e.g. `pool = \"images\"`"]);
        assert_eq!(
            errors(quote!(crate = "not a path")),
            ["invalid crate path `not a path`: expected a path to the `offload` crate, such as \
              \"::offload\" or \"my_crate::offload\""]
        );
        assert_eq!(errors(quote!(crate = "")).len(), 1);
        assert_eq!(errors(quote!(crate = "offload<T>")).len(), 1);
    }

    #[test]
    fn all_errors_at_once() {
        let errors = errors(quote!(timeout = "soon", workers = "many", colour = "red", pool = ""));
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("invalid duration `soon`"));
        assert!(errors[1].starts_with("invalid workers spec `many`"));
        assert!(errors[2].starts_with("unknown argument `colour`"));
        assert!(errors[3].starts_with("pool name must not be empty"));
    }

    #[test]
    fn a_bad_value_keeps_the_others() {
        let (args, err) = OffloadArgs::parse(quote!(timeout = "0s", workers = "3"));
        assert!(err.is_some());
        assert!(args.timeout_ms.is_none());
        assert_eq!(args.workers.map(|w| w.value), Some(WorkersSpec::Fixed(3)));
    }

    #[test]
    fn structural_errors_stop_parsing() {
        assert_eq!(errors(quote!(timeout = "1s" workers = "2")), ["expected `,`"]);
        assert_eq!(errors(quote!("1s")).len(), 1);
    }

    #[test]
    fn distance() {
        assert_eq!(edit_distance("timeout", "timeout"), 0);
        assert_eq!(edit_distance("timout", "timeout"), 1);
        assert_eq!(edit_distance("workres", "workers"), 2);
        assert_eq!(edit_distance("", "pool"), 4);
    }
}
