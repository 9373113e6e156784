//! Every setting of the schema is documented where users look: in the macro's table of
//! arguments, and, when a variable overrides it, in the README's table of variables.

use offload_spec::SETTINGS;

const README: &str = include_str!("../README.md");
const MACRO_DOCS: &str = include_str!("../offload-macros/src/lib.rs");

#[test]
fn every_setting_is_in_the_macro_docs_and_every_variable_in_the_readme() {
    for setting in SETTINGS {
        let row = format!("/// | `{}` |", setting.name);
        assert!(MACRO_DOCS.contains(&row), "the macro's table of arguments lacks `{}`", setting.name);
        if let Some(key) = setting.env {
            let row = format!("| {} | `OFFLOAD_{key}`, `OFFLOAD_POOL_<NAME>_{key}` |", setting.name);
            assert!(README.contains(&row), "the README's table of variables lacks `{}`", setting.name);
        }
    }
}
