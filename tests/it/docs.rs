//! The user guide stays true to the code: every configuration key the relay reads is in
//! the reference and every key the reference names is read; every link between the
//! README and the guide's pages leads somewhere; every page is in the book's summary.
//! (The metrics and alerts are checked in `deploy.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `struct RawX { field: Type, … }` under `src/`: the serde structs the
/// configuration file is read into, field names with their types.
fn raw_structs() -> BTreeMap<String, Vec<(String, String)>> {
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files);
    let mut structs = BTreeMap::new();
    for file in files {
        let text = read(&file);
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(rest) = line
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ")
                .strip_prefix("struct Raw")
                .and_then(|r| r.strip_suffix(" {"))
            else {
                continue;
            };
            let mut fields = Vec::new();
            for field in lines.by_ref() {
                let field = field.trim();
                if field == "}" {
                    break;
                }
                if field.starts_with("//") || field.starts_with("#[") {
                    continue;
                }
                let field = field
                    .trim_start_matches("pub(crate) ")
                    .trim_start_matches("pub ");
                let (name, ty) = field
                    .trim_end_matches(',')
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("{}: cannot read field {field}", file.display()));
                fields.push((name.to_owned(), ty.to_owned()));
            }
            structs.insert(format!("Raw{rest}"), fields);
        }
    }
    structs
}

/// The dotted keys reachable from `RawConfig`: a field whose type holds another raw
/// struct is a section, a `Vec` of one an array of tables (`key[].field`), a map a
/// table of free names (`key.<…>`), anything else a key.
fn keys_in_code() -> BTreeSet<String> {
    fn walk(
        structs: &BTreeMap<String, Vec<(String, String)>>,
        name: &str,
        prefix: &str,
        keys: &mut BTreeSet<String>,
    ) {
        let fields = structs
            .get(name)
            .unwrap_or_else(|| panic!("no struct {name} under src/"));
        for (field, ty) in fields {
            let key = format!("{prefix}{field}");
            let inner = ty
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .find(|t| t.starts_with("Raw") && structs.contains_key(*t));
            match inner {
                Some(inner) if ty.contains("Vec<") => {
                    walk(structs, inner, &format!("{key}[]."), keys)
                }
                Some(inner) => walk(structs, inner, &format!("{key}."), keys),
                None if ty.contains("Map<") => {
                    keys.insert(format!("{key}.<…>"));
                }
                None => {
                    keys.insert(key);
                }
            }
        }
    }
    let structs = raw_structs();
    let mut keys = BTreeSet::new();
    walk(&structs, "RawConfig", "", &mut keys);
    keys
}

/// The keys in the first column of the reference's table: `` `a.b.c` ``, with
/// `` `a.b.c`, `.d` `` for siblings and `<name>` for a free name.
fn keys_in_reference() -> BTreeSet<String> {
    let page = read(&repo().join("docs/configuration.md"));
    let mut keys = BTreeSet::new();
    for row in page.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split(" | ").next().unwrap().trim_start_matches("| ");
        let mut parent = String::new();
        for cell in first.split(", ") {
            let key = cell.trim_matches('`');
            let key = match key.strip_prefix('.') {
                Some(sibling) => format!("{parent}{sibling}"),
                None => key.to_owned(),
            };
            parent = key[..=key.rfind('.').unwrap_or(0)].to_owned();
            let key = match key.find(".<") {
                Some(at) => format!("{}.<…>", &key[..at]),
                None => key,
            };
            keys.insert(key);
        }
    }
    keys
}

#[test]
fn the_configuration_reference_names_every_key_and_only_those() {
    let code = keys_in_code();
    let reference = keys_in_reference();
    assert!(code.len() >= 60, "only {} keys found in src/", code.len());
    let undocumented: Vec<_> = code.difference(&reference).collect();
    let unknown: Vec<_> = reference.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "keys the relay reads but docs/configuration.md does not list: {undocumented:?}; \
         keys docs/configuration.md lists but the relay does not read: {unknown:?}"
    );
}

/// GitHub's (and mdBook's) anchor of a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// Every `](target)` of a Markdown text, outside code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

fn guide_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages
}

#[test]
fn every_link_of_the_readme_and_the_guide_leads_somewhere() {
    let mut files = guide_pages();
    files.push(repo().join("README.md"));
    files.push(repo().join("CHANGELOG.md"));
    let mut checked = 0;
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file);
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match link.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            checked += 1;
            if !target.exists() {
                broken.push(format!("{}: {link} (no such file)", file.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                if !anchors(&read(&target)).contains(fragment) {
                    broken.push(format!("{}: {link} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(checked >= 50, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_page_of_the_guide_is_in_its_summary() {
    let summary = read(&repo().join("docs/SUMMARY.md"));
    let listed: BTreeSet<String> = links(&summary).into_iter().collect();
    for page in guide_pages() {
        let name = page.file_name().unwrap().to_str().unwrap().to_owned();
        if name != "SUMMARY.md" {
            assert!(
                listed.contains(&name),
                "docs/{name} is not in docs/SUMMARY.md"
            );
        }
    }
    for name in &listed {
        assert!(
            repo().join("docs").join(name).exists(),
            "docs/SUMMARY.md lists {name}, which does not exist"
        );
    }
}

#[test]
fn the_readme_stays_short() {
    let lines = read(&repo().join("README.md")).lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines: move the detail into the guide under docs/"
    );
}
