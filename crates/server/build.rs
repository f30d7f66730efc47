//! Rebuilds the server when a migration changes.
//!
//! `sqlx::migrate!` embeds the SQL files of `migrations/` at compile time, but cargo does not know the crate depends
//! on them: without this hint an added or edited migration would not reach the binary until something else changed.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
