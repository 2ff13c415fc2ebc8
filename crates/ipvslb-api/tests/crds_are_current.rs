//! The CRD files in the repository are exactly what the types generate.

use std::path::Path;

fn assert_current(dir: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (file, expected) in ipvslb_api::crd_files().expect("the CRDs render") {
        let path = root.join(dir).join(&file);
        let actual = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask crds`", path.display()));
        assert!(
            actual == expected,
            "{} is stale: run `cargo xtask crds` and commit the result",
            path.display()
        );
    }
}

#[test]
fn crds_folder_matches_the_types() {
    assert_current("crds");
}

#[test]
fn the_charts_copy_matches_the_types() {
    assert_current("charts/ipvslb/crds");
}

#[test]
fn ippool_defaults_fill_in_a_minimal_pool() {
    let pool: ipvslb_api::IPPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "ipvslb.io/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": "p"},
        "spec": {"addresses": ["10.240.0.210-10.240.0.215"]}
    }))
    .expect("a minimal pool parses");
    assert!(pool.spec.auto_assign);
    assert!(!pool.spec.avoid_buggy_ips);
    assert_eq!(pool.spec.node_set, "default");
}
