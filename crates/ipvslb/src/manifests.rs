//! Reading Kubernetes manifests from files: multi-document YAML, files or whole directories.
//! Every error names the file and the document, so a user finds the bad object at once.

use std::fs;
use std::path::{Path, PathBuf};

use ipvslb_api::{IPPool, NodeSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Where an object came from: file and 1-based document number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// The document within the file, counting from 1.
    pub document: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

/// Why manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML.
    #[error("{origin}: not valid YAML: {source}")]
    Yaml {
        /// Where.
        origin: Origin,
        /// The parser's error.
        #[source]
        source: serde_norway::Error,
    },
    /// A document is YAML but not a valid object of its kind.
    #[error("{origin}: invalid {kind} {name:?}: {message}")]
    Invalid {
        /// Where.
        origin: Origin,
        /// The object's kind.
        kind: String,
        /// The object's name, if it has one.
        name: String,
        /// What is wrong, naming the field where possible.
        message: String,
    },
}

/// Everything read, by kind, each with its origin.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Services.
    pub services: Vec<(Origin, Service)>,
    /// IPPools.
    pub pools: Vec<(Origin, IPPool)>,
    /// NodeSets.
    pub node_sets: Vec<(Origin, NodeSet)>,
    /// Nodes.
    pub nodes: Vec<(Origin, Node)>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<(Origin, EndpointSlice)>,
    /// Namespaces (for their labels).
    pub namespaces: Vec<(Origin, Namespace)>,
    /// `(origin, apiVersion/kind)` of documents of other kinds, ignored.
    pub ignored: Vec<(Origin, String)>,
}

/// The identity of a document, read before its body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

impl Manifests {
    /// Reads every path: a file as is, a directory's `*.yaml`, `*.yml` and `*.json` files in
    /// name order (not recursing: the examples keep one scenario per directory).
    pub fn read(paths: &[PathBuf]) -> Result<Self, Error> {
        let mut manifests = Manifests::default();
        for path in paths {
            for file in files_of(path)? {
                let text = fs::read_to_string(&file).map_err(|source| Error::Read {
                    path: file.clone(),
                    source,
                })?;
                manifests.add_stream(&file, &text)?;
            }
        }
        Ok(manifests)
    }

    /// Adds every document of one YAML stream.
    pub fn add_stream(&mut self, file: &Path, text: &str) -> Result<(), Error> {
        for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.to_path_buf(),
                document: index + 1,
            };
            let value = serde_json::Value::deserialize(document).map_err(|source| Error::Yaml {
                origin: origin.clone(),
                source,
            })?;
            if value.is_null() {
                continue; // an empty document, as after a trailing `---`
            }
            self.add_value(origin, value)?;
        }
        Ok(())
    }

    fn add_value(&mut self, origin: Origin, value: serde_json::Value) -> Result<(), Error> {
        let meta: TypeMeta = serde_json::from_value(value.clone())
            .map_err(|e| invalid(&origin, "object", &value, e))?;
        match (meta.api_version.as_str(), meta.kind.as_str()) {
            ("v1", "Service") => self.services.push(typed(origin, "Service", value)?),
            ("v1", "Node") => self.nodes.push(typed(origin, "Node", value)?),
            ("v1", "Namespace") => self.namespaces.push(typed(origin, "Namespace", value)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                self.endpoint_slices
                    .push(typed(origin, "EndpointSlice", value)?)
            }
            ("ipvslb.io/v1alpha1", "IPPool") => self.pools.push(typed(origin, "IPPool", value)?),
            ("ipvslb.io/v1alpha1", "NodeSet") => {
                self.node_sets.push(typed(origin, "NodeSet", value)?)
            }
            ("v1", "List") => {
                for item in value
                    .get("items")
                    .and_then(|i| i.as_array())
                    .cloned()
                    .unwrap_or_default()
                {
                    self.add_value(origin.clone(), item)?;
                }
            }
            ("", _) | (_, "") => {
                return Err(invalid(
                    &origin,
                    "object",
                    &value,
                    "apiVersion and kind are required",
                ));
            }
            (api_version, kind) => self.ignored.push((origin, format!("{api_version}/{kind}"))),
        }
        Ok(())
    }
}

fn typed<T: DeserializeOwned>(
    origin: Origin,
    kind: &str,
    value: serde_json::Value,
) -> Result<(Origin, T), Error> {
    match serde_path_to_error::deserialize(&value) {
        Ok(object) => Ok((origin, object)),
        Err(e) => {
            let path = e.path().to_string();
            Err(invalid(
                &origin,
                kind,
                &value,
                format!("field {path}: {}", e.into_inner()),
            ))
        }
    }
}

fn invalid(
    origin: &Origin,
    kind: &str,
    value: &serde_json::Value,
    message: impl ToString,
) -> Error {
    Error::Invalid {
        origin: origin.clone(),
        kind: kind.to_owned(),
        name: value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_owned(),
        message: message.to_string(),
    }
}

fn files_of(path: &Path) -> Result<Vec<PathBuf>, Error> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    if !fs::metadata(path).map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_err)? {
        let file = entry.map_err(read_err)?.path();
        let manifest = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        if manifest && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}
