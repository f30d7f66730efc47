//! Sync-back, property-tested against its rules (crates/drivers/src/sync.rs, the module doc) on every driver that
//! syncs: the fake provider in process, SSH against a real sshd, and the fake provider as a plugin process (synced
//! through tar over the plugin's execute). Each case builds a random host tree (files, directories, symlinks, names
//! up to 255 bytes, sometimes a deep chain), syncs it in, edits it in the environment with a shell script (create,
//! same-size rewrite, delete, file↔directory, link↔directory, chmod) and on the host meanwhile, syncs back, and
//! compares the host tree with [`Model`], a second, in-memory reading of the rules. Drivers are driven directly,
//! not through the HTTP API, for speed.
//!
//! Then deterministic regressions for what issue #13 found: names of 236 bytes and more, swaps on SSH and plugins,
//! paths past `PATH_MAX`, a same-size rewrite within the second of sync-in on SSH.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_core::config::DriverConfig;
use berth_core::driver::{
    EnvironmentDriver, ExecRequest, LeaseHandle, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_drivers::contain::Containment;
use berth_drivers::local::LocalDriver;
use berth_drivers::registry::{DriverRegistry, ProviderRegistry};
use berth_drivers::sync::{Entry, conflict_path, lost_entries, scan_tree};
use berth_drivers::test_support::{Collect, lease_request, never};
use berth_fake_provider::FakeProvider;
use berth_plugins::host::PluginHost;
use berth_plugins::supervisor::{Deadlines, HostSettings, PluginState, RestartPolicy};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

use crate::plugins::fake_plugin_dir;
use crate::support::sshd::TestSshd;

/// Cases per driver: enough to meet every kind of edit against every kind of entry, few enough for a fast suite.
const CASES: u32 = 24;

/// Names the trees are made of: short ones, a space, a non-ASCII one, and long ones — 236 bytes and more was where
/// the old temporary name passed 255 bytes; 255 is the most a name can be.
fn names() -> Vec<String> {
    vec![
        "a".to_owned(),
        "b".to_owned(),
        "c d".to_owned(),
        "ü".to_owned(),
        "L".repeat(240),
        "M".repeat(255),
    ]
}

/// One entry of a generated tree.
#[derive(Clone, Debug)]
enum Node {
    Dir,
    File(String),
    Link(String),
}

/// One edit, on the `n`th path of the initial tree (modulo its length) or, for `Create`, in its `n`th directory.
#[derive(Clone, Debug)]
enum Op {
    SameSize(Index),
    Rewrite(Index, String),
    Delete(Index),
    ToDir(Index),
    ToFile(Index),
    ToLink(Index),
    Chmod(Index),
    Create(Index, usize, String),
}

#[derive(Clone, Debug)]
struct Case {
    tree: Vec<(String, Node)>,
    env: Vec<Op>,
    host: Vec<Op>,
}

fn build_tree(specs: Vec<(Index, usize, u8, String)>, deep: bool) -> Vec<(String, Node)> {
    let names = names();
    let mut dirs = vec![String::new()];
    let mut tree: Vec<(String, Node)> = Vec::new();
    for (parent, name, kind, content) in specs {
        let parent = dirs[parent.index(dirs.len())].clone();
        let name = &names[name % names.len()];
        let path = if parent.is_empty() {
            name.clone()
        } else {
            format!("{parent}/{name}")
        };
        // Keep well below PATH_MAX with the temporary directories' prefixes (the deep chain is its own entry).
        if path.len() > 1200 || tree.iter().any(|(known, _)| *known == path) {
            continue;
        }
        let node = match kind % 3 {
            0 => {
                dirs.push(path.clone());
                Node::Dir
            }
            1 => Node::File(content),
            _ => Node::Link(format!("t-{content}")),
        };
        tree.push((path, node));
    }
    if deep {
        let mut path = String::from("deep");
        tree.push((path.clone(), Node::Dir));
        for _ in 0..12 {
            path.push('/');
            path.push_str(&"D".repeat(200));
            tree.push((path.clone(), Node::Dir));
        }
        tree.push((format!("{path}/bottom"), Node::File("deep down".to_owned())));
    }
    tree
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let content = "[a-y]{0,12}";
    prop_oneof![
        any::<Index>().prop_map(Op::SameSize),
        (any::<Index>(), content).prop_map(|(at, content)| Op::Rewrite(at, content)),
        any::<Index>().prop_map(Op::Delete),
        any::<Index>().prop_map(Op::ToDir),
        any::<Index>().prop_map(Op::ToFile),
        any::<Index>().prop_map(Op::ToLink),
        any::<Index>().prop_map(Op::Chmod),
        (any::<Index>(), 0..6_usize, content)
            .prop_map(|(dir, name, content)| Op::Create(dir, name, content)),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let specs = prop::collection::vec((any::<Index>(), 0..6_usize, 0..3_u8, "[a-y]{0,12}"), 1..12);
    (
        specs,
        prop::bool::weighted(0.25),
        prop::collection::vec(op_strategy(), 0..7),
        prop::collection::vec(op_strategy(), 0..4),
    )
        .prop_map(|(specs, deep, env, host)| Case {
            tree: build_tree(specs, deep),
            env,
            host,
        })
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The edits as a POSIX shell script run in the tree's root. An edit that no longer applies (its path is gone) does
/// nothing; nothing ever writes through a link.
fn script(tree: &[(String, Node)], ops: &[Op]) -> String {
    let names = names();
    let dirs: Vec<&str> = std::iter::once("")
        .chain(
            tree.iter()
                .filter(|(_, node)| matches!(node, Node::Dir))
                .map(|(path, _)| path.as_str()),
        )
        .collect();
    let path_of = |at: &Index| quote(&tree[at.index(tree.len())].0);
    let mut lines = vec!["exec 2>/dev/null".to_owned()];
    for op in ops {
        lines.push(match op {
            Op::SameSize(at) => {
                let p = path_of(at);
                format!(
                    "if [ -f {p} ] && [ ! -L {p} ]; then n=$(wc -c < {p}); head -c \"$n\" /dev/zero | tr '\\0' Z > {p}; fi"
                )
            }
            Op::Rewrite(at, content) => {
                let p = path_of(at);
                format!("rm -rf -- {p}; printf '%s' {} > {p}", quote(content))
            }
            Op::Delete(at) => format!("rm -rf -- {}", path_of(at)),
            Op::ToDir(at) => {
                let p = path_of(at);
                format!("rm -rf -- {p}; mkdir -- {p} && printf in > {p}/inside")
            }
            Op::ToFile(at) => {
                let p = path_of(at);
                format!("rm -rf -- {p}; printf swapped > {p}")
            }
            Op::ToLink(at) => {
                let p = path_of(at);
                format!("rm -rf -- {p}; ln -s t-link {p}")
            }
            Op::Chmod(at) => {
                let p = path_of(at);
                format!(
                    "if [ -L {p} ]; then :; elif [ -f {p} ]; then chmod 600 {p}; elif [ -d {p} ]; then chmod 700 {p}; fi"
                )
            }
            Op::Create(dir, name, content) => {
                let dir = dirs[dir.index(dirs.len())];
                let name = &names[name % names.len()];
                let (d, p) = if dir.is_empty() {
                    (".".to_owned(), quote(name))
                } else {
                    (quote(dir), quote(&format!("{dir}/{name}")))
                };
                format!(
                    "if [ -d {d} ] && [ ! -L {d} ]; then rm -rf -- {p}; printf '%s' {} > {p}; fi",
                    quote(content)
                )
            }
        });
    }
    lines.push("exit 0".to_owned());
    lines.join("\n")
}

fn build_host(root: &Path, tree: &[(String, Node)]) {
    std::fs::create_dir_all(root).unwrap();
    for (path, node) in tree {
        let at = root.join(path);
        match node {
            Node::Dir => std::fs::create_dir(&at).unwrap(),
            Node::File(content) => std::fs::write(&at, content).unwrap(),
            Node::Link(target) => std::os::unix::fs::symlink(target, &at).unwrap(),
        }
    }
}

fn run_on_host(root: &Path, script: &str) {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success());
}

fn shell(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env: BTreeMap::from([("PATH".to_owned(), "/usr/bin:/bin".to_owned())]),
        cwd: None,
        stdin: None,
        timeout: Some(Duration::from_secs(60)),
    }
}

type Tree = BTreeMap<String, Entry>;

async fn scan(root: &Path) -> Tree {
    scan_tree(root).await.unwrap().entries().clone()
}

/// The rules of sync-back, applied to trees in memory: `base` is the tree at sync-in (both sides), `env` the
/// environment's after the run, `host` the host's just before sync-back.
struct Model<'a> {
    tree: Tree,
    base: &'a Tree,
    conflicts: BTreeSet<String>,
    lost: BTreeSet<String>,
    redirects: Vec<(String, String)>,
    dir_modes: Vec<(String, u32)>,
    not_dirs: BTreeSet<String>,
}

enum Reached {
    Here,
    Missing,
    Blocked(String),
}

fn same_content(current: Option<&Entry>, before: Option<&Entry>) -> bool {
    match (current, before) {
        (None, None) => true,
        (Some(Entry::Dir { .. }), Some(Entry::Dir { .. })) => true,
        (Some(Entry::File { sha256: x, .. }), Some(Entry::File { sha256: y, .. })) => x == y,
        (Some(Entry::Symlink { target: x }), Some(Entry::Symlink { target: y })) => x == y,
        _ => false,
    }
}

impl<'a> Model<'a> {
    fn run(base: &'a Tree, env: &Tree, host: &Tree) -> Self {
        let changed: Vec<(&String, &Entry)> = env
            .iter()
            .filter(|(path, entry)| base.get(*path) != Some(*entry))
            .collect();
        let mut model = Model {
            tree: host.clone(),
            base,
            conflicts: BTreeSet::new(),
            lost: BTreeSet::new(),
            redirects: Vec::new(),
            dir_modes: Vec::new(),
            not_dirs: changed
                .iter()
                .filter(|(_, entry)| !matches!(entry, Entry::Dir { .. }))
                .map(|(path, _)| (*path).clone())
                .collect(),
        };
        for path in base.keys().rev().filter(|path| !env.contains_key(*path)) {
            model.delete(path);
        }
        for (path, entry) in changed {
            model.write(path, entry);
        }
        for (path, mode) in std::mem::take(&mut model.dir_modes).into_iter().rev() {
            if let Some(Entry::Dir { mode: current }) = model.tree.get_mut(&path) {
                *current = mode;
            }
        }
        model
    }

    fn has_children(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.tree
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(key, _)| key.starts_with(&prefix))
    }

    fn reach(&mut self, path: &str, create: bool) -> Reached {
        let segments: Vec<&str> = path.split('/').collect();
        for depth in 1..segments.len() {
            let ancestor = segments[..depth].join("/");
            match self.tree.get(&ancestor) {
                Some(Entry::Dir { .. }) => {}
                Some(_) => return Reached::Blocked(ancestor),
                None if create => {
                    self.tree.insert(ancestor, Entry::Dir { mode: 0o700 });
                }
                None => return Reached::Missing,
            }
        }
        Reached::Here
    }

    fn redirected(&self, path: &str) -> String {
        self.redirects
            .iter()
            .filter_map(|(from, to)| {
                let rest = path.strip_prefix(from.as_str())?.strip_prefix('/')?;
                Some((from.len(), format!("{to}/{rest}")))
            })
            .max_by_key(|(depth, _)| *depth)
            .map_or_else(|| path.to_owned(), |(_, to)| to)
    }

    fn delete(&mut self, path: &str) {
        match self.reach(path, false) {
            Reached::Here => {}
            Reached::Missing => return,
            Reached::Blocked(at) => {
                self.conflicts.insert(at);
                return;
            }
        }
        let Some(current) = self.tree.get(path) else {
            return;
        };
        if !same_content(Some(current), self.base.get(path)) {
            self.conflicts.insert(path.to_owned());
            return;
        }
        if matches!(current, Entry::Dir { .. }) && self.has_children(path) {
            self.conflicts.insert(path.to_owned());
            return;
        }
        self.tree.remove(path);
    }

    fn write(&mut self, path: &str, incoming: &Entry) {
        let target = self.redirected(path);
        let redirected = target != path;
        match self.reach(&target, true) {
            Reached::Here => {}
            Reached::Blocked(at) if !redirected && !self.not_dirs.contains(&at) => {
                self.conflicts.insert(at.clone());
                self.redirects.push((at.clone(), conflict_path(&at)));
                return self.write(path, incoming);
            }
            Reached::Blocked(_) | Reached::Missing => {
                self.lost.insert(path.to_owned());
                return;
            }
        }
        let current = self.tree.get(&target).cloned();
        let before = if redirected {
            None
        } else {
            self.base.get(path)
        };
        let unchanged = same_content(current.as_ref(), before);
        if let Entry::Dir { mode } = incoming {
            match current {
                Some(Entry::Dir { .. }) => {}
                None => {
                    self.tree.insert(target.clone(), Entry::Dir { mode: 0o700 });
                }
                Some(_) if unchanged => {
                    self.tree.insert(target.clone(), Entry::Dir { mode: 0o700 });
                }
                Some(_) => {
                    self.conflicts.insert(path.to_owned());
                    let beside = conflict_path(&target);
                    self.redirects.push((path.to_owned(), beside.clone()));
                    if !matches!(self.reach(&beside, true), Reached::Here) {
                        self.lost.insert(path.to_owned());
                        return;
                    }
                    match self.tree.get(&beside) {
                        None => {
                            self.tree.insert(beside.clone(), Entry::Dir { mode: 0o700 });
                        }
                        Some(Entry::Dir { .. }) => {}
                        Some(_) => {
                            self.lost.insert(path.to_owned());
                            return;
                        }
                    }
                    self.dir_modes.push((beside, *mode));
                    return;
                }
            }
            self.dir_modes.push((target, *mode));
            return;
        }
        let already = match (&current, incoming) {
            (Some(Entry::File { sha256: x, .. }), Entry::File { sha256: y, .. }) => x == y,
            (Some(Entry::Symlink { target: x }), Entry::Symlink { target: y }) => x == y,
            _ => false,
        };
        if already {
            if let (Some(Entry::File { mode, .. }), Entry::File { mode: new, .. }) =
                (self.tree.get_mut(&target), incoming)
            {
                *mode = *new;
            }
            return;
        }
        let free = match current {
            _ if !unchanged => false,
            Some(Entry::Dir { .. }) => {
                if self.has_children(&target) {
                    false
                } else {
                    self.tree.remove(&target);
                    true
                }
            }
            _ => true,
        };
        let destination = if free {
            target
        } else {
            self.conflicts.insert(path.to_owned());
            let beside = conflict_path(&target);
            if !matches!(self.reach(&beside, true), Reached::Here) {
                self.lost.insert(path.to_owned());
                return;
            }
            beside
        };
        if matches!(self.tree.get(&destination), Some(Entry::Dir { .. })) {
            // A rename cannot replace a directory: that entry fails, and is reported.
            self.lost.insert(path.to_owned());
            return;
        }
        self.tree.insert(destination, incoming.clone());
    }
}

/// One driver under test: how to lease an environment with a workspace, and where its tree lives on this host.
struct Lane {
    name: &'static str,
    driver: Arc<dyn EnvironmentDriver>,
    config: DriverConfig,
}

impl Lane {
    async fn check(&self, case: &Case, temp: &Path) -> Result<(), TestCaseError> {
        let host = temp.join(format!("host-{}", uuid::Uuid::new_v4()));
        build_host(&host, &case.tree);
        let base = scan(&host).await;
        let request = lease_request();
        let lease = self.driver.acquire(&self.config, &request).await.unwrap();
        let workspace = self
            .driver
            .realize_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    local_path: Some(host.clone()),
                },
            )
            .await
            .unwrap();
        let env_script = script(&case.tree, &case.env);
        let outcome = self
            .driver
            .execute(
                &lease,
                &workspace,
                shell(&env_script),
                &Collect::default(),
                never(),
            )
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0), "{env_script}");
        run_on_host(&host, &script(&case.tree, &case.host));
        let env = scan(Path::new(&workspace.cwd)).await;
        let before_sync = scan(&host).await;
        let report = self.driver.sync_back(&lease, &workspace).await;
        self.driver.release(&lease, false, None).await.unwrap();
        let report = report.unwrap();
        let after = scan(&host).await;
        let model = Model::run(&base, &env, &before_sync);
        std::fs::remove_dir_all(&host).unwrap();

        let lost: BTreeSet<String> = lost_entries(&report)
            .iter()
            .map(|entry| entry.path.clone())
            .collect();
        prop_assert_eq!(
            &lost,
            &model.lost,
            "{}: lost entries; report {:?}",
            self.name,
            report
        );
        let conflicts: BTreeSet<String> = report.conflicts.iter().cloned().collect();
        prop_assert_eq!(
            &conflicts,
            &model.conflicts,
            "{}: conflicts; report {:?}",
            self.name,
            report
        );
        let differences: Vec<String> = after
            .keys()
            .chain(model.tree.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|path| after.get(*path) != model.tree.get(*path))
            .map(|path| {
                format!(
                    "{path}: host {:?}, rules {:?}",
                    after.get(path),
                    model.tree.get(path)
                )
            })
            .collect();
        prop_assert!(
            differences.is_empty(),
            "{}: the host tree differs from the rules: {differences:#?}\nreport {report:?}",
            self.name
        );
        Ok(())
    }
}

fn check_all(lane: &Lane, runtime: &tokio::runtime::Runtime) {
    let temp = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        // A shrink step is a whole lease, sync-in, run and sync-back: few are worth it.
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| {
        runtime.block_on(lane.check(&case, temp.path()))
    });
    if let Err(failure) = result {
        panic!("{}: {failure}", lane.name);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn fake_lane(root: &Path) -> Lane {
    let mut providers = ProviderRegistry::new();
    providers
        .register(Arc::new(
            FakeProvider::builder()
                .root(root.join("sandboxes"))
                .build()
                .unwrap(),
        ))
        .unwrap();
    let drivers = DriverRegistry::new(
        LocalDriver::new(root.join("local"), Containment::disabled_for_tests()),
        Arc::new(providers),
    );
    let config = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake"}),
        drivers.providers(),
    )
    .unwrap();
    Lane {
        name: "fake",
        driver: drivers.get(Driver::Sandbox),
        config,
    }
}

fn ssh_lane(sshd: &TestSshd, root: &Path) -> Lane {
    let drivers = DriverRegistry::new(
        LocalDriver::new(root.join("local"), Containment::disabled_for_tests()),
        Arc::new(ProviderRegistry::new()),
    );
    let config = DriverConfig::parse(Driver::Ssh, &sshd.config(), drivers.providers()).unwrap();
    Lane {
        name: "ssh",
        driver: drivers.get(Driver::Ssh),
        config,
    }
}

/// The fake provider as a plugin process, ready; the host must outlive the lane.
async fn plugin_lane(root: &Path) -> (PluginHost, Lane) {
    let dir = fake_plugin_dir(
        &root.join("plugins"),
        "berth.sync-props",
        "fake-plugin",
        &[
            "--root",
            &root.join("plugin-sandboxes").display().to_string(),
            "--uncontained",
        ],
    );
    let settings = HostSettings {
        state_root: root.join("plugin-state"),
        restart: RestartPolicy::default(),
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
        host_version: env!("CARGO_PKG_VERSION").to_owned(),
        deadlines: Deadlines::default(),
    };
    let host = PluginHost::start(&[dir], &["fake".to_owned()], &settings);
    assert!(host.problems().is_empty(), "{:?}", host.problems());
    for plugin in host.plugins() {
        let state = plugin.settle(Duration::from_secs(20)).await;
        assert!(
            matches!(state, PluginState::Ready(_)),
            "{:?}",
            state.status()
        );
    }
    let mut providers = ProviderRegistry::new();
    for provider in host.sandbox_providers() {
        let provider = provider.unwrap();
        let plugin_id = provider.plugin().id().to_owned();
        providers.register_plugin(provider, &plugin_id).unwrap();
    }
    let drivers = DriverRegistry::new(
        LocalDriver::new(root.join("local"), Containment::disabled_for_tests()),
        Arc::new(providers),
    );
    let config = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake-plugin"}),
        drivers.providers(),
    )
    .unwrap();
    let lane = Lane {
        name: "plugin",
        driver: drivers.get(Driver::Sandbox),
        config,
    };
    (host, lane)
}

#[test]
fn sync_back_follows_its_rules_on_the_fake_provider() {
    let temp = tempfile::tempdir().unwrap();
    check_all(&fake_lane(temp.path()), &runtime());
}

#[test]
fn sync_back_follows_its_rules_over_ssh() {
    let sshd = TestSshd::start();
    let temp = tempfile::tempdir().unwrap();
    check_all(&ssh_lane(&sshd, temp.path()), &runtime());
}

#[test]
fn sync_back_follows_its_rules_through_a_plugin() {
    let temp = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let (host, lane) = runtime.block_on(plugin_lane(temp.path()));
    check_all(&lane, &runtime);
    runtime.block_on(host.shutdown(Duration::from_secs(5)));
}

// === Regressions: what issue #13 found ===

/// Leases an environment on `lane` with `host` as its workspace, runs `script` there, and syncs back.
async fn run_and_sync(lane: &Lane, host: &Path, script: &str) -> (SyncReport, Value) {
    let request = lease_request();
    let lease: LeaseHandle = lane.driver.acquire(&lane.config, &request).await.unwrap();
    let workspace: RealizedWorkspace = lane
        .driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(host.to_path_buf()),
            },
        )
        .await
        .unwrap();
    let sink = Collect::default();
    let outcome = lane
        .driver
        .execute(&lease, &workspace, shell(script), &sink, never())
        .await
        .unwrap();
    let output = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    assert_eq!(outcome.exit_code, Some(0), "{}: {output}", lane.name);
    let report = lane.driver.sync_back(&lease, &workspace).await;
    lane.driver.release(&lease, false, None).await.unwrap();
    (report.unwrap(), json!({"output": output}))
}

/// The swaps and long names every driver must bring back, and what the host must hold afterwards.
async fn swaps_and_long_names(lane: &Lane, temp: &Path) {
    let long = "N".repeat(250);
    let host = temp.join(format!("swaps-{}", lane.name));
    std::fs::create_dir_all(host.join("dir-to-file")).unwrap();
    std::fs::write(host.join("dir-to-file/inner"), "x").unwrap();
    std::fs::create_dir_all(host.join("dir-to-link")).unwrap();
    std::fs::write(host.join("file-to-dir"), "x").unwrap();
    std::os::unix::fs::symlink("somewhere", host.join("link-to-dir")).unwrap();
    std::fs::write(host.join(&long), "old").unwrap();
    let script = format!(
        "rm -rf dir-to-file && echo now-a-file > dir-to-file && \
         rm -rf dir-to-link && ln -s elsewhere dir-to-link && \
         rm file-to-dir && mkdir file-to-dir && echo inside > file-to-dir/f && \
         rm link-to-dir && mkdir link-to-dir && echo inside > link-to-dir/f && \
         echo new > {long} && echo made > {made} && mkfifo fifo",
        long = quote(&long),
        made = quote(&"O".repeat(255)),
    );
    let (report, output) = run_and_sync(lane, &host, &script).await;
    assert!(
        lost_entries(&report).is_empty(),
        "{}: {report:?} {output}",
        lane.name
    );
    assert!(report.conflicts.is_empty(), "{}: {report:?}", lane.name);
    // A FIFO is no workspace content: reported, not a loss, and nothing of it reaches the host.
    let skipped: Vec<(&str, &str)> = report
        .skipped
        .iter()
        .map(|entry| (entry.path.as_str(), entry.reason.as_str()))
        .collect();
    assert_eq!(skipped, [("fifo", "special_file")], "{}", lane.name);
    assert!(std::fs::symlink_metadata(host.join("fifo")).is_err());
    let read = |path: &str| std::fs::read_to_string(host.join(path)).unwrap();
    assert_eq!(read("dir-to-file"), "now-a-file\n", "{}", lane.name);
    assert_eq!(
        std::fs::read_link(host.join("dir-to-link")).unwrap(),
        Path::new("elsewhere"),
        "{}",
        lane.name
    );
    assert_eq!(read("file-to-dir/f"), "inside\n", "{}", lane.name);
    assert!(
        std::fs::symlink_metadata(host.join("link-to-dir"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(read("link-to-dir/f"), "inside\n", "{}", lane.name);
    assert_eq!(read(&long), "new\n", "{}", lane.name);
    assert_eq!(read(&"O".repeat(255)), "made\n", "{}", lane.name);
    // A long name changed on both sides gets its conflict copy under a name that fits.
    std::fs::write(host.join(&long), "host").unwrap();
    let script = format!("echo env > {}", quote(&long));
    let request = lease_request();
    let lease = lane.driver.acquire(&lane.config, &request).await.unwrap();
    let workspace = lane
        .driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(host.clone()),
            },
        )
        .await
        .unwrap();
    lane.driver
        .execute(
            &lease,
            &workspace,
            shell(&script),
            &Collect::default(),
            never(),
        )
        .await
        .unwrap();
    std::fs::write(host.join(&long), "host, meanwhile").unwrap();
    let report = lane.driver.sync_back(&lease, &workspace).await.unwrap();
    lane.driver.release(&lease, false, None).await.unwrap();
    assert_eq!(
        report.conflicts,
        std::slice::from_ref(&long),
        "{}: {report:?}",
        lane.name
    );
    assert!(
        lost_entries(&report).is_empty(),
        "{}: {report:?}",
        lane.name
    );
    assert_eq!(read(&long), "host, meanwhile");
    assert_eq!(read(&conflict_path(&long)), "env\n", "{}", lane.name);
    assert_eq!(conflict_path(&long).len(), 255);
}

#[tokio::test]
async fn swaps_and_long_names_come_back_on_the_fake_provider() {
    let temp = tempfile::tempdir().unwrap();
    swaps_and_long_names(&fake_lane(temp.path()), temp.path()).await;
}

#[tokio::test]
async fn swaps_and_long_names_come_back_over_ssh() {
    let sshd = TestSshd::start();
    let temp = tempfile::tempdir().unwrap();
    swaps_and_long_names(&ssh_lane(&sshd, temp.path()), temp.path()).await;
}

#[tokio::test]
async fn swaps_and_long_names_come_back_through_a_plugin() {
    let temp = tempfile::tempdir().unwrap();
    let (host, lane) = plugin_lane(temp.path()).await;
    swaps_and_long_names(&lane, temp.path()).await;
    host.shutdown(Duration::from_secs(5)).await;
}

/// A shell loop that walks (or makes) `depth` directories of 200-byte names one `cd -P` at a time (physical: no
/// system call ever sees the whole path), then runs `then` at the bottom.
fn descend(depth: usize, make: bool, then: &str) -> String {
    let name = "P".repeat(200);
    let mkdir = if make {
        format!("mkdir {name} && ")
    } else {
        String::new()
    };
    format!(
        "i=0; while [ $i -lt {depth} ]; do {mkdir}cd -P {name} || exit 1; i=$((i+1)); done; {then}"
    )
}

#[tokio::test]
async fn paths_past_path_max_come_back_on_the_fake_provider() {
    let temp = tempfile::tempdir().unwrap();
    let lane = fake_lane(temp.path());
    let host = temp.path().join("deep");
    std::fs::create_dir(&host).unwrap();
    // 30 levels of 201 bytes: past PATH_MAX (4096) from the first half on.
    run_on_host(&host, &descend(30, true, "echo host > old"));
    let script = descend(
        30,
        false,
        "echo changed > old && echo new > new && mkdir sub && echo in > sub/f",
    );
    let (report, output) = run_and_sync(&lane, &host, &script).await;
    assert!(lost_entries(&report).is_empty(), "{report:?} {output}");
    assert_eq!(report.files_written, 3, "{report:?}");
    let tree = scan(&host).await;
    let bottom = vec!["P".repeat(200); 30].join("/");
    let file = |name: &str| match tree.get(&format!("{bottom}/{name}")) {
        Some(Entry::File { size, .. }) => *size,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(file("old"), "changed\n".len() as u64);
    assert_eq!(file("new"), "new\n".len() as u64);
    assert_eq!(file("sub/f"), "in\n".len() as u64);
    assert!(bottom.len() > 4096);
}

#[tokio::test]
async fn a_same_size_rewrite_in_the_second_of_sync_in_comes_back_over_ssh() {
    let sshd = TestSshd::start();
    let temp = tempfile::tempdir().unwrap();
    let lane = ssh_lane(&sshd, temp.path());
    // Written on the host just now, rewritten in the environment at once with as many bytes: its size and its
    // mtime's second may well be what sync-in left. Several tries, as the finding missed 1 in 3.
    for attempt in 0..5 {
        let host = temp.path().join(format!("same-size-{attempt}"));
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("f.txt"), "aaaa").unwrap();
        let (report, output) = run_and_sync(&lane, &host, "printf bbbb > f.txt").await;
        assert!(lost_entries(&report).is_empty(), "{report:?} {output}");
        assert_eq!(
            std::fs::read_to_string(host.join("f.txt")).unwrap(),
            "bbbb",
            "attempt {attempt}: {report:?}"
        );
    }
    // And a file the environment did not touch, written on the host within the same second, is not mistaken for
    // a change: nothing comes back.
    let host = temp.path().join("untouched");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("f.txt"), "aaaa").unwrap();
    let (report, _) = run_and_sync(&lane, &host, "true").await;
    assert_eq!(report, SyncReport::default());
}

#[test]
fn the_model_reads_the_rules_as_the_module_states_them() {
    // A conflict keeps the host's version and puts the environment's beside it; an untouched path keeps the host's
    // change; a directory the host added to is not deleted.
    let file = |content: &str| Entry::File {
        mode: 0o644,
        size: content.len() as u64,
        sha256: content.to_owned(),
    };
    let base: Tree = [
        ("a".to_owned(), file("1")),
        ("b".to_owned(), file("1")),
        ("d".to_owned(), Entry::Dir { mode: 0o755 }),
    ]
    .into();
    let env: Tree = [("a".to_owned(), file("env")), ("b".to_owned(), file("1"))].into();
    let host: Tree = [
        ("a".to_owned(), file("host")),
        ("b".to_owned(), file("host")),
        ("d".to_owned(), Entry::Dir { mode: 0o755 }),
        ("d/new".to_owned(), file("host")),
    ]
    .into();
    let model = Model::run(&base, &env, &host);
    assert_eq!(model.tree["a"], file("host"));
    assert_eq!(model.tree["a.berth-conflict"], file("env"));
    assert_eq!(model.tree["b"], file("host"));
    assert!(model.tree.contains_key("d/new"));
    assert_eq!(
        model.conflicts,
        ["a".to_owned(), "d".to_owned()].into_iter().collect()
    );
    assert!(model.lost.is_empty());
}

#[tokio::test]
async fn a_same_size_host_edit_in_the_second_of_the_last_sync_reaches_a_persistent_remote() {
    let sshd = TestSshd::start();
    let temp = tempfile::tempdir().unwrap();
    let mut config = sshd.config();
    config["workspaceMode"] = json!("persistent");
    let drivers = DriverRegistry::new(
        LocalDriver::new(temp.path().join("local"), Containment::disabled_for_tests()),
        Arc::new(ProviderRegistry::new()),
    );
    let config = DriverConfig::parse(Driver::Ssh, &config, drivers.providers()).unwrap();
    let driver = drivers.get(Driver::Ssh);
    let first = lease_request();
    let host = temp.path().join("persistent");
    std::fs::create_dir(&host).unwrap();
    for attempt in 0..3 {
        let content = if attempt % 2 == 0 { "aaaa" } else { "bbbb" };
        // Same size as what the remote holds, written right after the last sync: its mtime's second may match.
        std::fs::write(host.join("f.txt"), content).unwrap();
        std::fs::write(host.join(format!("other-{attempt}")), "x").unwrap();
        let request = berth_core::driver::LeaseRequest {
            run_id: berth_core::ids::RunId::new(),
            ..first.clone()
        };
        let lease = driver.acquire(&config, &request).await.unwrap();
        let workspace = driver
            .realize_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    local_path: Some(host.clone()),
                },
            )
            .await
            .unwrap();
        if attempt > 0 {
            // Only what changed travels: the file just written and the new one, not the one from the first try.
            assert_eq!(workspace.metadata["filesSent"], 2, "attempt {attempt}");
        }
        let sink = Collect::default();
        driver
            .execute(&lease, &workspace, shell("cat f.txt"), &sink, never())
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&sink.0.lock().unwrap()),
            content,
            "attempt {attempt}: the command saw a stale file"
        );
        let report = driver.sync_back(&lease, &workspace).await.unwrap();
        driver.release(&lease, false, None).await.unwrap();
        assert_eq!(report, SyncReport::default(), "attempt {attempt}");
        assert_eq!(
            std::fs::read_to_string(host.join("f.txt")).unwrap(),
            content
        );
    }
}

/// Files, a directory and a symlink the command made deeper than PATH_MAX (with a name that looks like a tar option)
/// all come back: the remote's GNU tar reaches their directory in steps, as no system call can take the whole path.
async fn deep_remote_paths_come_back(lane: &Lane, temp: &Path) {
    let host = temp.join(format!("deep-remote-{}", lane.name));
    std::fs::create_dir(&host).unwrap();
    let script = format!(
        "echo top > top && ({})",
        descend(
            30,
            true,
            "echo deep > f && printf x > --directory=.. && mkdir sub && echo in > sub/g && ln -s f link"
        )
    );
    let (report, output) = run_and_sync(lane, &host, &script).await;
    assert!(
        lost_entries(&report).is_empty(),
        "{}: {report:?} {output}",
        lane.name
    );
    assert_eq!(std::fs::read_to_string(host.join("top")).unwrap(), "top\n");
    let tree = scan(&host).await;
    let bottom = vec!["P".repeat(200); 30].join("/");
    let size = |name: &str| match tree.get(&format!("{bottom}/{name}")) {
        Some(Entry::File { size, .. }) => *size,
        other => panic!("{}: {name}: {other:?}", lane.name),
    };
    assert_eq!(size("f"), "deep\n".len() as u64);
    assert_eq!(size("--directory=.."), 1);
    assert_eq!(size("sub/g"), "in\n".len() as u64);
    assert!(
        matches!(tree.get(&format!("{bottom}/link")), Some(Entry::Symlink { target }) if target == "f"),
        "{}: {:?}",
        lane.name,
        tree.get(&format!("{bottom}/link"))
    );
    assert_eq!(report.files_written, 5, "{}: {report:?}", lane.name);
}

#[tokio::test]
async fn a_remote_path_past_path_max_comes_back_over_ssh() {
    let sshd = TestSshd::start();
    let temp = tempfile::tempdir().unwrap();
    deep_remote_paths_come_back(&ssh_lane(&sshd, temp.path()), temp.path()).await;
}

#[tokio::test]
async fn a_remote_path_past_path_max_comes_back_through_a_plugin() {
    let temp = tempfile::tempdir().unwrap();
    let (host, lane) = plugin_lane(temp.path()).await;
    deep_remote_paths_come_back(&lane, temp.path()).await;
    host.shutdown(Duration::from_secs(5)).await;
}

/// What the fake provider's test above checks, where the workspace travels through the remote's tar: a host tree
/// deeper than PATH_MAX goes in (sync-in reads it from descriptors and places it on the remote in steps), the command
/// changes it there, and every change comes back.
async fn deep_host_paths_make_the_round_trip(lane: &Lane, temp: &Path) {
    let host = temp.join(format!("deep-{}", lane.name));
    std::fs::create_dir(&host).unwrap();
    run_on_host(
        &host,
        &descend(
            30,
            true,
            "echo host > old && echo same > kept && ln -s old link",
        ),
    );
    let script = descend(
        30,
        false,
        "[ \"$(cat old)\" = host ] && [ \"$(readlink link)\" = old ] && echo changed > old && echo new > new && \
         mkdir sub && echo in > sub/f",
    );
    let (report, output) = run_and_sync(lane, &host, &script).await;
    assert!(
        lost_entries(&report).is_empty(),
        "{}: {report:?} {output}",
        lane.name
    );
    assert_eq!(report.files_written, 3, "{}: {report:?}", lane.name);
    let tree = scan(&host).await;
    let bottom = vec!["P".repeat(200); 30].join("/");
    let file = |name: &str| match tree.get(&format!("{bottom}/{name}")) {
        Some(Entry::File { size, .. }) => *size,
        other => panic!("{}: {name}: {other:?}", lane.name),
    };
    assert_eq!(file("old"), "changed\n".len() as u64);
    assert_eq!(file("new"), "new\n".len() as u64);
    assert_eq!(file("sub/f"), "in\n".len() as u64);
    assert_eq!(file("kept"), "same\n".len() as u64);
    assert!(bottom.len() > 4096);
}

#[tokio::test]
async fn paths_past_path_max_make_the_round_trip_over_ssh() {
    let sshd = TestSshd::start();
    let temp = tempfile::tempdir().unwrap();
    deep_host_paths_make_the_round_trip(&ssh_lane(&sshd, temp.path()), temp.path()).await;
}

#[tokio::test]
async fn paths_past_path_max_make_the_round_trip_through_a_plugin() {
    let temp = tempfile::tempdir().unwrap();
    let (host, lane) = plugin_lane(temp.path()).await;
    deep_host_paths_make_the_round_trip(&lane, temp.path()).await;
    host.shutdown(Duration::from_secs(5)).await;
}
