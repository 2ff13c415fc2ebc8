//! Developer tasks of ipvslb as a library, so that tests reuse them: the CRD generator, the
//! API server harness and the image's binary build. The `xtask` binary (`cargo xtask <task>`) is a thin front end.

pub mod apiserver;
pub mod crds;
pub mod image;

use std::path::{Path, PathBuf};

/// The cache root of every built or downloaded test fixture: `$IPVSLB_CACHE`, else
/// `$HOME/.cache/ipvslb`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("IPVSLB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".cache").join("ipvslb")
}

/// The string value of `"key": "value"` (or `"key":"value"`) in JSON printed by `go` or
/// `cargo` (no escapes expected: paths and versions).
pub fn json_string(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":");
    let start = json.find(&needle)? + needle.len();
    let rest = json[start..].trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn reads_json_strings_of_go() {
        let json = "{\n\t\"Path\": \"k8s.io/kubernetes\",\n\t\"GoMod\": \"/m/v1.37.2.mod\"\n}";
        assert_eq!(
            json_string(json, "GoMod").as_deref(),
            Some("/m/v1.37.2.mod")
        );
        assert_eq!(json_string(json, "Zip"), None);
    }

    #[test]
    fn the_executable_is_read_from_a_cargo_message() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"kernel_ipvs"},"executable":"/t/debug/deps/kernel_ipvs-0a1b","fresh":true}"#;
        assert_eq!(
            json_string(line, "executable").as_deref(),
            Some("/t/debug/deps/kernel_ipvs-0a1b")
        );
        assert_eq!(json_string(line, "missing"), None);
    }
}
