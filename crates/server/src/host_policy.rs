//! What of this host the companies may use: the directories a run may name as `workspace.localPath`, and which
//! companies get a Local environment.
//!
//! The operator grants **workspace roots** at start-up: `--workspace-root DIR` (every company),
//! `--workspace-root COMPANY_ID=DIR` (one company), or `BERTH_WORKSPACE_ROOTS` with the same entries separated by
//! `:`. A company API key may name a directory inside a root granted to every company or to its own company, and
//! nothing at all without one; the admin token — the operator — may name any existing directory. Nobody may name
//! berth's own directories — the data directory, the SQLite database's directory, the fake provider's sandboxes —
//! anything inside them, or any directory that contains them (a sandbox run would get a copy of the keys or of other
//! runs' sandboxes, and sync-back could overwrite them).
//!
//! Paths are compared component by component ([`Path::starts_with`]) after resolving symlinks, never as strings, and
//! the resolved path is what the run uses from then on.
//!
//! **Local environments** share this host. With [`LocalEnvironments::DefaultCompany`] (the default) only the
//! `default` company — the operator's own — has one; with [`LocalEnvironments::All`] every company does.

use std::io;
use std::path::{Path, PathBuf};

use berth_core::ErrorKind;
use berth_core::ids::CompanyId;

/// Which companies get (and may use) a Local environment: `berth serve --local-environments`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LocalEnvironments {
    /// Only the company named `default`, the operator's own.
    #[default]
    #[value(name = "default")]
    DefaultCompany,
    /// Every company (each gets one when it is created).
    All,
}

impl LocalEnvironments {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalEnvironments::DefaultCompany => "default",
            LocalEnvironments::All => "all",
        }
    }
}

/// Who names a workspace: the operator (admin token) or a company API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkspaceCaller {
    Operator,
    Company(CompanyId),
}

/// A workspace root, as the operator gave it and resolved at start-up.
#[derive(Clone, Debug)]
struct WorkspaceRoot {
    /// `None`: granted to every company.
    company: Option<CompanyId>,
    /// As given (absolute): a request is first compared with this or `canonical`, before anything is resolved.
    given: PathBuf,
    canonical: PathBuf,
}

/// The host rules every run request is checked against. Built once at start-up.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    /// Canonical directories no run may name, be inside, or contain: the data dir, the database's directory, the
    /// fake provider's sandboxes.
    protected: Vec<PathBuf>,
    roots: Vec<WorkspaceRoot>,
    local_environments: LocalEnvironments,
    default_company: CompanyId,
}

/// A start-up problem with `--workspace-root` / `BERTH_WORKSPACE_ROOTS`, or with the directories berth protects.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(
        "--workspace-root `{entry}`: expected an absolute DIR, or COMPANY_ID=DIR with an absolute DIR"
    )]
    Syntax { entry: String },
    #[error(
        "--workspace-root `{entry}`: `{id}` is not a company id (COMPANY_ID=DIR takes the id that GET /api/companies shows)"
    )]
    CompanyId { entry: String, id: String },
    #[error("--workspace-root {dir}: no such directory")]
    Missing { dir: PathBuf },
    #[error("--workspace-root {dir}: not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("--workspace-root {dir}: cannot resolve it")]
    Unresolvable { dir: PathBuf, source: io::Error },
    #[error(
        "--workspace-root {dir} (resolved: {resolved}) overlaps {protected}, which berth keeps to itself: a workspace root may neither be inside it nor contain it"
    )]
    Protected {
        dir: PathBuf,
        resolved: PathBuf,
        protected: PathBuf,
    },
    #[error("cannot resolve berth's own directory {dir}")]
    ProtectedUnresolvable { dir: PathBuf, source: io::Error },
}

/// Why a run request may not use the host as it asked. Checked when the run is accepted, before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum HostPolicyError {
    /// `workspace.localPath` does not resolve to an existing directory.
    #[error("is not a directory on the berth host")]
    NotADirectory,
    #[error(
        "workspace.localPath is one of berth's own directories (its data directory, its database's, its sandboxes'), is inside one, or contains one; no run may use it (not even with the admin token)"
    )]
    ProtectedDirectory,
    #[error(
        "no workspace root is granted to this company, so its runs cannot use workspace.localPath; the operator grants one with `berth serve --workspace-root DIR` (every company) or `--workspace-root COMPANY_ID=DIR` (one company)"
    )]
    NoWorkspaceRoots,
    #[error(
        "workspace.localPath must be a directory inside a workspace root granted to this company, after resolving symlinks: {roots}"
    )]
    OutsideWorkspaceRoots { roots: String },
    #[error(
        "this company has no Local environment: pass environmentId to run in one of its environments, or ask the operator to start berth with `--local-environments all` (Local environments share the berth host, so by default only the `default` company has one)"
    )]
    NoLocalEnvironment,
    #[error(
        "Local environments run on the berth host and belong to the `default` company only; the operator allows them for every company with `berth serve --local-environments all`"
    )]
    LocalEnvironmentNotAllowed,
}

impl HostPolicyError {
    /// The stable error code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            HostPolicyError::NotADirectory => "validation_failed",
            HostPolicyError::ProtectedDirectory
            | HostPolicyError::NoWorkspaceRoots
            | HostPolicyError::OutsideWorkspaceRoots { .. } => "workspace_not_allowed",
            HostPolicyError::NoLocalEnvironment => "no_local_environment",
            HostPolicyError::LocalEnvironmentNotAllowed => "local_environment_not_allowed",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            HostPolicyError::NotADirectory | HostPolicyError::NoLocalEnvironment => {
                ErrorKind::Validation
            }
            HostPolicyError::ProtectedDirectory
            | HostPolicyError::NoWorkspaceRoots
            | HostPolicyError::OutsideWorkspaceRoots { .. }
            | HostPolicyError::LocalEnvironmentNotAllowed => ErrorKind::Forbidden,
        }
    }
}

impl HostPolicy {
    /// Every granted workspace root, resolved: host commands see none of them but their own workspace.
    pub fn workspace_roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|root| root.canonical.as_path())
    }

    /// Resolves every root and the protected directories (one that does not exist yet through its nearest existing
    /// ancestor), and refuses roots that are missing, not directories, or overlap a protected directory. Empty
    /// entries are skipped.
    pub fn new(
        root_entries: &[String],
        protected_dirs: &[&Path],
        local_environments: LocalEnvironments,
        default_company: CompanyId,
    ) -> Result<Self, RootError> {
        let mut protected: Vec<PathBuf> = Vec::new();
        for dir in protected_dirs {
            let canonical = resolve_existing_prefix(dir).map_err(|source| {
                RootError::ProtectedUnresolvable {
                    dir: dir.to_path_buf(),
                    source,
                }
            })?;
            if !protected.contains(&canonical) {
                protected.push(canonical);
            }
        }
        let mut roots: Vec<WorkspaceRoot> = Vec::new();
        for entry in root_entries.iter().map(|entry| entry.trim()) {
            if entry.is_empty() {
                continue;
            }
            let (company, given) = parse_root_entry(entry)?;
            let canonical = resolve_root(&given)?;
            if let Some(overlapped) = protected.iter().find(|dir| overlaps(&canonical, dir)) {
                return Err(RootError::Protected {
                    dir: given,
                    resolved: canonical,
                    protected: overlapped.clone(),
                });
            }
            let duplicate = roots
                .iter()
                .any(|root| root.company == company && root.canonical == canonical);
            if !duplicate {
                roots.push(WorkspaceRoot {
                    company,
                    given,
                    canonical,
                });
            }
        }
        Ok(Self {
            protected,
            roots,
            local_environments,
            default_company,
        })
    }

    /// The companies that were granted a root of their own (start-up warns about unknown ones).
    pub fn companies_with_roots(&self) -> Vec<CompanyId> {
        let mut companies: Vec<CompanyId> =
            self.roots.iter().filter_map(|root| root.company).collect();
        companies.sort();
        companies.dedup();
        companies
    }

    /// The resolved roots, for the start-up log: `(company or every company, directory)`.
    pub fn root_summary(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|root| match root.company {
                Some(company) => format!("{company}={}", root.canonical.display()),
                None => root.canonical.display().to_string(),
            })
            .collect()
    }

    pub fn local_environments(&self) -> LocalEnvironments {
        self.local_environments
    }

    /// Whether `company` has (and may run in) a Local environment.
    pub fn may_use_local(&self, company: CompanyId) -> bool {
        self.local_environments == LocalEnvironments::All || company == self.default_company
    }

    /// [`may_use_local`](Self::may_use_local) as an error for the API.
    pub fn check_local(&self, company: CompanyId) -> Result<(), HostPolicyError> {
        if self.may_use_local(company) {
            Ok(())
        } else {
            Err(HostPolicyError::LocalEnvironmentNotAllowed)
        }
    }

    /// Checks a run's `workspace.localPath` (absolute, without `..`: the request validation saw to that) for
    /// `caller`, and returns the resolved directory the run must use from here on.
    ///
    /// A company key is compared with its roots before anything is resolved, so a path outside them is refused the
    /// same way whether it exists or not (no probing the host's tree); then again after resolving symlinks, which
    /// is the check that counts.
    pub async fn confine_workspace(
        &self,
        caller: WorkspaceCaller,
        requested: &Path,
    ) -> Result<PathBuf, HostPolicyError> {
        let roots: Vec<&WorkspaceRoot> = match caller {
            WorkspaceCaller::Operator => Vec::new(),
            WorkspaceCaller::Company(company) => {
                let roots: Vec<&WorkspaceRoot> = self
                    .roots
                    .iter()
                    .filter(|root| root.company.is_none_or(|owner| owner == company))
                    .collect();
                if roots.is_empty() {
                    return Err(HostPolicyError::NoWorkspaceRoots);
                }
                let lexically_inside = roots.iter().any(|root| {
                    requested.starts_with(&root.given) || requested.starts_with(&root.canonical)
                });
                if !lexically_inside {
                    return Err(outside(&roots));
                }
                roots
            }
        };
        let resolved = tokio::fs::canonicalize(requested)
            .await
            .map_err(|_| HostPolicyError::NotADirectory)?;
        let is_dir = tokio::fs::metadata(&resolved)
            .await
            .is_ok_and(|metadata| metadata.is_dir());
        if !is_dir {
            return Err(HostPolicyError::NotADirectory);
        }
        if self.protected.iter().any(|dir| overlaps(&resolved, dir)) {
            return Err(HostPolicyError::ProtectedDirectory);
        }
        if let WorkspaceCaller::Company(_) = caller
            && !roots
                .iter()
                .any(|root| resolved.starts_with(&root.canonical))
        {
            return Err(outside(&roots));
        }
        Ok(resolved)
    }
}

fn outside(roots: &[&WorkspaceRoot]) -> HostPolicyError {
    let roots = roots
        .iter()
        .map(|root| root.canonical.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    HostPolicyError::OutsideWorkspaceRoots { roots }
}

/// Whether one of two canonical paths is the other or inside it, component by component.
fn overlaps(path: &Path, protected: &Path) -> bool {
    path.starts_with(protected) || protected.starts_with(path)
}

/// `DIR` or `COMPANY_ID=DIR`; DIR must be absolute. A DIR starting with `/` is taken whole, `=` and all.
fn parse_root_entry(entry: &str) -> Result<(Option<CompanyId>, PathBuf), RootError> {
    if entry.starts_with('/') {
        return Ok((None, PathBuf::from(entry)));
    }
    let Some((id, dir)) = entry.split_once('=') else {
        return Err(RootError::Syntax {
            entry: entry.to_owned(),
        });
    };
    let company = id
        .trim()
        .parse::<CompanyId>()
        .map_err(|_| RootError::CompanyId {
            entry: entry.to_owned(),
            id: id.trim().to_owned(),
        })?;
    let dir = dir.trim();
    if !dir.starts_with('/') {
        return Err(RootError::Syntax {
            entry: entry.to_owned(),
        });
    }
    Ok((Some(company), PathBuf::from(dir)))
}

/// `dir` with symlinks resolved, when it may not exist yet (the fake provider makes its root on first use): its
/// longest existing ancestor resolved, and the rest appended as given.
fn resolve_existing_prefix(dir: &Path) -> io::Result<PathBuf> {
    let absolute = std::path::absolute(dir)?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut resolved) => {
                resolved.extend(rest.iter().rev());
                return Ok(resolved);
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(error);
                };
                rest.push(name);
                existing = parent;
            }
            Err(error) => return Err(error),
        }
    }
}

fn resolve_root(dir: &Path) -> Result<PathBuf, RootError> {
    let canonical = std::fs::canonicalize(dir).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => RootError::Missing {
            dir: dir.to_path_buf(),
        },
        _ => RootError::Unresolvable {
            dir: dir.to_path_buf(),
            source,
        },
    })?;
    let metadata = std::fs::metadata(&canonical).map_err(|source| RootError::Unresolvable {
        dir: dir.to_path_buf(),
        source,
    })?;
    if !metadata.is_dir() {
        return Err(RootError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(roots: &[String], protected: &Path) -> HostPolicy {
        HostPolicy::new(
            roots,
            &[protected],
            LocalEnvironments::DefaultCompany,
            CompanyId::new(),
        )
        .expect("policy")
    }

    #[test]
    fn overlap_compares_components_not_strings() {
        assert!(overlaps(Path::new("/srv/data"), Path::new("/srv/data")));
        assert!(overlaps(Path::new("/srv/data/x"), Path::new("/srv/data")));
        assert!(overlaps(Path::new("/srv"), Path::new("/srv/data")));
        assert!(!overlaps(Path::new("/srv/data2"), Path::new("/srv/data")));
        assert!(!overlaps(Path::new("/srv/dat"), Path::new("/srv/data")));
    }

    #[test]
    fn protected_dirs_may_not_exist_yet() {
        let temp = tempfile::tempdir().expect("temp dir");
        let base = std::fs::canonicalize(temp.path()).expect("canonical");
        std::os::unix::fs::symlink(&base, base.join("link")).expect("symlink");
        assert_eq!(
            resolve_existing_prefix(&base.join("link/not/yet")).expect("resolved"),
            base.join("not/yet")
        );
    }

    #[test]
    fn root_entries_parse() {
        let id = CompanyId::new();
        assert_eq!(
            parse_root_entry("/srv/a=b").expect("dir"),
            (None, PathBuf::from("/srv/a=b"))
        );
        assert_eq!(
            parse_root_entry(&format!("{id}=/srv/x")).expect("company dir"),
            (Some(id), PathBuf::from("/srv/x"))
        );
        assert!(matches!(
            parse_root_entry("acme=/srv/x"),
            Err(RootError::CompanyId { .. })
        ));
        assert!(matches!(
            parse_root_entry("relative"),
            Err(RootError::Syntax { .. })
        ));
        assert!(matches!(
            parse_root_entry(&format!("{id}=relative")),
            Err(RootError::Syntax { .. })
        ));
    }

    #[test]
    fn roots_must_exist_be_directories_and_stay_clear_of_the_data_dir() {
        let temp = tempfile::tempdir().expect("temp dir");
        let data = temp.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        let file = temp.path().join("file");
        std::fs::write(&file, b"x").expect("file");
        let new = |root: &Path| {
            HostPolicy::new(
                &[root.display().to_string()],
                &[&data],
                LocalEnvironments::DefaultCompany,
                CompanyId::new(),
            )
        };
        assert!(matches!(
            new(&temp.path().join("missing")),
            Err(RootError::Missing { .. })
        ));
        assert!(matches!(new(&file), Err(RootError::NotADirectory { .. })));
        assert!(matches!(new(&data), Err(RootError::Protected { .. })));
        assert!(matches!(new(temp.path()), Err(RootError::Protected { .. })));
        let inside = data.join("workspaces");
        std::fs::create_dir(&inside).expect("inside");
        assert!(matches!(new(&inside), Err(RootError::Protected { .. })));
    }

    #[tokio::test]
    async fn companies_stay_inside_their_roots_and_nobody_reaches_the_data_dir() {
        let temp = tempfile::tempdir().expect("temp dir");
        let base = std::fs::canonicalize(temp.path()).expect("canonical");
        let data = base.join("data");
        let shared = base.join("shared");
        let theirs = base.join("theirs");
        let outside = base.join("outside");
        for dir in [&data, &shared, &theirs, &outside] {
            std::fs::create_dir(dir).expect("dir");
        }
        std::os::unix::fs::symlink(&outside, shared.join("escape")).expect("symlink");
        std::fs::create_dir(shared.join("inner")).expect("inner");
        let mine = CompanyId::new();
        let other = CompanyId::new();
        let policy = policy(
            &[
                shared.display().to_string(),
                format!("{other}={}", theirs.display()),
            ],
            &data,
        );
        let company = WorkspaceCaller::Company(mine);
        assert_eq!(
            policy
                .confine_workspace(company, &shared.join("inner"))
                .await
                .expect("inside"),
            shared.join("inner")
        );
        for refused in [
            theirs.clone(),
            outside.clone(),
            shared.join("escape"),
            data.clone(),
        ] {
            let error = policy
                .confine_workspace(company, &refused)
                .await
                .expect_err("refused");
            assert_eq!(error.code(), "workspace_not_allowed", "{refused:?}");
        }
        // Missing outside the roots: refused as outside, not reported missing.
        let error = policy
            .confine_workspace(company, &base.join("nope"))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Forbidden);
        let error = policy
            .confine_workspace(company, &shared.join("nope"))
            .await
            .expect_err("missing");
        assert_eq!(error.kind(), ErrorKind::Validation);

        let operator = WorkspaceCaller::Operator;
        assert_eq!(
            policy
                .confine_workspace(operator, &shared.join("escape"))
                .await
                .expect("operator"),
            outside
        );
        for refused in [data.clone(), data.join("."), base.clone()] {
            let error = policy
                .confine_workspace(operator, &refused)
                .await
                .expect_err("protected");
            assert_eq!(error.code(), "workspace_not_allowed");
        }
        let no_roots = self::policy(&[], &data);
        assert!(matches!(
            no_roots.confine_workspace(company, &shared).await,
            Err(HostPolicyError::NoWorkspaceRoots)
        ));
    }
}
