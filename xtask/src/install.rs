//! `cargo xtask install`: the release binary, its shell completions and its man page, where a person who
//! builds from source expects them (under `--prefix`, default /usr/local; `--destdir` stages the tree
//! elsewhere, as packagers do). The completions and the page come from the binary itself
//! (`cnitrace completions SHELL`, `cnitrace man`): they cannot disagree with its options.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What goes where, relative to the prefix: (path, how to make it).
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Binary,
    /// The output of the binary run with these arguments.
    Output(&'static [&'static str]),
    /// A file of the source tree (the causes' guide, which verdicts point to).
    Tree(&'static str),
    /// A relative symbolic link to this path: `kubectl-cnitrace` → `cnitrace`, so that kubectl finds the
    /// plugin on PATH (`kubectl cnitrace follow …`).
    Link(&'static str),
}

pub fn layout() -> Vec<(&'static str, Source, u32)> {
    vec![
        ("bin/cnitrace", Source::Binary, 0o755),
        ("bin/kubectl-cnitrace", Source::Link("cnitrace"), 0o777),
        ("share/bash-completion/completions/cnitrace", Source::Output(&["completions", "bash"]), 0o644),
        ("share/zsh/site-functions/_cnitrace", Source::Output(&["completions", "zsh"]), 0o644),
        ("share/fish/vendor_completions.d/cnitrace.fish", Source::Output(&["completions", "fish"]), 0o644),
        ("share/man/man1/cnitrace.1", Source::Output(&["man"]), 0o644),
        ("share/doc/cnitrace/causes.md", Source::Tree("docs/causes.md"), 0o644),
    ]
}

/// Installs `bin` and what it generates under `destdir` + `prefix`; returns the files written.
pub fn install(bin: &Path, prefix: &Path, destdir: Option<&Path>) -> Result<Vec<PathBuf>> {
    if !prefix.is_absolute() {
        bail!("--prefix must be an absolute path, not {}", prefix.display());
    }
    let root = match destdir {
        Some(d) => d.join(prefix.strip_prefix("/").expect("absolute")),
        None => prefix.to_path_buf(),
    };
    let mut written = Vec::new();
    for (rel, source, mode) in layout() {
        let to = root.join(rel);
        std::fs::create_dir_all(to.parent().expect("a folder")).with_context(|| format!("create {}", to.parent().expect("a folder").display()))?;
        if let Source::Link(target) = source {
            let tmp = to.with_extension("xtask-new");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("link {}", tmp.display()))?;
            std::fs::rename(&tmp, &to).with_context(|| format!("install {}", to.display()))?;
            written.push(to);
            continue;
        }
        let bytes = match source {
            Source::Binary => std::fs::read(bin).with_context(|| format!("read {}", bin.display()))?,
            Source::Tree(file) => {
                let from = crate::workspace_root().join(file);
                std::fs::read(&from).with_context(|| format!("read {}", from.display()))?
            }
            Source::Link(_) => unreachable!("linked above"),
            Source::Output(args) => {
                let out = std::process::Command::new(bin).args(args).output().with_context(|| format!("run {} {}", bin.display(), args.join(" ")))?;
                if !out.status.success() || out.stdout.is_empty() {
                    bail!("{} {} failed: {}", bin.display(), args.join(" "), String::from_utf8_lossy(&out.stderr));
                }
                out.stdout
            }
        };
        // Written beside and renamed: a running cnitrace keeps its old file.
        let tmp = to.with_extension("xtask-new");
        std::fs::write(&tmp, &bytes).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        std::fs::rename(&tmp, &to).with_context(|| format!("install {}", to.display()))?;
        written.push(to);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_land_where_shells_and_man_look() {
        let paths: Vec<&str> = layout().iter().map(|(p, _, _)| *p).collect();
        assert_eq!(
            paths,
            [
                "bin/cnitrace",
                "bin/kubectl-cnitrace",
                "share/bash-completion/completions/cnitrace",
                "share/zsh/site-functions/_cnitrace",
                "share/fish/vendor_completions.d/cnitrace.fish",
                "share/man/man1/cnitrace.1",
                "share/doc/cnitrace/causes.md"
            ]
        );
    }

    /// With a stand-in binary (a shell script answering as cnitrace would), into a staging folder.
    #[test]
    fn install_stages_every_file_under_destdir() {
        let dir = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("cnitrace");
        std::fs::write(&fake, "#!/bin/sh\necho \"generated by $*\"\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let stage = dir.join("stage");
        let written = install(&fake, Path::new("/usr/local"), Some(&stage)).expect("install");
        assert_eq!(written.len(), 7);
        assert_eq!(std::fs::read_link(stage.join("usr/local/bin/kubectl-cnitrace")).unwrap(), Path::new("cnitrace"), "the kubectl plugin");
        assert!(std::fs::read_to_string(stage.join("usr/local/share/doc/cnitrace/causes.md")).unwrap().contains("## `veth-detached`"));
        assert_eq!(std::fs::read_to_string(stage.join("usr/local/share/man/man1/cnitrace.1")).unwrap(), "generated by man\n");
        assert_eq!(std::fs::read_to_string(stage.join("usr/local/share/zsh/site-functions/_cnitrace")).unwrap(), "generated by completions zsh\n");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(stage.join("usr/local/bin/cnitrace")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o755);
        assert!(install(&fake, Path::new("relative"), Some(&stage)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
