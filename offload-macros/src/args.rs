//! The attribute's arguments: `#[offload(timeout = "30s", workers = "cpus-2", ...)]`.
//!
//! Values are string literals, except the counts `queue`, `max_tasks` and `breaker`'s
//! `failures`, which are integer literals, `breaker`, which is a list of its own
//! (`breaker(failures = 3, reset = "1m")`), and `fallback`, which is a path to a function.
//! Each is checked here at compile time with the grammar of `offload-spec`, which the runtime
//! uses for its environment variables too; errors point at the literal (bad value) or the
//! key (unknown, duplicate, missing value). Parsing goes on past a bad argument so that all
//! of them are reported at once.

use offload_spec::{Grammar, SETTINGS, Setting, Value};
use proc_macro2::{Delimiter, Span, TokenStream};
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::parse::{ParseStream, Parser};
use syn::spanned::Spanned as _;
use syn::{Expr, ExprLit, ExprPath, ExprUnary, Lit, LitInt, LitStr, Path, Token, UnOp};

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
    /// The settings with plain values (`timeout`, `workers`, ...: see
    /// [`offload_spec::SETTINGS`]), each checked, in the order given, spanned at the literal.
    pub(crate) values: Vec<Spanned<(&'static str, Value)>>,
    /// `pool = "..."`, never empty.
    pub(crate) pool: Option<LitStr>,
    /// `breaker(...)`, spanned at the key.
    pub(crate) breaker: Option<Spanned<Breaker>>,
    /// `fallback = path::to::fn`: what stands in for a call that failed worker-side.
    pub(crate) fallback: Option<ExprPath>,
    /// `state = path::to::fn`: builds, once in each worker, what the function's first
    /// argument refers to.
    pub(crate) state: Option<ExprPath>,
    /// `crate = "..."`: where the `offload` crate is, `::offload` when not given.
    pub(crate) krate: Option<Path>,
}

/// `breaker(failures = N, reset = "...")`, with the defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Breaker {
    /// Worker-side failures in a row that open the breaker, never zero.
    pub(crate) failures: u32,
    /// How long it stays open before a trial call, in milliseconds, never zero.
    pub(crate) reset_ms: u64,
}

impl Breaker {
    /// `breaker` without `failures` or `reset`.
    const DEFAULT: Breaker = Breaker {
        failures: offload_spec::defaults::BREAKER_FAILURES,
        reset_ms: offload_spec::defaults::BREAKER_RESET_MS,
    };
}

/// A set of accepted keys: the attribute's ([`Key`]) or those of `breaker(...)`
/// ([`BreakerKey`]). Unknown and duplicate keys, missing values and the messages about
/// values are handled for both by the same helpers.
trait Keys: Copy + PartialEq + 'static {
    /// Every key, in the order messages list them.
    const ALL: &'static [Self];

    /// What a key of this set is called in messages: "argument", "`breaker` argument".
    const WHAT: &'static str;

    /// Other names for a key that edit distance cannot tell: synonyms, abbreviations and
    /// what other tools call the setting. Misspellings (`timout`) and a key with words
    /// around it (`timeout_ms`, `max_queue`) are found without them, by [`suggest`].
    const ALIASES: &'static [(&'static str, Self)];

    fn name(self) -> &'static str;

    /// How the key is written, for messages.
    fn example(self) -> &'static str;
}

/// An accepted key: a setting of [`offload_spec::SETTINGS`], by its place there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key(usize);

impl Key {
    /// The key of the setting `name`; a compile error of this crate for a name that is not
    /// a setting.
    const fn named(name: &str) -> Key {
        let mut i = 0;
        while i < SETTINGS.len() {
            if eq(SETTINGS[i].name.as_bytes(), name.as_bytes()) {
                return Key(i);
            }
            i += 1;
        }
        panic!("not a setting")
    }

    fn setting(self) -> &'static Setting {
        &SETTINGS[self.0]
    }
}

const fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

impl Keys for Key {
    const ALL: &'static [Key] = &{
        let mut all = [Key(0); SETTINGS.len()];
        let mut i = 0;
        while i < all.len() {
            all[i] = Key(i);
            i += 1;
        }
        all
    };

    const WHAT: &'static str = "argument";

    const ALIASES: &'static [(&'static str, Key)] = &[
        ("deadline", Key::named("timeout")),
        // Celery's name.
        ("time_limit", Key::named("timeout")),
        ("threads", Key::named("workers")),
        // `multiprocessing.Pool(processes=)`.
        ("processes", Key::named("workers")),
        // `make -j`, joblib's `n_jobs`.
        ("jobs", Key::named("workers")),
        // Celery's name.
        ("concurrency", Key::named("workers")),
        ("parallelism", Key::named("workers")),
        // Not `pool`: the size of a pool is its number of workers.
        ("pool_size", Key::named("workers")),
        ("mem", Key::named("memory")),
        // What `memory` sets: `RLIMIT_AS`, the address space.
        ("rlimit", Key::named("memory")),
        ("address_space", Key::named("memory")),
        ("backlog", Key::named("queue")),
        ("backpressure", Key::named("overload")),
        ("policy", Key::named("overload")),
        // `multiprocessing.Pool(maxtasksperchild=)`.
        ("maxtasksperchild", Key::named("max_tasks")),
        ("max_calls", Key::named("max_tasks")),
        // gunicorn's name.
        ("max_requests", Key::named("max_tasks")),
        ("recycle", Key::named("max_tasks")),
        ("rss", Key::named("max_rss")),
        // Celery's `max_memory_per_child`, which replaces a worker as `max_rss` does.
        ("max_memory", Key::named("max_rss")),
        ("payload", Key::named("max_payload")),
        ("max_size", Key::named("max_payload")),
        // gRPC's name.
        ("max_message_size", Key::named("max_payload")),
        ("circuit", Key::named("breaker")),
        ("on_error", Key::named("fallback")),
        ("on_failure", Key::named("fallback")),
        ("or_else", Key::named("fallback")),
        ("default", Key::named("fallback")),
    ];

    fn name(self) -> &'static str {
        self.setting().name
    }

    fn example(self) -> &'static str {
        self.setting().example
    }
}

/// The keys of `breaker(...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerKey {
    Failures,
    Reset,
}

impl Keys for BreakerKey {
    const ALL: &'static [BreakerKey] = &[BreakerKey::Failures, BreakerKey::Reset];

    const WHAT: &'static str = "`breaker` argument";

    const ALIASES: &'static [(&'static str, BreakerKey)] = &[
        ("threshold", BreakerKey::Failures),
        // pybreaker's name.
        ("fail_max", BreakerKey::Failures),
        ("cooldown", BreakerKey::Reset),
        // pybreaker's `reset_timeout`.
        ("timeout", BreakerKey::Reset),
    ];

    fn name(self) -> &'static str {
        match self {
            BreakerKey::Failures => "failures",
            BreakerKey::Reset => "reset",
        }
    }

    fn example(self) -> &'static str {
        match self {
            BreakerKey::Failures => "`failures = 5`",
            BreakerKey::Reset => "`reset = \"30s\"`",
        }
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

    /// One `key = value`, or `breaker(...)`. Errors about this argument alone go to `errors`,
    /// so parsing goes on; `Err` is for input that the parser cannot get past.
    fn parse_one(
        &mut self,
        meta: &ParseNestedMeta<'_>,
        seen: &mut Vec<Key>,
        errors: &mut Errors,
    ) -> syn::Result<()> {
        let Some(key) = accepted_key(meta, seen, errors)? else { return Ok(()) };
        if key.setting().grammar == Grammar::Breaker && !meta.input.peek(Token![=]) {
            self.breaker = parse_breaker(meta, errors)?;
            return Ok(());
        }
        let Some(value) = value(meta)? else {
            errors.push(needs_a_value(meta, key));
            return Ok(());
        };
        if let Err(err) = self.set(key, &value) {
            errors.push(err);
        }
        Ok(())
    }

    /// Checks a value and stores it.
    fn set(&mut self, key: Key, value: &Expr) -> syn::Result<()> {
        let name = key.name();
        match key.setting().grammar {
            Grammar::Name => {
                let lit = string(key, value)?;
                if lit.value().trim().is_empty() {
                    return Err(syn::Error::new(
                        lit.span(),
                        format!("{name} name must not be empty, e.g. `{name} = \"images\"`"),
                    ));
                }
                self.pool = Some(lit);
            }
            // `breaker(...)` and `breaker` are parsed by `parse_breaker`: this is `breaker = ..`.
            Grammar::Breaker => {
                let message = format!("expected a parenthesised list, e.g. {}", key.example());
                return Err(syn::Error::new_spanned(value, message));
            }
            Grammar::FunctionPath if name == "state" => self.state = Some(function_path(key, value)?),
            Grammar::FunctionPath => self.fallback = Some(function_path(key, value)?),
            Grammar::CratePath => {
                let lit = string(key, value)?;
                let path = lit.parse_with(Path::parse_mod_style).map_err(|_| {
                    let message = format!(
                        "invalid crate path `{}`: expected a path to the `offload` crate, such as \
                         \"::offload\" or \"my_crate::offload\"",
                        lit.value()
                    );
                    syn::Error::new(lit.span(), message)
                })?;
                self.krate = Some(path);
            }
            Grammar::Count { min } => {
                let count = parse_count(key, value, min)?;
                self.values.push(Spanned { value: (name, Value::Count(count.value)), span: count.span });
            }
            grammar => {
                let parsed = parse_str(key, value, |text| {
                    grammar.parse(name, text).expect("a grammar of plain values")
                })?;
                self.values.push(Spanned { value: (name, parsed.value), span: parsed.span });
            }
        }
        Ok(())
    }

    /// The value given for the setting `name`, if one was.
    #[cfg(test)]
    fn value(&self, name: &str) -> Option<Value> {
        self.values.iter().find(|v| v.value.0 == name).map(|v| v.value.1)
    }
}

/// `breaker`, `breaker()` or `breaker(failures = N, reset = "...")`; what is left out takes
/// its default. `None` if anything in the list was wrong: the errors went to `errors`.
fn parse_breaker(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<Option<Spanned<Breaker>>> {
    let mut breaker = Breaker::DEFAULT;
    let mut valid = true;
    if is_empty_list(meta.input) {
        let _empty: proc_macro2::TokenTree = meta.input.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let mut seen = Vec::new();
        meta.parse_nested_meta(|nested| {
            let Some(key) = accepted_key(&nested, &mut seen, errors)? else {
                valid = false;
                return Ok(());
            };
            let result = match value(&nested)? {
                Some(value) => set_breaker(&mut breaker, key, &value),
                None => Err(needs_a_value(&nested, key)),
            };
            if let Err(err) = result {
                errors.push(err);
                valid = false;
            }
            Ok(())
        })?;
    }
    Ok(valid.then(|| Spanned { value: breaker, span: meta.path.span() }))
}

/// Checks one value of `breaker(...)` and stores it.
fn set_breaker(breaker: &mut Breaker, key: BreakerKey, value: &Expr) -> syn::Result<()> {
    let what = key.name();
    match key {
        BreakerKey::Failures => {
            let count = parse_count(key, value, 1)?;
            breaker.failures = u32::try_from(count.value).map_err(|_| {
                let message =
                    format!("{what} `{}` is too large: it must be at most {}", count.value, u32::MAX);
                syn::Error::new(count.span, message)
            })?;
        }
        BreakerKey::Reset => {
            breaker.reset_ms = parse_str(key, value, |text| offload_spec::parse_millis(text, what))?.value;
        }
    }
    Ok(())
}

/// `()`, with nothing inside.
fn is_empty_list(input: ParseStream<'_>) -> bool {
    input.cursor().group(Delimiter::Parenthesis).is_some_and(|(inside, _, _)| inside.eof())
}

/// Which key `meta` is, if it is one of `K` and was not given before. An unknown or repeated
/// key is reported (on the key) and its value skipped, and gives `None`.
fn accepted_key<K: Keys>(
    meta: &ParseNestedMeta<'_>,
    seen: &mut Vec<K>,
    errors: &mut Errors,
) -> syn::Result<Option<K>> {
    let Some(key) = K::ALL.iter().copied().find(|key| meta.path.is_ident(key.name())) else {
        value(meta)?;
        errors.push(unknown_key::<K>(&meta.path));
        return Ok(None);
    };
    if seen.contains(&key) {
        value(meta)?;
        errors.push(syn::Error::new_spanned(&meta.path, format!("duplicate {} `{}`", K::WHAT, key.name())));
        return Ok(None);
    }
    seen.push(key);
    Ok(Some(key))
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

fn needs_a_value<K: Keys>(meta: &ParseNestedMeta<'_>, key: K) -> syn::Error {
    let message = format!("`{}` needs a value, e.g. {}", key.name(), key.example());
    syn::Error::new_spanned(&meta.path, message)
}

/// The value of `key`, which must be a string literal.
fn string<K: Keys>(key: K, value: &Expr) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Str(lit), attrs }) if attrs.is_empty() => Ok(lit.clone()),
        other => {
            let message = format!("expected a string literal, e.g. {}", key.example());
            Err(syn::Error::new_spanned(other, message))
        }
    }
}

/// The value of `key`, which must be a path to a function, written as a path: a string
/// literal gets a hint to drop the quotes.
fn function_path<K: Keys>(key: K, value: &Expr) -> syn::Result<ExprPath> {
    match value {
        Expr::Path(path) if path.attrs.is_empty() => Ok(path.clone()),
        Expr::Lit(ExprLit { lit: Lit::Str(lit), attrs }) if attrs.is_empty() => {
            let message = match lit.parse::<ExprPath>() {
                Ok(path) => format!(
                    "expected a path to a function, not a string literal: write `{} = {}`",
                    key.name(),
                    path.to_token_stream().to_string().replace(' ', "")
                ),
                Err(_) => {
                    format!("expected a path to a function, not a string literal, e.g. {}", key.example())
                }
            };
            Err(syn::Error::new(lit.span(), message))
        }
        other => {
            let message = format!("expected a path to a function, e.g. {}", key.example());
            Err(syn::Error::new_spanned(other, message))
        }
    }
}

/// The value of `key`, a string literal, parsed by `parse`; errors point at the literal.
fn parse_str<K: Keys, T>(
    key: K,
    value: &Expr,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> syn::Result<Spanned<T>> {
    let lit = string(key, value)?;
    let span = lit.span();
    let value = parse(&lit.value()).map_err(|message| syn::Error::new(span, message))?;
    Ok(Spanned { value, span })
}

/// The value of `key`, an integer literal of at least `min` that fits `u64`.
fn parse_count<K: Keys>(key: K, value: &Expr, min: u64) -> syn::Result<Spanned<u64>> {
    let what = key.name();
    let lit = match value {
        Expr::Lit(ExprLit { lit: Lit::Int(lit), attrs }) if attrs.is_empty() => lit,
        // `-1`: say what the bound is, rather than that this is no literal.
        negative if is_negative_int(negative) => {
            return Err(syn::Error::new_spanned(negative, format!("{what} must be at least {min}")));
        }
        other => {
            let message = format!("expected an integer literal, e.g. {}", key.example());
            return Err(syn::Error::new_spanned(other, message));
        }
    };
    let span = lit.span();
    let value = count(lit, what, min).map_err(|message| syn::Error::new(span, message))?;
    Ok(Spanned { value, span })
}

/// `-N`, an integer literal other than zero with a minus sign.
fn is_negative_int(value: &Expr) -> bool {
    let Expr::Unary(ExprUnary { op: UnOp::Neg(_), expr, .. }) = value else { return false };
    matches!(&**expr, Expr::Lit(ExprLit { lit: Lit::Int(lit), .. }) if lit.base10_digits() != "0")
}

/// An integer literal as a count, with the shared grammar's bound.
fn count(lit: &LitInt, what: &str, min: u64) -> Result<u64, String> {
    let digits = lit.base10_digits();
    if lit.base10_parse::<u64>().is_err() {
        return Err(format!("{what} `{digits}` is too large: it must be at most {}", u64::MAX));
    }
    offload_spec::parse_count(digits, what, min)
}

fn unknown_key<K: Keys>(path: &Path) -> syn::Error {
    let name = path.to_token_stream().to_string().replace(' ', "");
    let expected = K::ALL.iter().map(|key| format!("`{}`", key.name())).collect::<Vec<_>>().join(", ");
    let mut message = format!("unknown {} `{name}`; expected one of {expected}", K::WHAT);
    if let Some(key) = suggest::<K>(&name) {
        message.push_str(&format!("; did you mean `{}`?", key.name()));
    }
    syn::Error::new_spanned(path, message)
}

/// The key a misspelt or guessed name most likely meant: the key or alias closest to the
/// name, or to a run of its `_`-separated words, so that a key with words around it
/// (`timeout_ms`, `max_queue`, `pool_name`) is found as a misspelt one (`timout`) is. Close
/// means at most one edit per three letters of what is compared, as rustc's own suggestions
/// allow; the closest wins, and between equally close ones, the longer run of words.
fn suggest<K: Keys>(unknown: &str) -> Option<K> {
    let unknown = unknown.to_ascii_lowercase();
    let words: Vec<&str> = unknown.split('_').collect();
    let candidates = K::ALL.iter().map(|&key| (key.name(), key)).chain(K::ALIASES.iter().copied());
    let mut best: Option<(usize, K)> = None;
    for len in (1..=words.len()).rev() {
        for run in words.windows(len) {
            let run = run.join("_");
            let limit = run.chars().count().max(3) / 3;
            for (name, key) in candidates.clone() {
                let distance = edit_distance(&run, name);
                if distance <= limit && best.is_none_or(|(closest, _)| distance < closest) {
                    best = Some((distance, key));
                }
            }
        }
    }
    best.map(|(_, key)| key)
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

    use std::num::NonZeroUsize;

    use offload_spec::{Overload, Value, WorkersSpec};

    use super::{Breaker, OffloadArgs, edit_distance};

    const EXPECTED: &str = "expected one of `timeout`, `workers`, `memory`, `queue`, `overload`, \
                            `max_tasks`, `max_rss`, `max_payload`, `spin_us`, `grace`, `retries`, `pool`, `breaker`, `fallback`, `state`, \
                            `crate`";

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
        assert!(args.values.is_empty());
        assert!(args.pool.is_none());
        assert!(args.breaker.is_none());
        assert!(args.fallback.is_none());
        assert!(args.krate.is_none());
    }

    #[test]
    fn all_arguments() {
        let args = parse_ok(quote!(
            timeout = "1m 30s",
            workers = "cpus / 2",
            memory = "512MiB",
            queue = 64,
            overload = "reject",
            max_tasks = 1_000,
            max_rss = "1 GB",
            pool = "images",
            breaker(failures = 3, reset = "1m"),
            fallback = super::cached,
            crate = "my_crate::offload",
        ));
        assert_eq!(args.value("timeout"), Some(Value::Millis(90_000)));
        assert_eq!(
            args.value("workers"),
            Some(Value::Workers(WorkersSpec::CpusDiv(NonZeroUsize::new(2).unwrap())))
        );
        assert_eq!(args.value("memory"), Some(Value::Bytes(512 << 20)));
        assert_eq!(args.value("queue"), Some(Value::Count(64)));
        assert_eq!(args.value("overload"), Some(Value::Overload(Overload::Reject)));
        assert_eq!(args.value("max_tasks"), Some(Value::Count(1000)));
        assert_eq!(args.value("max_rss"), Some(Value::Bytes(1_000_000_000)));
        assert_eq!(args.pool.map(|p| p.value()).as_deref(), Some("images"));
        assert_eq!(args.breaker.map(|b| b.value), Some(Breaker { failures: 3, reset_ms: 60_000 }));
        let fallback = args.fallback.unwrap();
        assert_eq!(quote!(#fallback).to_string(), "super :: cached");
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
        assert_eq!(errors(quote!(priority = "3")), [format!("unknown argument `priority`; {EXPECTED}")]);
        assert_eq!(errors(quote!(a::b = "3")), [format!("unknown argument `a::b`; {EXPECTED}")]);
    }

    #[test]
    fn misspellings_get_a_hint() {
        let cases = [
            // Misspellings.
            (quote!(timout = "1s"), "timeout"),
            (quote!(Timeout = "1s"), "timeout"),
            (quote!(time_out = "1s"), "timeout"),
            (quote!(worker = "4"), "workers"),
            (quote!(memroy = "1GiB"), "memory"),
            (quote!(queues = 4), "queue"),
            (quote!(overloaded = "reject"), "overload"),
            (quote!(max_task = 10), "max_tasks"),
            (quote!(max_rs = "1GiB"), "max_rss"),
            (quote!(pools = "a"), "pool"),
            (quote!(krate = "a"), "crate"),
            (quote!(braeker), "breaker"),
            (quote!(fallbak = f), "fallback"),
            // A key with words around it.
            (quote!(timeout_ms = 500), "timeout"),
            (quote!(timeout_secs = 5), "timeout"),
            (quote!(num_workers = "4"), "workers"),
            (quote!(memory_limit = "1GiB"), "memory"),
            (quote!(queue_size = 4), "queue"),
            (quote!(max_queue = 4), "queue"),
            (quote!(on_overload = "reject"), "overload"),
            (quote!(max_tasks_per_child = 10), "max_tasks"),
            (quote!(pool_name = "a"), "pool"),
            (quote!(circuit_breaker(failures = 3)), "breaker"),
            (quote!(fallback_fn = f), "fallback"),
            (quote!(crate_path = "a"), "crate"),
            // Other names, maybe with words around them or misspelt.
            (quote!(deadline = "1s"), "timeout"),
            (quote!(threads = "4"), "workers"),
            (quote!(worker_threads = "4"), "workers"),
            (quote!(processes = "4"), "workers"),
            (quote!(n_jobs = "4"), "workers"),
            (quote!(pool_size = "4"), "workers"),
            (quote!(mem = "1GiB"), "memory"),
            (quote!(mem_limit = "1GiB"), "memory"),
            (quote!(rlimit = "1GiB"), "memory"),
            (quote!(backlog = 4), "queue"),
            (quote!(policy = "reject"), "overload"),
            (quote!(maxtasksperchild = 10), "max_tasks"),
            (quote!(max_calls = 10), "max_tasks"),
            (quote!(recycle_after = 10), "max_tasks"),
            (quote!(rss = "1GiB"), "max_rss"),
            (quote!(max_memory = "1GiB"), "max_rss"),
            (quote!(max_memory_per_child = "1GiB"), "max_rss"),
            (quote!(payload_limit = "1GiB"), "max_payload"),
            (quote!(circuit), "breaker"),
            (quote!(on_error = f), "fallback"),
            (quote!(default = f), "fallback"),
        ];
        for (tokens, key) in cases {
            let errors = errors(tokens);
            assert_eq!(errors.len(), 1);
            assert!(errors[0].ends_with(&format!("; did you mean `{key}`?")), "{}", errors[0]);
        }
        for unrelated in [quote!(priority = "3"), quote!(colour = "red"), quote!(a::b = 1)] {
            assert!(!errors(unrelated)[0].contains("did you mean"));
        }
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
        assert_eq!(errors(quote!(memory = 512)), ["expected a string literal, e.g. `memory = \"512MiB\"`"]);
        assert_eq!(
            errors(quote!(overload = reject)),
            ["expected a string literal, e.g. `overload = \"reject\"`"]
        );
        assert_eq!(errors(quote!(max_rss = 1)), ["expected a string literal, e.g. `max_rss = \"1GiB\"`"]);
        assert_eq!(errors(quote!(pool)), ["`pool` needs a value, e.g. `pool = \"name\"`"]);
        assert_eq!(errors(quote!(queue)), ["`queue` needs a value, e.g. `queue = 64`"]);
        assert_eq!(errors(quote!(timeout("1s"))), ["`timeout` needs a value, e.g. `timeout = \"30s\"`"]);
    }

    #[test]
    fn counts_must_be_integer_literals() {
        assert_eq!(errors(quote!(queue = "64")), ["expected an integer literal, e.g. `queue = 64`"]);
        assert_eq!(errors(quote!(queue = 6.4)), ["expected an integer literal, e.g. `queue = 64`"]);
        assert_eq!(errors(quote!(queue = N)), ["expected an integer literal, e.g. `queue = 64`"]);
        assert_eq!(
            errors(quote!(max_tasks = "1000")),
            ["expected an integer literal, e.g. `max_tasks = 1000`"]
        );
    }

    #[test]
    fn counts() {
        assert_eq!(parse_ok(quote!(queue = 0)).value("queue"), Some(Value::Count(0)));
        assert_eq!(parse_ok(quote!(queue = 0x10)).value("queue"), Some(Value::Count(16)));
        assert_eq!(parse_ok(quote!(max_tasks = 1)).value("max_tasks"), Some(Value::Count(1)));
        assert_eq!(parse_ok(quote!(max_tasks = 7u64)).value("max_tasks"), Some(Value::Count(7)));
        assert_eq!(errors(quote!(max_tasks = 0)), ["max_tasks must be at least 1"]);
        assert_eq!(errors(quote!(max_tasks = -3)), ["max_tasks must be at least 1"]);
        assert_eq!(errors(quote!(queue = -1)), ["queue must be at least 0"]);
        assert_eq!(errors(quote!(queue = -0)), ["expected an integer literal, e.g. `queue = 64`"]);
        assert_eq!(
            errors(quote!(queue = 18446744073709551616)),
            ["queue `18446744073709551616` is too large: it must be at most 18446744073709551615"]
        );
    }

    #[test]
    fn sizes_and_policies() {
        assert_eq!(parse_ok(quote!(memory = "64KiB")).value("memory"), Some(Value::Bytes(65_536)));
        assert_eq!(parse_ok(quote!(max_rss = "2 GiB")).value("max_rss"), Some(Value::Bytes(2 << 30)));
        assert_eq!(
            parse_ok(quote!(overload = "wait")).value("overload"),
            Some(Value::Overload(Overload::Wait))
        );
        assert_eq!(errors(quote!(memory = "0MiB")), ["memory must be greater than zero"]);
        assert_eq!(errors(quote!(max_rss = "0GiB")), ["max_rss must be greater than zero"]);
        assert!(errors(quote!(memory = "512"))[0].starts_with("invalid size `512`"));
        assert!(errors(quote!(max_rss = "1.5GiB"))[0].starts_with("invalid size `1.5GiB`"));
        assert!(errors(quote!(overload = "drop"))[0].starts_with("invalid overload policy `drop`"));
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
    fn breaker_defaults() {
        let default = Some(Breaker { failures: 5, reset_ms: 30_000 });
        assert_eq!(parse_ok(quote!(breaker)).breaker.map(|b| b.value), default);
        assert_eq!(parse_ok(quote!(breaker())).breaker.map(|b| b.value), default);
        assert_eq!(
            parse_ok(quote!(breaker(failures = 1))).breaker.map(|b| b.value),
            Some(Breaker { failures: 1, reset_ms: 30_000 })
        );
        assert_eq!(
            parse_ok(quote!(breaker(reset = "1s",), timeout = "1s")).breaker.map(|b| b.value),
            Some(Breaker { failures: 5, reset_ms: 1000 })
        );
        assert_eq!(
            parse_ok(quote!(breaker(reset = "250ms", failures = 0x10))).breaker.map(|b| b.value),
            Some(Breaker { failures: 16, reset_ms: 250 })
        );
    }

    #[test]
    fn breaker_bad_values() {
        assert_eq!(errors(quote!(breaker(failures = 0))), ["failures must be at least 1"]);
        assert_eq!(errors(quote!(breaker(failures = -1))), ["failures must be at least 1"]);
        assert_eq!(
            errors(quote!(breaker(failures = 4294967296))),
            ["failures `4294967296` is too large: it must be at most 4294967295"]
        );
        assert_eq!(
            errors(quote!(breaker(failures = "3"))),
            ["expected an integer literal, e.g. `failures = 5`"]
        );
        assert_eq!(errors(quote!(breaker(reset = "0s"))), ["reset must be greater than zero"]);
        assert!(errors(quote!(breaker(reset = "soon")))[0].starts_with("invalid duration `soon`"));
        assert_eq!(
            errors(quote!(breaker(reset = 30))),
            ["expected a string literal, e.g. `reset = \"30s\"`"]
        );
        assert_eq!(errors(quote!(breaker(reset))), ["`reset` needs a value, e.g. `reset = \"30s\"`"]);
        assert_eq!(
            errors(quote!(breaker = 3)),
            ["expected a parenthesised list, e.g. `breaker(failures = 5, reset = \"30s\")`"]
        );
        let (args, _) = OffloadArgs::parse(quote!(breaker(failures = 0, reset = "1s")));
        assert!(args.breaker.is_none());
    }

    #[test]
    fn breaker_keys() {
        assert_eq!(
            errors(quote!(breaker(failures = 3, priority = 2))),
            ["unknown `breaker` argument `priority`; expected one of `failures`, `reset`"]
        );
        assert_eq!(
            errors(quote!(breaker(cooldown = "1s"))),
            [
                "unknown `breaker` argument `cooldown`; expected one of `failures`, `reset`; did you mean `reset`?"
            ]
        );
        assert_eq!(
            errors(quote!(breaker(reset_timeout = "1s"))),
            [
                "unknown `breaker` argument `reset_timeout`; expected one of `failures`, `reset`; did you mean `reset`?"
            ]
        );
        assert_eq!(
            errors(quote!(breaker(failure = 1))),
            [
                "unknown `breaker` argument `failure`; expected one of `failures`, `reset`; did you mean `failures`?"
            ]
        );
        assert_eq!(
            errors(quote!(breaker(failures = 1, reset = "1s", failures = 2))),
            ["duplicate `breaker` argument `failures`"]
        );
        assert_eq!(errors(quote!(breaker, breaker(failures = 1))), ["duplicate argument `breaker`"]);
        // The other arguments are still parsed, and their errors reported.
        let all = errors(quote!(breaker(failures = 0, colour = 1), timeout = "0s"));
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[2], "timeout must be greater than zero");
        assert_eq!(
            errors(quote!(breaker(failures 3))),
            ["`failures` needs a value, e.g. `failures = 5`", "expected `,`"]
        );
    }

    #[test]
    fn fallback_is_a_path() {
        for path in
            [quote!(cached), quote!(crate::cache::get), quote!(Cache::get::<u32>), quote!(<Cache>::get)]
        {
            let args = parse_ok(quote!(fallback = #path));
            let fallback = args.fallback.unwrap();
            assert_eq!(quote!(#fallback).to_string(), path.to_string());
        }
        assert_eq!(
            errors(quote!(fallback = "cache::get")),
            ["expected a path to a function, not a string literal: write `fallback = cache::get`"]
        );
        assert_eq!(
            errors(quote!(fallback = "not a path")),
            ["expected a path to a function, not a string literal, e.g. `fallback = path::to::function`"]
        );
        assert_eq!(
            errors(quote!(fallback = |x| x)),
            ["expected a path to a function, e.g. `fallback = path::to::function`"]
        );
        assert_eq!(
            errors(quote!(fallback)),
            ["`fallback` needs a value, e.g. `fallback = path::to::function`"]
        );
        assert_eq!(errors(quote!(fallback = a, fallback = b)), ["duplicate argument `fallback`"]);
    }

    #[test]
    fn a_bad_value_keeps_the_others() {
        let (args, err) = OffloadArgs::parse(quote!(timeout = "0s", workers = "3"));
        assert!(err.is_some());
        assert!(args.value("timeout").is_none());
        assert_eq!(
            args.value("workers"),
            Some(Value::Workers(WorkersSpec::Fixed(NonZeroUsize::new(3).unwrap())))
        );
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
