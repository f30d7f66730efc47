//! The architecture's checkable rules (ARCHITECTURE.md, "Invariants"), read from the source itself:
//!
//! - inside every crate, the modules (one per file) form a DAG: no file names an item of a file that names it back,
//!   however long the way round;
//! - inside `berth-server`, layers point downward only: `secrets`/`vault` ← `runs` ← `api` ← `serve`/`cli`;
//! - SQL is the store's alone: `berth-store` is the only crate that depends on sqlx.
//!
//! A module depends on another when it names one of its items: a `use` of `crate::`, `super::`, `self::` or a child
//! module, or such a path in code. A path through a re-export (`pub use`) is followed to the file that defines the
//! item. A parent declaring or re-exporting its children is not a dependency, and `#[cfg(test)]` code is left out:
//! tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use syn::visit::Visit;

type ModPath = Vec<String>;

/// The server's layers, lowest first. A module may name modules of its own layer or below; a new top-level module
/// must be placed here, which is the point: where it sits is a decision.
const SERVER_LAYERS: &[&[&str]] = &[
    &[
        "error_chain",
        "private_file",
        "telemetry",
        "data_dir",
        "metrics",
    ],
    &["secrets", "host_policy", "tokens"],
    &["vault"],
    // The server's half of the bridge runs around each command and records its audit as run events.
    &["runs", "bridge"],
    &["state", "api", "console"],
    &["serve", "client", "run_command", "lab", "plugin_check"],
    &["cli"],
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("crates"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.join("src/lib.rs").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// One crate's module files and what each names.
#[derive(Debug, Default)]
struct CrateModules {
    files: BTreeMap<ModPath, PathBuf>,
    /// `pub use` inside each module: the exported name and the (absolute) path it stands for.
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
    /// Every absolute path each file names, with the module (possibly inline) it was named from.
    named: BTreeMap<ModPath, Vec<ModPath>>,
}

impl CrateModules {
    fn read(crate_dir: &Path) -> Self {
        let src = crate_dir.join("src");
        let mut modules = CrateModules::default();
        let mut pending = vec![src.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    // `src/bin` holds separate crate roots.
                    if path != src.join("bin") {
                        pending.push(path);
                    }
                } else if path.extension().is_some_and(|ext| ext == "rs")
                    && path != src.join("main.rs")
                {
                    modules.files.insert(module_path(&src, &path), path);
                }
            }
        }
        for (module, file) in &modules.files.clone() {
            let text = std::fs::read_to_string(file).unwrap();
            let parsed = syn::parse_file(&text)
                .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            let mut collector = PathCollector {
                modules: &modules,
                scope: module.clone(),
                found: Vec::new(),
                reexports: Vec::new(),
            };
            collector.visit_file(&parsed);
            let PathCollector {
                found, reexports, ..
            } = collector;
            for (scope, name, target) in reexports {
                modules
                    .reexports
                    .entry(scope)
                    .or_default()
                    .insert(name, target);
            }
            modules.named.insert(module.clone(), found);
        }
        modules
    }

    /// The file that defines what `path` names: the longest module prefix, through re-exports.
    fn defining_file(&self, path: &[String]) -> Option<ModPath> {
        let mut path = path.to_vec();
        for _ in 0..8 {
            let module = (0..=path.len())
                .rev()
                .map(|len| path[..len].to_vec())
                .find(|prefix| self.files.contains_key(prefix))?;
            let rest = &path[module.len()..];
            match rest
                .first()
                .and_then(|name| self.reexports.get(&module)?.get(name))
            {
                Some(target) if target != &path => {
                    let mut next = target.clone();
                    next.extend(rest[1..].iter().cloned());
                    path = next;
                }
                _ => return Some(module),
            }
        }
        None
    }

    /// File-to-file dependencies, without parent-to-descendant edges.
    fn edges(&self) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
        let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
        for (from, paths) in &self.named {
            let targets = edges.entry(from.clone()).or_default();
            for path in paths {
                if let Some(to) = self.defining_file(path)
                    && &to != from
                    && !to.starts_with(from)
                {
                    targets.insert(to);
                }
            }
        }
        edges
    }
}

fn module_path(src: &Path, file: &Path) -> ModPath {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn show(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// Collects absolute paths from one file, tracking inline modules and skipping `#[cfg(test)]` items.
struct PathCollector<'a> {
    modules: &'a CrateModules,
    scope: ModPath,
    found: Vec<ModPath>,
    reexports: Vec<(ModPath, String, ModPath)>,
}

impl PathCollector<'_> {
    /// `segments` made absolute from the current scope, or `None` for another crate's path.
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let mut base = self.scope.clone();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().is_some_and(|segment| segment == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = base.clone();
                child.push(first.to_owned());
                if !self.modules.files.contains_key(&child) {
                    return None;
                }
            }
            None => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, public: bool) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree, public);
                prefix.pop();
            }
            syn::UseTree::Name(name) => self.used(prefix, &name.ident.to_string(), None, public),
            syn::UseTree::Rename(rename) => self.used(
                prefix,
                &rename.ident.to_string(),
                Some(rename.rename.to_string()),
                public,
            ),
            syn::UseTree::Glob(_) => {
                if let Some(path) = self.absolute(prefix) {
                    self.found.push(path);
                }
            }
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.use_tree(prefix, tree, public);
                }
            }
        }
    }

    fn used(&mut self, prefix: &[String], name: &str, rename: Option<String>, public: bool) {
        let mut segments = prefix.to_vec();
        if name != "self" {
            segments.push(name.to_owned());
        }
        let Some(path) = self.absolute(&segments) else {
            return;
        };
        if public {
            let exported = rename.unwrap_or_else(|| segments.last().cloned().unwrap_or_default());
            self.reexports
                .push((self.scope.clone(), exported, path.clone()));
        }
        // A re-export of anything but a descendant is a dependency too (`edges` drops the descendants).
        self.found.push(path);
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .parse_args::<syn::Meta>()
                .is_ok_and(|meta| meta.path().is_ident("test"))
    })
}

fn attrs_of(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(item) => &item.attrs,
        syn::Item::Enum(item) => &item.attrs,
        syn::Item::Fn(item) => &item.attrs,
        syn::Item::Impl(item) => &item.attrs,
        syn::Item::Mod(item) => &item.attrs,
        syn::Item::Static(item) => &item.attrs,
        syn::Item::Struct(item) => &item.attrs,
        syn::Item::Trait(item) => &item.attrs,
        syn::Item::Type(item) => &item.attrs,
        syn::Item::Use(item) => &item.attrs,
        _ => &[],
    }
}

impl<'ast> Visit<'ast> for PathCollector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if is_test_only(attrs_of(item)) {
            return;
        }
        match item {
            syn::Item::Use(item) => {
                let public = matches!(item.vis, syn::Visibility::Public(_));
                self.use_tree(&mut Vec::new(), &item.tree, public);
            }
            syn::Item::Mod(module) if module.content.is_some() => {
                self.scope.push(module.ident.to_string());
                syn::visit::visit_item_mod(self, module);
                self.scope.pop();
            }
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_impl_item_fn(&mut self, function: &'ast syn::ImplItemFn) {
        if !is_test_only(&function.attrs) {
            syn::visit::visit_impl_item_fn(self, function);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path
            .segments
            .iter()
            .map(|segment| segment.ident.to_string())
            .collect();
        if path.leading_colon.is_none()
            && matches!(
                segments.first().map(String::as_str),
                Some("crate" | "super" | "self")
            )
            && segments.len() > 1
            && let Some(path) = self.absolute(&segments)
        {
            self.found.push(path);
        }
        syn::visit::visit_path(self, path);
    }
}

/// Strongly connected components of more than one file (Tarjan's algorithm).
fn circles(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        found: Vec<Vec<ModPath>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, node: &'a ModPath) {
            let next = self.index.len();
            self.index.insert(node, next);
            self.low.insert(node, next);
            self.stack.push(node);
            self.on_stack.insert(node);
            for target in self.edges.get(node).into_iter().flatten() {
                if !self.index.contains_key(target) {
                    self.visit(target);
                    let low = self.low[node].min(self.low[target]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(target) {
                    let low = self.low[node].min(self.index[target]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.push(member.clone());
                    if member == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in edges.keys() {
        if !tarjan.index.contains_key(node) {
            tarjan.visit(node);
        }
    }
    tarjan.found
}

#[test]
fn modules_in_every_crate_form_a_dag() {
    let mut report = String::new();
    for crate_dir in crate_dirs() {
        let modules = CrateModules::read(&crate_dir);
        let edges = modules.edges();
        for circle in circles(&edges) {
            let members: BTreeSet<&ModPath> = circle.iter().collect();
            writeln!(
                report,
                "{}: a circle of {} modules:",
                crate_dir.display(),
                circle.len()
            )
            .unwrap();
            for from in &circle {
                for to in edges[from].iter().filter(|to| members.contains(to)) {
                    writeln!(report, "  {} -> {}", show(from), show(to)).unwrap();
                }
            }
        }
    }
    assert!(
        report.is_empty(),
        "import circles (move the shared piece to where it belongs):\n{report}"
    );
}

#[test]
fn server_layers_point_downward() {
    let modules = CrateModules::read(&workspace_root().join("crates/server"));
    let layer_of = |module: &ModPath| -> Option<usize> {
        let top = module.first()?;
        SERVER_LAYERS
            .iter()
            .position(|layer| layer.contains(&top.as_str()))
    };
    let mut report = String::new();
    for module in modules.files.keys().filter(|module| !module.is_empty()) {
        if layer_of(module).is_none() {
            writeln!(
                report,
                "{} is in no layer: place it in SERVER_LAYERS",
                show(module)
            )
            .unwrap();
        }
    }
    for (from, targets) in modules.edges() {
        let Some(from_layer) = layer_of(&from) else {
            continue;
        };
        for to in targets {
            if let Some(to_layer) = layer_of(&to)
                && to_layer > from_layer
            {
                writeln!(
                    report,
                    "{} (layer {from_layer}) names {} (layer {to_layer})",
                    show(&from),
                    show(&to)
                )
                .unwrap();
            }
        }
    }
    assert!(
        report.is_empty(),
        "the server's layers must point downward:\n{report}"
    );
}

#[test]
fn only_the_store_depends_on_sqlx() {
    let mut with_sqlx = Vec::new();
    for crate_dir in crate_dirs() {
        let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
        let dependencies = manifest
            .split("[dev-dependencies]")
            .next()
            .unwrap_or_default();
        if dependencies
            .lines()
            .any(|line| line.trim_start().starts_with("sqlx"))
        {
            with_sqlx.push(
                crate_dir
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    assert_eq!(with_sqlx, ["store"], "SQL lives only in berth-store");
}

/// The checker itself: a planted circle and a planted upward import are found.
#[test]
fn the_checker_finds_a_planted_circle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("runs")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod api;\npub mod runs;\n").unwrap();
    std::fs::write(
        src.join("api.rs"),
        "use crate::runs::Manager;\npub struct ApiError;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("runs/mod.rs"),
        "mod manager;\npub use manager::Manager;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("runs/manager.rs"),
        "pub struct Manager;\nfn f() -> crate::api::ApiError { todo!() }\n#[cfg(test)]\nmod tests { use super::*; }\n",
    )
    .unwrap();
    let modules = CrateModules::read(dir.path());
    let found = circles(&modules.edges());
    assert_eq!(
        found,
        vec![vec![
            vec!["api".to_owned()],
            vec!["runs".to_owned(), "manager".to_owned()]
        ]],
        "the re-export is followed to the defining file"
    );
}
