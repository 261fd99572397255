//! The folders of `src/` form layers, and imports point one way only:
//! app → bus / engine → actions → millrace / agent → contract (bus may use engine, agent
//! may use millrace). A `crate::` path that points upward, or sideways where that is not
//! allowed, fails this test with the file and line.

use std::path::Path;

fn rank(folder: &str) -> Option<u8> {
    Some(match folder {
        "contract" => 0,
        "millrace" | "agent" => 1,
        "actions" => 2,
        "engine" | "bus" => 3,
        "app" => 4,
        _ => return None,
    })
}

fn allowed(from: &str, to: &str) -> bool {
    match (rank(from), rank(to)) {
        (Some(a), Some(b)) if b < a => true,
        _ => matches!((from, to), ("agent", "millrace") | ("bus", "engine")) || from == to,
    }
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let Some(from) = rel.components().next().and_then(|c| c.as_os_str().to_str()) else {
            continue;
        };
        if rank(from).is_none() {
            continue; // lib.rs, main.rs
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let to: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if rank(&to).is_none() {
                    continue;
                }
                seen += 1;
                if !allowed(from, &to) {
                    wrong.push(format!(
                        "{}:{}: {from} -> {to}: {}",
                        rel.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        seen > 50,
        "found only {seen} crate:: imports; is src/ laid out by folder?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}
