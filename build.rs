//! Embeds the vendored data directory (`data/`, ~10 MB) in the binary, so `candor` finds its
//! datasets, templates and judge prompts without its source checkout
//! (`candor::datasets::embedded`). Cargo re-runs this when anything under `data/` changes.

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("reading data/").map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    println!("cargo:rerun-if-changed=data");
    let mut all = Vec::new();
    files(&root, &mut all);
    // A cache key for the extracted copy: the files' names and bytes.
    let mut hash = DefaultHasher::new();
    let mut table = String::from("pub static FILES: &[(&str, &[u8])] = &[\n");
    for p in &all {
        let rel = p.strip_prefix(&root).unwrap().to_str().expect("data/ file names are UTF-8").replace('\\', "/");
        hash.write(rel.as_bytes());
        hash.write(&std::fs::read(p).expect("reading a data file"));
        table.push_str(&format!("    ({rel:?}, include_bytes!({:?})),\n", p.to_str().unwrap()));
    }
    table.push_str("];\n");
    table.push_str(&format!("pub const DIGEST: &str = \"{:016x}\";\n", hash.finish()));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("embedded_data.rs");
    std::fs::write(out, table).expect("writing embedded_data.rs");
}
