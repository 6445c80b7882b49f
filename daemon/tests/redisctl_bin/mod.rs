//! The `redisctl` binary for tests that drive the CLI.

use std::{path::PathBuf, process::Command, sync::OnceLock};

/// The `redisctl` binary next to `respwatchd`, built (or brought up to date) once per run:
/// `cargo test -p respwatchd` alone does not build other packages' binaries.
pub fn redisctl_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = PathBuf::from(env!("CARGO_BIN_EXE_respwatchd"));
            let profile_dir = exe.parent().expect("profile dir").to_path_buf();
            let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
            let mut build =
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
            build
                .args(["build", "-q", "-p", "redisctl"])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
            // `cargo test` gives the test its package's CARGO_PKG_*, CARGO_MANIFEST_*, OUT_DIR
            // and so on. Build scripts that watch such variables (ring's) would see them change
            // and rebuild everything above them, here and again in the next plain build.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if (name.starts_with("CARGO_") && name != "CARGO_HOME") || name == "OUT_DIR" {
                    build.env_remove(&*name);
                }
            }
            build.env("CARGO_TARGET_DIR", &target_dir);
            if profile_dir
                .file_name()
                .is_some_and(|name| name == "release")
            {
                build.arg("--release");
            }
            let status = build.status().expect("cargo build -p redisctl");
            assert!(status.success(), "building redisctl failed");
            profile_dir.join("redisctl")
        })
        .clone()
}
