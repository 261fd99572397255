//! The contract's vocabulary is written in one place (`src/contract/vocab.rs`), and the
//! documents clients are built from name every member of it.

use std::path::{Path, PathBuf};

use millracer::contract::vocab::{ErrorCode, EventType};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_event_type_or_error_code_is_spelled_outside_the_vocabulary() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    assert!(files.len() > 20, "src/ has the crate's files");
    let mut found = Vec::new();
    for file in files {
        if file.ends_with("contract/vocab.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for word in EventType::ALL
                .iter()
                .map(|t| t.as_str())
                .chain(ErrorCode::ALL.iter().map(|c| c.as_str()))
            {
                let quoted = format!("\"{word}\"");
                // A JSON key of the same spelling (`"cancelled": true`) is not the code.
                let as_key = format!("{quoted}:");
                if line.matches(&quoted).count() > line.matches(&as_key).count() {
                    found.push(format!("{}:{}: \"{word}\"", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "use the vocabulary's enums instead of these literals:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_event_type_is_documented_where_clients_read() {
    let readme = read("README.md");
    let schema = read("contracts/ops-event-frame.schema.json");
    let asyncapi = read("contracts/asyncapi.yaml");
    for event in EventType::ALL {
        let quoted = format!("`{}`", event.as_str());
        assert!(readme.contains(&quoted), "README.md does not name {quoted}");
        assert!(
            schema.contains(&quoted),
            "the frame schema does not name {quoted}"
        );
        assert!(
            asyncapi.contains(&quoted),
            "asyncapi.yaml does not name {quoted}"
        );
    }
}

#[test]
fn every_error_code_is_documented_where_clients_read() {
    let readme = read("README.md");
    let schema = read("contracts/ops-result.schema.json");
    for code in ErrorCode::ALL {
        let quoted = format!("`{}`", code.as_str());
        assert!(readme.contains(&quoted), "README.md does not name {quoted}");
        assert!(
            schema.contains(&quoted),
            "the result schema does not name {quoted}"
        );
    }
}
