//! Where berth keeps its data when `--data-dir` is not given.
//!
//! Its own module because `berth serve` (`cli`), the client subcommands looking for the admin token (`client`) and
//! the SSH lab (`lab`) all default to it, and none of them should import another to find it.

use std::path::PathBuf;

use anyhow::Context;

/// `$XDG_DATA_HOME/berth`, else `~/.local/share/berth`.
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(data_home) = std::env::var_os("XDG_DATA_HOME").filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(data_home).join("berth"));
    }
    let home = std::env::var_os("HOME")
        .filter(|value| !value.is_empty())
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/berth"))
}
