//! `cargo xtask crds`: writes `crds/<plural>.ipvslb.io.yaml` and the chart's copy from the types.

use std::fs;
use std::path::{Path, PathBuf};

/// Where generated CRDs live, relative to the workspace root.
const TARGETS: [&str; 2] = ["crds", "charts/ipvslb/crds"];

/// Writes every CRD file; removes stale `*.yaml` files of ipvslb's group in the target folders.
pub fn write() -> Result<(), String> {
    let root = workspace_root();
    for target in TARGETS {
        let dir = root.join(target);
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        for (file, text) in rendered()? {
            let path = dir.join(&file);
            fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!(
                "wrote {}",
                path.strip_prefix(&root).unwrap_or(&path).display()
            );
        }
    }
    Ok(())
}

fn rendered() -> Result<Vec<(String, String)>, String> {
    ipvslb_api::crd_files().map_err(|e| format!("rendering the CRDs: {e}"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
